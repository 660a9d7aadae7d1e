"""uint16 fixed-point sums of the sliding window against a float64 restatement of the weighted mean."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
from reference_pipeline import tile_starts_formula

from stuseg.inference.fixedsums import FIXED_ONE, add_rounded
from stuseg.inference.head import ClassProbabilities
from stuseg.inference.predict import Ensemble, sliding_window


def float64_mean(
    x: np.ndarray, fn, k: int, patch: tuple[int, ...], step: float
) -> tuple[np.ndarray, np.ndarray]:
    """The Gaussian-weighted mean of ``fn`` over the tiles in float64, and how many tiles cover each
    voxel: (K, *shape), (*shape). The weight is scipy's filtered impulse (nnU-Net's recipe), in float64."""
    pads = [(max(p - s, 0) // 2, max(p - s, 0) - max(p - s, 0) // 2) for s, p in zip(x.shape, patch)]
    xp = np.pad(x, pads)
    starts = [tile_starts_formula(s, p, step) for s, p in zip(xp.shape, patch)]
    if math.prod(len(s) for s in starts) > 1:
        impulse = np.zeros(patch)
        impulse[tuple(p // 2 for p in patch)] = 1
        g = ndi.gaussian_filter(impulse, [p / 8 for p in patch], 0, mode="constant", cval=0)
        g /= g.max()
    else:
        g = np.ones(patch)
    sums = np.zeros((k, *xp.shape))
    norm = np.zeros(xp.shape)
    count = np.zeros(xp.shape, np.int64)
    for i in starts[0]:
        for j in starts[1]:
            for m in starts[2]:
                sl = (slice(i, i + patch[0]), slice(j, j + patch[1]), slice(m, m + patch[2]))
                with torch.no_grad():
                    p = fn(torch.from_numpy(xp[sl][None, None].copy()))[0].movedim(-1, 0).double().numpy()
                sums[(slice(None), *sl)] += p * g
                norm[sl] += g
                count[sl] += 1
    crop = tuple(slice(b, b + s) for (b, _), s in zip(pads, x.shape))
    return sums[(slice(None), *crop)] / norm[crop], count[crop]


def streamed(x: np.ndarray, fn, k: int, patch, step: float, dtype: torch.dtype) -> np.ndarray:
    """The sliding window's mean scores (K, *shape) as float64, put together from its slabs."""
    with torch.inference_mode():
        slabs = [
            (s.axis, s.scores())
            for s in sliding_window(torch.from_numpy(x)[None], fn, k, patch, step, sums_dtype=dtype)
        ]
    return torch.cat([s for _, s in slabs], dim=slabs[0][0]).movedim(-1, 0).double().numpy()


def bound(additions: np.ndarray) -> np.ndarray:
    """The stated bound of stuseg.inference.fixedsums on a mean probability."""
    return 0.51 * additions / FIXED_ONE + 1e-6


