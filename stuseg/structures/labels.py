"""The label table: the 104 structures in model channel order, their groups and selection.

Channel ``i`` of the network is label value ``i`` in every segmentation stuseg writes
(0 = background). The order is the 104 TotalSegmentator v1 names in Python ``sorted()`` order,
as STU-Net was trained; it is *not* TotalSegmentator's own numbering, which each row carries
as ``totalseg_v1`` so results can be renumbered for comparison. Sources of these facts: the
STU-Net repository's ``label_orders.json`` (the order) and TotalSegmentator v1's
``class_map["total"]`` (its numbering); ``tests/data/reference/label_order.json`` records both,
with commits, and the tests compare this table with it. The four groups follow the
TotalSegmentator paper's organs, bones, muscles and vessels.

Fine-tuned models bring their own label tables (any names, 1 to 255 classes): ``model_names``
makes such a table safe to use as file names, and ``select_from`` selects from any table the way
``select`` does from the published one.

Pure data and name lookup: this module imports nothing beyond the standard library.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from enum import Enum
from typing import NamedTuple

from stuseg.errors import LabelError

__all__ = [
    "FALLBACK_NAME",
    "GROUPS",
    "LABELS",
    "LEFT_RIGHT_PAIRS",
    "MAY_BE_IN_PIECES",
    "NAME_BYTES",
    "ONE_PIECE",
    "STRUCTURES",
    "TABLE",
    "TOTALSEG_V1_INDEX",
    "Group",
    "Numbering",
    "Structure",
    "describe",
    "file_name",
    "index_of",
    "left_right_pairs",
    "lookup",
    "model_names",
    "one_piece",
    "renumbering",
    "select",
    "select_from",
]


class Group(str, Enum):
    """Anatomical groups, as in the TotalSegmentator paper."""

    ORGANS = "organs"
    BONES = "bones"
    MUSCLES = "muscles"
    VESSELS = "vessels"


class Numbering(str, Enum):
    """How label values are numbered in a multilabel file."""

    MODEL = "model"  # value = model channel index (1..104), the stuseg default
    COMPACT = "compact"  # value = 1..k in model order of the selected structures
    TOTALSEG_V1 = "totalsegmentator-v1"  # value = TotalSegmentator v1's official index


class Structure(NamedTuple):
    """One row of the label table."""

    index: int  # model channel = label value
    name: str
    group: Group
    totalseg_v1: int  # index in TotalSegmentator v1's class_map["total"]


# fmt: off
TABLE: tuple[Structure, ...] = (
    Structure(1, "adrenal_gland_left", Group.ORGANS, 12),
    Structure(2, "adrenal_gland_right", Group.ORGANS, 11),
    Structure(3, "aorta", Group.VESSELS, 7),
    Structure(4, "autochthon_left", Group.MUSCLES, 100),
    Structure(5, "autochthon_right", Group.MUSCLES, 101),
    Structure(6, "brain", Group.ORGANS, 50),
    Structure(7, "clavicula_left", Group.BONES, 86),
    Structure(8, "clavicula_right", Group.BONES, 87),
    Structure(9, "colon", Group.ORGANS, 57),
    Structure(10, "duodenum", Group.ORGANS, 56),
    Structure(11, "esophagus", Group.ORGANS, 42),
    Structure(12, "face", Group.ORGANS, 93),
    Structure(13, "femur_left", Group.BONES, 88),
    Structure(14, "femur_right", Group.BONES, 89),
    Structure(15, "gallbladder", Group.ORGANS, 4),
    Structure(16, "gluteus_maximus_left", Group.MUSCLES, 94),
    Structure(17, "gluteus_maximus_right", Group.MUSCLES, 95),
    Structure(18, "gluteus_medius_left", Group.MUSCLES, 96),
    Structure(19, "gluteus_medius_right", Group.MUSCLES, 97),
    Structure(20, "gluteus_minimus_left", Group.MUSCLES, 98),
    Structure(21, "gluteus_minimus_right", Group.MUSCLES, 99),
    Structure(22, "heart_atrium_left", Group.ORGANS, 45),
    Structure(23, "heart_atrium_right", Group.ORGANS, 47),
    Structure(24, "heart_myocardium", Group.ORGANS, 44),
    Structure(25, "heart_ventricle_left", Group.ORGANS, 46),
    Structure(26, "heart_ventricle_right", Group.ORGANS, 48),
    Structure(27, "hip_left", Group.BONES, 90),
    Structure(28, "hip_right", Group.BONES, 91),
    Structure(29, "humerus_left", Group.BONES, 82),
    Structure(30, "humerus_right", Group.BONES, 83),
    Structure(31, "iliac_artery_left", Group.VESSELS, 51),
    Structure(32, "iliac_artery_right", Group.VESSELS, 52),
    Structure(33, "iliac_vena_left", Group.VESSELS, 53),
    Structure(34, "iliac_vena_right", Group.VESSELS, 54),
    Structure(35, "iliopsoas_left", Group.MUSCLES, 102),
    Structure(36, "iliopsoas_right", Group.MUSCLES, 103),
    Structure(37, "inferior_vena_cava", Group.VESSELS, 8),
    Structure(38, "kidney_left", Group.ORGANS, 3),
    Structure(39, "kidney_right", Group.ORGANS, 2),
    Structure(40, "liver", Group.ORGANS, 5),
    Structure(41, "lung_lower_lobe_left", Group.ORGANS, 14),
    Structure(42, "lung_lower_lobe_right", Group.ORGANS, 17),
    Structure(43, "lung_middle_lobe_right", Group.ORGANS, 16),
    Structure(44, "lung_upper_lobe_left", Group.ORGANS, 13),
    Structure(45, "lung_upper_lobe_right", Group.ORGANS, 15),
    Structure(46, "pancreas", Group.ORGANS, 10),
    Structure(47, "portal_vein_and_splenic_vein", Group.VESSELS, 9),
    Structure(48, "pulmonary_artery", Group.VESSELS, 49),
    Structure(49, "rib_left_1", Group.BONES, 58),
    Structure(50, "rib_left_10", Group.BONES, 67),
    Structure(51, "rib_left_11", Group.BONES, 68),
    Structure(52, "rib_left_12", Group.BONES, 69),
    Structure(53, "rib_left_2", Group.BONES, 59),
    Structure(54, "rib_left_3", Group.BONES, 60),
    Structure(55, "rib_left_4", Group.BONES, 61),
    Structure(56, "rib_left_5", Group.BONES, 62),
    Structure(57, "rib_left_6", Group.BONES, 63),
    Structure(58, "rib_left_7", Group.BONES, 64),
    Structure(59, "rib_left_8", Group.BONES, 65),
    Structure(60, "rib_left_9", Group.BONES, 66),
    Structure(61, "rib_right_1", Group.BONES, 70),
    Structure(62, "rib_right_10", Group.BONES, 79),
    Structure(63, "rib_right_11", Group.BONES, 80),
    Structure(64, "rib_right_12", Group.BONES, 81),
    Structure(65, "rib_right_2", Group.BONES, 71),
    Structure(66, "rib_right_3", Group.BONES, 72),
    Structure(67, "rib_right_4", Group.BONES, 73),
    Structure(68, "rib_right_5", Group.BONES, 74),
    Structure(69, "rib_right_6", Group.BONES, 75),
    Structure(70, "rib_right_7", Group.BONES, 76),
    Structure(71, "rib_right_8", Group.BONES, 77),
    Structure(72, "rib_right_9", Group.BONES, 78),
    Structure(73, "sacrum", Group.BONES, 92),
    Structure(74, "scapula_left", Group.BONES, 84),
    Structure(75, "scapula_right", Group.BONES, 85),
    Structure(76, "small_bowel", Group.ORGANS, 55),
    Structure(77, "spleen", Group.ORGANS, 1),
    Structure(78, "stomach", Group.ORGANS, 6),
    Structure(79, "trachea", Group.ORGANS, 43),
    Structure(80, "urinary_bladder", Group.ORGANS, 104),
    Structure(81, "vertebrae_C1", Group.BONES, 41),
    Structure(82, "vertebrae_C2", Group.BONES, 40),
    Structure(83, "vertebrae_C3", Group.BONES, 39),
    Structure(84, "vertebrae_C4", Group.BONES, 38),
    Structure(85, "vertebrae_C5", Group.BONES, 37),
    Structure(86, "vertebrae_C6", Group.BONES, 36),
    Structure(87, "vertebrae_C7", Group.BONES, 35),
    Structure(88, "vertebrae_L1", Group.BONES, 22),
    Structure(89, "vertebrae_L2", Group.BONES, 21),
    Structure(90, "vertebrae_L3", Group.BONES, 20),
    Structure(91, "vertebrae_L4", Group.BONES, 19),
    Structure(92, "vertebrae_L5", Group.BONES, 18),
    Structure(93, "vertebrae_T1", Group.BONES, 34),
    Structure(94, "vertebrae_T10", Group.BONES, 25),
    Structure(95, "vertebrae_T11", Group.BONES, 24),
    Structure(96, "vertebrae_T12", Group.BONES, 23),
    Structure(97, "vertebrae_T2", Group.BONES, 33),
    Structure(98, "vertebrae_T3", Group.BONES, 32),
    Structure(99, "vertebrae_T4", Group.BONES, 31),
    Structure(100, "vertebrae_T5", Group.BONES, 30),
    Structure(101, "vertebrae_T6", Group.BONES, 29),
    Structure(102, "vertebrae_T7", Group.BONES, 28),
    Structure(103, "vertebrae_T8", Group.BONES, 27),
    Structure(104, "vertebrae_T9", Group.BONES, 26),
)
# fmt: on

#: The 105 output channels by index: "background", then the 104 structures.
LABELS: tuple[str, ...] = ("background", *(s.name for s in TABLE))
#: The 104 structure names; ``STRUCTURES[i - 1]`` is label value ``i``.
STRUCTURES: tuple[str, ...] = LABELS[1:]
#: Group name -> its structures in model order.
GROUPS: dict[str, tuple[str, ...]] = {g.value: tuple(s.name for s in TABLE if s.group is g) for g in Group}
#: Model index -> TotalSegmentator v1 index (0 -> 0 for the background).
TOTALSEG_V1_INDEX: dict[int, int] = {0: 0, **{s.index: s.totalseg_v1 for s in TABLE}}

_BY_LOWER: dict[str, Structure] = {s.name.lower(): s for s in TABLE}

# ---------------------------------------------------------------------------------------------
# Anatomical facts the quality flags of stuseg.analysis.statistics rely on

#: Structures of the published table that a correct segmentation may show in several pieces
#: although each is one piece in a body; every other structure is expected in one piece inside
#: the field of view (pieces cut apart by the field of view's edges are allowed for: see
#: stuseg.analysis.statistics). Why each may be in pieces:
MAY_BE_IN_PIECES: dict[str, str] = {
    "colon": "bowel: a collapsed stretch holds no lumen to segment, and loops leave and re-enter a slab",
    "small_bowel": "bowel loops, as the colon",
    "duodenum": "bowel, as the colon: a collapsed stretch splits the segmented lumen",
    "face": "a region drawn for de-identification, not an organ with one outline",
}
#: The structures of the published table that are one piece in a body, in model order.
ONE_PIECE: tuple[str, ...] = tuple(s.name for s in TABLE if s.name not in MAY_BE_IN_PIECES)
_ONE_PIECE_LOWER = frozenset(n.lower() for n in ONE_PIECE)
_SIDE = re.compile(r"(?<![a-z0-9])(left|right)(?![a-z0-9])", re.IGNORECASE)


def one_piece(name: str) -> bool:
    """True if ``name`` (case-insensitive) is a structure of the published table that is one piece
    in a body (``ONE_PIECE``); False for the others and for names not in the table (a fine-tuned
    model's own structures: nothing is known about their shape)."""
    return name.strip().lower() in _ONE_PIECE_LOWER


def left_right_pairs(names: Iterable[str]) -> list[tuple[str, str]]:
    """The left/right pairs among ``names``, by the naming rule of the published table.

    A name with exactly one word ``left`` (any case; words are separated by anything but letters
    and digits, e.g. ``kidney_left``, ``rib_left_3``) pairs with the name that has ``right`` in
    its place (compared case-insensitively), if that name is among ``names`` too. The rule holds
    for any label table (TotalSegmentator's v2 names, a model's own names) that follows it.

    Args:
        names: structure names.

    Returns:
        ``(left name, right name)`` pairs, in the order of the left names.
    """
    names = list(names)
    by_lower = {n.lower(): n for n in names}
    pairs = []
    for name in names:
        sides = _SIDE.findall(name)
        if len(sides) != 1 or sides[0].lower() != "left":
            continue
        partner = _SIDE.sub("right", name.lower())
        if partner in by_lower:
            pairs.append((name, by_lower[partner]))
    return pairs


#: The left/right pairs of the published table (30), in model order of the left member.
LEFT_RIGHT_PAIRS: tuple[tuple[str, str], ...] = tuple(left_right_pairs(STRUCTURES))
_GLOB_CHARS = re.compile(r"[*?\[]")
_LIST_HINT = "run 'stuseg labels' to list the names"
# What a name of the published table may be confused with: its structures and groups.
_CANDIDATES: dict[str, str] = {**{k: s.name for k, s in _BY_LOWER.items()}, **{g: g for g in GROUPS}}


def _suggest(word: str, candidates: Mapping[str, str], hint: str) -> str:
    """A message tail naming the closest candidates (lower-case key -> name as shown), else ``hint``."""
    close = difflib.get_close_matches(word.lower(), candidates, n=3)
    # Keep only matches about as close as the best one, so 'organ' suggests 'organs' alone.
    score = {c: difflib.SequenceMatcher(None, word.lower(), c).ratio() for c in close}
    close = [c for c in close if score[c] >= score[close[0]] - 0.15]
    if not close:
        return f"; {hint}"
    return _did_you_mean([candidates[c] for c in close])


def _did_you_mean(names: list[str]) -> str:
    quoted = [f"'{n}'" for n in names]
    alternatives = quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]
    return f", did you mean {alternatives}?"


