"""Parse what ``lce_benchmark_model`` (TF ``benchmark_model`` + LCE ops) prints.

``parse_benchmark_output(text) -> BenchmarkOutput`` reads the stdout of one run: the ``Inference timings
in us`` summary line, the ``count=.. avg=..`` stat lines, and the two op-profiling blocks written with
``--enable_op_profiling=true`` (tab-separated, with or without the ``INFO: `` prefix and the older
``[start]`` column). ``parse_profile_csv(text)`` reads the ``--profiling_output_csv_file`` variant.
Averages may print in scientific notation (``1.24027e+06`` us), which slow diffusion models hit.
Format reference: ``../shared/reference/lce_deploy.md`` section 5.3.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_PREFIX = r"^(?:INFO: )?"
_SUMMARY = re.compile(_PREFIX + rf"Inference timings in us: Init: ({_NUM}), First inference: ({_NUM}), "
                      rf"Warmup \(avg\): ({_NUM}), Inference \(avg\): ({_NUM})", re.M)
_STAT = re.compile(_PREFIX + rf"count=(\d+)(?: first=({_NUM}))? curr=({_NUM})(?:\(all same\))?"
                   rf"(?: min=({_NUM}) max=({_NUM}) avg=({_NUM}) std=({_NUM}))?", re.M)
_MEMORY = re.compile(r"Memory footprint delta from the start of the tool \(MB\): init=(" + _NUM + r") overall=("
                     + _NUM + ")")
_PEAK = re.compile(r"Overall peak memory footprint \(MB\) via periodic monitoring: (" + _NUM + ")")
_SIZE = re.compile(r"The input model file size \(MB\): (" + _NUM + ")")
_BANNER = re.compile(r"^(?:INFO: )?=+ (.+?) =+\s*$")
_NAME_INDEX = re.compile(r"^\[(.*)\]:(\d+)$")


class BenchmarkParseError(ValueError):
    """The text is not (complete) ``lce_benchmark_model`` output; says what is missing."""


@dataclass(frozen=True)
class OpRow:
    """One row of the 'Run Order' table: a node's time per run, in milliseconds."""

    node_type: str
    first_ms: float
    avg_ms: float
    percent: float
    times_called: int
    name: str  # the raw [Name] field, '[out_tensor_names]:node_index'

    @property
    def outputs(self) -> list[str]:
        m = _NAME_INDEX.match(self.name)
        return m.group(1).split(",") if m else [self.name]

    @property
    def node_index(self) -> int | None:
        m = _NAME_INDEX.match(self.name)
        return int(m.group(2)) if m else None


@dataclass
class BenchmarkOutput:
    init_us: float
    first_us: float
    warmup_avg_us: float
    avg_us: float
    stats: list[dict] = field(default_factory=list)  # warm-up phase, then the regular runs
    ops: list[OpRow] = field(default_factory=list)  # regular runs, Run Order
    by_type: dict[str, float] = field(default_factory=dict)  # node type -> avg ms per run
    model_size_mb: float | None = None
    memory_mb: dict[str, float] = field(default_factory=dict)

    @property
    def avg_ms(self) -> float:
        return self.avg_us / 1000.0


def _float(v: str) -> float:
    return float(v.strip().rstrip("%"))


def _stat(m: re.Match) -> dict:
    count, first, curr, lo, hi, avg, std = m.groups()
    if lo is None:  # 'count=N curr=C(all same)' or a lone run
        return {"count": int(count), "first": float(curr), "min": float(curr), "max": float(curr),
                "avg": float(curr), "std": 0.0}
    return {"count": int(count), "first": float(first), "min": float(lo), "max": float(hi), "avg": float(avg),
            "std": float(std)}


def _table_rows(lines: list[str], sep: str) -> tuple[list[OpRow], dict[str, float]]:
    """Rows of the 'Run Order' and 'Summary by node type' tables of one profiling block."""
    rows, by_type, section, header = [], {}, None, None
    for line in lines:
        banner = _BANNER.match(line)
        if banner:
            section, header = banner.group(1).strip(), None
            continue
        if section not in ("Run Order", "Summary by node type") or not line.strip():
            continue
        cells = [c.strip() for c in (line.split(sep) if sep == "\t" else line.split(sep, 8))]
        if cells and cells[0] == "":
            cells = cells[1:]
        if header is None:
            header = [c.strip("[] ").lower().replace("_", " ") for c in cells]
            continue
        if len(cells) < len(header) - 1:
            continue
        if cells[0].startswith(("Number of nodes", "Timings", "Memory", "INFO:")) or section is None:
            continue
        col = dict(zip(header, cells))
        if section == "Run Order":
            name = sep.join(cells[len(header) - 1:]) if len(cells) > len(header) else col.get("name", "")
            rows.append(OpRow(col["node type"], _float(col["first"]), _float(col.get("avg ms", "0")),
                              _float(col.get("%", "0")), int(float(col.get("times called", "1"))), name.strip()))
        else:
            by_type[col["node type"]] = _float(col.get("avg ms", "0"))
    return rows, by_type


def _regular_block(text: str) -> list[str] | None:
    """Lines of the 'Operator-wise Profiling Info for Regular Benchmark Runs' block, or None."""
    key = "Operator-wise Profiling Info for Regular Benchmark Runs"
    at = text.find(key)
    if at < 0:
        return None
    lines = text[at:].splitlines()[1:]
    out = []
    for line in lines:
        if line.startswith("Profiling Info for") or re.match(r"^(?:INFO: )?Inference timings", line):
            break
        out.append(line)
    return out


def parse_profile_tables(text: str, sep: str = "\t") -> tuple[list[OpRow], dict[str, float]]:
    block = _regular_block(text)
    return _table_rows(block if block is not None else text.splitlines(), sep)


def parse_benchmark_output(text: str) -> BenchmarkOutput:
    found = list(_SUMMARY.finditer(text))
    m = found[-1] if found else None  # the last summary line wins (a tool prints one per benchmark)
    if m is None:
        tail = " | ".join(text.strip().splitlines()[-3:])
        raise BenchmarkParseError("no 'Inference timings in us' line in the benchmark output (did the run "
                                  f"crash or stop early?); last lines: {tail[-300:]!r}")
    out = BenchmarkOutput(*(float(v) for v in m.groups()))
    out.stats = [_stat(s) for s in _STAT.finditer(text)]
    if (size := _SIZE.search(text)) is not None:
        out.model_size_mb = float(size.group(1))
    if (mem := _MEMORY.search(text)) is not None:
        out.memory_mb = {"init": float(mem.group(1)), "overall": float(mem.group(2))}
    if (peak := _PEAK.search(text)) is not None:
        out.memory_mb["peak"] = float(peak.group(1))
    if _regular_block(text) is not None:
        out.ops, out.by_type = parse_profile_tables(text)
    return out


def parse_profile_csv(text: str) -> tuple[list[OpRow], dict[str, float]]:
    """The ``--profiling_output_csv_file`` file: same sections, comma-separated rows (names may hold commas)."""
    return parse_profile_tables(text, sep=",")