def softmax_conv(classes: int, sharpness: float, seed: int = 0):
    """A non-local function (a 5^3 convolution) whose softmax has a patch-dependent term."""
    torch.manual_seed(seed)
    conv = torch.nn.Conv3d(1, classes, 5, padding=2)

    def fn(t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.softmax(sharpness * conv(t) + t.mean(), dim=1).movedim(1, -1).contiguous()

    return fn


def check_against_reference(got: np.ndarray, ref: np.ndarray, additions: np.ndarray) -> None:
    limit = bound(additions)
    assert (np.abs(got - ref) <= limit).all(), f"worst excess {(np.abs(got - ref) - limit).max():.3g}"
    top2 = np.sort(ref, axis=0)[-2:]
    clear = (top2[1] - top2[0]) > 2 * limit
    assert clear.mean() > 0.9  # the check below covers most voxels
    np.testing.assert_array_equal(got.argmax(0)[clear], ref.argmax(0)[clear])


@pytest.mark.parametrize(
    ("shape", "step"),
    [
        ((30, 45, 21), 0.5),  # padded along one axis, 3 tiles covering along another
        pytest.param((40, 70, 50), 0.5, marks=pytest.mark.slow),  # up to 12 tiles over a voxel
        ((17, 26, 33), 0.3),  # a finer step: more, smaller terms
    ],
)
def test_means_are_within_the_bound_of_the_float64_mean(shape: tuple[int, int, int], step: float) -> None:
    """Everywhere, including the volume's corners where a tile's weight falls to 4e-11 (a single
    scale for the whole volume would round those sums to nothing)."""
    fn = softmax_conv(6, 3.0)
    x = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    ref, additions = float64_mean(x, fn, 6, (16, 16, 16), step)
    got = streamed(x, fn, 6, (16, 16, 16), step, torch.uint16)
    check_against_reference(got, ref, additions)
    corner = (0, 0, 0)
    np.testing.assert_allclose(
        got[(slice(None), *corner)], ref[(slice(None), *corner)], rtol=0, atol=bound(1)
    )
    # The quantisation is real and of the stated size: somewhere the error reaches an eighth of the
    # bound (a coarser step would fail the check above).
    assert (np.abs(got - ref) / bound(additions)).max() > 1 / 8


@pytest.mark.slow  # two tiny STU-Nets over 8 tiles, twice
def test_in_place_head_and_ensemble_stay_within_the_bound() -> None:
    """STU-Net's CPU head adding probability chunks straight into uint16 sums, two folds each
    rounding their own terms: within the bound for twice the tiles of the float32 path."""
    from stuseg.model.network import Arch, build_network

    torch.manual_seed(3)
    nets = [
        build_network(Arch(dims=(4, 4, 8, 8, 8, 8), depths=(1,) * 6, num_classes=7)).eval() for _ in range(2)
    ]
    for net in nets:
        with torch.no_grad():
            for p in net.parameters():
                p.normal_(0, 0.3)
    ensemble = Ensemble([ClassProbabilities(net, chunk=700) for net in nets])
    assert ensemble.members[0].accumulates_in_place
    x = np.random.default_rng(4).normal(size=(40, 44, 36)).astype(np.float32)
    exact = streamed(x, ensemble, 7, (32, 32, 32), 0.5, torch.float32)
    got = streamed(x, ensemble, 7, (32, 32, 32), 0.5, torch.uint16)
    # float32 vs float64: a few ulps; the tiles over a voxel here: at most 2 * 2 * 2, times 2 folds.
    limit = bound(np.array(16)) + 1e-6
    assert np.abs(got - exact).max() <= limit
    top2 = np.sort(exact, axis=0)[-2:]
    clear = (top2[1] - top2[0]) > 2 * limit
    np.testing.assert_array_equal(got.argmax(0)[clear], exact.argmax(0)[clear])


def test_scores_slightly_above_one_clamp_instead_of_wrapping() -> None:
    """Every class at 1 + 1e-6 everywhere: the sums saturate near FIXED_ONE, they never wrap."""
    x = np.zeros((40, 20, 20), np.float32)

    def ones(t: torch.Tensor) -> torch.Tensor:
        return torch.full((*t.shape[:1], *t.shape[2:], 3), 1 + 1e-6)

    got = streamed(x, ones, 3, (16, 16, 16), 0.25, torch.uint16)
    np.testing.assert_allclose(got, 1.0, rtol=0, atol=bound(5 * 2 * 2))


def test_add_rounded_rounds_each_term_to_nearest_and_clamps() -> None:
    target = torch.zeros((2, 3, 4, 5), dtype=torch.uint16)
    base = torch.zeros((4, 6, 8, 5), dtype=torch.uint16)
    view = base[1:3, 2:5, 3:7]  # a strided region of a larger buffer, as a tile's
    values = torch.tensor([0.2, 0.5, 0.74, 1.0, -0.3]).expand(2, 3, 4, 5)
    scale = torch.full((2, 3, 4, 1), 10.0)
    for t in (target, view):
        add_rounded(t, values, scale)
        add_rounded(t, values, scale)
        np.testing.assert_array_equal(
            t.numpy(), np.broadcast_to(np.array([4, 10, 14, 20, 0], np.uint16), t.shape)
        )
    assert base.numpy().astype(np.int64).sum() == view.numpy().astype(np.int64).sum()  # nothing else touched
    add_rounded(target, torch.full((2, 3, 4, 5), 1e9), scale)
    assert (target.numpy() == 65535).all()


def test_add_rounded_refuses_float_targets() -> None:
    with pytest.raises(ValueError, match="uint16"):
        add_rounded(torch.zeros((2, 2, 2, 3)), torch.ones((2, 2, 2, 3)), torch.ones((2, 2, 2, 1)))


def test_fixed_point_sums_are_refused_for_other_dtypes() -> None:
    with pytest.raises(ValueError, match="float32 or uint16"):
        next(
            sliding_window(
                torch.zeros(1, 16, 16, 16), softmax_conv(2, 1.0), 2, (16, 16, 16), sums_dtype=torch.float16
            )
        )


def test_the_pipeline_uses_fixed_point_only_for_probabilities_on_the_cpu_with_few_terms() -> None:
    """v1 (softmax) on the CPU at step 0.5: uint16. Logits (v2), an accelerator, a fine step or
    many folds (more than MAX_ADDITIONS terms over a voxel, 27 tiles at most at step 0.5): float32."""
    import dataclasses

    from stuseg.inference.pipeline import _sums_dtype
    from stuseg.model.plan import PLAN

    cpu, shape = torch.device("cpu"), (244, 202, 224)
    assert _sums_dtype(shape, 1, cpu, PLAN, 0.5) == torch.uint16
    assert _sums_dtype(shape, 2, cpu, PLAN, 0.5) == torch.uint16
    assert _sums_dtype(shape, 1, cpu, dataclasses.replace(PLAN, framework="v2"), 0.5) == torch.float32
    assert _sums_dtype(shape, 1, torch.device("cuda"), PLAN, 0.5) == torch.float32
    assert _sums_dtype(shape, 1, cpu, PLAN, 0.2) == torch.float32
    assert _sums_dtype(shape, 5, cpu, PLAN, 0.5) == torch.float32  # up to 27 tiles over a voxel, x 5


def test_batches_of_tiles_add_the_same_integers_as_single_tiles() -> None:
    """Each tile in a batch gets its own weights: batching changes nothing, bit for bit (a pointwise
    function, whose values cannot depend on the batch)."""

    def fn(t: torch.Tensor) -> torch.Tensor:
        v = t[:, 0]
        return torch.softmax(torch.stack([v, 2 * v, -v, v * v], dim=-1), dim=-1)

    x = torch.from_numpy(np.random.default_rng(5).normal(size=(1, 20, 36, 28)).astype(np.float32))

    def sums(batch_size: int) -> list[np.ndarray]:
        with torch.inference_mode():
            return [
                s.sums.numpy().copy()
                for s in sliding_window(x, fn, 4, (16, 16, 16), 0.5, batch_size, sums_dtype=torch.uint16)
            ]

    for one, three in zip(sums(1), sums(3), strict=True):
        np.testing.assert_array_equal(one, three)
