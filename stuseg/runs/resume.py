"""What a batch result depends on, and which cases are already done (resume).

``Settings`` are the weights and options a result depends on (its fingerprint) and the outputs
asked for; ``done_before`` says whether a case's complete result is in the batch folder;
``skip_done`` logs and yields those as ``skipped`` for every kind of run (local, Ray).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stuseg.results.write import PRODUCTS, Layout, Request
from stuseg.runs.cases import Case, Ignored
from stuseg.runs.folder import LOG_NAME
from stuseg.runs.runlog import CaseResult, Recorder, RunLog, read_log

__all__ = [
    "ModelOptions",
    "Settings",
    "case_layout",
    "cases_done",
    "done_before",
    "holds",
    "latest_ok",
    "model_table",
    "output_paths",
    "product_tags",
    "settings_of",
    "skip_done",
]


@dataclass(frozen=True)
class ModelOptions:
    """The options that choose a model and how it predicts: ``stuseg.Segmenter``'s arguments as one
    value, for what loads a model somewhere else (``run_local`` here, each actor of a Ray batch).

    The fields mean what the ``Segmenter`` arguments of the same names mean.
    """

    size: str | None = None
    weights: Path | None = None
    device: str = "auto"
    fast: bool = False
    tta: bool = False
    step_size: float = 0.5
    roi_subset: tuple[str, ...] | None = None
    model: str | None = None  # a fine-tuned model: folder or registered name
    folds: tuple[str, ...] | None = None
    checkpoint: str = "final"
    precision: str = "auto"

    def load(self, threads: int | None = None) -> Any:
        """A ``stuseg.Segmenter`` with these options (loads the network now).

        Raises:
            WeightsError, InputError, LabelError: as ``Segmenter`` does.
        """
        from stuseg.inference.pipeline import Segmenter

        subset = list(self.roi_subset) if self.roi_subset else None
        return Segmenter(
            self.size,
            weights=self.weights,
            device=self.device,
            fast=self.fast,
            tta=self.tta,
            step_size=self.step_size,
            roi_subset=subset,
            model=self.model,
            folds=list(self.folds) if self.folds else None,
            checkpoint=self.checkpoint,
            threads=threads,
            precision=self.precision,
        )


@dataclass(frozen=True)
class Settings:
    """The options that decide a batch's results, as recorded in the log and compared on resume.

    ``labels`` are the selected label values (``roi_subset`` resolved), so two spellings of the
    same selection compare equal. The device is recorded but not compared: a result made on the
    CPU counts as done for a later run on a GPU.

    ``names`` are the names of ``labels`` (same order) for a model with its own label table, and
    ``classes`` that model's number of structures; both stay empty (0) for the published table,
    so the published models' records are as before. A model's names are compared too: they
    name its output files.

    ``precision`` is the type the network ran in (``stuseg.model.precision``, resolved). float32 and
    float16 are the original pipeline's own (CPU, CUDA) and count as one, as the devices do;
    bfloat16 enters the fingerprint, so a batch resumed in another precision than bfloat16
    results were made in (or the reverse) redoes those cases, and records made before the
    option existed still resume a float32 or float16 batch.
    """

    size: str
    weights_sha256: str
    fast: bool = False
    tta: bool = False
    step_size: float = 0.5
    labels: tuple[int, ...] = ()
    multilabel: bool = False
    weights: str | None = None
    device: str = ""
    names: tuple[str, ...] = ()
    classes: int = 0
    precision: str = "float32"
    # What each case's result holds (NIfTI, statistics, preview, DICOM-SEG): not part of the
    # fingerprint (the segmentation does not depend on it), checked apart on resume.
    request: Request = field(default_factory=Request)

    def wanted(self, case: Case) -> list[str]:
        """The outputs this run wants of ``case``, as results record them (``product_tags``): a
        DICOM-SEG only for a DICOM series (a file case gets the rest, the SEG left out with a
        logged reason)."""
        products = [p for p in self.request.products if not PRODUCTS[p].dicom or case.series is not None]
        return product_tags(products, self.request)

    def fingerprint(self) -> dict[str, Any]:
        """The part of the settings that must match for an earlier result to be reused."""
        return (
            {
                "size": self.size,
                "weights_sha256": self.weights_sha256,
                "fast": self.fast,
                "tta": self.tta,
                "step_size": self.step_size,
                "labels": list(self.labels),
                "multilabel": self.multilabel,
            }
            | ({"names": list(self.names)} if self.names else {})
            | ({"precision": self.precision} if self.precision == "bfloat16" else {})
        )

    def options(self) -> dict[str, Any]:
        """Everything, for the log (``roi_subset``: the names kept, None for all of the model's)."""
        from stuseg.structures.labels import LABELS

        if self.names:
            kept, classes = list(self.names), self.classes or len(self.names)
        else:
            kept, classes = [LABELS[i] for i in self.labels], len(LABELS) - 1
        subset = kept if 0 < len(self.labels) < classes else None
        return {
            "size": self.size,
            "weights": self.weights,
            "fast": self.fast,
            "tta": self.tta,
            "step_size": self.step_size,
            "roi_subset": subset,
            "multilabel": self.multilabel,
            "device": self.device,
            "precision": self.precision,
            "outputs": list(self.request.products),
        } | ({"dicom_seg_type": self.request.seg_type} if self.request.dicom_seg else {})


def product_tags(products: Sequence[str], request: Request) -> list[str]:
    """How a result records the outputs it holds: the product names, the DICOM-SEG with its
    encoding (``dicom-seg:binary``), so a resume asking for another encoding redoes it."""
    return [f"{p}:{request.seg_type}" if p == "dicom-seg" else p for p in products]


def holds(recorded: Any, wanted: Sequence[str]) -> bool:
    """Whether a result that records ``recorded`` (its ``products``; none recorded: the masks
    only, as results made before outputs were recorded) holds every output ``wanted``."""
    have = set(recorded) if isinstance(recorded, list) else {"nifti"}
    return set(wanted) <= have


def model_table(segmenter: Any) -> tuple[tuple[str, ...], int]:
    """``(names of the selected labels, number of structures)`` of a loaded ``stuseg.Segmenter``
    with its own label table, as its Segmentations name them; ``((), 0)`` for the published table.

    The model's table is the Segmenter's ``names`` (value -> name) where it has one, else its
    plan's default (``class_<value>`` beyond the published class count).
    """
    from stuseg.inference.pipeline import _class_name
    from stuseg.structures.labels import STRUCTURES

    plan = segmenter.plan
    table = {v: _class_name(v, plan, getattr(segmenter, "names", None)) for v in range(1, plan.num_classes)}
    if table == dict(enumerate(STRUCTURES, start=1)):
        return (), 0
    return tuple(table[int(v)] for v in segmenter.keep), len(table)


def settings_of(
    segmenter: Any,
    *,
    multilabel: bool = False,
    weights: Path | None = None,
    request: Request | None = None,
) -> Settings:
    """The ``Settings`` of a loaded ``stuseg.Segmenter`` (its ``weights_sha256`` identifies the
    weights, whatever loaded them)."""
    names, classes = model_table(segmenter)
    return Settings(
        size=segmenter.size,
        weights_sha256=segmenter.weights_sha256,
        request=request or Request(),
        fast=bool(segmenter.fast),
        tta=bool(segmenter.tta),
        step_size=float(segmenter.step_size),
        labels=tuple(int(v) for v in segmenter.keep),
        multilabel=multilabel,
        weights=str(weights) if weights is not None else None,
        device=str(segmenter.device),
        names=names,
        classes=classes,
        precision=str(getattr(segmenter, "precision", "float32")),
    )


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
