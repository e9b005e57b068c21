"""Per-timestep error of a noise predictor and how well it passes the image mean (DC) through to eps.

For each probed timestep t, ``n`` images x0 (seeded), noise eps and x_t = sqrt(abar) x0 + sqrt(1-abar) eps:

- ``mse``: mean (eps_hat - eps)^2 over pixels and images (the training loss at that t);
- ``dc_slope``: least-squares slope of the per-image, per-channel mean of eps_hat on the mean of the true
  eps (1 = the DC of the noise is predicted exactly; 0 = ignored). The FP teacher's slope at high t is
  the reference a student must reach;
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


def dc_stats(eps_hat: torch.Tensor, eps: torch.Tensor) -> dict[str, float]:
    """MSE and DC pass-through of one batch of predictions ``eps_hat`` against the true ``eps`` ([B, C, H, W])."""
    d_hat = eps_hat.double().mean(dim=(2, 3)).flatten()
    d = eps.double().mean(dim=(2, 3)).flatten()
    dc, dh = d - d.mean(), d_hat - d_hat.mean()
    var = float((dc * dc).sum())
    slope = float((dh * dc).sum()) / var if var > 0 else float("nan")
    denom = math.sqrt(var * float((dh * dh).sum()))
    return {"mse": float(((eps_hat.double() - eps.double()) ** 2).mean()),
            "dc_slope": slope, "dc_corr": float((dh * dc).sum()) / denom if denom > 0 else float("nan"),
            "dc_rms": float(((d_hat - d) ** 2).mean().sqrt())}


@torch.no_grad()
def passthrough_report(models: dict[str, torch.nn.Module], diffusion: Diffusion, images_u8: np.ndarray,
                       timesteps: Sequence[int] = DEFAULT_TIMESTEPS, n: int = 256, seed: int = 0,
                       batch_size: int = 64) -> dict:
    """{"timesteps", "n", "seed", "models": {name: [row per t]}} with the fields of ``dc_stats`` per row,
    plus ``x0_dc_rms``. Every model sees the same x0, noise and t (and an empty timestep cache)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(images_u8), generator=g)[:n]
    x0 = torch.from_numpy(images_u8[idx.numpy()]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    out: dict = {"timesteps": [int(t) for t in timesteps], "n": int(len(x0)), "seed": seed, "models": {}}
    noises = {t: torch.randn(x0.shape, generator=g) for t in timesteps}
    for name, model in models.items():
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
            row = {"t": int(t), **dc_stats(torch.cat(preds), noises[t])}
            abar = float(diffusion.alphas_cumprod[t])
            row["x0_dc_rms"] = row["dc_rms"] * math.sqrt((1 - abar) / abar)
            rows.append(row)
        out["models"][name] = rows
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
    names = list(report["models"])
    head = "| t | " + " | ".join(f"{n} MSE | {n} DC slope | {n} x0 DC err" for n in names) + " |"
    sep = "|---|" + "---:|" * (3 * len(names))
    lines = [head, sep]
    for i, t in enumerate(report["timesteps"]):
        cells = []
        for n in names:
            r = report["models"][n][i]
            cells += [f"{r['mse']:.4f}", f"{r['dc_slope']:.2f}", f"{r['x0_dc_rms']:.3f}"]
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
