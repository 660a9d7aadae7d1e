#!/usr/bin/env bash
# Wheels of stuseg's dependencies that the device machine's image lacks (its python3 is 3.12 with
# torch, numpy, scipy, numba, typer, rich, huggingface_hub, safetensors and pillow already), for
# benchmarks/gpu_check.py there: downloaded into .whl/ (ignored through .git/info/exclude) for
# the device tool's `carry`. The versions are the ones the tests pass with here. SimpleITK is left
# out: its 53 MB wheel would take the working tree past the 64 MiB a device call carries, and
# gpu_check.py reads and writes NIfTI only, which stuseg does with nibabel (SimpleITK is imported
# only for NRRD, MetaImage and DICOM inputs).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
    manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
for wheel in nibabel==5.4.2 isal==1.9.1; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp "${platforms[@]}" -d .whl "$wheel"
done
ls -l .whl
