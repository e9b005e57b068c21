"""Mini-replication of the papers' tables (``bdmtool replicate``): tables as data, resumable runs, the report."""

from .report import summarize, write_report
from .run import ReplicationBudget, environment, finished_scores, run_replication
from .tables import ARMS, TABLES, arms_for

__all__ = ["ARMS", "TABLES", "ReplicationBudget", "arms_for", "environment", "finished_scores", "run_replication",
           "summarize", "write_report"]
