"""Confidence per structure, tallied while the export streams, against whole-volume numpy oracles.

The network here is pointwise (each voxel's logits depend on its own value only), so the sliding
window's average is the network's output itself and the oracle can compute the whole probability
volume from the network's input in numpy, resample it as the reference export does
(``reference_pipeline``), take each voxel's label and the probability of that label, and average
per structure. Nothing of stuseg's export or kernels is used by the oracle.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import reference_pipeline
import scipy.ndimage as ndi
import torch

from stuseg.analysis.quality import LOW_CONFIDENCE_SHARE, LOW_PROBABILITY, Confidence
from stuseg.cli.render import quality_line
from stuseg.inference.pipeline import Segmenter
from stuseg.inference.postprocess import ProbabilityExport, export_labels, tensor_tallies
from stuseg.inference.predict import Slab
from stuseg.model.plan import Normalization, Plan

CENTRES = (-1000.0, 40.0, 300.0, 700.0)  # class k wins nearest CENTRES[k] (HU)


class Pointwise(torch.nn.Module):
    """Logits ``-sharpness * ((x - centre_k) / 150)^2`` per class: every voxel on its own."""

    def __init__(self, sharpness: float) -> None:
        super().__init__()
        self.sharpness = sharpness

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centres = torch.tensor(CENTRES, dtype=x.dtype).view(1, -1, 1, 1, 1)
        return -self.sharpness * ((x - centres) / 150.0) ** 2


def pointwise_logits(x: np.ndarray, sharpness: float) -> np.ndarray:
    """The same logits in numpy, float64, (K, *spatial)."""
    return np.stack([-sharpness * ((x.astype(np.float64) - c) / 150.0) ** 2 for c in CENTRES])


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(0))
    return e / e.sum(0)


def per_label(labels: np.ndarray, probability: np.ndarray, k: int) -> dict[int, tuple[float, float]]:
    """Mean probability and share below 0.5 per label value 1..k-1 present, by masks."""
    out = {}
    for value in range(1, k):
        mask = labels == value
        if mask.any():
            p = probability[mask]
            out[value] = (float(p.mean()), float((p < 0.5).mean()))
    return out


def oracle(x: np.ndarray, sharpness: float, framework: str, fast: bool, shape, axis):
    """Whole-volume reference: (labels on the grid the figures are counted on, figures per label)."""
    logits = pointwise_logits(x, sharpness)
    prob = softmax(logits)
    if fast:  # argmax at network resolution; the figures count those voxels
        labels = prob.argmax(0)
        return labels, per_label(labels, prob.max(0), len(CENTRES))
    # Normal: v1 resamples the probabilities and takes the largest; v2 resamples the logits, then
    # the softmax (nnU-Net v2's order), and the largest.
    if framework == "v1":
        resampled = reference_pipeline.resample_probabilities(prob, shape, axis).astype(np.float64)
    else:
        resampled = softmax(reference_pipeline.resample_probabilities(logits, shape, axis).astype(np.float64))
    labels = resampled.argmax(0)
    return labels, per_label(labels, resampled.max(0), len(CENTRES))


def _volume(make_nifti, zooms=(1.2, 1.3, 2.5)) -> Path:
    return make_nifti(shape=(40, 36, 14), affine=np.diag([*zooms, 1.0]))


def _run(path: Path, sharpness: float, framework: str, fast: bool):
    plan = Plan((1.5, 1.5, 1.5), (16, 16, 16), len(CENTRES), (Normalization("none"),), framework)
    segmenter = Segmenter(model=Pointwise(sharpness), plan=plan, device="cpu", fast=fast)
    prepared = segmenter.prepare(path)
    x = prepared.x[0].copy()
    inferred = segmenter.infer(prepared)
    return segmenter, inferred, x


@pytest.mark.parametrize("framework", ["v1", "v2"])
@pytest.mark.parametrize("fast", [False, True])
def test_confidence_equals_a_whole_volume_numpy_computation(make_nifti, framework: str, fast: bool) -> None:
    _, inferred, x = _run(_volume(make_nifti), 0.25, framework, fast)
    geometry = inferred.geometry
    labels, expected = oracle(x, 0.25, framework, fast, geometry.cropped_shape, geometry.export_axis)
    confidence = inferred.confidence
    assert confidence.grid == ("network" if fast else "input") and confidence.logits == (framework == "v2")
    if not fast:  # the voxels counted are the label map's own
        assert (labels == inferred.labels).mean() > 0.9995
    assert len(expected) == 3  # every structure is present, and some voxels are unsure
    assert any(share > 0 for _, share in expected.values())
    for value, (mean, low_share) in expected.items():
        got = confidence.of(value)
        assert got is not None
        assert got[0] == pytest.approx(mean, abs=2e-4), value
        assert got[1] == pytest.approx(low_share, abs=2e-3), value
        # Voxel counts on the grid the figures are counted on.
        assert int(confidence.voxels[value]) == pytest.approx(int((labels == value).sum()), abs=3)
    assert confidence.of(0) is None and not confidence.voxels[0]


@pytest.mark.parametrize("framework", ["v1", "v2"])
@pytest.mark.parametrize("fast", [False, True])
def test_sharper_logits_give_higher_confidence(make_nifti, framework: str, fast: bool) -> None:
    path = _volume(make_nifti)
    figures = []
    for sharpness in (0.3, 0.6, 1.2):
        _, inferred, _ = _run(path, sharpness, framework, fast)
        figures.append({v: inferred.confidence.of(v) for v in (1, 2, 3)})
    for value in (1, 2, 3):
        means = [f[value][0] for f in figures]
        lows = [f[value][1] for f in figures]
        assert means[0] < means[1] < means[2], (value, means)
        assert lows[0] >= lows[1] >= lows[2], (value, lows)


def test_statistics_carry_the_figures_and_flag_low_confidence(make_nifti) -> None:
    path = _volume(make_nifti)
    plan = Plan((1.5, 1.5, 1.5), (16, 16, 16), len(CENTRES), (Normalization("none"),), "v2")
    unsure = Segmenter(model=Pointwise(0.01), plan=plan, device="cpu")(path)  # all near 1/4
    sure = Segmenter(model=Pointwise(5.0), plan=plan, device="cpu")(path)
    for seg, flagged in ((unsure, True), (sure, False)):
        stats = seg.statistics(path)
        assert stats.image["confidence"]["low_probability"] == LOW_PROBABILITY
        for rec in stats.structures:
            mean, share = seg.confidence.of(rec["label"])
            assert (rec["mean_probability"], rec["low_probability_share"]) == (mean, share)
            assert rec["low_confidence"] is (share > LOW_CONFIDENCE_SHARE) is flagged
        assert stats.flagged()["low_confidence"] == (["class_1", "class_2", "class_3"] if flagged else [])
        line = quality_line(stats)
        if flagged:  # near-uniform over 4 classes: every voxel below 0.5, mean about 1/4
            assert line.startswith("stuseg: quality: class_1 unsure (100% of voxels below p 0.5, mean p 0.2")
        else:
            assert line is None or "unsure" not in line


def test_a_label_map_from_files_has_no_confidence(tmp_path: Path) -> None:
    from stuseg.analysis.statistics import compute

    labels = np.zeros((5, 5, 5), np.uint8)
    labels[1:3, 1:3, 1:3] = 1
    stats = compute(labels, np.eye(4), np.zeros((5, 5, 5), np.float32), {1: "spleen"})
    rec = stats.structures[0]
    assert rec["mean_probability"] is rec["low_probability_share"] is rec["low_confidence"] is None
    assert stats.image["confidence"] is None


def _slabs(scores: np.ndarray, norm: np.ndarray, axis: int, cuts: list[int]):
    for a, b in zip(cuts, cuts[1:]):
        index = [slice(None)] * 4
        index[axis + 1] = slice(a, b)
        yield Slab(
            axis,
            a,
            b,
            torch.from_numpy(np.ascontiguousarray(scores[tuple(index)] * norm[tuple(index)[1:]])).movedim(
                0, -1
            ),
            torch.from_numpy(norm[tuple(index)[1:]]),
        )


@pytest.mark.parametrize("logits", [False, True])
@pytest.mark.parametrize(
    ("in_shape", "out_shape", "sep"), [((7, 9, 11), (13, 20, 17), None), ((5, 12, 13), (14, 20, 30), 0)]
)
def test_streamed_export_tallies_equal_the_whole_volume(logits: bool, in_shape, out_shape, sep) -> None:
    """Noisy scores in uneven slabs (every export path of the kernel: corners that agree, a candidate
    that wins by the bound, every class interpolated)."""
    rng = np.random.default_rng(sum(in_shape))
    k = 6
    raw = ndi.gaussian_filter(rng.normal(0, 1, (k, *in_shape)), (0, 1, 1, 1)) * 6
    prob = softmax(raw)
    scores = (raw if logits else prob).astype(np.float32)
    norm = rng.uniform(0.5, 2.0, in_shape).astype(np.float32)
    cuts = [0, 2, 3, in_shape[0]]
    export = ProbabilityExport(in_shape, out_shape, sep, 0, k, logits=logits)
    for slab in _slabs(scores, norm, 0, cuts):
        export.add(slab)
    labels = export.result()
    # The oracle: the (float32) mean scores resampled whole; v1 takes them as probabilities, v2
    # takes the softmax of the resampled logits; the figure is the largest probability.
    mean_scores = (scores * norm / norm).astype(np.float64)
    resampled = np.stack(
        [
            reference_pipeline._resample(c, out_shape, sep, 1, clip=False, dtype=np.float64)
            for c in mean_scores
        ]
    )
    if logits:
        resampled = softmax(resampled)
    np.testing.assert_array_equal(labels, resampled.argmax(0))
    for value, (mean, share) in per_label(labels, resampled.max(0), k).items():
        got = export.confidence.of(value)
        assert got[0] == pytest.approx(mean, rel=1e-6)
        assert got[1] == pytest.approx(share, abs=1e-9)
        assert export.confidence.voxels[value] == (labels == value).sum()
    p = softmax(mean_scores) if logits else mean_scores
    # Fast mode: the network-resolution voxels, each with its winning probability.
    _, tallies = export_labels(
        _slabs(scores, norm, 1, [0, 4, in_shape[1]]), in_shape, out_shape, sep, k, fast=True, logits=logits
    )
    argmax = mean_scores.argmax(0)
    for value, (mean, share) in per_label(argmax, p.max(0), k).items():
        assert tallies.of(value)[0] == pytest.approx(mean, rel=1e-6)
        assert tallies.of(value)[1] == pytest.approx(share, abs=1e-9)


@pytest.mark.parametrize("logits", [False, True])
def test_the_accelerator_tallies_equal_the_compiled_ones(logits: bool) -> None:
    """The torch tallies a GPU slab takes (run here on CPU tensors) against the kernel's."""
    rng = np.random.default_rng(7)
    raw = rng.normal(0, 2, (5, 6, 7, 5))
    scores = torch.from_numpy(
        (raw if logits else softmax(raw.transpose(3, 0, 1, 2)).transpose(1, 2, 3, 0)).astype(np.float32)
    )
    if logits:  # a voxel whose two largest logits tie, far above the rest: 1/2 each
        scores[0, 0, 0] = 0.0
        scores[0, 0, 0, 1] = scores[0, 0, 0, 2] = 40.0
    norm = torch.ones(scores.shape[:-1])
    compiled = Confidence.zeros(5, "network", logits)
    from stuseg.inference.postprocess import slab_labels

    out = np.zeros(scores.shape[:-1], np.uint8)
    slab_labels(Slab(0, 0, 5, scores, norm), out, compiled, logits=logits)
    device = Confidence.zeros(5, "network", logits)
    device.add(*tensor_tallies(scores, scores.argmax(-1), logits=logits))
    np.testing.assert_allclose(device.probability_sum, compiled.probability_sum, rtol=1e-6)
    np.testing.assert_array_equal(device.low, compiled.low)
    np.testing.assert_array_equal(device.voxels, compiled.voxels)
    assert compiled.voxels[1:].sum() == (out > 0).sum() and compiled.low[1:].sum() > 0
