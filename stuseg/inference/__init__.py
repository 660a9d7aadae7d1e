"""From an image to a label map: preprocess, sliding window, export back to the input grid.

``preprocess`` (to the network's grid), ``predict`` (the sliding window), ``head`` (the
network's last layer and softmax, streamed into the window's sums on the CPU), ``fixedsums``
(those sums in uint16), ``postprocess`` (back to the input grid while it streams), ``kernels``
(the per-voxel loops, numba), ``pipeline`` (``Segmenter`` and ``segment``), ``threads`` and
``memory`` (the process tuned for it: CPU threads, malloc, peak RSS).
"""

__all__: list[str] = []
