"""Which cases of a batch are already done (resume).

A result counts as done when the run log records it made with the same ``Settings``
(``stuseg.runs.settings``: its fingerprint) and it holds every output this run asks for;
``done_before`` says whether a case's complete result is in the batch folder;
``skip_done`` logs and yields those as ``skipped`` for every kind of run (local, Ray).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Generator, Mapping, Sequence
from pathlib import Path
from typing import Any

from stuseg.results.write import Layout
from stuseg.runs.cases import Case, Ignored
from stuseg.runs.folder import LOG_NAME
from stuseg.runs.runlog import CaseResult, Recorder, RunLog, read_log
from stuseg.runs.settings import Settings

__all__ = [
    "case_layout",
    "cases_done",
    "done_before",
    "holds",
    "latest_ok",
    "output_paths",
    "skip_done",
]


def holds(recorded: Any, wanted: Sequence[str]) -> bool:
    """Whether a result that records ``recorded`` (its ``products``; none recorded: the masks
    only, as results made before outputs were recorded) holds every output ``wanted``."""
    have = set(recorded) if isinstance(recorded, list) else {"nifti"}
    return set(wanted) <= have


def case_layout(output: Path, case_id: str, settings: Settings) -> Layout:
    """Where a case's result goes: ``OUTPUT/<id>/`` or ``OUTPUT/<id>.nii.gz`` with its files beside."""
    target = Path(output) / (f"{case_id}.nii.gz" if settings.multilabel else case_id)
    return Layout(target, settings.multilabel, settings.request.products)


def output_paths(output: Path, case_id: str, settings: Settings) -> list[Path]:
    """The paths of a case's result: its folder, or the multilabel file and every file beside it."""
    return case_layout(output, case_id, settings).all_files()


def cases_done(output: Path, cases: Sequence[Case], since: int = 0) -> int:
    """How many of ``cases`` the run log in ``output`` records as done (``ok`` or ``skipped``)
    after byte ``since`` (the log's size when the run began).

    For the line printed after an interruption: the log, not the results the caller received,
    also counts a case whose writing was completed while the batch was being stopped.
    """
    try:
        with open(Path(output) / LOG_NAME, "rb") as fh:
            fh.seek(since)
            tail = fh.read()
    except OSError:
        return 0
    ids = {c.id for c in cases}
    done = set()
    for line in tail.split(b"\n"):
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and record.get("case") in ids and record.get("status") != "failed":
                done.add(record["case"])
    return len(done)


def latest_ok(history: Sequence[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """Per case id, its latest ``ok`` record in a run log's ``history``."""
    latest: dict[str, Mapping[str, Any]] = {}
    for record in history:
        if record.get("status") == "ok" and isinstance(record.get("case"), str):
            latest[record["case"]] = record
    return latest


def done_before(
    case: Case, output: Path, settings: Settings, latest: Mapping[str, Mapping[str, Any]]
) -> bool:
    """Whether ``case``'s complete result is in ``output``, made with the same weights and options.

    A folder of masks says so itself: its marker (``.stuseg-run.json``, written before the folder
    was moved into place) records the case's input, the settings' fingerprint and the outputs it
    holds, and lists its files. A multilabel file is judged by the case's latest ``ok`` record in
    the run log (``latest``, from ``latest_ok``): same input and fingerprint, every listed file
    present. A result without an output this run asks for (``Settings.wanted``: statistics, a
    preview, a DICOM-SEG or its encoding) is not done: the case is segmented and written again.
    """
    output = Path(output)
    wanted = settings.wanted(case)
    if settings.multilabel:
        record = latest.get(case.id)
        return bool(
            record is not None
            and record.get("input") == case.source
            and record.get("series") == case.series
            and record.get("fingerprint") == settings.fingerprint()
            and holds(record.get("products"), wanted)
            and isinstance(record.get("outputs"), list)
            and record["outputs"]
            and all((output / rel).is_file() for rel in record["outputs"])
        )
    from stuseg.results.outputs import MARKER

    try:
        marker = json.loads((output / case.id / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    batch = marker.get("batch") if isinstance(marker, dict) else None
    files = marker.get("files") if isinstance(marker, dict) else None
    return bool(
        isinstance(batch, dict)
        and isinstance(files, list)
        and files
        and batch.get("fingerprint") == settings.fingerprint()
        and batch.get("input") == case.source
        and batch.get("series") == case.series
        and holds(batch.get("products"), wanted)
        and all((output / case.id / f).is_file() for f in files)
    )


def skip_done(
    cases: Sequence[Case],
    output: Path,
    recorder: Recorder,
    log: RunLog,
    *,
    overwrite: bool,
    ignored: Sequence[Ignored] = (),
) -> Generator[CaseResult, None, list[Case]]:
    """Log the ``ignored`` objects, then log and yield each case done before as ``skipped``;
    return the cases still to do (every case with ``overwrite``). Local and Ray runs alike."""
    settings = recorder.settings
    latest = latest_ok(read_log(output / LOG_NAME))
    for item in ignored:
        log.write(recorder.record(None, "skipped", reason=item.reason, input_path=item.path))
    todo: list[Case] = []
    for case in cases:
        if overwrite or not done_before(case, output, settings, latest):
            todo.append(case)
            continue
        paths = output_paths(output, case.id, settings)
        reason = "done before with the same weights and options"
        rec = recorder.record(case, "skipped", outputs=paths, reason=reason)
        log.write(rec)
        yield CaseResult(case, "skipped", paths, None, rec)
    return todo
