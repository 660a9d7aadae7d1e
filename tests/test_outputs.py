"""stuseg.results.outputs: output checks before any work, staged folders and files, the ownership marker."""

from __future__ import annotations

import gzip
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from stuseg.errors import OutputError
from stuseg.results import outputs
from stuseg.results.outputs import MARKER, check_output, clean_leftovers, staged_files, staged_folder


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _host() -> str:
    return "".join(c if c.isalnum() or c == "." else "_" for c in socket.gethostname())


def _refused(message: str, output: str | Path, **kw) -> None:
    with pytest.raises(OutputError) as info:
        check_output(output, **kw)
    assert str(info.value) == message


def test_refuses_an_output_that_is_an_input_inside_it_or_containing_it(tmp_path: Path) -> None:
    ct = tmp_path / "ct.nii.gz"
    ct.write_bytes(b"ct")
    dicom = tmp_path / "series"
    dicom.mkdir()
    _refused(
        f"the output {ct} is the input {ct}; writing it would destroy the input, so give a new file name",
        ct,
        inputs=[ct],
        kind="file",
    )
    _refused(
        f"the output {dicom / 'out'} lies inside the input folder {dicom}; give a folder outside it",
        dicom / "out",
        inputs=[dicom],
        kind="folder",
    )
    _refused(
        f"the output {tmp_path} contains the input {ct}; replacing it would delete the input, "
        "so give a new folder name",
        tmp_path,
        inputs=[ct],
        kind="folder",
        overwrite=True,  # never allowed
    )
    link = tmp_path / "link.nii.gz"
    link.symlink_to(ct)
    with pytest.raises(OutputError, match="is the input"):
        check_output(link, inputs=[ct], kind="file", overwrite=True)


