"""Full-precision diffusion training: AdamW, warm-up, clipping, EMA, atomic checkpoints, exact resume, DDP.

Randomness is a pure function of ``(train.seed, step)``: the batch indices, the timesteps and the noise
of step ``s`` are drawn from generators seeded with ``(seed, s)`` for the *global* batch, and each DDP
rank takes its slice. Hence a run resumed from ``state.ckpt`` continues exactly as if never stopped, and
an N-process DDP run computes the same updates as one process with the same global batch.

Run several processes with ``torchrun --nproc_per_node=N -m bdmtool.tools.cli train ...`` (gloo on CPU).
"""

from __future__ import annotations

import copy
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..files import atomic_write
from .binarize import binarize_
from .checkpoint import atomic_save, checkpoint_spec, inference_weights, load_checkpoint, make_checkpoint
from .data import load_images
from .diffusion import Diffusion
from .metrics import MetricsLog, plot_loss_curve
from .quantizers import kernels
from .objective import TrainingObjective
from .runtime import autocast, move_to_cpu, resolve_device, to_layout
from .spec import TrainSpec
from .unet import UNet, count_parameters

STATE_FILE, MODEL_FILE, METRICS_FILE, LOSS_PNG = "state.ckpt", "model.ckpt", "metrics.jsonl", "loss.png"


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@contextmanager
def distributed(device: torch.device = torch.device("cpu")):
    """Initialise torchrun's process group (RANK/WORLD_SIZE) when present, NCCL on CUDA and gloo on CPU;
    single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        try:
            yield DistEnv(dist.get_rank(), dist.get_world_size())
            dist.barrier()  # rank 0 may still be writing checkpoints; tearing gloo down under it aborts a peer
        finally:
            dist.destroy_process_group()
    else:
        yield DistEnv()


def _generator(*keys: int) -> torch.Generator:
    seed = 0
    for k in keys:  # simple, stable mixing of several integers into one 63-bit seed
        seed = (seed * 1_000_003 + int(k) + 0x9E3779B9) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


def batch_indices(n: int, batch: int, step: int, seed: int) -> torch.Tensor:
    """Indices of the global batch at ``step``: consecutive slices of a fresh permutation per epoch."""
    pos = torch.arange(step * batch, (step + 1) * batch)
    epochs, offsets = pos // n, pos % n
    out = torch.empty(batch, dtype=torch.long)
    for e in epochs.unique().tolist():
        perm = torch.randperm(n, generator=_generator(seed, 1, e))
        m = epochs == e
        out[m] = perm[offsets[m]]
    return out


def make_batch(images_u8: torch.Tensor, spec: TrainSpec, step: int, env: DistEnv,
               device: torch.device = torch.device("cpu")):
    """This rank's slice of the global batch at ``step``: (x0 in [-1,1], t, noise), drawn on the CPU (the same
    numbers on every device) and moved to ``device``."""
    tc = spec.train
    idx = batch_indices(len(images_u8), tc.batch_size, step, tc.seed)
    g = _generator(tc.seed, 2, step)
    t = torch.randint(0, spec.diffusion.timesteps, (tc.batch_size,), generator=g)
    x0 = images_u8[idx].permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if spec.data.hflip:
        flip = torch.rand(tc.batch_size, generator=g) < 0.5
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
    noise = torch.randn(x0.shape, generator=g)
    per = tc.batch_size // env.world
    sl = slice(env.rank * per, (env.rank + 1) * per)
    return x0[sl].to(device), t[sl].to(device), noise[sl].to(device)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float, step: int) -> None:
    """EMA with the usual warm-up: effective decay min(decay, (1 + step) / (10 + step))."""
    d = min(decay, (1.0 + step) / (10.0 + step))
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm.detach(), 1.0 - d)
    for be, bm in zip(ema.buffers(), model.buffers()):
        be.copy_(bm)


def lr_at(step: int, spec: TrainSpec) -> float:
    """Linear warm-up over ``warmup_steps``, then constant or a cosine decay to ``lr_final_ratio * lr``."""
    tc = spec.train
    w = tc.warmup_steps
    lr = tc.lr * min(1.0, (step + 1) / w) if w else tc.lr
    if tc.lr_decay == "cosine" and step >= w:
        frac = (step - w) / max(1, tc.steps - 1 - w)
        lr = tc.lr * (tc.lr_final_ratio + (1 - tc.lr_final_ratio) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))
    return lr


class TrainingDiverged(ValueError):
    """The loss or the gradient became NaN/inf; training stopped and kept its last good checkpoint."""


def _non_finite(loss: torch.Tensor, gnorm: torch.Tensor) -> str | None:
    """Which of the step's loss and gradient norm is NaN/inf (None when both are finite; one sync per step)."""
    if bool(torch.isfinite(loss.detach()) & torch.isfinite(gnorm)):
        return None
    if not math.isfinite(float(loss.detach())):
        return f"loss ({float(loss.detach())})"
    if not math.isfinite(float(gnorm)):
        return f"gradient norm ({float(gnorm)})"
    return None


