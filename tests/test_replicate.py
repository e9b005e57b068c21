"""`bdmtool replicate` end to end at a minimal budget: two configurations over two seeds from a micro teacher;
the report's numbers are the runs' own metrics, the orderings follow from them, a re-run reuses everything."""

import json
import os
import shutil
import subprocess

import pytest

import bdmtool

from conftest import MICRO_UNET, bdmtool_cmd
from bdmtool.trainer.replication import ARMS, TABLES, arms_for
from bdmtool.trainer.spec import build_train_spec
from bdmtool.trainer.train import train

COMMON = ["data.limit=32", "train.batch_size=4", "train.threads=1"]


def test_every_table_names_known_arms_and_each_claim_compares_two_of_its_rows():
    for t in TABLES.values():
        keys = [k for k, _ in t.rows]
        assert all(k in ARMS for k in keys)
        assert all(c.better in keys and c.worse in keys for c in t.claims), t.key
    arms = arms_for(tuple(TABLES), seeds=3)
    assert len({a.key for a in arms}) == len(arms)  # shared rows (BinaryDM W1A4, BiDM) are trained once
    assert {a.key for a in arms if a.seed == 2} == {"binarydm_w1a4_seed2", "baseline_w1a4_seed2", "bidm_w1a1_seed2",
                                                     "xnor_w1a1_seed2"}
    with pytest.raises(ValueError, match="unknown table"):
        arms_for(("nope",), 1)


def test_only_selects_rows_their_seeds_and_single_seed_runs():
    t = tuple(TABLES)
    pair = [a.key for a in arms_for(t, 3, ("xnor_w1a1", "bidm_w1a1"))]
    assert pair == ["xnor_w1a1", "bidm_w1a1", "bidm_w1a1_seed1", "xnor_w1a1_seed1", "bidm_w1a1_seed2",
                    "xnor_w1a1_seed2"]
    assert [a.key for a in arms_for(t, 3, ("bidm_w1a1",))] == ["bidm_w1a1"]  # no partner: no extra seeds
    one = arms_for(t, 3, ("baseline_w1a4_seed2",))
    assert [(a.key, a.seed, a.method) for a in one] == [("baseline_w1a4_seed2", 2, "baseline")]
    with pytest.raises(ValueError, match="baseline_w1a4_seed2"):
        arms_for(t, 2, ("baseline_w1a4_seed2",))  # seed 2 does not exist with --seeds 2
    with pytest.raises(ValueError, match="fp_seed1"):
        arms_for(t, 3, ("fp_seed1",))


def _run(args, timeout=900):
    return subprocess.run([*bdmtool_cmd(), "replicate", *args], capture_output=True, text=True, timeout=timeout)


