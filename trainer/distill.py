"""Distillation from the frozen FP teacher: feature taps, LRM (BinaryDM), SPD (BiDM), EBB regulariser.

Features are the U-Net's *block outputs* (the pixel-U-Net analogue of LDM's ``TimestepEmbedSequential``
outputs): every ResnetBlock (or the AttnBlock after it), every Down/Upsample, and the middle block.
Hooks are declared once per model by :class:`FeatureTap`; each loss is a pure function of the feature
dicts and returns a scalar tensor.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .spec import DistillConfig
from .unet import Downsample, Level, MidBlock, Upsample


def feature_sites(model: nn.Module) -> list[str]:
    """Names of the block-output modules of a :class:`~trainer.unet.UNet`, in forward order."""
    sites: list[str] = []
    for side in ("down", "up"):
        levels = model.get_submodule(side)
        order = range(len(levels)) if side == "down" else reversed(range(len(levels)))
        for i in order:
            level: Level = levels[i]
            for j in range(len(level.block)):
                sites.append(f"{side}.{i}.attn.{j}" if len(level.attn) else f"{side}.{i}.block.{j}")
            for r in ("downsample", "upsample"):
                if isinstance(getattr(level, r, None), (Downsample, Upsample)):
                    sites.append(f"{side}.{i}.{r}")
        if side == "down":
            sites.append("mid")
    assert all(isinstance(model.get_submodule(s), nn.Module) for s in sites)
    assert isinstance(model.get_submodule("mid"), MidBlock)
    return sites


class FeatureTap:
    """Forward hooks that keep the latest output of each named module: ``tap.features[name]``."""

    def __init__(self, model: nn.Module, names: list[str]):
        self.names = list(names)
        self.features: dict[str, torch.Tensor] = {}
        self._hooks = [model.get_submodule(n).register_forward_hook(self._store(n)) for n in self.names]

    def _store(self, name: str):
        def fn(module, inputs, out):
            self.features[name] = out
        return fn

    def clear(self) -> None:
        self.features = {}

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


# ------------------------------------------------------------------------------------------------- LRM


def _lrm_matrix(f: torch.Tensor, axis: str) -> torch.Tensor:
    if axis == "channel":  # paper: rows are pixels, columns channels
        return f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])
    return f.reshape(-1, f.shape[-1])  # official code: rows B*C*H, columns the width axis


def lrm_fit(teacher_features: dict[str, torch.Tensor], k: int = 4, axis: str = "channel") -> dict[str, torch.Tensor]:
    """Principal directions of each FP feature map (computed once, on the first batch, then fixed).

    channel axis (paper Eq. 11-12): top ceil(C / k) eigenvectors of the channel covariance over B*H*W.
    width axis (official code): q = W // 4 if W // 4 > 2 else 2 columns. Exact eigendecomposition
    (the code's randomized ``torch.pca_lowrank`` is not reproducible). Returns {site: E [D, q]}.
    """
    out = {}
    for name, f in teacher_features.items():
        x = _lrm_matrix(f.detach().double(), axis)
        d = x.shape[1]
        q = math.ceil(d / k) if axis == "channel" else (d // 4 if d // 4 > 2 else 2)
        q = min(q, d)
        xc = x - x.mean(dim=0, keepdim=True)
        evals, evecs = torch.linalg.eigh(xc.T @ xc / x.shape[0])
        out[name] = evecs[:, torch.argsort(evals, descending=True)[:q]].float().contiguous()
    return out


def lrm_loss(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor],
             proj: dict[str, torch.Tensor], axis: str = "channel") -> torch.Tensor:
    """Mean over sites of MSE(F_s E, F_t E): the features mimicked in the FP low-rank space."""
    terms = [F.mse_loss(_lrm_matrix(student[n], axis) @ e, _lrm_matrix(teacher[n].detach(), axis) @ e)
             for n, e in proj.items()]
    return torch.stack(terms).mean()


# ------------------------------------------------------------------------------------------------- SPD


def _bounds(n: int, p: int) -> list[int]:
    return torch.linspace(0, n, p + 1).long().tolist()


def _patches(f: torch.Tensor, p: int):
    """The p x p grid of patches of ``f`` [..., H, W], row by row (edges at linspace(0, H, p + 1))."""
    h, w = f.shape[-2:]
    p = min(p, h, w)
    hs, ws = _bounds(h, p), _bounds(w, p)
    for i in range(p):
        for j in range(p):
            yield f[..., hs[i]:hs[i + 1], ws[j]:ws[j + 1]]


def _patch_stack(f: torch.Tensor, p: int) -> torch.Tensor:
    """All patches of ``_patches(f, p)`` in one tensor [B, C, P, hmax, wmax], each zero-padded to the largest.

    Zero rows and columns add zero rows and columns to a patch's Gram (and nothing to its norm), so every
    SPD term computed on the stack equals the per-patch one up to float summation order. One gather (and one
    scatter-add in backward) replaces P slices, whose backward each wrote a zero tensor the size of ``f``.
    """
    h, w = f.shape[-2:]
    p = min(p, h, w)
    if h % p == 0 and w % p == 0:  # equal patches: a view
        b, c = f.shape[:2]
        return f.reshape(b, c, p, h // p, p, w // p).permute(0, 1, 2, 4, 3, 5).reshape(b, c, p * p, h // p, w // p)
    hs, ws = _bounds(h, p), _bounds(w, p)

    def index(edges: list[int], pad: int) -> torch.Tensor:  # [p, max size]; ``pad`` reads the zero row/column
        size = max(b - a for a, b in zip(edges, edges[1:]))
        return torch.tensor([[a + k if a + k < b else pad for k in range(size)] for a, b in zip(edges, edges[1:])])

    rows, cols = index(hs, h), index(ws, w)
    fp = F.pad(f, (0, 1, 0, 1))  # one zero row and column at index h / w
    out = fp[..., rows[:, None, :, None], cols[None, :, None, :]]  # [B, C, p, p, hmax, wmax]
    return out.flatten(2, 3)


def _gram_code(p: torch.Tensor) -> torch.Tensor:
    """[B, C, P, h, w] -> per-channel row Gram P P^T [B, C, P, h, h], each patch normalised by the Frobenius norm
    of its whole [B, C, h, h] tensor."""
    q = p @ p.transpose(-1, -2)
    return q / torch.linalg.vector_norm(q, dim=(0, 1, 3, 4), keepdim=True)


def _gram_paper(p: torch.Tensor) -> torch.Tensor:
    """[B, C, P, h, w] -> per-sample spatial attention of each flattened patch [B, P, hw, hw], normalised per
    sample and patch."""
    v = p.flatten(3).permute(0, 2, 3, 1)  # [B, P, h*w, C]
    a = v @ v.transpose(-1, -2)
    return a / a.flatten(2).norm(dim=2).clamp_min(1e-12)[..., None, None]


def spd_loss(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor], patches: int = 4,
             variant: str = "code") -> torch.Tensor:
    """Space Patched Distillation: mean over features and patches of ||G(P_s) - G(P_t)||_F.

    ``code`` (default, BiDM official ``r2b_loss``): G = per-channel row Gram P P^T normalised by the
    Frobenius norm of the whole [B, C, h, h] tensor; the norm is over the whole batch, not squared.
    ``paper``: G = per-sample spatial attention of the flattened patch, normalised per sample.
    All patches of a feature are computed in one batched product (``_patch_stack``); the loop over patches
    it replaces is ``spd_loss_reference``, which tests compare against.
    Under DDP the ``code`` variant's norm covers each process's share of the batch, so the term differs
    slightly from a single-process run with the same global batch (the ``paper`` variant does not).
    """
    gram = _gram_code if variant == "code" else _gram_paper
    terms = []
    for name, fs in student.items():
        # fp32 under a bf16 autocast too: the difference of two normalised Grams cancels (bf16 keeps ~3 digits of
        # it), and the many small products run faster in fp32 here (measured in docs/methods.md)
        with torch.autocast(fs.device.type, enabled=False):
            ps, pt = _patch_stack(fs.float(), patches), _patch_stack(teacher[name].detach().float(), patches)
            d = gram(ps) - gram(pt)
            if variant == "code":  # [B, C, P, h, h] -> one norm per patch
                terms.append(torch.linalg.vector_norm(d, dim=(0, 1, 3, 4)))
            else:  # [B, P, hw, hw] -> per-sample norm, mean over the batch, per patch
                terms.append(d.flatten(2).norm(dim=2).mean(dim=0))
    return torch.cat(terms).mean()


def spd_loss_reference(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor], patches: int = 4,
                       variant: str = "code") -> torch.Tensor:
    """``spd_loss`` patch by patch, as the official code loops (slow: a slice, two Grams and a norm per patch)."""
    terms = []
    for name, fs in student.items():
        ft = teacher[name].detach()
        for ps, pt in zip(_patches(fs, patches), _patches(ft, patches)):
            if variant == "code":
                qs, qt = ps @ ps.transpose(-1, -2), pt @ pt.transpose(-1, -2)
                terms.append((qs / qs.norm() - qt / qt.norm()).norm())
            else:
                vs, vt = ps.flatten(2).transpose(1, 2), pt.flatten(2).transpose(1, 2)
                a_s, a_t = vs @ vs.transpose(1, 2), vt @ vt.transpose(1, 2)
                d = (a_s / a_s.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None]
                     - a_t / a_t.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None])
                terms.append(d.flatten(1).norm(dim=1).mean())
    return torch.stack(terms).mean()


# ------------------------------------------------------------------------------------------------- EBB


def ebb_regulariser(model: nn.Module, mode: str = "abs") -> torch.Tensor | None:
    """mean(|sigma_II|) ("abs") or mean(sigma_II) ("signed", BinaryDM Eq. 9 as printed) over every EBB layer
    still in stage 1; the caller multiplies by tau. Gradient: tau/N * sign(sigma_II) or tau/N."""
    from .binarize import binary_layers

    sig = [m.sigma2.flatten() for m in binary_layers(model) if m.sigma2 is not None and bool(m.second_basis)]
    if not sig:
        return None
    sig = torch.cat(sig)
    return (sig.abs() if mode == "abs" else sig).mean()


class Distiller(nn.Module):
    """Holds the teacher-derived state that must survive a resume (LRM projections) as buffers."""

    def __init__(self, cfg: DistillConfig):
        super().__init__()
        self.cfg = cfg
        self.sites: list[str] = []

    def has_projections(self) -> bool:
        return bool(self.sites)

    def set_projections(self, proj: dict[str, torch.Tensor]) -> None:
        self.sites = list(proj)
        for i, name in enumerate(self.sites):
            self.register_buffer(f"proj_{i}", proj[name])

    def projections(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, f"proj_{i}") for i, n in enumerate(self.sites)}

    def state(self) -> dict:
        return {"sites": list(self.sites), "proj": [getattr(self, f"proj_{i}") for i in range(len(self.sites))]}

    def load(self, state: dict) -> None:
        self.set_projections(dict(zip(state["sites"], state["proj"])))