def lookup(name: str) -> Structure:
    """The table row of one structure.

    Args:
        name: a structure name, compared case-insensitively; surrounding spaces are ignored.

    Returns:
        The row: model index (= label value), name, group and TotalSegmentator v1 index.

    Raises:
        LabelError: ``name`` is not one of the 104 structures (the message suggests the closest
            names or groups), or is ``background``, which is label 0 and not a structure.
    """
    row = _BY_LOWER.get(name.strip().lower())
    if row is None:
        if name.strip().lower() == "background":
            raise LabelError(f"'background' is label 0, not a structure; {_LIST_HINT}")
        raise LabelError(f"unknown structure '{name}'{_suggest(name, _CANDIDATES, _LIST_HINT)}")
    return row


def index_of(name: str) -> int:
    """The model channel index (= label value) of one structure.

    Args:
        name: a structure name, case-insensitive.

    Returns:
        The index, 1 to 104.

    Raises:
        LabelError: ``name`` is not a structure (see ``lookup``).
    """
    return lookup(name).index


def describe(group: str | Group | None = None) -> list[Structure]:
    """The rows of the label table in model order, all of them or those of one group.

    Args:
        group: ``None`` for all 104 rows, or a group: a ``Group`` or its name ('organs', 'bones',
            'muscles', 'vessels'; case-insensitive).

    Returns:
        The rows, sorted by model index.

    Raises:
        LabelError: ``group`` is not one of the four groups.
    """
    if group is None:
        return list(TABLE)
    key = str(getattr(group, "value", group)).strip().lower()
    if key not in GROUPS:
        raise LabelError(f"unknown group '{group}'; choose one of {', '.join(GROUPS)}")
    return [s for s in TABLE if s.group.value == key]


