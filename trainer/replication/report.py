"""The replication report: each table with the paper's FID beside ours, and a ✔/✘ per claimed ordering.

Arms trained over several seeds (the headline pairs) show mean ± half the range. A claim is judged on the seeds
both arms have finished: ✔ when the mean agrees with the paper *and* the ordering holds on most of those seeds,
✘ when both disagree with it, ≈ (undecided) when the mean and the seeds point different ways (e.g. a mean
carried by one seed); the report says on how many seeds each ordering held. A claim judged on one seed is also
≈ when its two FIDs differ by less than the noise of such a difference, 2·√2·σ, with σ the seed-to-seed standard
deviation pooled over the table's arms that have several seeds (none: no such test).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from math import sqrt
from statistics import mean, variance

from bdmtool.files import atomic_write

from .run import ReplicationBudget, teacher_id
from .tables import TABLES


def _seeds(key: str, scores: dict[str, dict]) -> list[dict]:
    """The score of ``key`` and of its extra-seed runs (``<key>_seed<k>``), seed 0 first."""
    return [scores[k] for k in [key] + sorted(k for k in scores if k.startswith(f"{key}_seed"))]


def _by_seed(key: str, scores: dict[str, dict]) -> dict[int, float]:
    """{training seed: FID} of ``key``'s runs (a claim compares two arms on the seeds both have finished)."""
    return {int(r["params"]["arm"]["seed"]): r["metrics"]["fid"] for r in _seeds(key, scores)}


def _fid(key: str, scores: dict[str, dict]) -> tuple[float, float, int]:
    """(mean FID, half range, number of seeds)."""
    f = [r["metrics"]["fid"] for r in _seeds(key, scores)]
    return mean(f), (max(f) - min(f)) / 2, len(f)


def verdict(mean_holds: bool, seeds_holding: int, seeds: int) -> str:
    """"holds" / "fails" / "undecided": one seed decides by itself; over several, the mean and the majority of
    seeds must agree (a tie or a disagreement is undecided)."""
    if seeds <= 1:
        return "holds" if mean_holds else "fails"
    if mean_holds and 2 * seeds_holding > seeds:
        return "holds"
    if not mean_holds and 2 * seeds_holding < seeds:
        return "fails"
    return "undecided"


MARK = {"holds": "✔", "fails": "✘", "undecided": "≈"}


def seed_sigma(rows: list[dict]) -> float | None:
    """The seed-to-seed standard deviation of FID pooled over ``rows`` with several seeds (root of the mean of
    their sample variances); None when no row has two seeds."""
    var = [variance(r["fids"]) for r in rows if len(r["fids"]) > 1]
    return sqrt(mean(var)) if var else None


def summarize(scores: dict[str, dict], tables: tuple[str, ...]) -> dict:
    """{"tables": [{key, title, source, seed_sigma, rows: [...], claims: [...]}]} from the arms' score records."""
    out = []
    for tkey in tables:
        t = TABLES[tkey]
        rows = []
        for key, paper in [(k, p) for k, p in t.rows if k in scores]:  # rows not run (--only) are left out
            f, spread, n = _fid(key, scores)
            runs = _seeds(key, scores)
            avg = {m: mean(r["metrics"][m] for r in runs) for m in ("sfid", "precision", "recall")}
            rows.append({"key": key, "label": runs[0]["label"], "paper_fid": paper, "fid": f, "fid_spread": spread,
                         "seeds": n, **avg, "final_loss": runs[0]["final_loss"], "grid": runs[0]["grid"],
                         "fids": [r["metrics"]["fid"] for r in runs]})
        claims = []
        sigma = seed_sigma(rows)
        for c in [c for c in t.claims if c.better in scores and c.worse in scores]:
            better, worse = _by_seed(c.better, scores), _by_seed(c.worse, scores)
            pairs = [(better[s], worse[s]) for s in sorted(set(better) & set(worse))]  # like with like: same seeds
            fb, fw = mean(a for a, _ in pairs), mean(b for _, b in pairs)
            k = sum(a < b for a, b in pairs)
            within = len(pairs) == 1 and sigma is not None and abs(fb - fw) < 2 * sqrt(2) * sigma
            claims.append({"claim": c.text, "better": c.better, "worse": c.worse, "fid_better": fb, "fid_worse": fw,
                           "verdict": "undecided" if within else verdict(fb < fw, k, len(pairs)),
                           "within_noise": within, "seeds_holding": k, "seeds": len(pairs),
                           "seed_list": sorted(set(better) & set(worse))})
            claims[-1]["holds"] = claims[-1]["verdict"] == "holds"
        out.append({"key": tkey, "title": t.title, "source": t.source, "seed_sigma": sigma, "rows": rows,
                    "claims": claims})
    seconds = sum(float(r.get("seconds") or 0.0) for r in scores.values())
    return {"tables": out, "n_runs": len(scores), "run_seconds": round(seconds, 1)}


def summary_markdown(summary: dict) -> str:
    """Every claimed ordering of every table in one table (what the README shows)."""
    lines = ["| table | claimed ordering | FID (ours) | holds |", "|---|---|---|:-:|"]
    for t in summary["tables"]:
        for c in t["claims"]:
            lines.append(f"| {t['title'].split(':')[0]} | {c['claim']} | {c['fid_better']:.2f} vs "
                         f"{c['fid_worse']:.2f} | {MARK[c['verdict']]}{_on_seeds(c)} |")
    held = sum(c["holds"] for t in summary["tables"] for c in t["claims"])
    open_ = sum(c["verdict"] == "undecided" for t in summary["tables"] for c in t["claims"])
    total = sum(len(t["claims"]) for t in summary["tables"])
    undecided = (f", {open_} undecided (≈: the mean and most seeds disagree, or one seed's difference is within "
                 "the seed-to-seed noise)" if open_ else "")
    lines += ["", f"{held} of {total} claimed orderings hold{undecided}; {summary['n_runs']} runs, "
                  f"{summary['run_seconds'] / 3600:.1f} h of training, sampling and scoring in all (one core each)."]
    return "\n".join(lines)


