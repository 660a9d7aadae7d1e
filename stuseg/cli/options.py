"""The options ``predict`` and ``batch`` share, and what they become for the library.

The ``Annotated`` option types (one help text each), and the conversions of parsed options into
the library's objects: a model folder, a ``stuseg.results.Request``, a channel list.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from stuseg.cli.base import fail, given_path
from stuseg.errors import StusegError

__all__ = [
    "OVERWRITE_HELP",
    "QA_FAIL_EXIT",
    "CheckpointChoice",
    "CheckpointOption",
    "DeviceOption",
    "DicomSegType",
    "FastOption",
    "FoldsOption",
    "ModelOption",
    "NamesOption",
    "OutputType",
    "PrecisionChoice",
    "PrecisionOption",
    "QaFailOption",
    "RoiSubsetOption",
    "SizeOption",
    "StepSizeOption",
    "TtaOption",
    "WeightsFileOption",
    "build_request",
    "canonical_size",
    "channel_paths",
    "model_folder",
    "model_inputs",
    "parse_folds",
]


class OutputType(str, Enum):
    """What ``stuseg predict`` writes; ``--output-type`` is repeatable."""

    NIFTI = "nifti"  # masks (or the --ml file) as NIfTI
    DICOM_SEG = "dicom-seg"  # one DICOM Segmentation instance referencing the DICOM series INPUT
    RTSTRUCT = "rtstruct"  # one RT Structure Set (contours) referencing the DICOM series INPUT


class DicomSegType(str, Enum):
    """How a DICOM-SEG stores its segments (``--dicom-seg-type``; ``stuseg.results.dicomseg.SEG_TYPES``)."""

    BINARY = "binary"  # one 1-bit frame per structure per slice (the default)
    LABELMAP = "labelmap"  # one 8-bit frame per slice, pixel value = segment number


OVERWRITE_HELP = "Replace an existing OUTPUT even if stuseg did not write it (a folder as a whole)."


NamesOption = Annotated[
    Path | None,
    typer.Option(
        "--names",
        metavar="FILE.json",
        help='Label table of a multilabel file from another tool: {"1": "spleen", ...}.',
    ),
]


# Options that predict and batch share, with the same meaning.
QaFailOption = Annotated[
    bool,
    typer.Option(
        "--qa-fail",
        help="Treat a result that raises a quality flag for review (wrong_side, fragmented, "
        "low_confidence) as a failure: the result is kept; predict exits with status 3, batch logs the "
        "case as failed.",
    ),
]


# predict --qa-fail's exit status when a quality flag is raised (1 is an error, 2 a usage error).
QA_FAIL_EXIT = 3


SizeOption = Annotated[
    str | None,
    typer.Option(
        "--size",
        "-s",
        help="small, base, large or huge (S/B/L/H). [default: base, or the size of --weights]",
    ),
]


FastOption = Annotated[
    bool,
    typer.Option(
        "--fast",
        help="Argmax at 1.5 mm, then resample the labels: same network time, a slightly "
        "cheaper export (see the README).",
    ),
]


TtaOption = Annotated[bool, typer.Option("--tta", help="Average over the 8 mirrorings (8x slower).")]


StepSizeOption = Annotated[
    float,
    typer.Option(
        "--step-size", metavar="FRACTION", min=0.05, max=1.0, help="Tile step as a fraction of the patch."
    ),
]


DeviceOption = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")]


WeightsFileOption = Annotated[
    Path | None,
    typer.Option("--weights", metavar="FILE", help="Local checkpoint (.model or .safetensors)."),
]


RoiSubsetOption = Annotated[
    list[str] | None,
    typer.Option("--roi-subset", metavar="NAME", help="Keep only these structures, groups or patterns."),
]


ModelOption = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        metavar="DIR|NAME",
        help="A fine-tuned STU-Net: an nnU-Net v2 or v1 model folder, or a name from `stuseg models`.",
    ),
]


FoldsOption = Annotated[
    str | None,
    typer.Option("--folds", metavar="0,1,...", help="Folds of --model to average. [default: every fold]"),
]


class CheckpointChoice(str, Enum):
    """Which checkpoint of each fold of a model folder."""

    FINAL = "final"
    BEST = "best"


CheckpointOption = Annotated[
    CheckpointChoice, typer.Option("--checkpoint", help="Which checkpoint of each fold of --model.")
]


class PrecisionChoice(str, Enum):
    """The type of the network's convolutions (``stuseg.model.precision``)."""

    AUTO = "auto"
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


