"""What a batch result depends on: the model's options, and the settings a result records.

``ModelOptions`` choose a model and how it predicts (what loads a ``Segmenter`` elsewhere: the
local runner, each Ray actor). ``Settings`` are the weights and options a result depends on (its
fingerprint, compared on resume) and the outputs asked for, as the run log records them;
``settings_of`` reads them off a loaded ``Segmenter``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stuseg.results.write import PRODUCTS, Request
from stuseg.runs.cases import Case

__all__ = ["ModelOptions", "Settings", "model_table", "product_tags", "settings_of"]


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