def _last_good(saved: int | None, state_path: Path) -> str:
    if saved is None:
        return "no checkpoint had been written yet"
    return f"{state_path} holds the last good state, step {saved}"


def _check_resume_spec(saved: TrainSpec, spec: TrainSpec, path: Path) -> None:
    """Everything but the step budget and logging cadence must match to resume (the budget too when the
    learning rate decays over it: a cosine schedule stretched mid-run would not be the same run)."""
    def key(s: TrainSpec) -> TrainSpec:
        steps = s.train.steps if s.train.lr_decay != "none" else 1
        return s.replace(train=s.train.replace(steps=steps, log_every=1, ckpt_every=1, threads=0, device="auto"))
    a, b = key(saved), key(spec)
    if a != b:
        diff = [k for k, v in b.to_dict().items() if a.to_dict()[k] != v]
        raise ValueError(f"{path} was written by a run with a different spec (sections {diff}); "
                         "resume with the same settings or choose a new --out directory")


def train(spec: TrainSpec, out_dir: str | os.PathLike, resume: bool = True, progress: bool = True,
          init_weights: dict | None = None) -> Path:
    """Train ``spec`` into ``out_dir`` (``state.ckpt``, ``model.ckpt``, ``metrics.jsonl``, ``loss.png``).

    Resumes from ``out_dir/state.ckpt`` when present and ``resume`` is true. ``init_weights`` starts
    the model from a state dict (ignored when resuming). Returns the path of ``model.ckpt``.
    """
    out = Path(out_dir)
    tc = spec.train
    if tc.threads:
        torch.set_num_threads(tc.threads)
    device = resolve_device(tc.device)
    with distributed(device) as env:
        if tc.batch_size % env.world:
            raise ValueError(f"train.batch_size={tc.batch_size} must be divisible by the {env.world} processes")
        images = torch.from_numpy(load_images(spec.data))
        diffusion = Diffusion(spec.diffusion)
        torch.manual_seed(tc.seed)
        model, teacher = build_student(spec, init_weights)
        ema = build_model(spec)
        ema.load_state_dict(model.state_dict())
        ema.eval().requires_grad_(False)
        for net_ in (model, ema, teacher):
            if net_ is not None:
                to_layout(net_.to(device), tc.memory_format)
        objective = TrainingObjective(spec, diffusion, model, teacher)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=tc.lr,
                                weight_decay=tc.weight_decay)
        start = 0
        state_path = out / STATE_FILE
        if resume and state_path.exists():
            ckpt = load_checkpoint(state_path)
            _check_resume_spec(checkpoint_spec(ckpt), spec, state_path)
            model.load_state_dict(ckpt["model"])
            ema.load_state_dict(ckpt["ema"])
            opt.load_state_dict(ckpt["optimizer"])
            torch.set_rng_state(ckpt["rng"]["torch"])
            if ckpt.get("distill"):
                objective.distiller.load(ckpt["distill"])
                objective.distiller.to(device)
            start = ckpt["step"]
        else:
            objective.prepare(*(to_layout(v, tc.memory_format) for v in make_batch(images, spec, 0, env, device)))
        if env.is_main:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write(out / "spec.json", spec.to_json())
        log = MetricsLog(out / METRICS_FILE, resume_step=start) if env.is_main else None
        unused = spec.binarize is not None and spec.binarize.may_leave_parameters_unused
        net = (torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=unused,
                                                         device_ids=[device] if device.type == "cuda" else None)
               if env.world > 1 else model)
        kind = "fp" if spec.binarize is None else "binary"

        def save(step: int) -> None:
            if not env.is_main:
                return
            rng = {"torch": torch.get_rng_state(), "seed": torch.tensor(tc.seed)}
            distill = objective.distiller.state() if objective.distiller.has_projections() else None
            weights, ema_weights = move_to_cpu(model.state_dict()), move_to_cpu(ema.state_dict())
            atomic_save(make_checkpoint(spec, step, weights, ema_weights, move_to_cpu(opt.state_dict()), rng,
                                        kind=kind, distill=move_to_cpu(distill)), state_path)
            atomic_save(make_checkpoint(spec, step, ema_weights, kind=kind), out / MODEL_FILE)
            plot_loss_curve(out / METRICS_FILE, out / LOSS_PNG)

        bar = tqdm(range(start, tc.steps), initial=start, total=tc.steps, disable=not (progress and env.is_main),
                   desc=f"train {count_parameters(model) / 1e6:.2f}M params", dynamic_ncols=True)
        model.train()
        saved = start if state_path.exists() else None
        t_last = time.perf_counter()
        for step in bar:
            x0, t, noise = (to_layout(v, tc.memory_format) for v in make_batch(images, spec, step, env, device))
            torch.manual_seed(_generator(tc.seed, 3, step, env.rank).initial_seed())  # dropout
            for group in opt.param_groups:
                group["lr"] = lr_at(step, spec)
            with autocast(tc.precision, device), kernels(tc.kernels):  # the backward follows the forward's kernels
                terms = objective(net, x0, t, noise, step)
            loss = terms["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(opt.param_groups[0]["params"],
                                                   tc.grad_clip if tc.grad_clip else float("inf"))
            bad = _non_finite(loss, gnorm)
            if bad:  # before the update: the weights in memory and on disk are the last good ones
                raise TrainingDiverged(
                    f"training diverged at step {step + 1}: non-finite {bad}; stopped before updating the weights"
                    f" ({_last_good(saved, state_path)}). Lower train.lr (now {tc.lr:g}) or raise train.warmup_steps"
                    " and resume with the same command")
            opt.step()
            ema_update(ema, model, tc.ema_decay, step)
            done = step + 1
            if done % tc.log_every == 0 or done == tc.steps:
                names = sorted(terms)
                values = torch.stack([terms[k].detach().float() for k in names])
                if env.world > 1:
                    dist.all_reduce(values)
                    values /= env.world
                logged = {("loss" if k == "loss" else f"loss_{k}"): float(v) for k, v in zip(names, values)}
                now = time.perf_counter()
                if log is not None:
                    log.log({"step": done, **logged, "grad_norm": float(gnorm), "lr": lr_at(step, spec),
                             "sec_per_step": (now - t_last) / tc.log_every})
                t_last = now
                bar.set_postfix(loss=f"{logged['loss']:.4f}")
            if done % tc.ckpt_every == 0 or done == tc.steps:
                save(done)
                saved = done
        if start >= tc.steps:  # nothing to do: make sure the inference file exists
            save(start)
    return out / MODEL_FILE


