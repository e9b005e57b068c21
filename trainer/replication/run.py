"""Train and score every arm of the chosen tables from one FP teacher, with one recipe, resumably.

Each arm is a normal ``bdmtool train`` run folder (``OUT/runs/<key>/``), so an interrupted replication
continues exactly (``train`` resumes from ``state.ckpt``) and finished runs are reused. Each arm's score
lands in ``OUT/runs/<key>/score.json`` together with the parameters that produced it (budget, sampler,
reference); a later call with the same parameters reuses it, a different budget recomputes it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from bdmtool.files import atomic_write, file_sha256
from bdmtool.trainer.runtime.threads import allowed_cpus

from .tables import Arm, arms_for

SCORE_VERSION = 2  # 2: the teacher is identified by its content (sha256), not its path


def teacher_id(teacher: str | os.PathLike) -> str:
    """``sha256:`` and the first 16 hex digits of the teacher file's sha256: a score stays valid when the checkout
    or the file moves (a committed replication folder is reused by a fresh clone) and is recomputed when the
    weights change."""
    st = os.stat(teacher)
    return _content_id(str(teacher), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=8)
def _content_id(teacher: str, mtime_ns: int, size: int) -> str:  # stat in the key: a rewritten file is rehashed
    return f"sha256:{file_sha256(teacher)[:16]}"


@dataclass(frozen=True)
class ReplicationBudget:
    """The shared recipe (every arm gets exactly this) and what ``--budget k`` scales (steps and N)."""

    steps: int = 2000  # QAT steps per arm (at 600 the W1A8 / W1A1 students still draw blobs: docs/methods.md)
    batch_size: int = 32
    lr: float = 1e-3  # cosine decay, warm-up below: the shipped students' recipe (docs/methods.md)
    warmup_steps: int = 50
    n_samples: int = 1000  # DDIM samples per arm for FID / sFID / precision / recall
    n_reference: int = 5000  # images of the teacher's data (MNIST-5k) for the reference statistics
    sample_steps: int = 50
    sample_seed: int = 0
    seeds: int = 3  # headline pairs are trained with seeds 0..seeds-1

    def scaled(self, k: float) -> "ReplicationBudget":
        if not (k > 0 and k != float("inf")):  # also NaN
            raise ValueError(f"--budget must be a finite number > 0, got {k}")
        return ReplicationBudget(max(1, round(self.steps * k)), self.batch_size, self.lr, self.warmup_steps,
                                 max(8, round(self.n_samples * k)), self.n_reference, self.sample_steps,
                                 self.sample_seed, self.seeds)


# The student recipe every replication arm shares (bdmtool's affine DC path, fixed when the 2,000-step run began),
# pinned so that a later change of the students' defaults neither restarts nor silently mixes a running table.
RECIPE = ("binarize.dc_bypass=timestep_affine",)


def arm_overrides(arm: Arm, b: ReplicationBudget, threads: int) -> list[str]:
    return [f"train.seed={arm.seed}", f"train.batch_size={b.batch_size}", f"train.lr={b.lr}",
            "train.lr_decay=cosine", f"train.warmup_steps={min(b.warmup_steps, max(b.steps // 4, 1))}",
            "train.log_every=25", f"train.ckpt_every={max(min(100, b.steps // 4), 1)}", f"train.threads={threads}",
            *RECIPE, *arm.overrides]


def arm_command(arm: Arm, b: ReplicationBudget, teacher: str, threads: int) -> str:
    """The equivalent CLI command of one arm's training (written into the report)."""
    rel = os.path.relpath(teacher)
    teacher = teacher if rel.startswith("..") else rel  # a path a reader can rerun from the checkout
    if arm.method is None:
        return f"(the teacher itself: {teacher})"
    sets = " ".join(f"--set {o}" for o in arm_overrides(arm, b, threads))
    return (f"bdmtool train --method {arm.method} --abits {arm.abits} --teacher {teacher} --steps {b.steps} "
            f"--out runs/{arm.key} {sets}")


