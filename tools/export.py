"""``bdmtool export``: checkpoint -> bundle (PyTorch side) -> exporter pipeline (TensorFlow side)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def export_checkpoint(ckpt: str | Path, out: str | Path, target: str = "lce", name: str | None = None,
                      tol: float = 1e-4, log: Callable[[str], None] = print):
    from bdmtool.exporter.pipeline import export_lce
    from bdmtool.trainer.bundle import write_bundle

    bundle = write_bundle(ckpt, Path(out) / "bundle")
    log(f"[bundle] {bundle}")
    return export_lce(bundle, out, name=name, tol=tol, target=target, log=log)