def test_replicate_two_configurations_report_matches_the_runs_and_reruns_reuse(tmp_path):
    fp = train(build_train_spec("tiny", "digits", 2, [*MICRO_UNET, *COMMON]), tmp_path / "fp", progress=False)
    out = tmp_path / "rep"
    args = ["--out", str(out), "--tables", "binarydm_t1", "--only", "baseline_w1a4,binarydm_w1a4", "--steps", "2",
            "--n", "8", "--ref-limit", "20", "--seeds", "2", "--sample-steps", "3", "--teacher", str(fp)]
    r = _run(args)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    keys = ["baseline_w1a4", "binarydm_w1a4", "baseline_w1a4_seed1", "binarydm_w1a4_seed1"]
    assert sorted(rep["runs"]) == sorted(keys)
    scores = {k: json.loads((out / "runs" / k / "score.json").read_text()) for k in keys}
    for k in keys:  # every run is a normal, resumable training folder with its own samples
        assert (out / "runs" / k / "model.ckpt").is_file() and (out / "runs" / k / "metrics.jsonl").is_file()
        assert rep["runs"][k]["metrics"] == scores[k]["metrics"]
        assert (out / scores[k]["grid"]).is_file() and scores[k]["n_samples"] == 8
    assert scores["binarydm_w1a4_seed1"]["params"]["arm"]["seed"] == 1
    (table,) = rep["tables"]
    rows = {r["key"]: r for r in table["rows"]}
    for k in ("baseline_w1a4", "binarydm_w1a4"):
        fids = [scores[k]["metrics"]["fid"], scores[f"{k}_seed1"]["metrics"]["fid"]]
        assert rows[k]["fids"] == fids and rows[k]["fid"] == pytest.approx(sum(fids) / 2)
        assert rows[k]["fid_spread"] == pytest.approx(abs(fids[0] - fids[1]) / 2) and rows[k]["seeds"] == 2
    assert rows["binarydm_w1a4"]["paper_fid"] == 87.77 and rows["baseline_w1a4"]["paper_fid"] == 100.17
    (claim,) = table["claims"]  # only the W1A4 ordering has both of its rows here
    from bdmtool.trainer.replication.report import MARK, verdict

    pairs = [(scores[f"binarydm_w1a4{s}"]["metrics"]["fid"], scores[f"baseline_w1a4{s}"]["metrics"]["fid"])
             for s in ("", "_seed1")]
    want = verdict(rows["binarydm_w1a4"]["fid"] < rows["baseline_w1a4"]["fid"], sum(a < b for a, b in pairs), 2)
    assert claim["verdict"] == want and claim["holds"] == (want == "holds")
    md = (out / "report.md").read_text()
    assert "BinaryDM W1A4 < Baseline W1A4" in md and f"{MARK[want]} (" in md
    assert f"{rows['binarydm_w1a4']['fid']:.2f}" in md
    held = sum(c["holds"] for t in rep["tables"] for c in t["claims"])
    assert "## Summary" in md and f"{held} of {sum(len(t['claims']) for t in rep['tables'])} claimed" in md
    sheet = out / "binarydm_t1.png"  # each table's runs side by side, from their committed grids
    assert sheet.stat().st_size > 5_000 and "](binarydm_t1.png)" in md

    again = _run(args)
    assert again.returncode == 0 and again.stdout.count("(reused)") == 4, again.stdout[-2000:]
    assert json.loads((out / "report.json").read_text())["tables"] == rep["tables"]

    # what a fresh clone holds of a committed replication folder (the .gitignore keeps score.json and the grid of
    # each run, not its checkpoints), with the teacher at another path: every score is reused, nothing retrains
    clone, moved = tmp_path / "clone", tmp_path / "elsewhere" / "teacher.ckpt"
    moved.parent.mkdir()
    shutil.copy(fp, moved)
    for k in keys:
        assert scores[k]["grid"] == f"runs/{k}/samples.png"
        (clone / "runs" / k).mkdir(parents=True)
        for name in ("score.json", "samples.png"):
            shutil.copy(out / "runs" / k / name, clone / "runs" / k / name)
    cloned = _run(["--out", str(clone), *args[2:-2], "--teacher", str(moved)])
    assert cloned.returncode == 0 and cloned.stdout.count("(reused)") == 4, cloned.stdout[-2000:]
    assert json.loads((clone / "report.json").read_text())["tables"] == rep["tables"]
    assert (clone / "binarydm_t1.png").stat().st_size > 5_000  # drawn from the grids alone
    with open(moved, "ab") as f:  # other weights: the scores are not theirs
        f.write(b"\0")
    changed = _run(["--out", str(clone), *args[2:4], *args[6:-2], "--teacher", str(moved), "--report-only"])
    assert changed.returncode == 1 and "has finished" in changed.stderr, changed.stderr[-1500:]

    # a worker running one row (--only) must not shrink the report to that row; --report-only trains nothing
    one = _run([*args[:4], "--only", "binarydm_w1a4", *args[6:]])
    assert one.returncode == 0 and one.stdout.count("(reused)") == 1, one.stdout[-2000:]
    assert sorted(json.loads((out / "report.json").read_text())["runs"]) == sorted(keys)
    (out / "report.md").unlink()
    (out / "runs" / "binarydm_w1a4_seed1" / "score.json").unlink()  # unfinished: left out, not trained
    rep_only = _run([*args[:4], *args[6:], "--report-only"])
    assert rep_only.returncode == 0 and "[replicate] 1/" not in rep_only.stdout, rep_only.stdout[-2000:]
    assert sorted(json.loads((out / "report.json").read_text())["runs"]) == sorted(set(keys) - {"binarydm_w1a4_seed1"})
    assert not (out / "runs" / "binarydm_w1a4_seed1" / "score.json").exists() and (out / "report.md").is_file()


def test_replicate_bad_arguments_are_one_line_errors(tmp_path):
    for args, words in ((["--tables", "nope"], "unknown table"), (["--only", "xnor_w1a1"], "is not a run of"),
                        (["--teacher", str(tmp_path / "missing.ckpt")], "not found"), (["--jobs", "0"], "--jobs"),
                        (["--n", "0"], "--n must be >= 1"), (["--n", "1"], "--n must be >= 2"),
                        (["--budget", "nan"], "finite number"), (["--report-only"], "has finished"),
                        (["--teacher", os.path.join(bdmtool.ASSETS, "tiny_mnist_xnor_w1a1.ckpt")], "binarized")):
        r = _run(["--out", str(tmp_path / "o"), "--tables", "binarydm_t1", *args] if "--tables" not in args
                 else ["--out", str(tmp_path / "o"), *args], timeout=120)
        assert r.returncode == 1 and "Traceback" not in r.stderr, (args, r.stderr[-1500:])
        assert r.stderr.strip().splitlines()[-1].startswith("Error:") and words in r.stderr, (args, r.stderr)


