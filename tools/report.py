"""The demo report: ``index.html`` (for people) and ``report.md`` (for diffs), from the stages' summaries.

Every number in the report is read from a stage's JSON (``<stage>/done.json``); nothing is computed here.
"""

from __future__ import annotations

import html
from pathlib import Path

from bdmtool.files import atomic_write

def models(s: dict) -> list[tuple[str, str | None, str, str, str]]:
    """(PyTorch stage, export stage or None, label, bits, tag) of every model in the report, in table order:
    the FP model, the shipped students, then the short QAT run (not exported)."""
    out = [("fp", "export_fp", "FP (embedded)", "W32A32", "fp")]
    for k in s:
        if k.startswith("student_"):
            tag = k.removeprefix("student_")
            exp = f"export_{tag}" if f"export_{tag}" in s and "refused" not in s[f"export_{tag}"] else None
            out.append((k, exp, f"{s[k]['label']} (shipped, "
                        f"{s[k]['steps']} steps)", s[k]["bits"], tag))
    for k in s:
        if k.startswith("qat_"):
            out.append((k, None, f"{s[k]['label']} ({s[k]['steps']} steps)", s[k]["bits"], k))
    return out


def table_rows(s: dict) -> list[dict]:
    """One row per model with every number the report shows (also used by the tests)."""
    bench = s.get("bench_host", {}).get("models", {})
    ops = s.get("ops", {})
    fp_ms = next(iter(bench.values()), {}).get("fp_ms")
    rows = []
    for torch_stage, exp, label, bits, tag in models(s):
        b = bench.get(tag, {})
        x = s[exp] if exp else {}
        m = s[torch_stage]["metrics"]
        rows.append({
            "model": label, "bits": bits, "tag": tag,
            "tflite_kib": x["file_bytes"] / 1024 if x else None, "bconv_ops": x.get("bconv_ops"),
            "theory_mib": ops.get(tag, {}).get("size_mib"), "gops": ops.get(tag, {}).get("gops"),
            "fid_torch": m["fid"], "fid_tflite": x["metrics"]["fid"] if x else None,
            "sfid_torch": m["sfid"], "precision": m["precision"], "recall": m["recall"],
            "host_ms": b.get("binary_ms", fp_ms if tag == "fp" else None),
            "speedup": b.get("speedup", 1.0 if tag == "fp" else None)})
    return rows


def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


HEADER = ["model", "bits", ".tflite (KiB)", "LceBconv2d", "size, theory (MiB)", "GOPs", "FID PyTorch", "FID .tflite",
          "sFID", "precision", "recall", "host latency (ms)", "speedup vs FP (host)"]


def _cells(r: dict) -> list[str]:
    return [r["model"], r["bits"], _f(r["tflite_kib"], ".0f"), _f(r["bconv_ops"], "d"), _f(r["theory_mib"], ".2f"),
            _f(r["gops"], ".3f"), _f(r["fid_torch"], ".1f"), _f(r["fid_tflite"], ".1f"), _f(r["sfid_torch"], ".1f"),
            _f(r["precision"], ".2f"), _f(r["recall"], ".2f"), _f(r["host_ms"], ".2f"), _f(r["speedup"], ".2f") + "x"]