def _score_params(arm: Arm, b: ReplicationBudget, teacher: str) -> dict:
    """What a score depends on (a finished score is reused while these are equal). The FP row trains
    nothing, so the training budget is not part of its key."""
    train = {} if arm.method is None else {"steps": b.steps, "batch_size": b.batch_size, "lr": b.lr,
                                           "warmup_steps": b.warmup_steps}
    return {"version": SCORE_VERSION, "arm": asdict(arm), **train, "n_samples": b.n_samples,
            "n_reference": b.n_reference, "sample_steps": b.sample_steps, "sample_seed": b.sample_seed,
            "teacher": teacher_id(teacher)}


def _finished(arm: Arm, b: ReplicationBudget, teacher: str, out: str | os.PathLike) -> dict | None:
    """The arm's score record when it was finished at these parameters (marked reused), else None."""
    path = Path(out) / "runs" / arm.key / "score.json"
    if not path.is_file():
        return None
    done = json.loads(path.read_text())
    return {**done, "reused": True} if done.get("params") == json.loads(json.dumps(_score_params(arm, b, teacher))) \
        else None


class ArmBusy(RuntimeError):
    """Another process is training or scoring this arm (two workers, two terminals)."""


@contextlib.contextmanager
def _arm_lock(folder: Path):
    """An exclusive lock on ``folder/.lock`` for as long as this process trains and scores the arm; raises
    ``ArmBusy`` at once if another process holds it. The OS drops it when the holder dies (kill -9 included),
    so a stale lock cannot block a re-run."""
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            raise ArmBusy(f"{folder} is being trained or scored by another process (pid {holder})") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_arm(arm: Arm, b: ReplicationBudget, teacher: str, out: str, threads: int, progress: bool = False) -> dict:
    """Train (or reuse) one arm and score it (or reuse its score); returns the score record. Raises ``ArmBusy``
    when another process holds the arm (its result is picked up by the report once that process finishes)."""
    done = _finished(arm, b, teacher, out)
    if done is not None:
        return done
    with _arm_lock(Path(out) / "runs" / arm.key):
        return _train_and_score(arm, b, teacher, out, threads, progress)