def test_the_committed_replication_record_is_reports_scores_and_grids_only():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isdir(os.path.join(root, ".git")):
        pytest.skip("not a git checkout")

    def ignored(path):
        return subprocess.run(["git", "check-ignore", "-q", path], cwd=root).returncode == 0

    kept = ["replication/report.md", "replication/report.json", "replication/runs/xnor_w1a1/score.json",
            "replication/runs/xnor_w1a1/samples.png"]
    dropped = ["replication/runs/xnor_w1a1/model.ckpt", "replication/runs/xnor_w1a1/state.ckpt",
               "replication/runs/xnor_w1a1/samples.npz", "replication/runs/xnor_w1a1/metrics.jsonl"]
    assert not any(map(ignored, kept)) and all(map(ignored, dropped))


def test_a_claim_compares_two_arms_on_the_seeds_both_have_finished():
    """BinaryDM has seeds 0 and 1, the baseline only seed 0: the ordering is judged on seed 0 alone (a mean over
    two seeds against one is not like with like), while each row still shows its own mean."""
    from bdmtool.trainer.replication.report import summarize, summary_markdown

    def rec(key, seed, fid):
        return {"params": {"arm": {"seed": seed}}, "metrics": {"fid": fid, "sfid": 1.0, "precision": 0.0,
                                                               "recall": 0.0},
                "label": key, "final_loss": None, "grid": "", "seconds": 1.0}

    scores = {"binarydm_w1a4": rec("b", 0, 130.0), "binarydm_w1a4_seed1": rec("b", 1, 100.0),
              "baseline_w1a4": rec("a", 0, 120.0)}
    summary = summarize(scores, ("binarydm_t1",))
    t = summary["tables"][0]
    (claim,) = t["claims"]
    assert (claim["fid_better"], claim["fid_worse"], claim["seeds"], claim["holds"]) == (130.0, 120.0, 1, False)
    assert claim["within_noise"] and t["seed_sigma"] == pytest.approx(30 / 2 ** 0.5)
    # not read against the row's 115; and 10 FID on one seed is within the noise of BinaryDM's two seeds (sd 21)
    assert "| 130.00 vs 120.00 | ≈ (seed 0, within noise) |" in summary_markdown(summary)
    row = next(r for r in t["rows"] if r["key"] == "binarydm_w1a4")
    assert row["fid"] == 115.0 and row["seeds"] == 2
    scores["baseline_w1a4_seed1"] = rec("a", 1, 125.0)  # now both seeds: 115 vs 122.5, held on 1 of 2
    (claim,) = summarize(scores, ("binarydm_t1",))["tables"][0]["claims"]
    assert (claim["fid_better"], claim["fid_worse"], claim["seeds"], claim["seeds_holding"], claim["holds"]) == \
        (115.0, 122.5, 2, 1, False)
    assert claim["verdict"] == "undecided"  # the mean holds on the strength of one seed: neither ✔ nor ✘


