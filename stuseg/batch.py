"""Segment many scans with one model load: find the cases, run them with the stages overlapped, log each.

A batch turns SOURCEs (image files, folders searched recursively, list files) into ``Case``s with
stable, unique, file-name-safe ids, and writes each case's result atomically into
``OUTPUT/<case id>/`` (masks) or ``OUTPUT/<case id>.nii.gz`` (``multilabel``). Every finished case
appends one JSON line to ``OUTPUT/stuseg-batch.jsonl`` (the run log), which is also what a later
run reads to skip cases already done with the same weights and options.

The work is done in ``stuseg.runs`` (one job per module: ``cases``, ``runlog``, ``resume``,
``process``, ``local``, ``signals``); this module is the public face that keeps the import paths
(``stuseg.batch.run``, ``stuseg.batch.discover``, ...).
"""

from __future__ import annotations

from stuseg.runs.cases import (
    LIST_SUFFIXES,
    WHAT_IS_FOUND,
    Case,
    Discovery,
    Ignored,
    discover,
    group_channels,
    read_list,
    safe_id,
    unique_ids,
)
from stuseg.runs.folder import (
    COHORT_NAMES,
    LOG_NAME,
)
from stuseg.runs.local import (
    check_batch_output,
    run,
    run_local,
    uuid4_hex,
)
from stuseg.runs.process import (
    CaseJob,
    process,
    split_threads,
    write_case,
)
from stuseg.runs.resume import (
    case_layout,
    cases_done,
    done_before,
    holds,
    latest_ok,
    output_paths,
    skip_done,
)
from stuseg.runs.runlog import (
    CaseResult,
    RunLog,
    failure,
    one_line,
    read_log,
)
from stuseg.runs.settings import (
    ModelOptions,
    Settings,
    model_table,
    product_tags,
    settings_of,
)
from stuseg.runs.signals import (
    Interrupted,
    signals_interrupt,
)

__all__ = [
    "COHORT_NAMES",
    "LIST_SUFFIXES",
    "LOG_NAME",
    "WHAT_IS_FOUND",
    "Case",
    "CaseJob",
    "CaseResult",
    "Discovery",
    "Ignored",
    "Interrupted",
    "ModelOptions",
    "RunLog",
    "Settings",
    "case_layout",
    "cases_done",
    "check_batch_output",
    "discover",
    "done_before",
    "failure",
    "group_channels",
    "holds",
    "latest_ok",
    "model_table",
    "one_line",
    "output_paths",
    "process",
    "product_tags",
    "read_list",
    "read_log",
    "run",
    "run_local",
    "safe_id",
    "settings_of",
    "signals_interrupt",
    "skip_done",
    "split_threads",
    "unique_ids",
    "uuid4_hex",
    "write_case",
]