def test_refuses_empty_paths_the_current_folder_and_wrong_kinds(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    _refused("the output path is empty; give the name of a new folder", "", inputs=[], kind="folder")
    _refused("the output path is empty; give the name of a new file", " ", inputs=[], kind="file")
    for here in (".", str(tmp_path), ".."):
        with pytest.raises(OutputError, match="is the current folder or holds it"):
            check_output(here, inputs=[], kind="folder", overwrite=True)
    (tmp_path / "f.txt").write_text("x")
    _refused(
        "the output f.txt is a file, but a folder is written here; give a folder name",
        "f.txt",
        inputs=[],
        kind="folder",
    )
    (tmp_path / "d").mkdir()
    _refused(
        "the output d is a folder, but a file is written here; give a file name", "d", inputs=[], kind="file"
    )
    missing = tmp_path / "no" / "such"
    _refused(
        f"the folder {tmp_path / 'no'} does not exist; create it first (mkdir -p '{tmp_path / 'no'}')",
        missing,
        inputs=[],
        kind="folder",
    )


def test_a_folder_of_the_users_files_is_refused_unless_overwrite(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "liver.nii.gz").write_bytes(b"my own work")
    (mine / "notes.txt").write_text("keep")
    _refused(
        f"the folder {mine} holds files stuseg did not write (liver.nii.gz and 1 more); give a new "
        "folder, or add --overwrite to replace the folder and everything in it",
        mine,
        inputs=[],
        kind="folder",
    )
    check_output(mine, inputs=[], kind="folder", overwrite=True)
    # an empty folder, or one stuseg wrote, is fine
    (tmp_path / "empty").mkdir()
    check_output(tmp_path / "empty", inputs=[], kind="folder")
    with staged_folder(tmp_path / "ours") as stage:
        (stage / "liver.nii.gz").write_bytes(b"result")
    check_output(tmp_path / "ours", inputs=[], kind="folder")
    # ... until the user adds a file of their own to it
    (tmp_path / "ours" / "extra.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"holds files stuseg did not write \(extra.txt\)"):
        check_output(tmp_path / "ours", inputs=[], kind="folder")


def test_an_existing_file_is_replaced_only_if_stuseg_wrote_it(tmp_path: Path) -> None:
    theirs = tmp_path / "seg.nii.gz"
    with gzip.open(theirs, "wb") as fh:
        fh.write(b"\x5c\x01" + b"\0" * 400)
    with pytest.raises(OutputError, match="exists and was not written by stuseg"):
        check_output(theirs, inputs=[], kind="file")
    check_output(theirs, inputs=[], kind="file", overwrite=True)
    ours = tmp_path / "ours.nii.gz"
    with gzip.open(ours, "wb") as fh:  # the label table a multilabel file carries in its header
        fh.write(b"\0" * 352 + json.dumps({"format": "stuseg-labels/1"}, indent=1).encode())
    check_output(ours, inputs=[], kind="file")
    (tmp_path / "seg.ctbl").write_text("# Color table file written by stuseg\n")
    check_output(tmp_path / "seg.ctbl", inputs=[], kind="file")


def test_staged_folder_replaces_a_previous_run_as_a_whole_and_records_it(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with outputs.recording("predict", {"input_path": Path("ct.nii.gz")}), staged_folder(out) as stage:
        assert stage.parent == tmp_path and stage.name.startswith(".stuseg-staging-")
        assert not out.exists()
        for name in ("a", "b", "c"):
            (stage / f"{name}.nii.gz").write_bytes(name.encode())
    doc = json.loads((out / MARKER).read_text())
    assert doc["command"] == "predict" and doc["options"] == {"input_path": "ct.nii.gz"}
    with staged_folder(out) as stage:
        (stage / "b.nii.gz").write_bytes(b"second")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "b.nii.gz"]
    assert (out / "b.nii.gz").read_bytes() == b"second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing hidden left beside it
    doc = json.loads((out / MARKER).read_text())
    assert doc["files"] == ["b.nii.gz"] and doc["format"] == "stuseg-run/1"
    with outputs.recording("export-labels", {"ml": False}), staged_folder(out) as stage:
        (stage / "sub").mkdir()
        (stage / "sub" / "x.json").write_text("{}")
    doc = json.loads((out / MARKER).read_text())
    assert doc["command"] == "export-labels" and doc["options"] == {"ml": False}
    assert doc["files"] == ["sub/x.json"]


@pytest.mark.parametrize("failure", [RuntimeError("boom"), KeyboardInterrupt(), OSError(28, "No space")])
def test_a_failed_block_leaves_the_previous_output_untouched(tmp_path: Path, failure) -> None:
    out = tmp_path / "out"
    with staged_folder(out) as stage:
        (stage / "old.nii.gz").write_bytes(b"old")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    expected = OutputError if isinstance(failure, OSError) else type(failure)
    with pytest.raises(expected) as info, staged_folder(out) as stage:
        (stage / "new.nii.gz").write_bytes(b"half")
        raise failure
    if isinstance(failure, OSError):
        assert str(info.value) == f"cannot write {out}: No space; nothing was written"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_staged_files_appear_together_or_not_at_all(tmp_path: Path) -> None:
    finals = [tmp_path / "seg.nii.gz", tmp_path / "seg.json"]
    with pytest.raises(RuntimeError), staged_files(finals) as temps:
        assert [t.name.endswith(f.name) for t, f in zip(temps, finals)] == [True, True]
        temps[0].write_bytes(b"one")
        raise RuntimeError
    assert list(tmp_path.iterdir()) == []
    with staged_files(finals) as temps:
        for t in temps:
            t.write_text(t.name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg.json", "seg.nii.gz"]


def test_leftovers_of_dead_processes_are_removed_by_the_next_run(tmp_path: Path) -> None:
    dead, host = _dead_pid(), _host()
    stale_dir = tmp_path / f".stuseg-staging-{host}-{dead}-0123abcd"
    stale_dir.mkdir()
    (stale_dir / "liver.nii.gz").write_bytes(b"half")
    stale_file = tmp_path / f".stuseg-staging-{host}-{dead}-0123abcd-seg.nii.gz"
    stale_file.write_bytes(b"half")
    alive = tmp_path / f".stuseg-staging-{host}-{os.getpid()}-0123abcd"
    alive.mkdir()
    elsewhere = tmp_path / f".stuseg-staging-otherhost-{dead}-0123abcd"
    elsewhere.mkdir()
    users = tmp_path / ".stuseg-staging-notes"
    users.write_text("not ours: no pid")
    with staged_folder(tmp_path / "out") as stage:
        (stage / "x").write_text("x")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["out", alive.name, elsewhere.name, users.name])
    assert clean_leftovers(tmp_path) == []


def test_a_folder_that_cannot_be_looked_into_is_refused(tmp_path: Path, monkeypatch) -> None:
    """Unreadable contents cannot be known to be stuseg's (EACCES simulated: root reads everything)."""
    out = tmp_path / "out"
    with staged_folder(out) as stage:
        (stage / "sub").mkdir()
        (stage / "sub" / "a.nii.gz").write_bytes(b"a")
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path) == out / "sub":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    _refused(
        f"cannot look into the folder {out} (Permission denied); give a new folder, or add --overwrite "
        "to replace the folder and everything in it",
        out,
        inputs=[],
        kind="folder",
    )
