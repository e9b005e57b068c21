"""``results.json`` (schema ``bdmtool-bench`` v1), its Markdown table, the per-conv PNG chart, and diffs.

Layout::

    {"schema": "bdmtool-bench", "version": 1, "status": "complete" | "partial", "error": null | "...",
     "target": {"kind": "host" | "adb", "label", device model / SoC / ABI / Android or host CPU, ...},
     "options": {threads, runs, warmup_runs, repeats, cooldown_s, pin_big_cores, xnnpack, op_profiling},
     "models": {"binary" | "baseline": {"path", "sha256", "size_bytes", "kernel",
                "latency": {"median_ms", "min_ms", "max_ms", "iqr_ms", "n", "sample", "samples_ms"},
                "ops": [...], "layers": {layer: ms}}},          # ops/layers only from phone op profiling
     "speedup": baseline median / binary median, "size_ratio": baseline bytes / binary bytes,
     "convs": [{"layer", "shape", "binary_in_model", "binary": latency, "fp": latency, "speedup"}]}
"""

from __future__ import annotations

import json
from pathlib import Path

from ..files import atomic_savefig, atomic_write

SCHEMA, VERSION = "bdmtool-bench", 1


def new_results(target: dict, options: dict) -> dict:
    return {"schema": SCHEMA, "version": VERSION, "status": "partial", "error": None, "target": target,
            "options": options, "models": {}, "convs": []}


def save(results: dict, path: str | Path) -> Path:
    """Atomic write: a crash mid-benchmark leaves the last complete measurement on disk."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(results, indent=2))
    return path


def load(path: str | Path) -> dict:
    from ..files import read_json

    data = read_json(path, "results.json written by `bdmtool bench`")
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise ValueError(f"{path} is not a bdmtool bench results file (no schema {SCHEMA!r})")
    if data.get("version") != VERSION:
        raise ValueError(f"{path} has results version {data.get('version')}; this bdmtool reads version {VERSION}")
    return data


def finish(results: dict) -> dict:
    m = results["models"]
    if "binary" in m and "baseline" in m:
        results["speedup"] = m["baseline"]["latency"]["median_ms"] / m["binary"]["latency"]["median_ms"]
        results["size_ratio"] = m["baseline"]["size_bytes"] / m["binary"]["size_bytes"]
    results["status"] = "complete"
    return results


def _ms(lat: dict) -> str:
    return f"{lat['median_ms']:.3f} (IQR {lat['iqr_ms']:.3f})"


def markdown(results: dict) -> str:
    t = results["target"]
    o = results["options"]
    lines = [f"### Benchmark: {t['label']}", "",
             f"threads {o['threads']}, {o['runs']} runs x {o['repeats']} repeats, warm-up {o['warmup_runs']}, "
             f"XNNPACK {'on' if o['xnnpack'] else 'off'}; status {results['status']}"
             + (f" ({results['error']})" if results.get("error") else ""), "",
             "| model | file | size (KiB) | latency ms, median (IQR) | kernel |", "|---|---|---:|---:|---|"]
    for role, m in results["models"].items():
        lines.append(f"| {role} | {Path(m['path']).name} | {m['size_bytes'] / 1024:.1f} | {_ms(m['latency'])} "
                     f"| {m['kernel']} |")
    if "speedup" in results:
        faster = "faster" if results["speedup"] >= 1 else "slower"
        lines += ["", f"Whole model: speedup (baseline / binary latency) **{results['speedup']:.2f}x** (binary "
                      f"{faster}); the binary file is **{results['size_ratio']:.2f}x** smaller."]
    if results["convs"]:
        lines += ["", "| layer | shape HxWxCin-Cout-k s p | binary in model | FP ms | binary ms | speedup |",
                  "|---|---|:-:|---:|---:|---:|"]
        for c in results["convs"]:
            lines.append(f"| {c['layer']} | {c['shape']} | {'yes' if c['binary_in_model'] else 'no'} | "
                         f"{c['fp']['median_ms']:.4f} | {c['binary']['median_ms']:.4f} | {c['speedup']:.2f}x |")
    return "\n".join(lines) + "\n"


def chart(results: dict, path: str | Path) -> Path | None:
    """Bar chart of per-conv FP vs binary median time with the speedup on top (distinct shapes)."""
    if not results["convs"]:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows, seen = [], set()
    for c in results["convs"]:
        if c["shape"] not in seen:
            seen.add(c["shape"])
            rows.append(c)
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(rows) + 2), 4.2))
    fp = [c["fp"]["median_ms"] for c in rows]
    bn = [c["binary"]["median_ms"] for c in rows]
    ax.bar(x - 0.2, fp, 0.4, label="FP conv (CONV_2D)", color="#8c8c8c")
    ax.bar(x + 0.2, bn, 0.4, label="binary conv (LceBconv2d)", color="#1f77b4")
    for i, c in enumerate(rows):
        ax.text(i, max(fp[i], bn[i]) * 1.05, f"{c['speedup']:.1f}x", ha="center", fontsize=7)
    ax.set_yscale("log")
    ax.set_xticks(x, [c["shape"] for c in rows], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("median latency (ms, log)")
    ax.set_title(f"Per-convolution latency: {results['target']['label']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    atomic_savefig(fig, path, dpi=120)
    plt.close(fig)
    return path


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def compare(a: dict, b: dict) -> str:
    """Markdown diff of two results files: whole-model medians and per-shape speedups, B relative to A."""
    lines = [f"A: {a['target']['label']}  vs  B: {b['target']['label']}", "",
             "| model | A median ms | B median ms | B/A |", "|---|---:|---:|---:|"]
    for role in sorted(set(a["models"]) | set(b["models"])):
        ma, mb = a["models"].get(role), b["models"].get(role)
        va = ma["latency"]["median_ms"] if ma else None
        vb = mb["latency"]["median_ms"] if mb else None
        ratio = f"{vb / va:.2f}" if va and vb else "-"
        lines.append(f"| {role} | {_num(va)} | {_num(vb)} | {ratio} |")
    if "speedup" in a or "speedup" in b:
        lines.append(f"| speedup (FP/binary) | {a.get('speedup', float('nan')):.2f} | "
                     f"{b.get('speedup', float('nan')):.2f} | |")
    sa = {c["shape"]: c["speedup"] for c in a["convs"]}
    sb = {c["shape"]: c["speedup"] for c in b["convs"]}
    common = [s for s in sa if s in sb]
    if common:
        lines += ["", "| conv shape | A speedup | B speedup |", "|---|---:|---:|"]
        lines += [f"| {s} | {sa[s]:.2f}x | {sb[s]:.2f}x |" for s in common]
    only = sorted(set(sa) ^ set(sb))
    if only:
        lines.append(f"\n{len(only)} conv shape(s) measured in only one run: {', '.join(only[:6])}")
    return "\n".join(lines) + "\n"
