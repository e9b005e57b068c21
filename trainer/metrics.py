"""Training logs: an append-only ``metrics.jsonl`` and the loss-curve PNG drawn from it."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

from ..files import atomic_write


class MetricsLog:
    """Append one JSON object per logged step; on resume, lines past the resumed step are dropped."""

    def __init__(self, path: str | os.PathLike, resume_step: int = 0):
        self.path = Path(path)
        if self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def log(self, record: dict) -> None:
        """Append one line (strict JSON: NaN/inf are refused); a failed write is rolled back, not left torn."""
        line = (json.dumps(record, allow_nan=False) + "\n").encode()
        with open(self.path, "ab") as f:
            size = f.tell()
            try:
                f.write(line)
                f.flush()
            except OSError:
                f.truncate(size)
                raise


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Rows of a metrics.jsonl; [] when nothing has been logged yet."""
    if not Path(path).exists():
        return []
    rows = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill mid-write
                continue
    return rows


def plot_loss_curve(metrics_path: str | os.PathLike, png_path: str | os.PathLike, title: str = "") -> Path | None:
    """Plot every ``loss*`` term against the step (log scale) with a moving average; returns the PNG path."""
    rows = read_metrics(metrics_path)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    keys = sorted({k for r in rows for k in r if k.startswith("loss")})
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for k in keys:
        pts = [(r["step"], r[k]) for r in rows if k in r]
        steps, vals = np.array([p[0] for p in pts]), np.array([p[1] for p in pts], dtype=float)
        line, = ax.plot(steps, vals, alpha=0.3, lw=0.8)
        w = max(1, len(vals) // 20)
        if len(vals) > w:
            smooth = np.convolve(vals, np.ones(w) / w, mode="valid")
            ax.plot(steps[w - 1:], smooth, color=line.get_color(), lw=1.8, label=f"{k} (avg {w})")
        else:
            line.set_label(k)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title or Path(metrics_path).parent.name)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    png_path = Path(png_path)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write(png_path, buf.getvalue())
    return png_path
