"""The papers' tables as data: which runs each table needs, the papers' numbers, and the orderings they claim.

An :class:`Arm` is one training configuration (a method preset, activation bits and ``--set`` overrides on
top of the shared recipe); several tables may share an arm (BinaryDM W1A4 is in BinaryDM's Table 1 and in its
ablation). A :class:`Claim` is one ordering a paper states (``better`` has the lower FID); the report marks
each ✔ or ✘ from our measurements.

Paper numbers (FID):
- BinaryDM Table 1: DDIM-100 on CIFAR-10 32x32 (002_c6c41e746a76c0dc.txt, "Table 1").
- BinaryDM Table 7: W1A4 ablation, LDM-4 on LSUN-Bedrooms 256x256 (Appendix B.2, cumulative rows:
  Vanilla, +EBB, +EBB+LRM = BinaryDM; "+LRM alone" has no number in the paper).
- BiDM Table 1: DDIM-100 on CIFAR-10 32x32, W1A1 (000_e18a6fa14ba2c0df.txt; its text extraction interleaves
  two tables, so these were read row by row: XNOR++ 251.14, DoReFa 397.60, ReActNet 231.55, ReSTE 394.29,
  XNOR 113.36, BiDM 81.65; BBCU is only in the LSUN table).
- BiDM ablation (LSUN-Bedrooms): the text states that TBS and SPD each help and combine best; its numbers
  are not in the stored text, so the claims carry none.
"""

from __future__ import annotations

from dataclasses import dataclass

_EBB_OFF = ("binarize.ebb_layers=", "distill.ebb_tau=0")
_LRM_OFF = ("distill.lrm_weight=0",)
_TBS_OFF = ("binarize.act_scale=xnor", "binarize.timestep_cache=")  # fixed XNOR K, no cross-timestep mixing
_SPD_OFF = ("distill.spd_weight=0",)


@dataclass(frozen=True)
class Arm:
    key: str  # run folder name and row id
    label: str
    method: str | None  # None: the FP teacher itself (not trained)
    abits: int | None = None
    overrides: tuple[str, ...] = ()
    seed: int = 0  # training seed (the headline pairs are repeated over seeds)

    def with_seed(self, seed: int) -> "Arm":
        return Arm(f"{self.key}_seed{seed}", self.label, self.method, self.abits, self.overrides, seed)


@dataclass(frozen=True)
class Claim:
    better: str  # arm key with the lower FID in the paper
    worse: str
    text: str


@dataclass(frozen=True)
class Table:
    key: str
    title: str
    source: str
    rows: tuple[tuple[str, float | None], ...]  # (arm key, paper FID)
    claims: tuple[Claim, ...]


ARMS: dict[str, Arm] = {a.key: a for a in (
    Arm("fp", "FP teacher", None),
    Arm("baseline_w1a32", "Baseline W1A32", "baseline", 32),
    Arm("binarydm_w1a32", "BinaryDM W1A32", "binarydm", 32),
    Arm("baseline_w1a8", "Baseline W1A8", "baseline", 8),
    Arm("binarydm_w1a8", "BinaryDM W1A8", "binarydm", 8),
    Arm("baseline_w1a4", "Baseline W1A4", "baseline", 4),
    Arm("binarydm_w1a4", "BinaryDM W1A4 (= +EBB +LRM)", "binarydm", 4),
    Arm("bdm_vanilla_w1a4", "BinaryDM W1A4 without EBB and LRM (vanilla)", "binarydm", 4, _EBB_OFF + _LRM_OFF),
    Arm("bdm_ebb_w1a4", "+EBB (no LRM)", "binarydm", 4, _LRM_OFF),
    Arm("bdm_lrm_w1a4", "+LRM (no EBB)", "binarydm", 4, _EBB_OFF),
    Arm("xnor_w1a1", "XNOR", "xnor", 1),
    Arm("xnorpp_w1a1", "XNOR++", "xnorpp", 1),
    Arm("dorefa_w1a1", "DoReFa", "dorefa", 1),
    Arm("reactnet_w1a1", "ReActNet", "reactnet", 1),
    Arm("reste_w1a1", "ReSTE", "reste", 1),
    Arm("bbcu_w1a1", "BBCU", "bbcu", 1),
    Arm("bidm_w1a1", "BiDM (= +TBS +SPD)", "bidm", 1),
    Arm("bidm_vanilla_w1a1", "BiDM without TBS and SPD (vanilla)", "bidm", 1, _TBS_OFF + _SPD_OFF),
    Arm("bidm_tbs_w1a1", "+TBS (no SPD)", "bidm", 1, _SPD_OFF),
    Arm("bidm_spd_w1a1", "+SPD (no TBS)", "bidm", 1, _TBS_OFF),
)}


def _better(better: str, worse: str) -> Claim:
    return Claim(better, worse, f"{ARMS[better].label.split(' (')[0]} < {ARMS[worse].label.split(' (')[0]}")


