"""Numbers and pictures made from a segmentation: statistics, quality flags, the preview, cohorts.

``statistics`` (per structure, on the CT), ``quality`` (pieces, sides, confidence),
``preview`` (the PNG), ``cohort`` (a batch folder as two tidy tables).
"""

__all__: list[str] = []
