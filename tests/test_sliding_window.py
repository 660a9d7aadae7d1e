"""Sliding window and mirror TTA, against scipy and whole-volume restatements of nnU-Net's rules."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
from reference_pipeline import tile_starts_formula as reference_starts

from stuseg.inference.head import ClassProbabilities, softmax_last_
from stuseg.inference.predict import (
    MIRROR_FLIPS,
    Mirrored,
    PatchPredictor,
    gaussian_importance,
    pad_amounts,
    sliding_window,
    tile_starts,
)


def predict_scores(x: torch.Tensor, fn, num_classes: int, patch=(128, 128, 128), step=0.5, batch_size=1):
    """The whole (*spatial, K) averaged score volume: the streamed slabs put together."""
    slabs = [(s.axis, s.scores()) for s in sliding_window(x, fn, num_classes, patch, step, batch_size)]
    return torch.cat([scores for _, scores in slabs], dim=slabs[0][0])


def filtered_impulse(patch: tuple[int, ...]) -> np.ndarray:
    """nnU-Net's recipe for the tile weight: a centred unit impulse through scipy's Gaussian filter
    (sigma = patch / 8), divided by its maximum, as float32."""
    impulse = np.zeros(patch)
    impulse[tuple(p // 2 for p in patch)] = 1
    ref = ndi.gaussian_filter(impulse, [p / 8 for p in patch], 0, mode="constant", cval=0)
    return (ref / ref.max()).astype(np.float32)


@pytest.mark.parametrize("size", [128, 129, 137, 191, 192, 193, 200, 256, 300, 511])
@pytest.mark.parametrize("step", [0.5, 0.25, 0.7, 1.0])
def test_tile_starts_match_formula_and_cover_the_axis(size: int, step: float) -> None:
    starts = tile_starts(size, 128, step)
    assert starts == reference_starts(size, 128, step)
    assert starts[0] == 0 and starts[-1] == size - 128
    assert all(b - a <= 128 for a, b in zip(starts, starts[1:]))  # no gaps


def test_tile_starts_examples_from_reference() -> None:
    assert tile_starts(137, 128, 0.5) == [0, 9]
    assert tile_starts(200, 128, 0.5) == [0, 36, 72]
    with pytest.raises(ValueError, match="smaller than the patch"):
        tile_starts(100, 128, 0.5)


def test_gaussian_is_bitwise_the_filtered_impulse_for_128() -> None:
    impulse = np.zeros((128, 128, 128))
    impulse[64, 64, 64] = 1
    ref = ndi.gaussian_filter(impulse, 128 / 8, 0, mode="constant", cval=0)
    ref = (ref / ref.max()).astype(np.float32)
    got = gaussian_importance((128, 128, 128))
    assert got.dtype == np.float32
    assert np.array_equal(got, ref)
    assert got[64, 64, 64] == 1.0 and got.argmax() == np.ravel_multi_index((64, 64, 64), got.shape)
    assert got[0, 0, 0] == pytest.approx(3.775e-11, rel=1e-3)


@pytest.mark.parametrize("patch", [(16, 24, 40), (9, 8, 7)])
def test_gaussian_matches_filtered_impulse_for_other_patches(patch: tuple[int, int, int]) -> None:
    impulse = np.zeros(patch)
    impulse[tuple(p // 2 for p in patch)] = 1
    ref = ndi.gaussian_filter(impulse, [p / 8 for p in patch], 0, mode="constant", cval=0)
    np.testing.assert_allclose(gaussian_importance(patch), ref / ref.max(), rtol=1e-6)


def test_padding_splits_half_before() -> None:
    assert pad_amounts((100, 128, 200, 27), (128, 128, 128, 32)) == [(14, 14), (0, 0), (0, 0), (2, 3)]


def _three(t: torch.Tensor) -> torch.Tensor:
    """(B, 1, *patch) -> (B, *patch, 3): three pointwise functions, classes last."""
    return torch.stack([t[:, 0], t[:, 0] + 1, 2 * t[:, 0]], dim=-1)


@pytest.mark.parametrize("shape", [(70, 50, 90), (20, 33, 17), (32, 32, 32)])
@pytest.mark.parametrize("step", [0.5, 0.3])
def test_weighted_average_of_pointwise_functions_is_the_function(shape: tuple[int, ...], step: float) -> None:
    """Any pointwise fn is reproduced exactly by the weighted average, padding removed."""
    x = torch.rand(1, *shape)
    y = predict_scores(x, _three, 3, (32, 32, 32), step, batch_size=3).movedim(-1, 0)
    assert y.shape == (3, *shape)
    torch.testing.assert_close(y[0], x[0], rtol=0, atol=3e-6)
    torch.testing.assert_close(y[1], x[0] + 1, rtol=0, atol=3e-6)
    torch.testing.assert_close(y[2], 2 * x[0], rtol=0, atol=3e-6)


def test_streamed_slabs_tile_the_volume_in_order() -> None:
    x = torch.rand(1, 40, 75, 50)
    # A slab's tensors are views into buffers the next step reuses: read each one at once.
    slabs = [
        (s.axis, s.start, s.stop, s.scores())
        for s in sliding_window(x, _three, 3, (16, 16, 16), 0.5, slab_bytes=3 * 4 * 40 * 50 * 3)
    ]
    assert {axis for axis, *_ in slabs} == {1}  # the largest axis
    assert slabs[0][1] == 0 and slabs[-1][2] == 75
    assert all(a[2] == b[1] for a, b in zip(slabs, slabs[1:]))
    assert max(stop - start for _, start, stop, _ in slabs) <= 3
    whole = torch.cat([scores for *_, scores in slabs], dim=1)
    torch.testing.assert_close(whole, predict_scores(x, _three, 3, (16, 16, 16), 0.5), rtol=0, atol=0)


def reference_aggregate(x: np.ndarray, fn, k: int, patch: tuple[int, ...], step: float) -> np.ndarray:
    """Full-volume aggregation as the reference describes it (numpy, no streaming)."""
    pads = [(max(p - s, 0) // 2, max(p - s, 0) - max(p - s, 0) // 2) for s, p in zip(x.shape, patch)]
    xp = np.pad(x, pads)
    starts = [reference_starts(s, p, step) for s, p in zip(xp.shape, patch)]
    tiles = math.prod(len(s) for s in starts)
    g = filtered_impulse(patch) if tiles > 1 else np.ones(patch, np.float32)
    acc = np.zeros((k, *xp.shape), np.float32)
    nb = np.zeros((k, *xp.shape), np.float32)
    for i in starts[0]:
        for j in starts[1]:
            for m in starts[2]:
                sl = (slice(i, i + patch[0]), slice(j, j + patch[1]), slice(m, m + patch[2]))
                pred = fn(torch.from_numpy(xp[sl][None, None].copy()))[0].movedim(-1, 0).numpy()
                pred = pred * g
                acc[(slice(None), *sl)] += pred
                nb[(slice(None), *sl)] += g
    crop = tuple(slice(b, b + s) for (b, _), s in zip(pads, x.shape))
    return acc[(slice(None), *crop)] / nb[(slice(None), *crop)]


def test_matches_reference_aggregation_with_a_nonlocal_function() -> None:
    """A function whose output depends on the whole patch: tile positions and weights must match."""
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(1, 4, 5, padding=2)

    def fn(t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.softmax(conv(t) + t.mean(), dim=1).movedim(1, -1)

    x = np.random.default_rng(1).normal(size=(30, 45, 21)).astype(np.float32)
    ref = reference_aggregate(x, fn, 4, (16, 16, 16), 0.5)
    got = predict_scores(torch.from_numpy(x)[None], fn, 4, (16, 16, 16), 0.5).movedim(-1, 0).numpy()
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-6)
    assert (got.argmax(0) == ref.argmax(0)).mean() > 0.999


def test_single_tile_uses_uniform_weights() -> None:
    """One tile: the Gaussian is not used, so even a non-pointwise fn comes back unweighted."""
    x = torch.rand(1, 10, 12, 14)

    def fn(t: torch.Tensor) -> torch.Tensor:
        return t.flip(2).movedim(1, -1)  # flips the padded patch

    got = predict_scores(x, fn, 1, (16, 16, 16)).movedim(-1, 0)
    pads = pad_amounts((10, 12, 14), (16, 16, 16))
    xp = torch.nn.functional.pad(x, [v for p in reversed(pads) for v in p])
    expect = xp.flip(1)[:, 3:13, 2:14, 1:15]
    torch.testing.assert_close(got, expect, rtol=0, atol=0)


def all_flips() -> list[tuple[int, ...]]:
    """Every subset of the spatial dims (2, 3, 4) of a (B, C, z, y, x) tensor."""
    return [dims for r in range(4) for dims in itertools.combinations((2, 3, 4), r)]


def test_mirror_flips_are_the_eight_mirrorings_each_once() -> None:
    assert len(MIRROR_FLIPS) == 8 and MIRROR_FLIPS[0] == ()
    assert sorted(tuple(sorted(d)) for d in MIRROR_FLIPS) == sorted(all_flips())


def test_mirrored_is_identity_for_flip_equivariant_functions() -> None:
    x = torch.rand(2, 1, 8, 10, 12)
    fn = lambda t: torch.stack([t[:, 0] * 3, t[:, 0].square()], dim=-1)  # noqa: E731  pointwise
    torch.testing.assert_close(Mirrored(fn)(x), fn(x), rtol=0, atol=1e-6)


def test_mirrored_a_mirror_equivariant_network_is_the_network() -> None:
    """A convolution with a kernel symmetric along every axis commutes with every flip."""
    torch.manual_seed(2)
    conv = torch.nn.Conv3d(1, 3, 3, padding=1)
    with torch.no_grad():
        w = conv.weight
        w.copy_(
            (
                w
                + w.flip(2)
                + w.flip(3)
                + w.flip(4)
                + w.flip(2, 3)
                + w.flip(2, 4)
                + w.flip(3, 4)
                + w.flip(2, 3, 4)
            )
            / 8
        )

    def fn(t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.softmax(conv(t), dim=1).movedim(1, -1)

    x = torch.rand(1, 1, 9, 10, 11)
    torch.testing.assert_close(Mirrored(fn)(x), fn(x), rtol=0, atol=1e-6)


def test_mirrored_averages_the_eight_flipped_back_passes() -> None:
    x = torch.rand(1, 1, 6, 7, 8)
    ramp = torch.arange(8.0).view(1, 1, 1, 1, 8)

    def fn(t: torch.Tensor) -> torch.Tensor:  # not flip-equivariant along x; classes last
        return (t + ramp).movedim(1, -1)

    got = Mirrored(fn)(x)
    # Half the passes flip x: ramp flipped back becomes 7 - ramp; the average is 3.5.
    torch.testing.assert_close(got, (x + 3.5).movedim(1, -1), rtol=0, atol=1e-6)
    passes = [fn(torch.flip(x, d)).flip([i - 1 for i in d]) if d else fn(x) for d in all_flips()]
    expect = sum(passes) / 8
    torch.testing.assert_close(got, expect, rtol=0, atol=1e-6)


def test_class_probabilities_of_a_plain_module_is_the_softmax_classes_last() -> None:
    logits = torch.randn(1, 105, 8, 8, 8)
    got = ClassProbabilities(torch.nn.Identity())(logits)
    torch.testing.assert_close(got, torch.softmax(logits, dim=1).movedim(1, -1), rtol=0, atol=1e-7)


def test_class_probabilities_of_stunet_match_its_forward() -> None:
    """The head applied as a matrix product on channels-last features equals the 1x1 conv."""
    from stuseg.model.network import Arch, build_network

    torch.manual_seed(0)
    net = build_network(Arch(dims=(4, 4, 8, 8, 8, 8), depths=(1,) * 6, num_classes=7))
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.inference_mode():
        expect = torch.softmax(net(x), dim=1).movedim(1, -1)
        got = ClassProbabilities(net)(x)
    assert got.shape == (2, 32, 32, 32, 7)
    torch.testing.assert_close(got, expect, rtol=0, atol=1e-6)


def test_accumulating_in_place_equals_materialising_each_tile() -> None:
    """The CPU path that adds probability chunks straight into the buffers, with the division by
    the softmax sum folded into the tile weight and one fused multiply-add, changes only the last
    float32 bits."""
    from stuseg.model.network import Arch, build_network

    torch.manual_seed(1)
    net = build_network(Arch(dims=(4, 4, 8, 8, 8, 8), depths=(1,) * 6, num_classes=9))
    fused = ClassProbabilities(net, chunk=700)
    assert fused.accumulates_in_place
    x = torch.randn(1, 40, 70, 50)
    with torch.inference_mode():
        a = predict_scores(x, fused, 9, (32, 32, 32), 0.5, batch_size=2)
        b = predict_scores(x, lambda t: fused(t), 9, (32, 32, 32), 0.5, batch_size=2)
    assert fused.breakdown["softmax"] > 0 and fused.breakdown["accumulate"] > 0
    torch.testing.assert_close(a, b, rtol=0, atol=2e-7)
    assert a.argmax(-1).eq(b.argmax(-1)).float().mean() > 0.9999


class Recording(PatchPredictor):
    """A pointwise predictor that counts how it is called and adds in place itself."""

    def __init__(self) -> None:
        self.calls = 0
        self.accumulated = 0

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return _three(t)

    def accumulate(self, x, targets, weight) -> None:
        self.accumulated += len(targets)
        for target, tile in zip(targets, _three(x)):
            target.add_(tile * weight)


def test_a_predictor_that_accumulates_is_asked_to_for_every_tile() -> None:
    x = torch.rand(1, 20, 40, 30)
    predictor = Recording()
    assert predictor.accumulates_in_place
    got = predict_scores(x, predictor, 3, (16, 16, 16), 0.5, batch_size=2).movedim(-1, 0)
    tiles = math.prod(len(tile_starts(s, 16, 0.5)) for s in (20, 40, 30))
    assert predictor.accumulated == tiles and predictor.calls == 0
    torch.testing.assert_close(got[1], x[0] + 1, rtol=0, atol=3e-6)


def test_softmax_without_the_private_kernel_gives_the_same_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The public fallback (where torch lacks aten._softmax.out) equals the in-place kernel bit for
    bit, and both equal a float64 softmax computed by hand to float32 precision."""
    import stuseg.inference.head

    logits = torch.randn(3, 5, 7, 105) * 8
    private = softmax_last_(logits.clone())
    monkeypatch.setattr(stuseg.inference.head, "_private_softmax_out", lambda: None)
    public = softmax_last_(logits.clone())
    torch.testing.assert_close(public, private, rtol=0, atol=0)
    z = logits.double() - logits.double().amax(-1, keepdim=True)
    by_hand = (z.exp() / z.exp().sum(-1, keepdim=True)).float()
    torch.testing.assert_close(public, by_hand, rtol=1e-6, atol=1e-7)
