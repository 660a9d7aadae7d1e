"""STU-Net's last layer and softmax as a sliding-window ``PatchPredictor``, streamed on the CPU.

``stuseg.model.network`` is the architecture alone (module names for strict checkpoint loading);
``stuseg.inference.predict`` is a sliding window that knows nothing about networks. What sits between
them is STU-Net-specific inference: run the network up to its full-resolution decoder
features (``net.features``), then apply the last 1x1 head (``net.seg_outputs[-1]``) and the
softmax in a way that suits the CPU. That is this module.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import torch

from stuseg.inference.fixedsums import add_rounded
from stuseg.inference.predict import PatchPredictor, add_weighted, item_weights

__all__ = ["ClassProbabilities", "softmax_last_"]

_LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * log2(e))
# (item, row start, row stop, scores, the softmax's sum or None for logits)
_Chunk = tuple[int, int, int, torch.Tensor, "torch.Tensor | None"]


def _private_softmax_out() -> object | None:
    """torch's in-place softmax kernel (``aten._softmax.out``), or None where this torch lacks it.

    A private operator: used only because it writes the result over its input (no second
    tile-sized buffer); ``softmax_last_`` falls back to public operators without it.
    """
    try:
        return torch.ops.aten._softmax.out
    except (AttributeError, RuntimeError):
        return None


def softmax_last_(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim in float32; in place over ``logits`` on the CPU when possible.

    Where the private in-place kernel is missing or refuses, the public ``torch.softmax`` (the
    same kernel) computes it into a new tensor, copied back: the same numbers, one more buffer.
    """
    logits = logits.float()
    if logits.device.type == "cpu" and logits.is_contiguous():
        op = _private_softmax_out()
        if op is not None:
            try:
                return op(logits, -1, False, out=logits)  # type: ignore[operator]
            except (RuntimeError, TypeError):
                pass
        return logits.copy_(torch.softmax(logits, dim=-1))
    return torch.softmax(logits, dim=-1)


