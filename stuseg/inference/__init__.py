"""From an image to a label map: preprocess, sliding window, export back to the input grid.

``preprocess`` (to the network's grid), ``predict`` (the sliding window), ``fixedsums`` (its
uint16 sums), ``postprocess`` (back to the input grid while it streams), ``kernels`` (the
per-voxel loops, numba), ``pipeline`` (``Segmenter`` and ``segment``), ``threads`` and
``memory`` (the process tuned for it: CPU threads, malloc, peak RSS).
"""

__all__: list[str] = []