def select(patterns: Iterable[str]) -> list[int]:
    """The model indices of the structures that names, groups and shell patterns select.

    Args:
        patterns: entries, each an exact structure name, a group name or a shell pattern
            (``rib_*``, ``kidney_?ight``), compared case-insensitively; one entry may hold
            several, separated by commas or spaces. Overlaps count once.

    Returns:
        The selected model indices, sorted, without duplicates.

    Raises:
        LabelError: no entry names anything, a name is not a structure or group (the message
            suggests the closest ones), or a pattern matches no structure.
    """
    words = [w for p in patterns for w in re.split(r"[,\s]+", str(p).strip()) if w]
    if not words:
        raise LabelError("no structures named; give structure names, groups or patterns such as 'rib_*'")
    groups = {g: [s.index for s in TABLE if s.group.value == g] for g in GROUPS}
    patterned = [(k, s.index) for k, s in _BY_LOWER.items()]
    return _selection(words, groups, patterned, lambda word: [lookup(word).index], _LIST_HINT)


def _selection(
    words: Iterable[str],
    groups: Mapping[str, Iterable[int]],
    patterned: Iterable[tuple[str, int]],
    exact: Callable[[str], Iterable[int]],
    hint: str,
) -> list[int]:
    """The values that ``words`` select: the one rule of ``select`` and ``select_from``.

    Each word is a group (lower-case key of ``groups``), a shell pattern matched against the
    lower-case keys of ``patterned`` ((key, value) pairs), or else a name that ``exact`` resolves
    (and raises LabelError for). A pattern that matches nothing raises LabelError ending in ``hint``.
    """
    patterned = list(patterned)
    chosen: set[int] = set()
    for word in words:
        key = word.lower()
        if key in groups:
            chosen.update(groups[key])
        elif _GLOB_CHARS.search(key):
            hits = [v for k, v in patterned if fnmatch.fnmatchcase(k, key)]
            if not hits:
                raise LabelError(f"pattern '{word}' matches no structure; {hint}")
            chosen.update(hits)
        else:
            chosen.update(exact(word))
    return sorted(chosen)