def _train_and_score(arm: Arm, b: ReplicationBudget, teacher: str, out: str, threads: int, progress: bool) -> dict:
    import torch

    from bdmtool.tools.evaluate import cache_dir
    from bdmtool.trainer import fid
    from bdmtool.trainer.data import load_images, load_npz
    from bdmtool.trainer.metrics import read_metrics
    from bdmtool.trainer.sampling import SampleOptions, sample_checkpoint
    from bdmtool.trainer.checkpoint import read_spec
    from bdmtool.trainer.spec import build_train_spec
    from bdmtool.trainer.train import train

    torch.set_num_threads(threads)
    folder = Path(out) / "runs" / arm.key
    score_path = folder / "score.json"
    params = _score_params(arm, b, teacher)
    done = _finished(arm, b, teacher, out)
    if done is not None:
        return done
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if arm.method is None:
        ckpt, final_loss = Path(teacher), None
    else:
        spec = build_train_spec(method=arm.method, abits=arm.abits, teacher=teacher, steps=b.steps,
                                overrides=arm_overrides(arm, b, threads))
        ckpt = train(spec, folder, progress=progress)
        rows = read_metrics(folder / "metrics.jsonl")
        tail = [r["loss"] for r in rows[-max(1, len(rows) // 10):]]
        final_loss = sum(tail) / len(tail)
    train_s = time.perf_counter() - t0
    opts = SampleOptions(n=b.n_samples, steps=b.sample_steps, seed=b.sample_seed, batch_size=min(b.n_samples, 100))
    png, npz = sample_checkpoint(ckpt, folder / "samples", opts, progress=progress)
    data = read_spec(teacher).data  # the teacher's own training images are the reference
    images = load_images(dataclasses.replace(data, limit=b.n_reference, hflip=False))
    ref = fid.reference_stats(images, {"reference": data.source, "path": data.path, "resolution": data.resolution,
                                       "channels": data.channels, "limit": b.n_reference}, cache_dir(),
                              progress=progress)
    m = fid.compare(load_npz(str(npz)), ref, progress=progress)
    record = {"params": params, "key": arm.key, "label": arm.label, "checkpoint": str(ckpt),
              "grid": str(png.relative_to(Path(out))), "final_loss": final_loss,
              "metrics": {k: float(m[k]) for k in ("fid", "sfid", "precision", "recall")},
              "n_samples": int(m["n_samples"]), "n_reference": int(m["n_reference"]),
              "seconds": round(time.perf_counter() - t0, 1), "train_seconds": round(train_s, 1),
              "command": arm_command(arm, b, teacher, threads)}
    atomic_write(score_path, json.dumps(record, indent=2))
    return record


def finished_scores(out: str | os.PathLike, tables: tuple[str, ...], budget: ReplicationBudget,
                    teacher: str) -> dict[str, dict]:
    """Scores already on disk for every arm of ``tables`` at this budget (others, e.g. from a different step count,
    are ignored): the report of an ``--only`` run or of a second worker still shows every finished row."""
    found = {arm.key: _finished(arm, budget, teacher, out) for arm in arms_for(tables, budget.seeds, ())}
    return {k: v for k, v in found.items() if v is not None}


def environment(jobs: int) -> dict:
    """What the numbers were measured on (the report records it)."""
    import platform

    import torch

    import bdmtool

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"bdmtool": bdmtool.__version__, "torch": torch.__version__, "cpu": cpu, "cores": os.cpu_count(),
            "jobs": jobs, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def run_replication(out: str | os.PathLike, tables: tuple[str, ...], budget: ReplicationBudget, teacher: str,
                    jobs: int = 1, only: tuple[str, ...] = (), log: Callable[[str], None] = print) -> dict[str, dict]:
    """Every arm of ``tables`` (``jobs`` at a time, each on (cores of the CPU affinity) // jobs threads);
    returns {key: score}."""
    arms = arms_for(tables, budget.seeds, only)
    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    if not Path(teacher).is_file():
        raise FileNotFoundError(f"teacher checkpoint {teacher} not found (pass --teacher FP_CHECKPOINT)")
    if budget.n_samples < 2:
        raise ValueError(f"--n must be >= 2 (FID needs two samples; 1,000 for claims), got {budget.n_samples}")
    from bdmtool.trainer.checkpoint import read_spec

    if read_spec(teacher).binarize is not None:
        raise ValueError(f"--teacher {teacher} is a binarized checkpoint; the replication needs the full-precision "
                         "model every arm starts from (the default: the embedded tiny_mnist_fp.ckpt)")
    threads = max(1, len(allowed_cpus()) // jobs)
    scores: dict[str, dict] = {}
    log(f"[replicate] {len(arms)} runs ({', '.join(tables)}), {budget.steps} steps x batch {budget.batch_size}, "
        f"N = {budget.n_samples}, {jobs} at a time on {threads} thread(s) each")

    def record(i: int, key: str, result: dict | ArmBusy) -> None:
        if isinstance(result, ArmBusy):
            log(f"[replicate] {i}/{len(arms)} {key}: skipped, {result}; its row appears once it finishes")
            return
        scores[key] = result
        log(f"[replicate] {i}/{len(arms)} {key}: FID {result['metrics']['fid']:.2f} "
            f"({'reused' if result.get('reused') else str(result['seconds']) + ' s'})")

    if jobs == 1:
        for i, arm in enumerate(arms, 1):
            log(f"[replicate] {i}/{len(arms)} {arm.key} ...")
            try:
                record(i, arm.key, run_arm(arm, budget, teacher, str(out), threads, progress=True))
            except ArmBusy as e:
                record(i, arm.key, e)
        return scores
    # spawn, not fork: a forked child would inherit torch's OpenMP pool from the parent
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {arm.key: pool.submit(run_arm, arm, budget, teacher, str(out), threads) for arm in arms}
        for i, (key, fut) in enumerate(futures.items(), 1):
            try:
                record(i, key, fut.result())
            except ArmBusy as e:
                record(i, key, e)
    return scores
