"""Run the original nnU-Net v1 code on the inputs that crashed stuseg's normal mode, and compare.

Not part of the test suite (nnU-Net 1.7.1 does not install cleanly on a current Python: its
`sklearn` requirement is a package that refuses to install). A check to run by hand, in an
environment of its own:

    python3 -m venv --system-site-packages /tmp/nnv1
    /tmp/nnv1/bin/pip install --no-deps nnunet==1.7.1 batchgenerators==0.25.3
    /tmp/nnv1/bin/pip install scikit-image pandas threadpoolctl
    /tmp/nnv1/bin/python tests/oracles/nnunet_v1_check.py [--tta]

For each input, nnU-Net v1's own functions do the whole original path: SimpleITK reading,
``crop_to_nonzero``, ``resample_patient`` (cubic, separate z), the nonCT z-score,
``SegmentationNetwork.predict_3D`` (tiles, Gaussian, mirroring) and
``save_segmentation_nifti_from_softmax`` (the normal mode's export). The network is the same
random STU-Net (real architecture, few channels) that stuseg runs. Prints, per input, the share
of voxels on which stuseg's label map equals the original's.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # conftest, fabricate
from conftest import make_ct_array
from fabricate import tiny_network
from nnunet.inference.segmentation_export import save_segmentation_nifti_from_softmax
from nnunet.network_architecture.neural_network import SegmentationNetwork
from nnunet.preprocessing.cropping import crop_to_nonzero
from nnunet.preprocessing.preprocessing import resample_patient
from test_thick_slices import FAILED_INPUTS

from stuseg.inference.pipeline import segment

TARGET = np.array([1.5, 1.5, 1.5])


class Original(SegmentationNetwork):
    """The STU-Net as nnU-Net v1's inference code expects a network to be."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net
        self.conv_op = torch.nn.Conv3d
        self.num_classes = 105
        self.inference_apply_nonlin = lambda x: torch.softmax(x, 1)
        self.do_ds = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def original(path: Path, net: torch.nn.Module, tta: bool, out: Path) -> np.ndarray:
    itk = sitk.ReadImage(str(path))
    data = sitk.GetArrayFromImage(itk)[None].astype(np.float32)
    spacing = np.array(itk.GetSpacing())[[2, 1, 0]]
    shape_before = data.shape[1:]
    data, seg, bbox = crop_to_nonzero(data, None)
    props = {
        "original_size_of_raw_data": np.array(shape_before),
        "original_spacing": spacing,
        "crop_bbox": bbox,
        "size_after_cropping": data.shape[1:],
        "itk_origin": itk.GetOrigin(),
        "itk_spacing": itk.GetSpacing(),
        "itk_direction": itk.GetDirection(),
    }
    data[np.isnan(data)] = 0
    data, _ = resample_patient(
        data, seg, spacing, TARGET, 3, 1, force_separate_z=None, order_z_data=0, order_z_seg=0
    )
    props["spacing_after_resampling"] = TARGET
    data = (data - data.mean()) / (data.std() + 1e-8)
    wrapped = Original(net).eval()
    _, softmax = wrapped.predict_3D(
        data.astype(np.float32),
        do_mirroring=tta,
        mirror_axes=(0, 1, 2),
        use_sliding_window=True,
        step_size=0.5,
        patch_size=(128, 128, 128),
        use_gaussian=True,
        pad_border_mode="constant",
        pad_kwargs={"constant_values": 0},
        all_in_gpu=False,
        verbose=False,
        mixed_precision=False,
    )
    save_segmentation_nifti_from_softmax(
        softmax, str(out), props, 1, None, None, None, None, None, None, 0, False
    )
    return np.asarray(nib.load(out).dataobj)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tta", action="store_true")
    args = parser.parse_args()
    net = tiny_network(seed=2)
    with tempfile.TemporaryDirectory() as tmp:
        for shape, zooms in FAILED_INPUTS:
            path = Path(tmp) / "ct.nii.gz"
            nib.save(nib.Nifti1Image(make_ct_array(shape).astype(np.float32), np.diag([*zooms, 1.0])), path)
            expect = original(path, net, args.tta, Path(tmp) / "original.nii.gz")
            got = segment(path, model=net, tta=args.tta, device="cpu").labels
            assert got.shape == expect.shape, (got.shape, expect.shape)
            agree = float((got == expect).mean())
            print(
                f"{shape} @ {zooms} mm, {'TTA' if args.tta else 'no TTA'}: {agree:.6f} of voxels equal",
                flush=True,
            )


if __name__ == "__main__":
    main()
