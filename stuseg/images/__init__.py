"""Images in, with their geometry: file names, grids, reading, and checks before the network.

``paths`` (which suffixes name images), ``geometry`` (facts about voxel grids), ``io`` (a volume
and its affine from NIfTI, NRRD/MHA or a DICOM series; label maps written back), ``checks`` (one
function per check of an input).
"""

__all__: list[str] = []
