"""The files stuseg writes in a batch folder beside the cases' results (no case id equals one)."""

from __future__ import annotations

__all__ = ["COHORT_NAMES", "FOLDER_FILES", "LOG_NAME"]

# The run log (``stuseg.runs.runlog``).
LOG_NAME = "stuseg-batch.jsonl"
# The cohort tables ``stuseg statistics RESULTS/`` writes (``stuseg.runs.cohort``).
COHORT_NAMES = ("stuseg-cohort.csv", "stuseg-cohort.cases.csv")
# Compared without regard to letter case (file systems that ignore it).
FOLDER_FILES = frozenset(n.casefold() for n in (LOG_NAME, *COHORT_NAMES))
