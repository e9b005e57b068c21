"""Per-timestep error of a noise predictor and how well it passes the image mean (DC) through to eps.

For each probed timestep t, ``n`` images x0 (seeded), noise eps and x_t = sqrt(abar) x0 + sqrt(1-abar) eps:

- ``mse``: mean (eps_hat - eps)^2 over pixels and images (the training loss at that t);
- ``dc_slope``: least-squares slope of the per-image, per-channel mean of eps_hat on the mean of the true
  eps (1 = the DC of the noise is predicted exactly; 0 = ignored). The FP teacher's slope at high t is
  the reference a student must reach;
- ``dc_slope_se``: its standard error (ordinary least squares: residual variance over the spread of the true
  means), so two slopes can be told apart from the sampling noise of ``n`` images;
- ``dc_gap`` / ``dc_gap_se`` (with a ``reference`` model, the teacher): reference slope minus this model's, and
  its standard error *paired* over the same images and noise (the slope of the difference of the two predicted
  means on the true mean), which is far tighter than the two separate errors combined;
- ``dc_corr``: correlation of the two means (right sign but attenuated: high corr, low slope);
- ``dc_rms``: RMS of (mean eps_hat - mean eps), and ``x0_dc_rms`` = dc_rms * sqrt((1-abar)/abar), the error
  this puts into the mean of DDIM's predicted x0 (what saturates samples into squares).

``passthrough_report(models, diffusion, images)`` evaluates several models on the same batch (teacher and
students alike) and returns plain dicts; ``plot_passthrough`` draws the three curves per model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..binarize import reset_state
from ..diffusion import Diffusion
from ...files import atomic_savefig

DEFAULT_TIMESTEPS = (10, 50, 100, 250, 500, 750, 900, 980)


def _dc(x: torch.Tensor) -> torch.Tensor:
    """Per-image, per-channel mean of ``x`` [B, C, H, W], flattened, in float64."""
    return x.double().mean(dim=(2, 3)).flatten()


def ols_slope(y: torch.Tensor, x: torch.Tensor) -> tuple[float, float]:
    """Least-squares slope of ``y`` on ``x`` (1-D, with intercept) and its standard error
    sqrt(sum(residual^2) / (m - 2) / sum((x - mean x)^2)); NaN where undefined."""
    xc, yc = x - x.mean(), y - y.mean()
    var = float((xc * xc).sum())
    if not var > 0:
        return float("nan"), float("nan")
    slope = float((yc * xc).sum()) / var
    m = len(x)
    se = math.sqrt(float(((yc - slope * xc) ** 2).sum()) / (m - 2) / var) if m > 2 else float("nan")
    return slope, se


def dc_stats(eps_hat: torch.Tensor, eps: torch.Tensor) -> dict[str, float]:
    """MSE and DC pass-through of one batch of predictions ``eps_hat`` against the true ``eps`` ([B, C, H, W])."""
    d_hat, d = _dc(eps_hat), _dc(eps)
    dc, dh = d - d.mean(), d_hat - d_hat.mean()
    var = float((dc * dc).sum())
    slope, se = ols_slope(d_hat, d)
    denom = math.sqrt(var * float((dh * dh).sum()))
    return {"mse": float(((eps_hat.double() - eps.double()) ** 2).mean()),
            "dc_slope": slope, "dc_slope_se": se,
            "dc_corr": float((dh * dc).sum()) / denom if denom > 0 else float("nan"),
            "dc_rms": float(((d_hat - d) ** 2).mean().sqrt())}


def dc_gap(eps_ref: torch.Tensor, eps_hat: torch.Tensor, eps: torch.Tensor) -> dict[str, float]:
    """The reference's DC slope minus this model's and the gap's standard error, paired over the same images:
    the slope (and its error) of mean(eps_ref) - mean(eps_hat) on mean(eps)."""
    gap, se = ols_slope(_dc(eps_ref) - _dc(eps_hat), _dc(eps))
    return {"dc_gap": gap, "dc_gap_se": se}


@torch.no_grad()
def passthrough_report(models: dict[str, torch.nn.Module], diffusion: Diffusion, images_u8: np.ndarray,
                       timesteps: Sequence[int] = DEFAULT_TIMESTEPS, n: int = 256, seed: int = 0,
                       batch_size: int = 64, reference: str | None = None) -> dict:
    """{"timesteps", "n", "seed", "reference", "models": {name: [row per t]}} with the fields of ``dc_stats`` per
    row, plus ``x0_dc_rms`` and, for every model but ``reference`` (a name in ``models``), ``dc_gap`` and
    ``dc_gap_se`` against it. Every model sees the same x0, noise and t (and an empty timestep cache)."""
    if reference is not None and reference not in models:
        raise ValueError(f"reference {reference!r} is not one of the models {list(models)}")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(images_u8), generator=g)[:n]
    x0 = torch.from_numpy(images_u8[idx.numpy()]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    out: dict = {"timesteps": [int(t) for t in timesteps], "n": int(len(x0)), "seed": seed, "reference": reference,
                 "models": {}}
    noises = {t: torch.randn(x0.shape, generator=g) for t in timesteps}
    ref_preds: dict[int, torch.Tensor] = {}
    order = sorted(models, key=lambda k: k != reference)  # the reference first, the others in their order
    for name in order:
        model = models[name]
        model.eval()
        rows = []
        for t in timesteps:
            tt = torch.full((len(x0),), float(t))
            x_t = diffusion.q_sample(x0, tt.long(), noises[t])
            preds = []
            for s in range(0, len(x0), batch_size):
                reset_state(model)
                preds.append(model(x_t[s:s + batch_size], tt[s:s + batch_size]))
            reset_state(model)
            eps_hat = torch.cat(preds)
            row = {"t": int(t), **dc_stats(eps_hat, noises[t])}
            abar = float(diffusion.alphas_cumprod[t])
            row["x0_dc_rms"] = row["dc_rms"] * math.sqrt((1 - abar) / abar)
            if name == reference:
                ref_preds[t] = eps_hat.double().mean(dim=(2, 3), keepdim=True)  # its per-image means: all dc_gap needs
            elif reference is not None:
                row.update(dc_gap(ref_preds[t], eps_hat, noises[t]))
            rows.append(row)
        out["models"][name] = rows
    out["models"] = {k: out["models"][k] for k in models}  # the caller's order
    return out


def high_t_slope(rows: list[dict], t_min: int = 500) -> float | None:
    """Mean DC slope over the probed timesteps t >= t_min (the regime where DDIM amplifies DC errors); None
    when no probed t is that high (JSON has no NaN)."""
    vals = [r["dc_slope"] for r in rows if r["t"] >= t_min]
    return float(np.mean(vals)) if vals else None


def plot_passthrough(report: dict, path: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = (("mse", "eps-MSE", True), ("dc_slope", "DC slope (mean eps_hat on mean eps)", False),
              ("x0_dc_rms", "DC error in predicted x0 (RMS)", True))
    for ax, (key, label, log) in zip(axes, panels):
        for name, rows in report["models"].items():
            ax.plot([r["t"] for r in rows], [r[key] for r in rows], marker="o", label=name)
        ax.set_xlabel("timestep t")
        ax.set_title(label)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[1].axhline(1.0, color="grey", lw=0.8, ls="--")
    axes[0].legend(fontsize=8)
    fig.suptitle(title or f"noise prediction per timestep ({report['n']} images, seed {report['seed']})")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)
    return path


def markdown_table(report: dict) -> str:
    """One row per t; per model its MSE, DC slope ± standard error, x0 DC error and, against the reference,
    the paired DC-slope gap ± its standard error."""
    names = list(report["models"])
    ref = report.get("reference")
    cols = {n: ["MSE", "DC slope ± se", "x0 DC err"] + ([] if n == ref or ref is None else ["DC gap ± se"])
            for n in names}
    head = "| t | " + " | ".join(f"{n} {c}" for n in names for c in cols[n]) + " |"
    sep = "|---|" + "---:|" * sum(len(c) for c in cols.values())
    lines = [head, sep]
    for i, t in enumerate(report["timesteps"]):
        cells = []
        for n in names:
            r = report["models"][n][i]
            cells += [f"{r['mse']:.4f}", f"{r['dc_slope']:.2f} ± {r['dc_slope_se']:.2f}", f"{r['x0_dc_rms']:.3f}"]
            if "dc_gap" in r:
                cells.append(f"{r['dc_gap']:.2f} ± {r['dc_gap_se']:.3f}")
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