def renumbering(indices: Iterable[int], numbering: str | Numbering = Numbering.MODEL) -> dict[int, int]:
    """The label value each selected structure gets in a multilabel file under a numbering.

    Args:
        indices: model indices (1 to 104) of the selected structures; order and duplicates do
            not matter.
        numbering: a ``Numbering`` or its value: ``model`` (value = model index), ``compact``
            (1..k in model order of the selection) or ``totalsegmentator-v1`` (TotalSegmentator
            v1's own index of the structure).

    Returns:
        ``{model index: label value}`` for each selected structure, in model order.

    Raises:
        LabelError: an index is not 1 to 104, or ``numbering`` is not one of the three.
    """
    idx = sorted(set(indices))
    bad = [i for i in idx if not 1 <= i <= len(STRUCTURES)]
    if bad:
        raise LabelError(f"label value {bad[0]} is not a structure index; use 1 to {len(STRUCTURES)}")
    scheme = str(getattr(numbering, "value", numbering))
    if scheme == Numbering.MODEL.value:
        return {i: i for i in idx}
    if scheme == Numbering.COMPACT.value:
        return {i: k for k, i in enumerate(idx, start=1)}
    if scheme == Numbering.TOTALSEG_V1.value:
        return {i: TOTALSEG_V1_INDEX[i] for i in idx}
    choices = ", ".join(n.value for n in Numbering)
    raise LabelError(f"unknown numbering '{numbering}'; choose one of {choices}")