def build_model(spec: TrainSpec) -> torch.nn.Module:
    """The network a spec trains: the U-Net, binarized by ``spec.binarize`` when set (random weights)."""
    model = UNet(spec.unet)
    if spec.binarize is not None:
        binarize_(model, spec.binarize, timesteps=spec.diffusion.timesteps)
    return model


def build_student(spec: TrainSpec, init_weights: dict | None = None):
    """(model, teacher): an FP model (teacher None), or a binarized student made from the FP teacher's
    weights, with the teacher frozen and kept as a separate copy for distillation."""
    if spec.binarize is None:
        model = UNet(spec.unet)
        if init_weights is None and spec.init:
            init, ispec, _ = load_model(spec.init)
            if ispec.binarize is not None or ispec.unet != spec.unet:
                raise ValueError(f"--init {spec.init} must be a full-precision checkpoint of the same U-Net")
            init_weights = init.state_dict()
        if init_weights is not None:
            model.load_state_dict(init_weights)
        return model, None
    teacher, tspec, _ = load_model(spec.teacher)
    if tspec.binarize is not None:
        raise ValueError(f"--teacher {spec.teacher} is itself binarized; the teacher must be a full-precision model")
    if tspec.unet != spec.unet:
        raise ValueError(f"the student's U-Net config differs from the teacher's ({spec.teacher}); "
                         "QAT keeps the teacher's architecture (drop --preset/--set unet.* overrides)")
    student = copy.deepcopy(teacher).train().requires_grad_(True)  # deep copy before the swap
    binarize_(student, spec.binarize, timesteps=spec.diffusion.timesteps)
    return student, teacher.eval().requires_grad_(False)


def load_model(path: str | os.PathLike, use_ema: bool = True) -> tuple[torch.nn.Module, TrainSpec, dict]:
    """Build the network described by a checkpoint and load its (EMA) weights; returns (model, spec, ckpt)."""
    ckpt = load_checkpoint(path)
    spec = checkpoint_spec(ckpt)
    model = build_model(spec)
    load_weights(model, inference_weights(ckpt, use_ema), path)
    return model.eval(), spec, ckpt


def load_weights(model: torch.nn.Module, weights: dict, path: str | os.PathLike,
                 fix: str = "the file was edited or mixes two models: re-create it with `bdmtool train`/`import`",
                 ) -> None:
    """``load_state_dict`` with a one-line CheckpointError naming the first missing, unexpected or mis-shaped
    tensor instead of torch's multi-line RuntimeError."""
    from .checkpoint import CheckpointError

    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    shapes = [f"{k} {tuple(weights[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in weights and tuple(weights[k].shape) != tuple(v.shape)]
    problems = [f"{len(missing)} missing ({missing[0]}, ...)" if missing else "",
                f"{len(unexpected)} unexpected ({unexpected[0]}, ...)" if unexpected else "",
                f"{len(shapes)} of another shape ({shapes[0]}, ...)" if shapes else ""]
    problems = [p for p in problems if p]
    if problems:
        raise CheckpointError(f"{path}: its weights do not fit the U-Net its spec describes: {'; '.join(problems)}; "
                              f"{fix}")
    model.load_state_dict(weights)
