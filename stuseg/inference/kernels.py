"""Per-voxel loops of the exports and of the sliding window's fixed-point sums, compiled with numba.

Each of these visits a voxel's 105 class scores or its 8 interpolation corners once, with
early exits (most output voxels lie where all corners agree). As whole-array operations the
same work takes one memory pass per step and is several times slower (the export-only
benchmark in benchmarks/RESULTS.md).

Conventions shared by the interpolating kernels: along each of the three output axes, a
(2, n) index table gives the low and high source index per output position and a (2, n)
float64 table their weights (low ``w``, high ``1 - w`` formed as scipy forms them; for a
nearest-neighbour axis the high index repeats the low one with weight 0). Corners are
visited z-major: (lo, lo, lo), (lo, lo, hi), (lo, hi, lo), ... A corner's weight is
``(w_0 * w_1) * w_2`` in float64, as scipy's order-1 spline forms it.

The functions are compiled on first use and cached on disk (numba's ``cache=True``), so only
the first run on a machine pays the compile time (a few seconds).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numba import njit, prange

from stuseg.analysis.quality import LOW_PROBABILITY

__all__ = ["add_rounded", "argmax_of_mean", "interpolate_argmax", "mean_top2", "vote_labels"]


def _jit(parallel: bool = True) -> Callable[[Callable], Callable]:
    """numba's ``njit``, cached on disk; without the cache where no cache folder is writable
    (numba refuses ``cache=True`` then, and the kernels are compiled on every run instead)."""
    options = {"nogil": True, "parallel": parallel, "error_model": "numpy"}

    def decorate(fn: Callable) -> Callable:
        try:
            return njit(cache=True, **options)(fn)
        except RuntimeError:  # "cannot cache function ...: no locator available"
            return njit(cache=False, **options)(fn)

    return decorate


@_jit(parallel=False)
def _corners(src, idx0, idx1, idx2, o0, o1, o2, lab, at) -> bool:  # pragma: no cover
    """Gather output voxel (o0, o1, o2)'s 8 corner values of ``src`` into ``lab`` and their source
    indices into ``at`` (8, 3), z-major; True when the values are not all equal."""
    c = 0
    for a in range(2):
        for b in range(2):
            for d in range(2):
                i, j, m = idx0[a, o0], idx1[b, o1], idx2[d, o2]
                lab[c] = src[i, j, m]
                at[c, 0] = i
                at[c, 1] = j
                at[c, 2] = m
                c += 1
    for c in range(1, 8):  # noqa: SIM110 - numba compiles loops, not generator expressions
        if lab[c] != lab[0]:
            return True
    return False


@_jit(parallel=False)
def _corner_weights(w0, w1, w2, o0, o1, o2, wt) -> None:  # pragma: no cover
    """The 8 corner weights ``(w_0 * w_1) * w_2`` of output voxel (o0, o1, o2), z-major, into ``wt``."""
    c = 0
    for a in range(2):
        for b in range(2):
            for d in range(2):
                wt[c] = w0[a, o0] * w1[b, o1] * w2[d, o2]
                c += 1


@_jit(parallel=False)
def _seen_before(lab, c) -> bool:  # pragma: no cover
    """Whether ``lab[c]`` already occurs among ``lab[:c]``."""
    for e in range(c):  # noqa: SIM110 - as above
        if lab[e] == lab[c]:
            return True
    return False


_LOWEST = np.float32(np.finfo(np.float32).min)

# Where a softmax is 1 to within this, it is taken as 1 without the sum over the classes (a bound
# on the sum: see ``_softmax_at_max`` and ``_class_probability``).
_NEGLIGIBLE = 1e-7


@_jit(parallel=False)
def _softmax_at_max(row, n, top) -> float:  # pragma: no cover
    """The softmax, at its largest class, of the mean logits ``row / n`` whose maximum is ``top``:
    ``1 / sum_k exp(l_k - l_max)``. Every term is at most 1 (nothing overflows); summed in
    float64 from float32 terms (float32's ``exp`` is the fast one; a probability needs no more).
    When the second-largest logit lies so far below that the other terms add less than
    ``_NEGLIGIBLE``, the probability is 1 to within that and the exponentials are skipped."""
    second = _LOWEST
    seen_top = False
    for k in range(row.shape[0]):
        v = row[k] / n
        if v == top and not seen_top:
            seen_top = True
        elif v > second:
            second = v
    if (row.shape[0] - 1) * np.exp(np.float64(second) - np.float64(top)) < _NEGLIGIBLE:
        return 1.0
    total = 0.0
    for k in range(row.shape[0]):
        total += np.exp(row[k] / n - top)
    return 1.0 / total


@_jit(parallel=False)
def _tally(conf_sum, conf_low, conf_count, r, k, p) -> None:  # pragma: no cover
    """Count one voxel of class ``k`` (not background) with winning probability ``p`` in row ``r``
    of the per-row tallies (each row is written by one thread only)."""
    if k == 0:
        return
    conf_sum[r, k] += p
    conf_count[r, k] += 1
    if p < LOW_PROBABILITY:
        conf_low[r, k] += 1


@_jit()
def argmax_of_mean(
    sums: np.ndarray,
    norm: np.ndarray,
    out: np.ndarray,
    logits: bool,
    conf_sum: np.ndarray,
    conf_low: np.ndarray,
    conf_count: np.ndarray,
) -> None:  # pragma: no cover
    """``out = argmax_k(sums[..., k] / norm)`` per voxel, float32, ties to the lowest class;
    each labelled voxel's winning probability tallied by class into row ``i`` of the
    (a, K) tallies ``conf_*`` (see ``_tally``; scores are ``logits`` or probabilities).

    ``sums`` (a, b, c, K), ``norm`` (a, b, c), ``out`` (a, b, c) uint8. Dividing by the same
    positive ``norm`` keeps the order of the classes, so the maximum quotient is the quotient
    of the maximum; only the search for its first occurrence divides each class.
    """
    n_classes = sums.shape[3]
    for i in prange(sums.shape[0]):
        for j in range(sums.shape[1]):
            for m in range(sums.shape[2]):
                row = sums[i, j, m]
                top = row[0]
                for k in range(1, n_classes):
                    if row[k] > top:
                        top = row[k]
                n = norm[i, j, m]
                q = top / n
                for k in range(n_classes):
                    if row[k] / n == q:
                        out[i, j, m] = k
                        if k != 0:
                            p = _softmax_at_max(row, n, q) if logits else q
                            _tally(conf_sum, conf_low, conf_count, i, k, p)
                        break


@_jit()
def add_rounded(
    flat: np.ndarray, s0: int, s1: int, s2: int, values: np.ndarray, scale: np.ndarray
) -> None:  # pragma: no cover
    """``flat[i*s0 + j*s1 + m*s2 + k] += round(values[i, j, m, k] * scale[i, j, m])``, clamped to uint16.

    ``flat`` is a 1D uint16 array holding a (a, b, c, K) view with strides ``s0, s1, s2, 1`` (in
    elements) from its first element; ``values`` (a, b, c, K) float32, ``scale`` (a, b, c)
    float32, both C-contiguous. The product of two float32 is exact in float64, so each term is
    that exact product rounded to the nearest integer (halves up); the product is clamped to
    [0, 65536] first and the sum to [0, 65535] after, so nothing wraps. One contiguous row of K
    per voxel: the inner loop vectorizes.
    """
    a, b, c, n_classes = values.shape
    for ij in prange(a * b):
        i = ij // b
        j = ij - i * b
        for m in range(c):
            s = np.float64(scale[i, j, m])
            base = i * s0 + j * s1 + m * s2
            target = flat[base : base + n_classes]
            row = values[i, j, m]
            for k in range(n_classes):
                x = min(max(np.float64(row[k]) * s, 0.0), 65536.0)
                total = np.int32(x + 0.5) + np.int32(target[k])
                target[k] = np.uint16(min(total, 65535))


_LOWEST = np.float32(np.finfo(np.float32).min)


@_jit()
def mean_top2(
    sums: np.ndarray,
    norm: np.ndarray,
    logits: bool,
    scores: np.ndarray,
    labels: np.ndarray,
    second: np.ndarray,
    top: np.ndarray,
) -> None:  # pragma: no cover
    """``scores = sums / norm`` (float32), its argmax (ties to the lowest class), second-largest
    value, and ``top``: for probabilities the argmax's own (its score), for ``logits`` its margin
    over the second-largest (``interpolate_argmax`` bounds the softmax with it).

    ``second`` is the largest score of any class but the argmax (float32's lowest value with a
    single class). Scores may be probabilities or logits of any sign: the search starts below
    every float32, and never from -inf, whose product with a zero interpolation weight is NaN.
    """
    n_classes = sums.shape[3]
    for i in prange(sums.shape[0]):
        for j in range(sums.shape[1]):
            for m in range(sums.shape[2]):
                row = sums[i, j, m]
                dst = scores[i, j, m]
                n = norm[i, j, m]
                best = _LOWEST
                runner_up = _LOWEST
                arg = 0
                for k in range(n_classes):
                    v = row[k] / n
                    dst[k] = v
                    if v > best:
                        runner_up = best
                        best = v
                        arg = k
                    elif v > runner_up:
                        runner_up = v
                labels[i, j, m] = arg
                second[i, j, m] = runner_up
                top[i, j, m] = best - runner_up if logits else best


@_jit()
def vote_labels(
    src: np.ndarray,
    idx0: np.ndarray,
    w0: np.ndarray,
    idx1: np.ndarray,
    w1: np.ndarray,
    idx2: np.ndarray,
    w2: np.ndarray,
    near0: np.ndarray,
    near1: np.ndarray,
    near2: np.ndarray,
    out: np.ndarray,
) -> None:  # pragma: no cover
    """Fast-mode export: per output voxel, the label whose corners carry the most weight.

    That is the argmax over labels of each label's linearly interpolated indicator. A label's
    score sums its corners' weights in corner order (the reference's rounding). Exact ties go
    to the nearest-neighbour label (``src`` at ``near0/1/2``) when it is tied, else to the
    smallest tied label.
    """
    for o0 in prange(out.shape[0]):
        lab = np.empty(8, np.uint8)
        at = np.empty((8, 3), np.int64)
        wt = np.empty(8, np.float64)
        for o1 in range(out.shape[1]):
            for o2 in range(out.shape[2]):
                if not _corners(src, idx0, idx1, idx2, o0, o1, o2, lab, at):
                    out[o0, o1, o2] = lab[0]
                    continue
                _corner_weights(w0, w1, w2, o0, o1, o2, wt)
                near = src[near0[o0], near1[o1], near2[o2]]
                best = -1.0
                best_label = lab[0]
                for c in range(8):
                    if _seen_before(lab, c):
                        continue
                    label = lab[c]
                    score = 0.0
                    for e in range(8):
                        if lab[e] == label:
                            score += wt[e]
                    if score > best:
                        best = score
                        best_label = label
                    elif score == best:
                        if label == near or best_label == near:
                            best_label = near
                        elif label < best_label:
                            best_label = label
                out[o0, o1, o2] = best_label


@_jit(parallel=False)
def _interpolate_scores(scores, at, wt, acc) -> None:  # pragma: no cover
    """``acc`` = the corners' class scores weighted by ``wt``: every class interpolated, in float64."""
    acc[:] = 0.0
    for e in range(8):
        row = scores[at[e, 0], at[e, 1], at[e, 2]]
        w = wt[e]
        for c in range(scores.shape[3]):
            acc[c] += w * row[c]


