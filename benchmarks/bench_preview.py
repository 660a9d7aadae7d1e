"""Time of ``stuseg.analysis.preview`` (render and write preview.png) on a 512 x 512 x 300 CT.

    python3 benchmarks/bench_preview.py [--shape 512 512 300] [--repeat 3] [--results FILE]

The same synthetic inputs as bench_statistics.py (float32 CT in Fortran order, a smooth label
map with the 104 structures as blocks, about half of the voxels labelled), stored LPS
(x and y flipped, as DICOM-derived volumes are) at 0.8 x 0.8 x 1.0 mm, so the reorientation is
part of the timed work. Prints one JSON line (best and all times, size of the picture) and
appends it to ``--results``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_statistics import make_inputs
from common import RESULTS, record

from stuseg.analysis.preview import write_preview
from stuseg.structures.labels import STRUCTURES


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", type=int, nargs=3, default=(512, 512, 300))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    shape = tuple(args.shape)
    labels, ct = make_inputs(shape)
    affine = np.diag([-0.8, -0.8, 1.0, 1.0])  # LPS storage
    names = dict(enumerate(STRUCTURES, start=1))
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / "preview.png"
        for _ in range(args.repeat):
            start = time.perf_counter()
            write_preview(labels, affine, ct, names, png)
            times.append(time.perf_counter() - start)
        from PIL import Image

        with Image.open(png) as img:
            size = list(img.size)
        png_bytes = png.stat().st_size
    line = {
        "bench": "preview",
        "shape": list(shape),
        "picture_px": size,
        "png_bytes": png_bytes,
        "seconds": [round(t, 3) for t in times],
        "best_s": round(min(times), 3),
    }
    record(line, args.results)


if __name__ == "__main__":
    main()