def _on_seeds(c: dict) -> str:
    """Which seeds a claim was judged on: an arm with one seed is compared with the other arm's same seed,
    not with its mean over seeds (which the table's row shows)."""
    if c["seeds"] > 1:
        return f" ({c['seeds_holding']}/{c['seeds']} seeds)"
    noise = ", within noise" if c.get("within_noise") else ""
    return f" (seed {c['seed_list'][0]}{noise})" if c.get("seed_list") else ""


def _f(v, fmt=".2f") -> str:
    return "–" if v is None else format(v, fmt)


def contact_sheet(rows: list[dict], root: Path, path: Path, title: str) -> Path | None:
    """One panel per row: the top-left quarter of its sample grid (16 of the 64 images at full size), titled
    with its label and FID. Reads only the committed ``samples.png`` files; None when no row has one."""
    rows = [r for r in rows if r["grid"] and (root / r["grid"]).is_file()]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt

    from bdmtool.files import atomic_savefig

    cols = min(4, len(rows))
    lines = (len(rows) + cols - 1) // cols
    fig, axes = plt.subplots(lines, cols, figsize=(2.6 * cols, 3.0 * lines), squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for ax, r in zip(axes.flat, rows):
        img = mpimg.imread(root / r["grid"])
        h, w = img.shape[:2]
        ax.imshow(img[: h // 2 + 2, : w // 2 + 2], cmap="gray", vmin=0, vmax=1 if img.max() <= 1 else 255)
        fid = f"{r['fid']:.1f}" + (f" ± {r['fid_spread']:.1f}" if r["seeds"] > 1 else "")
        ax.set_title(f"{r['label']}\nFID {fid}", fontsize=8)
    fig.suptitle(title, fontsize=10)
    atomic_savefig(fig, path, dpi=100)
    plt.close(fig)
    return path


def render_markdown(summary: dict, budget: ReplicationBudget, teacher: str, environment: dict,
                    figures: dict[str, str] | None = None) -> str:
    b = budget
    lines = ["# Mini-replication of BinaryDM and BiDM", "",
             f"Every run: {b.steps} QAT steps × batch {b.batch_size} from `{Path(teacher).name}` "
             f"({teacher_id(teacher)}), lr {b.lr:g} (cosine, "
             f"{b.warmup_steps} warm-up steps), bdmtool's defaults of each method (docs/methods.md). Scores: "
             f"{b.n_samples} DDIM-{b.sample_steps} samples (seed {b.sample_seed}, x0 clipping) vs {b.n_reference} "
             "images of the teacher's training data (MNIST-5k for the embedded teacher). The papers' FIDs are on "
             "other datasets and models: compare orderings, not values.",
             "", f"Environment: {json.dumps(environment)}", "", "## Summary", "", summary_markdown(summary), ""]
    for t in summary["tables"]:
        lines += [f"## {t['title']}", "", f"Paper numbers: {t['source']}.", ""]
        if (figures or {}).get(t["key"]):
            lines += [f"![16 samples of each run (seed 0)]({figures[t['key']]})", ""]
        lines += ["| run | paper FID | FID (ours) | sFID | precision | recall | final loss | seeds |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in t["rows"]:
            fid = _f(r["fid"]) + (f" ± {r['fid_spread']:.2f}" if r["seeds"] > 1 else "")
            lines.append(f"| [{r['label']}]({r['grid']}) | {_f(r['paper_fid'])} | {fid} | {_f(r['sfid'])} | "
                         f"{_f(r['precision'])} | {_f(r['recall'])} | {_f(r['final_loss'], '.4f')} | {r['seeds']} |")
        if t.get("seed_sigma") is not None:
            lines += ["", f"Seed-to-seed σ of FID in this table: {t['seed_sigma']:.2f} (pooled over its runs with "
                          f"several seeds); a one-seed difference below 2·√2·σ = {2 * sqrt(2) * t['seed_sigma']:.1f} "
                          "is within noise (≈)."]
        lines += ["", "| claimed ordering | FID (ours) | holds |", "|---|---|:-:|"]
        for c in t["claims"]:
            lines.append(f"| {c['claim']} | {c['fid_better']:.2f} vs {c['fid_worse']:.2f} | "
                         f"{MARK[c['verdict']]}{_on_seeds(c)} |")
        lines.append("")
    return "\n".join(lines)


def write_report(out: str | os.PathLike, scores: dict[str, dict], tables: tuple[str, ...],
                 budget: ReplicationBudget, teacher: str, environment: dict) -> tuple[Path, Path]:
    summary = summarize(scores, tables)
    out = Path(out)
    doc = {"budget": budget.__dict__, "teacher": Path(teacher).name, "teacher_id": teacher_id(teacher),
           "environment": environment, **summary,
           "summary_markdown": summary_markdown(summary),
           "runs": {k: {kk: v for kk, v in r.items() if kk not in ("params", "reused")} for k, r in scores.items()}}
    md, js = out / "report.md", out / "report.json"
    figures = {t["key"]: f"{t['key']}.png" for t in summary["tables"]
               if contact_sheet(t["rows"], out, out / f"{t['key']}.png", t["title"])}
    atomic_write(js, json.dumps(doc, indent=2))
    atomic_write(md, render_markdown(summary, budget, teacher, environment, figures))
    return md, js
