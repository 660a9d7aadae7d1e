"""File-name rules: one definition, whatever the letter case of the suffix."""

from __future__ import annotations

from pathlib import Path

import pytest

from stuseg.images import paths
from stuseg.results.labelmaps import companion_paths
from stuseg.results.write import Layout


@pytest.mark.parametrize(
    ("name", "suffix", "stem"),
    [
        ("ct.nii.gz", ".nii.gz", "ct"),
        ("CT.NII.GZ", ".nii.gz", "CT"),
        ("ct.Nii", ".nii", "ct"),
        ("scan.v2.nrrd", ".nrrd", "scan.v2"),
        ("head.MHD", ".mhd", "head"),
        ("notes.txt", ".txt", "notes"),
        ("plain", "", "plain"),
        (".nii.gz", ".gz", ".nii"),  # a hidden file named like the suffix, not an image
    ],
)
def test_suffix_and_stem(name: str, suffix: str, stem: str) -> None:
    assert paths.image_suffix(Path("/data") / name) == suffix
    assert paths.stem(name) == stem


def test_only_nifti_names_have_a_nifti_stem() -> None:
    assert paths.nifti_stem("seg.NII.GZ") == "seg" and paths.nifti_stem("seg.nii") == "seg"
    assert paths.nifti_stem("seg.nrrd") is None and paths.nifti_stem(".nii.gz") is None


@pytest.mark.parametrize("name", ["OUT.nii.gz", "OUT.NII.GZ", "OUT.Nii.Gz", "OUT.nii"])
def test_every_sidecar_of_a_multilabel_result_shares_its_stem(tmp_path: Path, name: str) -> None:
    result = tmp_path / name
    names = {
        companion_paths(result)["json"].name,
        *(p.name for p in Layout(result, True, ("statistics", "preview", "dicom-seg")).all_files()),
    }
    assert names == {"OUT.json", "OUT.statistics.json", "OUT.statistics.csv", "OUT.preview.png", "OUT.dcm"}