def test_a_one_seed_claim_within_the_seed_noise_is_undecided():
    """σ pooled over the table's multi-seed arms (root mean of their sample variances); a one-seed difference
    below 2·√2·σ is ≈ "within noise", above it the sign decides; multi-seed claims are not tested this way."""
    import math

    from bdmtool.trainer.replication.report import render_markdown, seed_sigma, summarize, summary_markdown
    from bdmtool.trainer.replication.run import ReplicationBudget

    def rec(seed, fid):
        return {"params": {"arm": {"seed": seed}}, "metrics": {"fid": fid, "sfid": 1.0, "precision": 0.0,
                                                               "recall": 0.0},
                "label": "x", "final_loss": None, "grid": "", "seconds": 1.0}

    assert seed_sigma([{"fids": [1.0]}]) is None
    assert seed_sigma([{"fids": [10.0, 14.0]}, {"fids": [0.0, 2.0, 4.0]}]) == pytest.approx(math.sqrt((8 + 4) / 2))
    base = {"binarydm_w1a4": rec(0, 120.0), "binarydm_w1a4_seed1": rec(1, 124.0),  # sigma = 2.83, bar = 8.0
            "baseline_w1a4": rec(0, 121.0), "baseline_w1a4_seed1": rec(1, 125.0)}
    for w8, want in (((110.0, 117.9), "undecided"), ((110.0, 118.1), "holds"), ((118.1, 110.0), "fails")):
        scores = base | {"binarydm_w1a8": rec(0, w8[0]), "baseline_w1a8": rec(0, w8[1])}
        summary = summarize(scores, ("binarydm_t1",))
        claim = next(c for c in summary["tables"][0]["claims"] if c["better"] == "binarydm_w1a8")
        assert claim["verdict"] == want and claim["within_noise"] == (want == "undecided"), (w8, claim)
        w4 = next(c for c in summary["tables"][0]["claims"] if c["better"] == "binarydm_w1a4")
        assert not w4["within_noise"] and w4["seeds"] == 2  # two seeds: judged by mean and majority only
    assert "≈ (seed 0, within noise)" not in summary_markdown(summary)
    md = render_markdown(summarize(base | {"binarydm_w1a8": rec(0, 110.0), "baseline_w1a8": rec(0, 117.9)},
                                   ("binarydm_t1",)), ReplicationBudget(),
                         os.path.join(bdmtool.ASSETS, "tiny_mnist_fp.ckpt"), {})
    assert "≈ (seed 0, within noise)" in md and "2·√2·σ = 8.0 is within noise" in md


def test_a_claim_needs_the_mean_and_most_seeds():
    """The verdict over several seeds: ✔ when the mean and most seeds agree with the paper, ✘ when both disagree,
    ≈ otherwise (the case met at W1A4: a mean carried by one seed of three); the summary counts it apart."""
    from bdmtool.trainer.replication.report import summarize, summary_markdown, verdict

    assert [verdict(True, 1, 1), verdict(False, 0, 1)] == ["holds", "fails"]
    assert [verdict(True, 2, 3), verdict(False, 1, 3), verdict(True, 1, 3), verdict(False, 2, 3),
            verdict(True, 1, 2), verdict(False, 1, 2)] == ["holds", "fails", "undecided", "undecided",
                                                              "undecided", "undecided"]

    def rec(seed, fid):
        return {"params": {"arm": {"seed": seed}}, "metrics": {"fid": fid, "sfid": 1.0, "precision": 0.0,
                                                               "recall": 0.0},
                "label": "x", "final_loss": None, "grid": "", "seconds": 1.0}

    better, worse = (130.33, 121.95, 119.42), (126.79, 115.51, 133.04)  # the W1A4 pair's three seeds
    scores = {f"binarydm_w1a4{'' if s == 0 else f'_seed{s}'}": rec(s, f) for s, f in enumerate(better)}
    scores |= {f"baseline_w1a4{'' if s == 0 else f'_seed{s}'}": rec(s, f) for s, f in enumerate(worse)}
    summary = summarize(scores, ("binarydm_t1",))
    (claim,) = summary["tables"][0]["claims"]
    assert claim["fid_better"] < claim["fid_worse"] and claim["seeds_holding"] == 1
    assert claim["verdict"] == "undecided" and not claim["holds"]
    md = summary_markdown(summary)
    assert "≈ (1/3 seeds)" in md and "0 of 1 claimed orderings hold, 1 undecided" in md


def test_an_arm_another_process_holds_is_skipped_and_a_dead_holders_lock_is_free(tmp_path):
    """Two workers (or two terminals) on one --out: an arm another process is training is skipped with one line
    naming that process, not trained twice into one folder; the lock dies with its holder (kill -9 included)."""
    import sys

    from bdmtool.trainer.replication import ReplicationBudget, run_replication
    from bdmtool.trainer.replication.run import _arm_lock

    folder = tmp_path / "runs" / "xnor_w1a1"
    folder.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"f = open({str(folder / '.lock')!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX)\n"
        "f.seek(0); f.truncate(); f.write(str(os.getpid())); f.flush(); print('held', flush=True); time.sleep(600)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        lines = []
        teacher = os.path.join(bdmtool.ASSETS, "tiny_mnist_fp.ckpt")
        scores = run_replication(tmp_path, ("bidm_t1",), ReplicationBudget(steps=1, n_samples=2, seeds=1), teacher,
                                 only=("xnor_w1a1",), log=lines.append)
        assert scores == {} and not (folder / "model.ckpt").exists()  # nothing trained
        assert f"xnor_w1a1: skipped, {folder} is being trained or scored by another process (pid {holder.pid})" \
            in lines[-1]
    finally:
        holder.kill()
        holder.wait()
    with _arm_lock(folder):  # the killed holder's lock went with it
        assert (folder / ".lock").read_text() == str(os.getpid())