# ---------------------------------------------------------------------------------------------
# Label tables of other models (fine-tuned ones): any names, 1 to 255 classes

# Characters that Windows forbids in file names (besides control characters) and the path
# separators of every system; ':' is also the separator of classic macOS paths.
_UNSAFE_CHARS = frozenset('<>:"/\\|?*')
# Names Windows reserves for devices, whatever follows a dot after them ("nul.nii.gz" too).
_RESERVED = frozenset(
    ["CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"]
    + [f"{port}{n}" for port in ("COM", "LPT") for n in range(1, 10)]
)
# Bytes (UTF-8) of a name at most: common file systems allow 255 per file name, and the name
# gets suffixes (".nii.gz", "_<value>") and may sit inside long paths on Windows.
NAME_BYTES = 120
#: The name of a structure whose name has nothing left after ``file_name``'s rule.
FALLBACK_NAME = "unnamed"


def _unsafe(char: str) -> bool:
    # Unicode categories C*: control (Cc), format (Cf: e.g. right-to-left overrides, which can
    # disguise a name), surrogate (Cs), private use (Co) and unassigned (Cn).
    return char.isspace() or char in _UNSAFE_CHARS or unicodedata.category(char).startswith("C")


def _cap(name: str, limit: int) -> str:
    """``name`` cut to at most ``limit`` UTF-8 bytes at a character boundary."""
    data = name.encode("utf-8")
    if len(data) <= limit:
        return name
    return data[:limit].decode("utf-8", errors="ignore")


