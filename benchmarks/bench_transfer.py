"""stuseg against nnU-Net v2's own predictor on the same fine-tuned model folder, on the CPU.

    python3 benchmarks/bench_transfer.py [--rounds 2] [--shape 512 512 300]

A synthetic CT-like scan (``common.make_ct``, default 512 x 512 x 300 voxels at 0.8 x 0.8 x
1.5 mm) and an nnU-Net v2 model folder of a 3-class STU-Net base (``tests/model_folders.py``'s
``write_v2_folder``: 1.5 mm isotropic, 128^3 patch, strides [1,1,1], 4 x [2,2,2], [1,1,2],
CTNormalization, fold 0; PyTorch's default initialisation, the heads' biases zero). Each round
runs, each in a fresh process and one after the other (the order swapped every round):

- nnU-Net v2 (the installed 2.8.x): ``nnUNetPredictor(tile_step_size=0.5, use_gaussian=True,
  use_mirroring=False, perform_everything_on_device=False, device=cpu)``, initialised by
  ``manual_initialization`` (``tests/nnunet_oracle.folder_predictor``: its trainer lookup imports
  timm/torchvision), then ``predict_from_files`` as ``nnUNetv2_predict`` calls it, with one
  preprocessing and one export worker process; it writes ``case.nii.gz``.
- stuseg: ``python3 -m stuseg predict IN OUT.nii.gz --model FOLDER --device cpu --ml`` when the
  command has ``--model``, else a fresh Python process calling ``stuseg.segment(IN,
  model=FOLDER, device="cpu")`` and writing the multilabel file as ``--ml`` does.

Measured from this (parent) process: wall time from process start to exit, and peak RSS as the
largest sum of the RSS of the process and all its descendants, sampled from /proc every 0.1 s
(nnU-Net's workers and its multiprocessing Manager included); besides, the peak RSS of the main
process alone (``wait4``'s ``ru_maxrss``). Both get the same torch thread count (the CPU count;
nnU-Net's ``nnUNet_def_n_proc`` set to it too, so its export does not switch to 8 threads).
``uptime``'s load averages are recorded before each run. The label maps are compared
voxel by voxel (share of equal voxels) as a sanity check. One JSON line per run goes to
benchmarks/results.jsonl.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from common import RESULTS, make_ct, record

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
LABELS = ("organ", "bone")  # + background: 3 classes
STRIDES = ((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2), (1, 1, 2))
PATCH = (128, 128, 128)
SPACING = (1.5, 1.5, 1.5)

NNUNET = """
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
from nnunet_oracle import folder_predictor
import torch

if __name__ == "__main__":
    start = time.perf_counter()
    predictor = folder_predictor(__import__("pathlib").Path(sys.argv[2]))
    predictor.predict_from_files([[sys.argv[3]]], [sys.argv[4]], save_probabilities=False,
                                 overwrite=True, num_processes_preprocessing=1,
                                 num_processes_segmentation_export=1)
    print(json.dumps({"inner_s": time.perf_counter() - start, "torch_threads": torch.get_num_threads(),
                      "rss_self_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                      "rss_largest_child_gb":
                          resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20}))
"""

STUSEG_LIBRARY = """
import json, resource, sys, time
import stuseg, torch
from stuseg.results import labelmaps

start = time.perf_counter()
seg = stuseg.segment(sys.argv[1], model=sys.argv[2], device="cpu", fast=False)
labelmaps.save_multilabel(seg.labels, seg.image.header, __import__("pathlib").Path(sys.argv[3]),
                          seg.names, numbering="model")
