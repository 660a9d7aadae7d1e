"""Numbers and pictures made from a segmentation: statistics, quality flags, the preview.

``statistics`` (per structure, on the CT), ``quality`` (pieces, sides, confidence),
``preview`` (the PNG). A batch folder's tables are ``stuseg.runs.cohort``.
"""

__all__: list[str] = []