class ClassProbabilities(PatchPredictor):
    """(B, C_in, *patch) -> softmax class probabilities (B, *patch, K), float32; or, with
    ``softmax=False``, the logits themselves (nnU-Net v2 averages logits, v1 probabilities).

    For an STU-Net (a module with ``features`` and ``seg_outputs``) the last 1x1 convolution
    is applied as a matrix product on channels-last features, on the CPU in cache-sized chunks
    of ``chunk`` voxels, each followed by its softmax in place: far faster than the 1x1 conv
    plus a channels-first softmax, and a tile's K x patch probabilities never exist at once
    when ``accumulate`` adds them straight into the sliding window's buffers. Any other module
    is called as it is and its (B, K, *patch) logits moved last.

    The CPU path computes the softmax with ``exp2`` on logits in base-2 units (``exp2`` is
    faster than ``exp`` there) and adds ``exp * (weight / sum)`` with one fused
    multiply-add: each probability and each sum is within a few float32 ulps of softmax,
    multiply, add (the reference's order).

    ``breakdown`` reports the seconds spent so far in the softmax and in adding into the
    buffers (CPU path), so that the timing report can show them apart from the network.

    ``autocast`` (e.g. ``torch.bfloat16``; ``stuseg.model.precision``) runs the network, up to the
    features, under ``torch.autocast`` in that type. On the CPU the features are then made
    float32 again, so that the head, the softmax and the sums stay float32 and take the
    streamed path above.

    ``channels_last``: the network's weights are in ``torch.channels_last_3d`` (the CPU's
    bfloat16 path, ``stuseg.model.precision.channels_last``), so each input is made so too, and oneDNN
    need not reorder it for the first convolution. The features may then come out in either
    layout; the head's matrix product reads them through a view either way (``movedim(1, -1)``
    is contiguous for channels-last features, so each chunk's ``reshape`` is then free).
    """

    def __init__(
        self,
        net: torch.nn.Module,
        chunk: int = 32768,
        *,
        softmax: bool = True,
        autocast: torch.dtype | None = None,
        channels_last: bool = False,
    ) -> None:
        self.net = net
        self.chunk = chunk
        self.softmax = softmax
        self.autocast = autocast
        self.channels_last = channels_last
        self.features = getattr(net, "features", None)
        self.head = net.seg_outputs[-1] if self.features is not None else None  # type: ignore[index]
        self.seconds = {"softmax": 0.0, "accumulate": 0.0}

    @property
    def breakdown(self) -> dict[str, float]:
        return dict(self.seconds)

    @property
    def accumulates_in_place(self) -> bool:
        return self.head is not None

    def _head_chunks(self, f: torch.Tensor) -> Iterator[_Chunk]:
        """(item, row start, row stop, unnormalized softmax (rows, *patch[1:], K), its sum (..., 1)).

        For CPU float32 features. The logits are formed in base-2 units (log2(e) folded into the
        head) so that the softmax can use ``exp2``; the division by the sum is left to the
        caller, who folds it into the tile weight. Without ``softmax``: the logits, and a sum of 1.
        """
        head = self.head
        assert head is not None
        k, c = head.weight.shape[:2]
        scale = _LOG2E if self.softmax else 1.0
        weight = head.weight.view(k, c).t() * scale
        bias = head.bias * scale
        plane = f.shape[3] * f.shape[4]
        rows = max(1, self.chunk // plane)
        buf = torch.empty((rows * plane, k), dtype=torch.float32)
        flat = f.movedim(1, -1)  # (B, *patch, C), a view
        in_softmax = 0.0
        try:
            for item in range(f.shape[0]):
                for lo in range(0, f.shape[2], rows):
                    hi = min(lo + rows, f.shape[2])
                    part = buf[: (hi - lo) * plane]
                    torch.addmm(bias, flat[item, lo:hi].reshape(-1, c), weight, out=part)
                    shape = (hi - lo, *f.shape[3:])
                    if not self.softmax:
                        yield item, lo, hi, part.view(*shape, k), None
                        continue
                    start = time.perf_counter()
                    part.sub_(part.amax(-1, keepdim=True)).exp2_()
                    total = part.sum(-1, keepdim=True)
                    in_softmax += time.perf_counter() - start
                    yield item, lo, hi, part.view(*shape, k), total.view(*shape, 1)
        finally:
            self.seconds["softmax"] += in_softmax

    def _whole(self, f: torch.Tensor) -> torch.Tensor:
        """All of a batch's probabilities at once (GPU, reduced precision)."""
        head = self.head
        assert head is not None
        k, c = head.weight.shape[:2]
        flat = f.movedim(1, -1).reshape(-1, c)
        logits = torch.addmm(head.bias.to(flat.dtype), flat, head.weight.view(k, c).t().to(flat.dtype))
        logits = logits.view(*f.shape[:1], *f.shape[2:], k)
        return softmax_last_(logits) if self.softmax else logits.float()

    @staticmethod
    def _cpu_path(f: torch.Tensor) -> bool:
        return f.device.type == "cpu" and f.dtype == torch.float32

    def _network(self, x: torch.Tensor, features: bool) -> torch.Tensor:
        """The features (``features``) or the whole network's logits, under ``autocast`` if set;
        on the CPU back in float32."""
        fn = self.features if features else self.net
        assert fn is not None
        if self.channels_last:  # the network's weights are: see the class's docstring
            x = x.contiguous(memory_format=torch.channels_last_3d)
        if self.autocast is None:
            return fn(x)
        with torch.autocast(x.device.type, dtype=self.autocast):
            out = fn(x)
        # float32 from here on: the head is a 1x1 convolution (cheap beside the network), and
        # the softmax and the sums must not round to 8 bits of mantissa.
        return out.float() if out.device.type == "cpu" else out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.features is None or self.head is None:
            logits = self._network(x, features=False).movedim(1, -1).contiguous()
            return softmax_last_(logits) if self.softmax else logits.float()
        f = self._network(x, features=True)
        if not self._cpu_path(f):
            return self._whole(f)
        out = torch.empty((*f.shape[:1], *f.shape[2:], self.head.weight.shape[0]), dtype=torch.float32)
        for item, lo, hi, exps, total in self._head_chunks(f):
            if total is None:
                out[item, lo:hi] = exps
            else:
                torch.div(exps, total, out=out[item, lo:hi])
        return out

    def accumulate(self, x: torch.Tensor, targets: Sequence[torch.Tensor], weight: torch.Tensor) -> None:
        if self.features is None:
            return super().accumulate(x, targets, weight)
        f = self._network(x, features=True)
        weights = item_weights(weight, len(targets))
        if not self._cpu_path(f):
            for target, tile, w in zip(targets, self._whole(f), weights):
                add_weighted(target, tile, w)
            return None
        adding = 0.0
        for item, lo, hi, exps, total in self._head_chunks(f):
            start = time.perf_counter()
            # probabilities * tile weight = exps * (weight / total), added in one fused pass.
            w = weights[item][lo:hi] if total is None else weights[item][lo:hi] / total
            target = targets[item][lo:hi]
            if target.dtype == torch.uint16:  # fixed-point sums: each term rounded to nearest
                add_rounded(target, exps, w)
            else:
                target.addcmul_(exps, w)
            adding += time.perf_counter() - start
        self.seconds["accumulate"] += adding
        return None
