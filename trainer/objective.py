"""The training objective: eps-MSE plus, for binarized students, the configured distillation terms.

``TrainingObjective(spec, diffusion, student, teacher)(net, x0, t, noise, step)`` returns a dict of loss
terms (``loss`` is the weighted total) so every term is logged. It also owns what happens around the
student's forward: the schedule state for ``step`` (progressive binarization, EBB stage, ReSTE's o) and,
for BiDM, the cross-timestep cache drawn from the same student at ``t + delta``.
"""

from __future__ import annotations

import torch
from torch import nn

from .binarize import apply_schedule_, calibrate_, reset_state
from .diffusion import Diffusion
from .distill import Distiller, FeatureTap, ebb_regulariser, feature_sites, lrm_fit, lrm_loss, spd_loss
from .spec import TrainSpec


class TrainingObjective:
    def __init__(self, spec: TrainSpec, diffusion: Diffusion, student: nn.Module, teacher: nn.Module | None):
        self.spec, self.diffusion, self.student, self.teacher = spec, diffusion, student, teacher
        self.dcfg = spec.distill
        self.distiller = Distiller(self.dcfg)
        self.uses_features = teacher is not None and (self.dcfg.lrm_weight > 0 or self.dcfg.spd_weight > 0)
        self.uses_teacher_eps = teacher is not None and self.dcfg.kd_weight > 0
        if self.uses_features:
            sites = feature_sites(student)
            self.s_tap, self.t_tap = FeatureTap(student, sites), FeatureTap(teacher, sites)

    @property
    def binarized(self) -> bool:
        return self.spec.binarize is not None

    def prepare(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> None:
        """Run once at the start of a fresh (not resumed) QAT run, on the first batch: LSQ steps from data,
        LRM projections from the teacher's features. Both are then fixed (and checkpointed)."""
        if not self.binarized:
            return
        x_t = self.diffusion.q_sample(x0, t, noise)
        apply_schedule_(self.student, self.spec.binarize, 0, self.spec.train.steps)
        calibrate_(self.student, x_t, t)
        if self.uses_features and self.dcfg.lrm_weight > 0:
            self.teacher_forward(x_t, t)
            self.distiller.set_projections(lrm_fit(self.t_tap.features, self.dcfg.lrm_k, self.dcfg.lrm_axis))
            self.t_tap.clear()

    @torch.no_grad()
    def teacher_forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The teacher's eps on ``x_t`` (its features land in ``t_tap``), at ``distill.teacher_precision``;
        in bf16 its outputs are handed on in fp32, like everything the losses compare."""
        if self.dcfg.teacher_precision != "bf16":
            return self.teacher(x_t, t)
        with torch.autocast(device_type=x_t.device.type, dtype=torch.bfloat16):
            eps = self.teacher(x_t, t)
        if self.uses_features:
            self.t_tap.features = {k: v.float() for k, v in self.t_tap.features.items()}
        return eps.float()

    def __call__(self, net: nn.Module, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                 step: int) -> dict[str, torch.Tensor]:
        bcfg = self.spec.binarize
        if bcfg is not None:
            apply_schedule_(self.student, bcfg, step, self.spec.train.steps)
            cache = getattr(self.student, "tbs_cache", None)
            if cache is not None:  # BiDM: the cache comes from the same student one sampler stride earlier
                t_prev = (t + bcfg.cache_delta).clamp(max=self.diffusion.num_timesteps - 1)
                cache.record(self.student, self.diffusion.q_sample(x0, t_prev, noise), t_prev)
        out = self.diffusion.training_losses(net, x0, t, noise)
        terms = {"mse": out["mse"]}
        total = out["mse"]
        if self.uses_features or self.uses_teacher_eps:
            eps_teacher = self.teacher_forward(out["x_t"], t)
        if self.uses_teacher_eps:  # output distillation: regress (partly) on the teacher's eps instead of the noise
            kd = self.dcfg.kd_weight
            terms["kd"] = torch.mean((out["eps_pred"] - eps_teacher) ** 2)
            total = (1.0 - kd) * out["mse"] + kd * terms["kd"]
        if self.uses_features:
            s_feats, t_feats = self.s_tap.features, self.t_tap.features
            if self.dcfg.lrm_weight > 0:
                terms["lrm"] = lrm_loss(s_feats, t_feats, self.distiller.projections(), self.dcfg.lrm_axis)
                total = total + self.dcfg.lrm_weight * terms["lrm"]
            if self.dcfg.spd_weight > 0:
                terms["spd"] = spd_loss(s_feats, t_feats, self.dcfg.spd_patches, self.dcfg.spd_variant)
                total = total + self.dcfg.spd_weight * terms["spd"]
            self.s_tap.clear()
            self.t_tap.clear()
        if self.binarized and self.dcfg.ebb_tau > 0:
            reg = ebb_regulariser(self.student, self.dcfg.ebb_reg)
            if reg is not None:
                terms["ebb"] = reg
                total = total + self.dcfg.ebb_tau * reg
        if self.binarized:
            reset_state(self.student)
        terms["loss"] = total
        return terms