@_jit(parallel=False)
def _class_probability(scores, labels, top, at, wt, k, logits, agree, acc) -> float:  # pragma: no cover
    """The probability of class ``k`` at an output voxel with corners ``at`` and weights ``wt``.

    Probabilities: class ``k``'s interpolated (the value the argmax compared; at corners whose
    argmax is ``k`` that is their ``top``). Logits (nnU-Net v2): the softmax of the interpolated
    logits at ``k``, ``1 / sum_j exp(L_j - L_k)``, as v2 takes the softmax after resampling.
    Where every corner's argmax is ``k`` (``agree``), each other class lies below ``k`` by at
    least the corner's margin ``top``, so every term ``j != k`` is at most ``exp(-M)`` for the
    interpolated margin M; when ``(K - 1) exp(-M)`` is below ``_NEGLIGIBLE`` the probability is
    1 to within that, and the sum over the classes is skipped. ``acc`` is scratch (K float64).
    """
    if not logits:
        p = 0.0
        for e in range(8):
            i, j, m = at[e, 0], at[e, 1], at[e, 2]
            q = top[i, j, m] if labels[i, j, m] == k else scores[i, j, m, k]
            p += wt[e] * q
        return p
    n_classes = scores.shape[3]
    if agree:
        margin = 0.0
        for e in range(8):
            margin += wt[e] * top[at[e, 0], at[e, 1], at[e, 2]]
        if (n_classes - 1) * np.exp(-margin) < _NEGLIGIBLE:
            return 1.0
    _interpolate_scores(scores, at, wt, acc)
    total = 0.0
    for c in range(n_classes):
        total += np.exp(acc[c] - acc[k])
    return 1.0 / total