def write_report(out: Path, s: dict, env: dict, budget: dict) -> tuple[Path, Path]:
    rows = table_rows(s)
    n, nref = s["fp"]["metrics"]["n_samples"], s["fp"]["metrics"]["n_reference"]
    intro = (f"Tiny U-Net (1.52 M parameters) on MNIST-5k 32x32: the embedded full-precision model, the binarized "
             f"students shipped with bdmtool (trained from it by scripts/make_assets.sh; bdmtool/assets/README.md), "
             f"and a {budget['qat_steps']}-step QAT run (batch {budget['qat_batch']}) that shows training works. "
             f"DDIM {budget['steps']} steps, seed {budget['seed']}, the same initial noise for every model. "
             f"FID/sFID/precision/recall: {n} samples vs {nref} MNIST-5k images (small-sample FID is biased "
             f"upwards; compare rows, not papers). Latencies are x86 host numbers through the LCE Python "
             f"interpreter, not a phone: LCE's optimized binary kernels are ARM code.")
    conv = s.get("bench_host", {}).get("convs", {})
    src = Path(s.get("bench_host", {}).get("convs_source") or "").name
    conv_line = (f"Per-convolution micro-models ({conv.get('layers')} layers of {src}, "
                 f"{conv.get('binary_layers')} binary in the model): sum of FP {conv.get('fp_ms', 0):.2f} ms vs "
                 f"binary {conv.get('binary_ms', 0):.2f} ms on this host.") if conv else ""
    ms = models(s)
    parity = {label: ", ".join(f"{k} {v:.1e}" for k, v in s[exp]["parity"].items()) for _, exp, label, _, _ in ms if exp}
    trained = [(t, label) for t, _, label, _, _ in ms if "loss_png" in s[t]]
    commands = [(s[k].get("label", k), s[k]["command"]) for k in s if isinstance(s[k], dict) and "command" in s[k]]

    md = ["# bdmtool demo report", "", intro, "", "| " + " | ".join(HEADER) + " |",
          "|" + "---|" * len(HEADER)]
    md += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    refused = {k.removeprefix("export_"): s[k]["refused"] for k in s if k.startswith("export_") and "refused" in s[k]}
    md += [""] + [f"Export of {k} refused: {v}" for k, v in refused.items()] if refused else []
    md += ["", "## Samples (PyTorch | .tflite in the LCE interpreter)", ""]
    for t, exp, label, bits, _ in ms:
        md.append(f"**{label} {bits}**: ![]({s[t]['grid']})" + (f" ![]({s[exp]['grid']})" if exp else ""))
    if conv:
        md += ["", "## Per-convolution latency (host)", "", conv_line, "", f"![]({conv['chart']})",
               f"Table: [{conv['table']}]({conv['table']})"]
    md += ["", "## Training loss", ""] + [f"**{label}**: ![]({s[t]['loss_png']})" for t, label in trained]
    md += ["", "## Export parity (max |d eps|)", ""] + [f"- {k}: {v}" for k, v in parity.items()]
    md += ["", "## Reproduce", ""] + [f"- {k}: `{c}`" for k, c in commands]
    md += ["", "## Environment", ""] + [f"- {k}: {v}" for k, v in env.items()] + [""]
    atomic_write(out / "report.md", "\n".join(md))

    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in HEADER)
    body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in _cells(r)) + "</tr>" for r in rows)
    grids = "".join(
        f"<figure><figcaption>{e(label)} {bits}</figcaption><div class=pair>"
        f"<div><img src='{e(s[q]['grid'])}' alt='{e(label)} PyTorch samples'><span>PyTorch</span></div>"
        + (f"<div><img src='{e(s[x]['grid'])}' alt='{e(label)} tflite samples'><span>.tflite (LCE)</span></div>"
           if x else "") + "</div></figure>" for q, x, label, bits, _ in ms)
    losses = "".join(f"<figure><figcaption>{e(label)}</figcaption><img class=plot src='{e(s[t]['loss_png'])}' "
                     f"alt='loss curve'></figure>" for t, label in trained)
    conv_html = (f"<h2>Per-convolution latency (host)</h2><p>{e(conv_line)}</p><img class=wide src='{e(conv['chart'])}' "
                 f"alt='per-conv latency chart'>") if conv else ""
    page = f"""<!doctype html><html lang=en><head><meta charset=utf-8><title>bdmtool demo report</title>
<style>body{{font:14px/1.45 system-ui,sans-serif;max-width:1200px;margin:24px auto;padding:0 16px;color:#222}}
table{{border-collapse:collapse;font-size:13px}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
td:first-child,th:first-child{{text-align:left}}th{{background:#f3f3f3}}.grids{{display:flex;gap:24px;flex-wrap:wrap}}
.pair{{display:flex;gap:8px}}.pair div{{text-align:center}}.pair span{{display:block;color:#666;font-size:12px}}
img{{image-rendering:pixelated}}.pair img{{width:260px}}img.plot{{max-width:560px;image-rendering:auto}}img.wide{{max-width:100%;image-rendering:auto}}
figure{{margin:0}}figcaption{{font-weight:600;margin-bottom:4px}}code{{background:#f6f6f6;padding:1px 4px}}</style>
</head><body><h1>bdmtool demo report</h1><p>{e(intro)}</p>
<table><tr>{head}</tr>{body}</table>{"".join(f"<p>Export of {e(k)} refused: {e(v)}</p>" for k, v in refused.items())}
<h2>Samples, same seed: PyTorch vs .tflite</h2><div class=grids>{grids}</div>
{conv_html}<h2>Training loss</h2><div class=grids>{losses}</div>
<h2>Export parity (max |&Delta;&epsilon;| per stage)</h2><ul>{"".join(f"<li>{e(k)}: {e(str(v))}</li>" for k, v in parity.items())}</ul>
<h2>Reproduce</h2><ul>{"".join(f"<li>{e(k)}: <code>{e(c)}</code></li>" for k, c in commands)}</ul>
<h2>Environment</h2><ul>{"".join(f"<li>{e(k)}: {e(str(v))}</li>" for k, v in env.items())}</ul>
<script>window.addEventListener("load", () => {{ document.body.dataset.brokenImages =
  [...document.images].filter(i => !i.complete || i.naturalWidth === 0).length; }});</script>
</body></html>"""
    atomic_write(out / "index.html", page)
    return out / "index.html", out / "report.md"
