"""A batch folder as two tidy tables: statistics per case and structure, and how each case went.

The run log (``stuseg-batch.jsonl``) decides what belongs to the batch: every case it records,
as its latest record says (a later ``skipped`` "done before" record keeps the earlier result).
Both tables are plain CSV (comma, one header row, empty cells for missing values) that
``pandas.read_csv`` reads with no options:

- ``structures``: one row per case and structure: ``case``, ``input``, ``size``, ``mode``,
  ``weights_sha256``, then the columns of ``statistics.csv`` (``stuseg.analysis.statistics.COLUMNS``), the
  rows of each case's own ``statistics.csv`` where the batch wrote one (``--statistics``), else
  computed from its result and its input CT.
- ``cases``: one row per case: ``case``, ``input``, ``series``, ``status``, ``error``, shape and
  spacing per axis, ``seconds_<stage>`` per stage, ``wall_seconds``, peak memory, model and
  weights, the device and the network's precision (``float32``, ``bfloat16``, ``float16``: the
  resolved choice, not ``auto``; empty for records of a stuseg that did not log it), and the
  number of warnings.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stuseg.errors import InputError
from stuseg.runs.folder import COHORT_NAMES, LOG_NAME
from stuseg.runs.runlog import read_log

__all__ = [
    "CASE_COLUMNS",
    "STAGES",
    "Cohort",
    "cases_path",
    "cohort_of",
    "default_paths",
    "is_batch_folder",
    "written_by_cohort",
]

# The stages a case's seconds are reported for, in pipeline order; others follow sorted.
STAGES = ("read", "load", "preprocess", "network", "softmax", "export", "write", "statistics", "preview",
          "dicom-seg", "rtstruct")  # fmt: skip
_LEAD = ("case", "input", "size", "mode", "weights_sha256")
CASE_COLUMNS = (
    "case", "input", "series", "status", "error", "shape_i", "shape_j", "shape_k", "spacing_i_mm",
    "spacing_j_mm", "spacing_k_mm",
)  # fmt: skip
_TAIL = ("wall_seconds", "peak_rss_bytes", "peak_gpu_bytes", "size", "mode", "weights_sha256", "device",
         "precision", "warnings")  # fmt: skip


@dataclass
class Cohort:
    """The two tables as CSV text, and how many cases each holds."""

    structures: str
    cases: str
    ok: int
    failed: int


def is_batch_folder(folder: Path) -> bool:
    """Whether ``folder`` is a batch folder (it holds a run log)."""
    return Path(folder).is_dir() and (Path(folder) / LOG_NAME).is_file()


def default_paths(folder: Path) -> tuple[Path, Path]:
    """Where ``stuseg statistics RESULTS/`` writes the tables: ``stuseg-cohort.csv`` and
    ``stuseg-cohort.cases.csv`` in the batch folder (no case's result can have these names)."""
    structures, cases = COHORT_NAMES
    return Path(folder) / structures, Path(folder) / cases


def cases_path(structures_csv: Path) -> Path:
    """The per-case table beside a structures table ``X.csv``: ``X.cases.csv``."""
    path = Path(structures_csv)
    return path.with_name(path.name[: -len(".csv")] + ".cases.csv")


def written_by_cohort(path: Path) -> bool:
    """Whether the CSV file ``path`` is a table this module wrote (its header row says so)."""
    try:
        with open(path, encoding="utf-8") as fh:
            first = fh.readline().rstrip("\n")
    except (OSError, UnicodeDecodeError):
        return False
    return first.startswith(",".join(_LEAD) + ",") or first.startswith(",".join(CASE_COLUMNS) + ",")


def _latest(records: Sequence[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """Per case id, the record that says how it stands: the latest ``ok`` or ``failed`` one."""
    latest: dict[str, Mapping[str, Any]] = {}
    for rec in records:
        if isinstance(rec.get("case"), str) and rec.get("status") in ("ok", "failed"):
            latest[rec["case"]] = rec
    return latest


def _mode(rec: Mapping[str, Any]) -> str:
    from stuseg.results.write import mode_name

    options = rec.get("options") or {}
    return mode_name(bool(options.get("fast")), bool(options.get("tta")))


def cohort_of(folder: Path) -> Cohort:
    """The cohort tables of batch folder ``folder`` (see the module's docstring).

    Raises:
        InputError: ``folder`` has no run log, or a case's statistics cannot be read or computed.
    """
    folder = Path(folder)
    if not is_batch_folder(folder):
        raise InputError(f"{folder} is not a batch folder (no {LOG_NAME}); give the --output of stuseg batch")
    latest = _latest(read_log(folder / LOG_NAME))
    if not latest:
        raise InputError(f"the run log {folder / LOG_NAME} records no case yet")
    structures = io.StringIO()
    writer = csv.writer(structures, lineterminator="\n")
    header_written = False
    for case, rec in latest.items():
        if rec["status"] != "ok":
            continue
        columns, rows = _statistics_rows(folder, rec)
        if not header_written:
            writer.writerow([*_LEAD, *columns])
            header_written = True
        lead = [
            case,
            rec.get("input") or "",
            rec.get("size") or "",
            _mode(rec),
            rec.get("weights_sha256") or "",
        ]
        writer.writerows([*lead, *row] for row in rows)
    if not header_written:
        from stuseg.analysis.statistics import COLUMNS

        writer.writerow([*_LEAD, *COLUMNS])
    ok = sum(1 for r in latest.values() if r["status"] == "ok")
    return Cohort(structures.getvalue(), _cases_table(latest), ok, len(latest) - ok)


def _statistics_rows(folder: Path, rec: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The header and rows of a case's statistics.csv: its own file, else computed now."""
    outputs = [folder / p for p in rec.get("outputs") or []]
    multilabel = bool((rec.get("options") or {}).get("multilabel"))
    result = outputs[0] if outputs else None
    if result is None:
        raise InputError(f"the run log records no result for case {rec['case']}")
    from stuseg.results.write import Layout

    csv_file = Layout(result, multilabel, ("statistics",)).files()["statistics"][1]
    text = csv_file.read_text(encoding="utf-8") if csv_file.is_file() else _computed(result, rec)
    rows = list(csv.reader(io.StringIO(text)))
    return rows[0], rows[1:]


def _computed(result: Path, rec: Mapping[str, Any]) -> str:
    """statistics.csv's text for a case written without ``--statistics``: from its result and CT."""
    from stuseg.analysis import statistics
    from stuseg.results import scans

    scan = scans.load_scan(result, Path(rec["input"]), series=rec.get("series"))
    stats = statistics.compute(
        scan.labels, scan.affine, scan.ct, scan.names, size=rec.get("size"), mode=_mode(rec)
    )
    return statistics.csv_text([(None, stats)])


def _cases_table(latest: Mapping[str, Mapping[str, Any]]) -> str:
    seen = {k for rec in latest.values() for k in (rec.get("seconds") or {})}
    stages = [s for s in STAGES if s in seen] + sorted(seen - set(STAGES))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*CASE_COLUMNS, *(f"seconds_{s.replace('-', '_')}" for s in stages), *_TAIL])
    for case, rec in latest.items():
        shape = list(rec.get("shape") or [None] * 3)
        spacing = list(rec.get("spacing") or [None] * 3)
        seconds = rec.get("seconds") or {}
        options = rec.get("options") or {}
        row = [
            case,
            rec.get("input"),
            rec.get("series"),
            rec.get("status"),
            rec.get("error"),
            *shape,
            *spacing,
        ]
        row += [seconds.get(s) for s in stages]
        row += [rec.get("wall_seconds"), rec.get("peak_rss_bytes"), rec.get("peak_gpu_bytes")]
        row += [rec.get("size"), _mode(rec), rec.get("weights_sha256"), options.get("device")]
        row.append(options.get("precision"))
        row.append(len(rec.get("warnings") or []))
        writer.writerow(["" if v is None else v for v in row])
    return buf.getvalue()