PrecisionOption = Annotated[
    PrecisionChoice,
    typer.Option(
        "--precision",
        help="The network's number type: auto (float16 on CUDA, float32 on the CPU), float32, bfloat16 "
        "(faster on CPUs with AMX/AVX512_BF16 or Arm BF16) or float16 (CUDA).",
    ),
]


def parse_folds(raw: str | None) -> list[str] | None:
    """``--folds 0,1`` as a list; None for every fold."""
    if raw is None:
        return None
    folds = [f.strip() for f in raw.split(",") if f.strip()]
    if not folds:
        raise fail("--folds is empty; give fold names such as 0,1,2 or all")
    return folds


def channel_paths(image: Path, extra: list[Path] | None, count: int) -> list[Path]:
    """The input files of a case, one per model channel: INPUT, then each --channel, or INPUT's
    siblings named as nnU-Net names channels (case_0000.nii.gz, case_0001.nii.gz, ...)."""
    from stuseg.images.paths import channel_name, channel_of

    files = [image, *(extra or [])]
    if len(files) == 1 and count > 1:
        named = channel_of(image)
        if named is None or named[1] != 0:
            raise fail(
                f"this model takes {count} input channels: give the others with --channel FILE, or name "
                "the files as nnU-Net does (case_0000.nii.gz, case_0001.nii.gz, ...) and give the first"
            )
        files = [channel_name(image, c) for c in range(count)]
        missing = [f for f in files if not f.exists()]
        if missing:
            raise fail(f"channel file {missing[0]} does not exist (this model takes {count} input channels)")
    if len(files) != count:
        raise fail(f"this model takes {count} input channel(s); {len(files)} were given")
    return files


def canonical_size(size: str | None) -> str | None:
    """``--size`` as the model table names it (``S`` -> ``small``).

    Raises:
        StusegError: an unknown size, naming the valid ones.
    """
    if size is None:
        return None
    from stuseg.model.sizes import canonical_size

    return canonical_size(size)


def model_folder(model: str | None, folds: list[str] | None, checkpoint: CheckpointChoice, only: str) -> Any:
    """The ``--model`` folder (``stuseg.weights.modelstore.resolve_model``: read, not loaded, so its
    channels are known and a bad folder is refused before any work), or None without one.

    Raises:
        StusegError: the folder is unusable, or ``--folds``/``--checkpoint`` (named in ``only``)
            were given without a model.
    """
    if model is not None:
        from stuseg.weights.modelstore import resolve_model

        return resolve_model(
            given_path(model, "--model"), folds=parse_folds(folds), checkpoint=checkpoint.value
        )
    if folds is not None or checkpoint is not CheckpointChoice.FINAL:
        raise StusegError(f"{only} apply to a --model")
    return None


def model_inputs(weights_file: Path | None, trained: Any) -> list[Path]:
    """What a run reads besides its scans: the ``--weights`` file, the ``--model`` folder."""
    return [*([weights_file] if weights_file is not None else []), *([trained.source] if trained else [])]


def build_request(
    output_types: list[OutputType] | None,
    statistics: bool,
    preview: bool,
    seg_type: DicomSegType | None,
    codes_file: Path | None,
) -> Any:
    """The outputs asked for by predict's and batch's options (``stuseg.results.write.Request``)."""
    from stuseg.results import write as results

    types = set(output_types or [OutputType.NIFTI])
    dicom_seg = OutputType.DICOM_SEG in types
    if not dicom_seg and codes_file is not None:
        raise StusegError("--codes applies to --output-type dicom-seg")
    if not dicom_seg and seg_type is not None:
        raise StusegError("--dicom-seg-type applies to --output-type dicom-seg")
    codes = None
    dicom_types = [t.value for t in (OutputType.DICOM_SEG, OutputType.RTSTRUCT) if t in types]
    if dicom_types:
        from stuseg.results import dicomseg

        dicomseg.require_highdicom(dicom_types[0])  # the extra, before any work
        codes = dicomseg.read_codes(codes_file) if codes_file is not None else None
    return results.Request(
        nifti=OutputType.NIFTI in types,
        statistics=statistics,
        preview=preview,
        dicom_seg=dicom_seg,
        rtstruct=OutputType.RTSTRUCT in types,
        seg_type=(seg_type or DicomSegType.BINARY).value,
        codes=codes,
    )