print(json.dumps({"inner_s": time.perf_counter() - start, "torch_threads": torch.get_num_threads(),
                  "stages_s": {k: round(v, 2) for k, v in seg.timings.items()},
                  "rss_self_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def write_folder(root: Path) -> Path:
    """The 3-class STU-Net base model folder (default init, heads' biases zero)."""
    sys.path.insert(0, str(TESTS))
    import torch
    from model_folders import write_v2_folder

    from stuseg.model.network import SIZES, build_network

    for axis in range(3):  # the patch must be divisible by the total downsampling on each axis
        total = 1
        for s in STRIDES:
            total *= s[axis]
        assert PATCH[axis] % total == 0, (axis, total)
    arch = dataclasses.replace(SIZES["base"], num_classes=len(LABELS) + 1, strides=STRIDES[1:])
    torch.manual_seed(0)
    net = build_network(arch)
    with torch.no_grad():
        for head in net.seg_outputs:
            head.bias.zero_()
    return write_v2_folder(
        root,
        net.state_dict(),
        spacing=SPACING,
        patch_size=PATCH,
        strides=STRIDES,
        labels=LABELS,
        normalization=("CTNormalization",),
        folds=("0",),
    )


def _tree_rss(root: int) -> int:
    """Bytes of RSS of process ``root`` and all its descendants, now."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            statm = Path(f"/proc/{entry}/statm").read_text().split()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        parents[int(entry)] = int(fields[1])
        rss[int(entry)] = int(statm[1]) * os.sysconf("SC_PAGE_SIZE")
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        children = [p for p, pp in parents.items() if pp == pid and p not in tree]
        tree.update(children)
        frontier.extend(children)
    return sum(rss.get(p, 0) for p in tree)


def measured(cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run ``cmd``; wall time, peak RSS of its process tree (sampled) and of its main process."""
    peak = [0]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _tree_rss(proc.pid))
            done.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    # Read the pipes in threads so that a chatty child never blocks; reap it with wait4 for its rusage.
    out: dict[str, str] = {}
    readers = [
        threading.Thread(target=lambda k=k, f=f: out.__setitem__(k, f.read()), daemon=True)
        for k, f in (("stdout", proc.stdout), ("stderr", proc.stderr))
    ]
    for r in readers:
        r.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    done.set()
    sampler.join()
    for r in readers:
        r.join()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out['stderr'][-4000:]}")
    inner = json.loads(out["stdout"].strip().splitlines()[-1]) if out["stdout"].strip() else {}
    result = {
        "wall_s": round(wall, 2),
        "peak_rss_tree_gb": round(peak[0] / 2**30, 3),
        "peak_rss_main_gb": round(usage.ru_maxrss / 2**20, 3),
        **{k: round(v, 3) if isinstance(v, float) else v for k, v in inner.items()},
    }
    summary = out["stderr"].strip().splitlines()[-1:] if out["stderr"].strip() else []
    if summary and summary[0].startswith("wrote "):
        result["stuseg_summary"] = summary[0]
    return result


def has_model_option(env: dict[str, str]) -> bool:
    """Whether ``stuseg predict`` takes ``--model`` (the command's option may come later)."""
    done = subprocess.run(
        [sys.executable, "-m", "stuseg", "predict", "--help"], env=env, capture_output=True, text=True
    )
    return "--model" in done.stdout


def agreement(nnunet_file: Path, stuseg_file: Path) -> dict[str, Any]:
    """Share of equal voxels between the two label maps (both taken to the closest canonical axes)."""
    import nibabel as nib
    import numpy as np

    a = nib.as_closest_canonical(nib.load(nnunet_file))
    b = nib.as_closest_canonical(nib.load(stuseg_file))
    same_grid = a.shape == b.shape and bool(np.allclose(a.affine, b.affine, atol=1e-3))
    la, lb = np.asarray(a.dataobj).astype(np.int16), np.asarray(b.dataobj).astype(np.int16)
    counts = {int(v): int(c) for v, c in zip(*np.unique(la, return_counts=True))}
    return {
        "same_grid": same_grid,
        "equal_share": round(float((la == lb).mean()), 6) if la.shape == lb.shape else None,
        "nnunet_label_counts": counts,
    }


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--shape", type=int, nargs=3, default=[512, 512, 300])
    parser.add_argument("--spacing", type=float, nargs=3, default=[0.8, 0.8, 1.5])
    parser.add_argument("--only", choices=["nnunet", "stuseg"], help="run one tool only (estimates)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    threads = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        env = {
            **os.environ,
            "STUSEG_HOME": str(work / "home"),
            "nnUNet_def_n_proc": str(threads),
            "nnUNet_raw": str(work / "raw"),
            "nnUNet_preprocessed": str(work / "pre"),
            "nnUNet_results": str(work / "results"),
        }
        ct = work / "case_0000.nii.gz"
        make_ct(ct, tuple(args.shape), tuple(args.spacing))
        folder = write_folder(work / "models")
        cli = has_model_option(env)
        tools = [args.only] if args.only else ["nnunet", "stuseg"]
        for r in range(args.rounds):
            order = tools if r % 2 == 0 else tools[::-1]
            outputs: dict[str, Path] = {}
            for tool in order:
                if tool == "nnunet":
                    out = work / f"nnunet-{r}" / "case"
                    cmd = [sys.executable, "-c", NNUNET, str(TESTS), str(folder), str(ct), str(out)]
                    outputs[tool] = out.with_name("case.nii.gz")
                    entry = "nnUNetPredictor.predict_from_files (1 preprocessing + 1 export worker)"
                else:
                    out = work / f"stuseg-{r}.nii.gz"
                    if cli:
                        cmd = [sys.executable, "-m", "stuseg", "predict", str(ct), str(out)]
                        cmd += ["--model", str(folder), "--device", "cpu", "--ml"]
                        entry = "stuseg predict --model FOLDER --device cpu --ml"
                    else:
                        cmd = [sys.executable, "-c", STUSEG_LIBRARY, str(ct), str(folder), str(out)]
                        entry = "stuseg.segment(model=FOLDER, device='cpu') + save_multilabel"
                    outputs[tool] = out
                load = uptime()
                result = measured(cmd, env)
                record(
                    {
                        "benchmark": "transfer",
                        "tool": tool,
                        "entry": entry,
                        "round": r,
                        "position": order.index(tool),
                        "commit": commit,
                        "model": "STU-Net base, 3 classes, 1.5 mm, 128^3, fold 0",
                        "input": {"shape": args.shape, "spacing_mm": args.spacing},
                        "uptime_before": load,
                        **result,
                    },
                    args.results,
                )
            if len(outputs) == 2:
                agree = agreement(outputs["nnunet"], outputs["stuseg"])
                record(
                    {"benchmark": "transfer-agreement", "round": r, "commit": commit, **agree}, args.results
                )


if __name__ == "__main__":
    main()