def file_name(name: str) -> str:
    """A structure name made safe as a file name on Linux, macOS and Windows.

    The rule, in order:

    1. Unicode NFKC normalisation (so full-width or composed look-alikes become plain characters);
    2. surrounding whitespace is dropped, and every run of whitespace, control or other invisible
       characters (Unicode categories C*), path separators and characters Windows forbids
       (``< > : " / \\ | ? *``) becomes one ``_``;
    3. leading and trailing dots and spaces are removed (Windows drops trailing ones; a leading
       dot hides a file);
    4. the name is cut to ``NAME_BYTES`` bytes of UTF-8, and step 3 is applied again;
    5. a name Windows reserves for a device (``CON``, ``PRN``, ``AUX``, ``NUL``, ``COM1``-``COM9``,
       ``LPT1``-``LPT9``, ``CONIN$``, ``CONOUT$``; any case, also before a dot) gets ``_`` after it;
    6. an empty result becomes ``FALLBACK_NAME``.

    Names that are already safe (letters, digits, ``_``, ``-``, inner dots), among them all 104
    published ones, come back unchanged. Uniqueness is not this function's job: see ``model_names``.

    Args:
        name: a structure name, e.g. from a model's dataset.json.

    Returns:
        The safe name (without a suffix such as ``.nii.gz``).
    """
    text = unicodedata.normalize("NFKC", str(name)).strip()
    parts: list[str] = []
    for char in text:
        if not _unsafe(char):
            parts.append(char)
        elif not parts or parts[-1] != "\0":  # one marker per run of unsafe characters
            parts.append("\0")
    safe = "".join(parts).replace("\0", "_")
    safe = _cap(safe.strip(". "), NAME_BYTES).strip(". ")
    stem, dot, rest = safe.partition(".")
    if stem.upper() in _RESERVED:
        safe = f"{stem}_{dot}{rest}"
    return safe or FALLBACK_NAME


def model_names(labels: Mapping[int, str]) -> dict[int, str]:
    """The names a model's outputs use for its label table: safe, and unique as file names.

    Each name is made safe with ``file_name``. Names that then coincide case-insensitively (as
    on macOS's and Windows' file systems; compared after ``str.casefold``) all get ``_<value>``
    appended, in value order, and again until no two names coincide; names that were unique
    keep their safe form. The result depends on the table alone. Value 0 (background) is
    dropped: it is never an output.

    Args:
        labels: label value -> name, e.g. a dataset.json's labels turned around.

    Returns:
        Label value -> output name, sorted by value; the published table comes back unchanged.

    Raises:
        LabelError: a value outside 0..255 (label maps are uint8).
    """
    bad = [v for v in labels if not 0 <= int(v) <= 255]
    if bad:
        raise LabelError(f"label value {bad[0]} is outside 0..255; a label map holds values 1 to 255")
    safe = {int(v): file_name(n) for v, n in sorted(labels.items()) if int(v) != 0}
    seen: dict[str, int] = {}
    for n in safe.values():
        seen[n.casefold()] = seen.get(n.casefold(), 0) + 1
    taken = {n.casefold() for n in safe.values() if seen[n.casefold()] == 1}
    out = {}
    for value, n in safe.items():
        if seen[n.casefold()] > 1:
            suffix = f"_{value}"
            while True:
                n = _cap(n, NAME_BYTES - len(suffix)) + suffix
                if n.casefold() not in taken:
                    break
        taken.add(n.casefold())
        out[value] = n
    return out


