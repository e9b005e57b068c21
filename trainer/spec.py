"""Torch-free specs of what a run builds: the U-Net, the noise schedule, the data and the training loop.

Named presets are the supported starting points (``UNetConfig.from_name("tiny")``); every field can be
changed with ``--set key=value`` on the CLI and is validated here, so a typo fails before any work starts.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from .config import Config, ConfigError, check
from .runtime import has_cxx_compiler, parse_device

SPEC_VERSION = 1


@dataclasses.dataclass(frozen=True)
class UNetConfig(Config):
    """The DDPM/DDIM pixel U-Net (Ho et al. 2020; pesser/pytorch_diffusion ``Model``).

    ``attn_resolutions`` are feature-map sizes (16 means "at 16x16"). GroupNorm uses ``num_groups`` groups,
    so every channel count (``ch * mult``) must be divisible by it.
    """

    resolution: int = 32
    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    resamp_with_conv: bool = True
    num_groups: int = 32
    norm_eps: float = 1e-6

    def validate(self) -> None:
        check(self.resolution > 0 and self.resolution % 2 ** (len(self.ch_mult) - 1) == 0,
              f"unet.resolution={self.resolution} must be divisible by 2**(len(ch_mult)-1)")
        check(len(self.ch_mult) >= 1, "unet.ch_mult must have at least one level, e.g. --set unet.ch_mult=[1,2,2,2]")
        check(self.ch >= 1 and all(m >= 1 for m in self.ch_mult),
              f"unet.ch ({self.ch}) and every unet.ch_mult entry ({list(self.ch_mult)}) must be >= 1")
        check(self.num_groups >= 1, f"unet.num_groups must be >= 1, got {self.num_groups}")
        check(self.norm_eps > 0, f"unet.norm_eps must be > 0, got {self.norm_eps}")
        for m in self.ch_mult:
            check((self.ch * m) % self.num_groups == 0,
                  f"unet.ch*ch_mult ({self.ch}*{m}) must be divisible by unet.num_groups={self.num_groups}")
        check(self.num_res_blocks >= 1, "unet.num_res_blocks must be >= 1")
        check(0.0 <= self.dropout < 1.0, f"unet.dropout must be in [0, 1), got {self.dropout}")
        check(self.in_channels in (1, 3) and self.out_channels in (1, 3),
              "unet.in_channels and unet.out_channels must be 1 or 3")
        levels = {self.resolution // 2**i for i in range(len(self.ch_mult))}
        bad = sorted(set(self.attn_resolutions) - levels)
        check(not bad, f"unet.attn_resolutions {bad} are not feature-map sizes of this U-Net ({sorted(levels)})")

    @property
    def temb_ch(self) -> int:
        return self.ch * 4

    @classmethod
    def from_name(cls, name: str) -> "UNetConfig":
        if name not in UNET_PRESETS:
            raise ConfigError(f"unknown U-Net preset {name!r}; choose from {sorted(UNET_PRESETS)}")
        return UNET_PRESETS[name]


UNET_PRESETS: dict[str, UNetConfig] = {
    # pesser/pytorch_diffusion CIFAR-10 (= ermongroup/ddim, BiDM-cifar): 35.7M parameters.
    "cifar10": UNetConfig(),
    # CPU-sized model for the demo and the tests: 32x32 grey digits, four levels, attention at 16x16.
    "tiny": UNetConfig(in_channels=1, out_channels=1, ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1,
                       attn_resolutions=(16,), dropout=0.0),
    # The same size for 3-channel data (CIFAR-10 pickles, image folders) on a CPU.
    "tiny-rgb": UNetConfig(in_channels=3, out_channels=3, ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1,
                           attn_resolutions=(16,), dropout=0.0),
}


@dataclasses.dataclass(frozen=True)
class DiffusionConfig(Config):
    """Noise schedule of the forward process q(x_t | x_0) and the prediction target (epsilon)."""

    schedule: Literal["linear", "ldm_linear", "cosine", "quad"] = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    timesteps: int = 1000

    def validate(self) -> None:
        check(self.timesteps >= 2, f"diffusion.timesteps must be >= 2, got {self.timesteps}")
        check(0 < self.beta_start < self.beta_end < 1,
              f"diffusion needs 0 < beta_start < beta_end < 1, got {self.beta_start}, {self.beta_end}")


@dataclasses.dataclass(frozen=True)
class DataConfig(Config):
    """Where training images come from. ``source`` is a loader name; ``path`` is needed by the file loaders."""

    source: Literal["mnist5k", "digits", "folder", "cifar10", "npz"] = "mnist5k"
    path: str = ""
    resolution: int = 32
    channels: int = 1
    hflip: bool = False
    limit: int = 0  # use only the first `limit` images (0 = all)

    def validate(self) -> None:
        check(self.source in ("mnist5k", "digits") or bool(self.path),
              f"data.path is required for data.source={self.source!r} (e.g. --data {self.source}:/path/to/data)")
        check(self.channels in (1, 3), f"data.channels must be 1 or 3, got {self.channels}")
        check(self.resolution >= 8, f"data.resolution must be >= 8, got {self.resolution}")
        check(self.limit >= 0, "data.limit must be >= 0")


@dataclasses.dataclass(frozen=True)
class TrainConfig(Config):
    """The optimisation loop: AdamW, linear warm-up, gradient clipping, EMA of the weights."""

    steps: int = 5000
    batch_size: int = 64
    lr: float = 2e-4
    lr_decay: Literal["none", "cosine"] = "none"  # cosine: lr -> lr_final_ratio * lr at the last step
    lr_final_ratio: float = 0.1
    weight_decay: float = 0.0
    warmup_steps: int = 200
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 500
    threads: int = 0  # torch intra-op threads per process (0 = leave torch's default)
    device: str = "auto"  # auto (CUDA when present) | cpu | cuda | cuda:N; where it runs, not what it computes
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast the step (docs/methods.md, "Training speed")
    kernels: Literal["eager", "compiled"] = "eager"  # compiled: quantizers fused by torch.compile (g++)
    memory_format: Literal["contiguous", "channels_last"] = "contiguous"  # channels_last: NHWC images and weights

    def validate(self) -> None:
        check(self.steps >= 1, f"train.steps must be >= 1, got {self.steps}")
        check(self.batch_size >= 1, f"train.batch_size must be >= 1, got {self.batch_size}")
        check(self.lr > 0, f"train.lr must be > 0, got {self.lr}")
        check(0.0 < self.ema_decay < 1.0, f"train.ema_decay must be in (0, 1), got {self.ema_decay}")
        check(self.grad_clip >= 0, "train.grad_clip must be >= 0 (0 disables clipping)")
        check(self.log_every >= 1 and self.ckpt_every >= 1, "train.log_every and train.ckpt_every must be >= 1")
        check(self.warmup_steps >= 0, "train.warmup_steps must be >= 0")
        check(0.0 <= self.lr_final_ratio <= 1.0, f"train.lr_final_ratio must be in [0, 1], got {self.lr_final_ratio}")
        check(0 <= self.seed < 2**63, f"train.seed must be an integer in [0, 2**63), got {self.seed}")
        check(self.threads >= 0, f"train.threads must be >= 0 (0 = torch's default), got {self.threads}")
        check(self.kernels != "compiled" or has_cxx_compiler(),
              "train.kernels=compiled needs a C++ compiler on PATH (torch.compile's CPU code); install g++ "
              "or use train.kernels=eager")
        check(self.weight_decay >= 0, f"train.weight_decay must be >= 0, got {self.weight_decay}")
        check(parse_device(self.device) is not None,
              f"train.device must be auto, cpu, cuda or cuda:N, got {self.device!r}")


WEIGHT_BINARIZER_NAMES = ("ste_sign", "scaled_sign", "magnitude_aware_sign", "ebb", "dorefa", "reste")
ACT_QUANTIZER_NAMES = ("identity", "ste_sign", "approx_sign", "rsign", "lsq", "dorefa", "reste")
# BinaryDM's head/tail on the pixel U-Net: LDM-4's first 6 input / last 6 output timestep blocks are its two
# highest-resolution levels (3 blocks per level), so EBB goes to levels 0 and 1 of the down and up paths.
HEAD_TAIL_LEVELS = ("down.0.*", "down.1.*", "up.0.*", "up.1.*")


@dataclasses.dataclass(frozen=True)
class BinarizeConfig(Config):
    """Which layers become binary and how: one config per method (see ``METHODS``), not one file.

    ``keep_fp`` and ``ebb_layers`` are fnmatch patterns over module names (``down.1.block.0.conv1``).
    Padding seen by binarized inputs: 1-bit activations are padded with +1 (LCE ``pad_values=1``,
    'same-one'); multi-bit activations with 0 (exact in LCE with same-zero bit-plane bconvs plus a
    constant border correction). sign(0) = +1 everywhere.
    """

    method: str = "binarydm"
    weight: Literal["ste_sign", "scaled_sign", "magnitude_aware_sign", "ebb", "dorefa", "reste"] = "scaled_sign"
    act: Literal["identity", "ste_sign", "approx_sign", "rsign", "lsq", "dorefa", "reste"] = "lsq"
    wbits: int = 1
    abits: int = 4
    keep_fp: tuple[str, ...] = ("conv_in", "conv_out", "temb.dense.*")
    bias: bool = True  # keep the FP bias of binarized layers (BiDM drops it)
    ebb_layers: tuple[str, ...] = ()  # layers with EBB's second basis (BinaryDM: HEAD_TAIL_LEVELS)
    ebb_stage2_step: int = -1  # training step at which sigma_II is dropped (-1: never)
    act_scale: Literal["none", "xnor", "tbs"] = "none"  # K = box(mean_c|x|): fixed (XNOR) or learnable (TBS)
    output_scale: Literal["none", "xnorpp"] = "none"  # XNOR++ learned Gamma = a_o (x) b_h (x) c_w
    shortcut: Literal["none", "bidm", "bbcu"] = "none"  # learnable per-conv residual (BiDM) / identity (BBCU)
    shortcut_init: float = 0.0  # BiDM CIFAR: gamma init 0.0 (LDM: 0.3)
    post: Literal["none", "rprelu"] = "none"  # ReActNet/BBCU RPReLU after the binary conv
    progressive: Literal["none", "middle_out"] = "none"  # BinaryDM: binarize one level group at a time
    progressive_every: int = 1  # steps between groups (official: 1)
    timestep_cache: tuple[str, ...] = ()  # BiDM cross-timestep sites: module names, matched segment by segment
    cache_buckets: int = 100  # learnable alpha per timestep bucket t // (T / buckets)
    cache_delta: int = 20  # training draws the cache at t + delta (= the sampler's stride)
    reste_o_end: float = 3.0  # ReSTE annealing o: 1 -> o_end over training
    # learned: LSQ's step as a parameter (the paper); log: its log is the parameter (bdmtool, stays positive);
    # per_batch: the official code's re-init every forward (not exportable).
    lsq_step: Literal["learned", "log", "per_batch"] = "learned"
    lsq_log_lr_scale: float = 1.0  # log mode: step = exp(scale * log_step), i.e. log(step) learns scale x faster
    # Border of multi-bit activations: "top" = the top LSQ level Qp*step (what bit-plane export needs),
    # "zero" = zero padding (exact on the int8 path, zero point 0; half the initial error of "top").
    act_pad: Literal["top", "zero"] = "top"
    # Float path for the image mean (bdmtool, not in the papers), see binarize.DCBypass:
    # timestep_gain: eps + g[b(t)] mean_hw(x_t);
    # timestep_affine: eps - h[b(t)] mean_hw(eps) + g[b(t)] mean_hw(x_t) + c[b(t)];
    # timestep_skip: the affine path - r[b(t)] (eps - mean_hw eps) + s[b(t)] (x_t - mean_hw x_t) (per-pixel skip).
    dc_bypass: Literal["none", "timestep_gain", "timestep_affine", "timestep_skip"] = "none"
    dc_bypass_buckets: int = 20  # gains per t // (T / buckets)
    dc_bypass_lr_scale: float = 100.0  # g = lr_scale * g_raw: the gains learn lr_scale times faster under Adam
    # the same for the per-pixel tables of timestep_skip (r, s); 0 = dc_bypass_lr_scale (checkpoints before it)
    dc_bypass_skip_lr_scale: float = 0.0

    def validate(self) -> None:
        check(self.wbits == 1, f"binarize.wbits must be 1 (binary weights), got {self.wbits}")
        check(self.abits in (1, 4, 8, 32), f"binarize.abits must be 1, 4, 8 or 32, got {self.abits}")
        one_bit = ("ste_sign", "approx_sign", "rsign", "dorefa", "reste")
        if self.abits == 1:
            check(self.act in one_bit, f"binarize.act={self.act!r} is not a 1-bit quantizer; use one of {one_bit}")
        elif self.abits == 32:
            check(self.act == "identity", "binarize.abits=32 needs binarize.act='identity'")
        else:
            check(self.act == "lsq", f"binarize.abits={self.abits} needs binarize.act='lsq'")
        check(self.act_scale == "none" or self.abits == 1, "binarize.act_scale needs 1-bit activations")
        check(not self.ebb_layers or self.weight in ("scaled_sign", "ebb"),
              "binarize.ebb_layers needs binarize.weight='scaled_sign' (EBB adds sigma_II on those layers)")
        check(self.progressive_every >= 1, "binarize.progressive_every must be >= 1")
        check(self.cache_buckets >= 1 and self.cache_delta >= 1, "binarize.cache_buckets/cache_delta must be >= 1")
        check(self.dc_bypass_buckets >= 1, "binarize.dc_bypass_buckets must be >= 1")
        check(self.dc_bypass_lr_scale > 0, "binarize.dc_bypass_lr_scale must be > 0")
        check(self.dc_bypass_skip_lr_scale >= 0,
              "binarize.dc_bypass_skip_lr_scale must be >= 0 (0: the same as dc_bypass_lr_scale)")
        check(self.lsq_log_lr_scale > 0, "binarize.lsq_log_lr_scale must be > 0")

    @property
    def may_leave_parameters_unused(self) -> bool:
        """True when some parameters get no gradient in some steps (DDP must then look for them)."""
        return self.progressive != "none" or self.ebb_stage2_step >= 0 or self.lsq_step == "per_batch"

    @classmethod
    def from_method(cls, method: str, abits: int | None = None) -> "BinarizeConfig":
        if method not in METHODS:
            raise ConfigError(f"unknown method {method!r}; choose from {sorted(METHODS)}")
        cfg = METHODS[method]
        if abits is not None and abits != cfg.abits:
            act = {1: cfg.act if cfg.abits == 1 else "ste_sign", 32: "identity"}.get(abits, "lsq")
            cfg = cfg.replace(abits=abits, act=act, act_scale=cfg.act_scale if abits == 1 else "none")
        # bdmtool's float DC path and per-pixel skip for every method, and LSQ steps learned in log space
        # (docs/methods.md, "Students that draw", "LSQ steps and the DC path", "A float skip of x_t");
        # --set binarize.dc_bypass=none --set binarize.lsq_step=learned is the papers' recipe.
        return cfg.replace(dc_bypass="timestep_skip", lsq_step="log" if cfg.act == "lsq" else cfg.lsq_step)


_BIDM_FP = ("conv_in", "conv_out", "temb.dense.*", "*.nin_shortcut")
METHODS: dict[str, BinarizeConfig] = {
    # BinaryDM (ICLR'25): EBB on head/tail levels, learnable sigma elsewhere, LSQ activations, progressive.
    "binarydm": BinarizeConfig(method="binarydm", weight="scaled_sign", act="lsq", abits=4,
                               ebb_layers=HEAD_TAIL_LEVELS, ebb_stage2_step=-1, progressive="middle_out"),
    # The "baseline" of both papers at W1A4/A8/A32: learnable per-channel sigma, LSQ, plain eps-MSE.
    "baseline": BinarizeConfig(method="baseline", weight="scaled_sign", act="lsq", abits=4),
    # BiDM (NeurIPS'24) W1A1: TBS (RSign threshold + learnable K + per-conv shortcut), cache, SPD.
    "bidm": BinarizeConfig(method="bidm", weight="magnitude_aware_sign", act="rsign", abits=1, keep_fp=_BIDM_FP,
                           bias=False, act_scale="tbs", shortcut="bidm", timestep_cache=("up.1.attn.*", "up.1.upsample")),
    "xnor": BinarizeConfig(method="xnor", weight="magnitude_aware_sign", act="ste_sign", abits=1, act_scale="xnor"),
    "xnorpp": BinarizeConfig(method="xnorpp", weight="ste_sign", act="ste_sign", abits=1, output_scale="xnorpp"),
    "dorefa": BinarizeConfig(method="dorefa", weight="dorefa", act="dorefa", abits=1),
    "reactnet": BinarizeConfig(method="reactnet", weight="magnitude_aware_sign", act="rsign", abits=1, post="rprelu"),
    "reste": BinarizeConfig(method="reste", weight="reste", act="reste", abits=1),
    "bbcu": BinarizeConfig(method="bbcu", weight="magnitude_aware_sign", act="rsign", abits=1, shortcut="bbcu",
                           post="rprelu"),
}


@dataclasses.dataclass(frozen=True)
class DistillConfig(Config):
    """Loss terms added to the eps-MSE when training a binarized student from the FP teacher."""

    lrm_weight: float = 0.0  # BinaryDM LRM lambda (1e-4)
    lrm_k: int = 4  # keep ceil(C / K) principal directions
    lrm_axis: Literal["channel", "width"] = "channel"  # paper (channel) or official code (width)
    spd_weight: float = 0.0  # BiDM SPD (1e-2)
    spd_patches: int = 4  # 4x4 grid of patches
    spd_variant: Literal["code", "paper"] = "code"
    ebb_tau: float = 0.0  # BinaryDM EBB regulariser tau * mean(f(sigma_II)) (9e-2)
    # f: "abs" pulls every sigma_II to zero (the paper's stated aim, "encouraging them to approach zero");
    # "signed" is Eq. 9 as printed, which has no minimum: under Adam it drives sigma_II through zero at ~lr per
    # step (-1.04 on the temb projections after 1,250 steps at lr 1e-3, 25x sigma_I), so dropping it at stage 2
    # is a shock. docs/methods.md, "EBB regulariser".
    ebb_reg: Literal["abs", "signed"] = "abs"
    # bdmtool, not in either paper: the eps target is (1 - kd) * noise + kd * teacher's eps, i.e. the loss is
    # (1 - kd) * MSE(eps, noise) + kd * MSE(eps, eps_teacher) up to a constant; 0 = the papers' noise target.
    # docs/methods.md, "Output distillation".
    kd_weight: float = 0.0
    # bdmtool, not in either paper: the frozen teacher's no-grad forward (its eps and the LRM / SPD features) at
    # the step's precision ("step": train.precision) or in bf16 autocast under an fp32 student step ("bf16": its
    # targets move by ~0.5 % relative, the step gets faster). docs/methods.md, "Training speed".
    teacher_precision: Literal["step", "bf16"] = "step"

    def validate(self) -> None:
        check(self.lrm_weight >= 0 and self.spd_weight >= 0 and self.ebb_tau >= 0, "distill weights must be >= 0")
        check(0.0 <= self.kd_weight <= 1.0, f"distill.kd_weight must be in [0, 1], got {self.kd_weight}")
        check(self.lrm_k >= 1 and self.spd_patches >= 1, "distill.lrm_k and distill.spd_patches must be >= 1")


DISTILL_PRESETS: dict[str, DistillConfig] = {
    "binarydm": DistillConfig(lrm_weight=1e-4, ebb_tau=9e-2),
    "bidm": DistillConfig(spd_weight=1e-2),
}


@dataclasses.dataclass(frozen=True)
class TrainSpec(Config):
    """Everything one training run needs; stored inside every checkpoint it writes."""

    unet: UNetConfig = UNetConfig.from_name("tiny")
    diffusion: DiffusionConfig = DiffusionConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    binarize: BinarizeConfig | None = None  # None: full-precision training
    distill: DistillConfig = DistillConfig()
    teacher: str = ""  # FP checkpoint the binarized student starts from and distils (required for QAT)
    init: str = ""  # FP training only: start from this checkpoint's (EMA) weights instead of random ones

    @classmethod
    def missing_section_hint(cls, section: str) -> str:
        return "binarize.* applies to a binarized student: add --method (e.g. --method binarydm)" \
            if section == "binarize" else ""

    def validate(self) -> None:
        check(not (self.init and self.binarize is not None),
              "--init is for full-precision training; a binarized student starts from --teacher")
        check(self.binarize is None or bool(self.teacher),
              "a binarized run needs a full-precision teacher: --teacher fp_model.ckpt")
        check(self.distill.kd_weight == 0 or self.binarize is not None,
              "distill.kd_weight distils a binarized student from its teacher: add --method and --teacher")
        d = self.distill
        check(d.teacher_precision == "step" or (self.binarize is not None and
                                               (d.lrm_weight > 0 or d.spd_weight > 0 or d.kd_weight > 0)),
              "distill.teacher_precision sets the precision of the teacher's forward, which this run never makes "
              "(no distill.lrm_weight, spd_weight or kd_weight term): drop it")
        check(self.unet.in_channels == self.data.channels,
              f"unet.in_channels={self.unet.in_channels} but data.channels={self.data.channels}; "
              "pick a preset with matching channels (tiny: 1, tiny-rgb/cifar10: 3) or set data.channels")
        check(self.unet.resolution == self.data.resolution,
              f"unet.resolution={self.unet.resolution} but data.resolution={self.data.resolution}")


def build_train_spec(preset: str = "tiny", data: str | None = None, steps: int | None = None,
                     overrides: tuple[str, ...] | list[str] = (), method: str | None = None,
                     abits: int | None = None, teacher: str | None = None, init: str | None = None) -> TrainSpec:
    """The spec the CLI's ``train`` builds.

    Full precision (``method=None``): a U-Net preset, ``data`` as ``NAME[:PATH]`` (default mnist5k).
    QAT (``method`` from ``METHODS``): the teacher checkpoint's U-Net, diffusion and data (``data`` overrides
    the data), the method's binarize preset at ``abits``, its distillation preset, and for BinaryDM the EBB
    stage switch at half the steps. ``--set`` overrides apply last.
    """
    if method is None and init:
        from .checkpoint import read_spec

        ispec = read_spec(init)
        if ispec.binarize is not None:
            raise ConfigError(f"--init {init} is a binarized checkpoint; fine-tune from a full-precision one")
        base = TrainSpec(unet=ispec.unet, diffusion=ispec.diffusion,
                         data=_data_config(data, ispec.unet) if data else ispec.data, init=str(init))
    elif method is None:
        unet = UNetConfig.from_name(preset)
        base = TrainSpec(unet=unet, data=_data_config(data or "mnist5k", unet))
    else:
        if not teacher:
            raise ConfigError(f"--method {method} needs --teacher FP_CHECKPOINT (e.g. the embedded default)")
        from .checkpoint import read_spec  # torch is needed only to read the teacher's checkpoint

        tspec = read_spec(teacher)
        bcfg = BinarizeConfig.from_method(method, abits)
        base = TrainSpec(unet=tspec.unet, diffusion=tspec.diffusion,
                         data=_data_config(data, tspec.unet) if data else tspec.data,
                         train=TrainConfig(lr=1e-4, warmup_steps=50), binarize=bcfg,
                         distill=DISTILL_PRESETS.get(method, DistillConfig()), teacher=str(teacher),
                         init=str(init or ""))  # validate() refuses --init with a method
    if steps is not None:
        base = base.replace(train=base.train.replace(steps=steps))
    if base.binarize is not None and base.binarize.ebb_layers and base.binarize.ebb_stage2_step < 0:
        base = base.replace(binarize=base.binarize.replace(ebb_stage2_step=base.train.steps // 2))
    return base.with_overrides(overrides)


def _data_config(arg: str, unet: UNetConfig) -> DataConfig:
    source, _, path = arg.partition(":")
    return DataConfig.from_dict({"source": source, "path": path, "channels": unet.in_channels,
                                 "resolution": unet.resolution})