TABLES: dict[str, Table] = {t.key: t for t in (
    Table("binarydm_t1", "BinaryDM Table 1: BinaryDM vs the baseline at W1A32 / W1A8 / W1A4",
          "BinaryDM (ICLR'25) Table 1, CIFAR-10 DDIM-100",
          (("fp", 5.54), ("baseline_w1a32", 22.59), ("binarydm_w1a32", 11.92), ("baseline_w1a8", 20.25),
           ("binarydm_w1a8", 11.21), ("baseline_w1a4", 100.17), ("binarydm_w1a4", 87.77)),
          (_better("binarydm_w1a32", "baseline_w1a32"), _better("binarydm_w1a8", "baseline_w1a8"),
           _better("binarydm_w1a4", "baseline_w1a4"))),
    Table("binarydm_t7", "BinaryDM Table 7: EBB and LRM at W1A4",
          "BinaryDM (ICLR'25) Table 7, LSUN-Bedrooms LDM-4 (cumulative rows)",
          (("bdm_vanilla_w1a4", 10.87), ("bdm_ebb_w1a4", 8.53), ("bdm_lrm_w1a4", None), ("binarydm_w1a4", 7.74)),
          (_better("bdm_ebb_w1a4", "bdm_vanilla_w1a4"), _better("binarydm_w1a4", "bdm_ebb_w1a4"),
           _better("bdm_lrm_w1a4", "bdm_vanilla_w1a4"))),
    Table("bidm_t1", "BiDM Table 1: W1A1 methods", "BiDM (NeurIPS'24) Table 1, CIFAR-10 DDIM-100",
          (("xnorpp_w1a1", 251.14), ("dorefa_w1a1", 397.60), ("reactnet_w1a1", 231.55), ("reste_w1a1", 394.29),
           ("bbcu_w1a1", None), ("xnor_w1a1", 113.36), ("bidm_w1a1", 81.65)),
          tuple(_better("bidm_w1a1", k) for k in ("xnor_w1a1", "xnorpp_w1a1", "dorefa_w1a1", "reactnet_w1a1",
                                                    "reste_w1a1", "bbcu_w1a1"))
          + tuple(_better("xnor_w1a1", k) for k in ("xnorpp_w1a1", "dorefa_w1a1", "reactnet_w1a1", "reste_w1a1"))),
    Table("bidm_ablation", "BiDM ablation: TBS and SPD at W1A1", "BiDM (NeurIPS'24) ablation, LSUN-Bedrooms",
          (("bidm_vanilla_w1a1", None), ("bidm_tbs_w1a1", None), ("bidm_spd_w1a1", None), ("bidm_w1a1", None)),
          (_better("bidm_tbs_w1a1", "bidm_vanilla_w1a1"), _better("bidm_spd_w1a1", "bidm_vanilla_w1a1"),
           _better("bidm_w1a1", "bidm_tbs_w1a1"), _better("bidm_w1a1", "bidm_spd_w1a1"))),
)}

# Repeated over seeds so that a ✔ on them is not noise (the "confidence" pairs).
HEADLINE_PAIRS: tuple[tuple[str, str], ...] = (("binarydm_w1a4", "baseline_w1a4"), ("bidm_w1a1", "xnor_w1a1"))


def arms_for(tables: tuple[str, ...], seeds: int, only: tuple[str, ...] = ()) -> list[Arm]:
    """Every arm the chosen tables need (each once, in table order; restricted to ``only`` when given), plus
    seeds 1..seeds-1 of the headline pairs whose arms are both present."""
    unknown = [t for t in tables if t not in TABLES]
    if unknown:
        raise ValueError(f"unknown table {unknown[0]!r}; choose from {sorted(TABLES)}")
    keys: list[str] = []
    for t in tables:
        keys += [k for k, _ in TABLES[t].rows if k not in keys]
    extra = [(a, b, s) for a, b in HEADLINE_PAIRS if a in keys and b in keys for s in range(1, seeds)]
    seeded = {f"{k}_seed{s}": ARMS[k].with_seed(s) for a, b, s in extra for k in (a, b)}
    if only:
        missing = [k for k in only if k not in keys and k not in seeded]
        if missing:
            raise ValueError(f"--only {missing[0]!r} is not a run of {', '.join(tables)} at {seeds} seed(s); "
                             f"choose from {keys + list(seeded)}")
        # a headline arm brings its extra seeds (when its partner is chosen too); a `<key>_seed<k>` is that run alone
        chosen = [k for k in keys if k in only]
        paired = {k for a, b in HEADLINE_PAIRS if a in chosen and b in chosen for k in (a, b)}
        return [ARMS[k] for k in chosen] + [arm for key, arm in seeded.items()
                                            if key in only or key.rsplit("_seed", 1)[0] in paired]
    return [ARMS[k] for k in keys] + list(seeded.values())