def _listing(names: Iterable[str], most: int = 8) -> str:
    """``'a', 'b', ...`` for a message: at most ``most`` names, then how many there are."""
    names = list(names)
    shown = ", ".join(f"'{n}'" for n in names[:most])
    return shown if len(names) <= most else f"{shown}, ... ({len(names)} in all)"


def select_from(names: Mapping[int, str], patterns: Iterable[str], *, groups: bool = False) -> list[int]:
    """The label values of the structures that names and shell patterns select from any table.

    ``select`` for a model's own label table, or another tool's. A word selects the structures
    whose name equals it case-insensitively, or, failing that, whose ``file_name`` equals the
    word's (so ``Liver_Tumour`` selects "Liver Tumour" and the reverse). A word with ``*``, ``?``
    or ``[`` is a shell pattern matched against both forms of every name. With ``groups``, a group
    name (``organs``, ...) that is no name in the table selects the table's structures of that
    group by the published names (another tool's table, such as TotalSegmentator's, shares many).

    Args:
        names: label value -> structure name (value 0, the background, is never selected).
        patterns: entries, each one or several names or patterns separated by commas (not by
            spaces: names may hold spaces); surrounding spaces are ignored. Overlaps count once.
        groups: let group names select the table's published structures of that group.

    Returns:
        The selected label values, sorted, without duplicates.

    Raises:
        LabelError: no entry names anything, a name is not in the table (the message suggests
            the closest names or those that begin with it, or else lists them), or a pattern
            matches no structure.
    """
    table = {int(v): str(n) for v, n in names.items() if int(v) != 0}
    words = [w.strip() for p in patterns for w in str(p).split(",") if w.strip()]
    if not words:
        raise LabelError("no structures named; give structure names or patterns such as 'kidney_*'")
    by_name: dict[str, list[int]] = {}
    by_file: dict[str, list[int]] = {}
    for value, n in sorted(table.items()):
        by_name.setdefault(n.lower(), []).append(value)
        by_file.setdefault(file_name(n).casefold(), []).append(value)
    hint = f"the model's structures are {_listing(table[v] for v in sorted(table))}"

    def exact(word: str) -> list[int]:
        found = by_name.get(word.lower()) or by_file.get(file_name(word).casefold())
        if found:
            return found
        if word.lower() == "background":
            raise LabelError(f"'background' is label 0, not a structure; {hint}")
        candidates = {n.lower(): n for n in table.values()}
        tail = _suggest(word, candidates, hint)
        # A model's names often extend a word ('liver' -> 'Liver_Tumour'): suggest those too.
        longer = [n for n in table.values() if n.lower().startswith(word.lower())]
        if tail == f"; {hint}" and longer:
            tail = _did_you_mean(longer[:3])
        raise LabelError(f"unknown structure '{word}'{tail}")

    patterned = [(k, v) for k, values in (*by_name.items(), *by_file.items()) for v in values]
    chosen_groups = {}
    for group, members in GROUPS.items() if groups else ():
        inside = [v for v, n in sorted(table.items()) if n.lower() in {m.lower() for m in members}]
        if inside and group not in by_name:
            chosen_groups[group] = inside
    return _selection(words, chosen_groups, patterned, exact, hint)
