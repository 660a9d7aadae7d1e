"""How long a fine-tuned model takes to load, the first time and every time after.

    python3 benchmarks/bench_load.py [--size base] [--folds 5] [--loads 3]

Writes an nnU-Net v2 model folder of STU-Net ``--size`` (random weights, 3 classes) with
``--folds`` folds, each fold's checkpoint as nnU-Net 2.8.1 saves it (the network's weights plus
the optimizer's momentum buffers, about twice the weights; ``tests/model_folders.py``), into a
temporary folder with its own ``STUSEG_HOME``. Then, each in a fresh process, on the CPU:

- ``folder``: ``stuseg.Segmenter(model=FOLDER)`` ``--loads`` times: the first converts each
  fold into stuseg's cache, the others find it there;
- ``registered``: ``stuseg import-model FOLDER --name m`` once, then ``Segmenter(model="m")``
  ``--loads`` times.

Each load's seconds are the Segmenter's own ``load_seconds`` (finding, verifying and reading the
weights and building the networks), with the page cache warm after the first (the files were
just written), which is what a user's second ``stuseg predict`` sees too. The children run in
the temporary folder, so that ``PYTHONPATH=<another checkout>`` measures that checkout's code
(a ``python -c`` child puts its working folder first on ``sys.path``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, record

TESTS = Path(__file__).resolve().parents[1] / "tests"

CHILD = """
import json, sys, time
import stuseg
start = time.perf_counter()
seg = stuseg.Segmenter(model=sys.argv[1], device="cpu")
print(json.dumps({"load_s": round(seg.load_seconds, 3), "folds": len(seg.nets),
                  "weights_sha256": seg.weights_sha256}))
"""


def write_folder(root: Path, size: str, folds: int) -> Path:
    sys.path.insert(0, str(TESTS))
    import torch
    from model_folders import write_v2_folder

    from stuseg.model.network import SIZES, build_network

    arch = dataclasses.replace(SIZES[size], num_classes=3)
    torch.manual_seed(0)
    state = build_network(arch).state_dict()
    return write_v2_folder(
        root,
        state,
        spacing=(1.5, 1.5, 1.5),
        patch_size=(128, 128, 128),
        strides=((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2), (1, 1, 2)),
        folds=tuple(str(f) for f in range(folds)),
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="base")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--loads", type=int, default=3)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder = write_folder(work / "models", args.size, args.folds)
        checkpoints = sorted(folder.glob("fold_*/checkpoint_final.pth"))
        on_disk = sum(p.stat().st_size for p in checkpoints)
        env = {**os.environ, "STUSEG_HOME": str(work / "home")}

        def load(model: str) -> dict:
            done = subprocess.run(
                [sys.executable, "-c", CHILD, model],
                env=env,
                cwd=work,
                capture_output=True,
                text=True,
                check=True,
            )
            return json.loads(done.stdout.strip().splitlines()[-1])

        folder_loads = [load(str(folder)) for _ in range(args.loads)]
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "stuseg", "import-model", str(folder), "--name", "m"],
            env=env,
            cwd=work,
            capture_output=True,
            check=True,
        )
        import_s = time.perf_counter() - start
        registered_loads = [load("m") for _ in range(args.loads)]
        record(
            {
                "benchmark": "load",
                "size": args.size,
                "folds": args.folds,
                "checkpoints_gb": round(on_disk / 1e9, 3),
                "folder_load_s": [r["load_s"] for r in folder_loads],
                "import_model_s": round(import_s, 2),
                "registered_load_s": [r["load_s"] for r in registered_loads],
                "same_identity": len({r["weights_sha256"] for r in folder_loads + registered_loads}) == 1,
            },
            args.results,
        )


if __name__ == "__main__":
    main()