@_jit()
def interpolate_argmax(
    scores: np.ndarray,
    labels: np.ndarray,
    second: np.ndarray,
    top: np.ndarray,
    logits: bool,
    idx0: np.ndarray,
    w0: np.ndarray,
    idx1: np.ndarray,
    w1: np.ndarray,
    idx2: np.ndarray,
    w2: np.ndarray,
    out: np.ndarray,
    conf_sum: np.ndarray,
    conf_low: np.ndarray,
    conf_count: np.ndarray,
) -> None:  # pragma: no cover
    """Normal-mode export: argmax of the linearly interpolated class scores, per output voxel.

    ``scores`` (a, b, c, K) float32 with their argmax ``labels``, ``second``-largest value and
    ``top`` (``mean_top2``) per source voxel. Interpolated values are
    summed in float64 and rounded to float32 before the argmax (ties to the lowest class), as
    the reference resizes in float64 and casts.

    Three levels, each exact:
    - all corners share their argmax: that class is at least as large as any other at every
      corner, so also in between (non-negative weights, monotonic rounding);
    - else the corners' argmax classes are interpolated; any other class is at most the
      second-largest score at every corner, so at most the same interpolation of ``second``:
      where the best candidate beats that bound, it wins;
    - else every class is interpolated.

    Each output voxel of a class other than 0 is tallied (``_tally``, row ``o0``) with the
    probability of its class (``_class_probability``): for probabilities the interpolated value
    that won the argmax; for ``logits`` the softmax of the interpolated logits at the winner.
    """
    n_classes = scores.shape[3]
    for o0 in prange(out.shape[0]):
        lab = np.empty(8, np.uint8)
        at = np.empty((8, 3), np.int64)
        wt = np.empty(8, np.float64)
        acc = np.empty(n_classes, np.float64)
        for o1 in range(out.shape[1]):
            for o2 in range(out.shape[2]):
                if not _corners(labels, idx0, idx1, idx2, o0, o1, o2, lab, at):
                    k = lab[0]
                    out[o0, o1, o2] = k
                    if k != 0:
                        _corner_weights(w0, w1, w2, o0, o1, o2, wt)
                        p = _class_probability(scores, labels, top, at, wt, k, logits, True, acc)
                        _tally(conf_sum, conf_low, conf_count, o0, k, p)
                    continue
                _corner_weights(w0, w1, w2, o0, o1, o2, wt)
                best = np.float32(-np.inf)
                best_class = n_classes
                for c in range(8):
                    if _seen_before(lab, c):
                        continue
                    k = lab[c]
                    v = 0.0
                    for e in range(8):
                        v += wt[e] * scores[at[e, 0], at[e, 1], at[e, 2], k]
                    v32 = np.float32(v)
                    if v32 > best or (v32 == best and k < best_class):
                        best = v32
                        best_class = k
                bound = 0.0
                for e in range(8):
                    bound += wt[e] * second[at[e, 0], at[e, 1], at[e, 2]]
                if not best > np.float32(bound):
                    _interpolate_scores(scores, at, wt, acc)
                    top32 = np.float32(acc[0])
                    best_class = 0
                    for k in range(1, n_classes):
                        v32 = np.float32(acc[k])
                        if v32 > top32:
                            top32 = v32
                            best_class = k
                out[o0, o1, o2] = best_class
                if best_class != 0:
                    p = _class_probability(scores, labels, top, at, wt, best_class, logits, False, acc)
                    _tally(conf_sum, conf_low, conf_count, o0, best_class, p)
