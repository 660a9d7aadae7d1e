"""What the commands print: progress bars (on a terminal only), summaries, the quality line."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from stuseg.cli.base import err, say

__all__ = [
    "QUALITY_LINE_ITEMS",
    "BatchBars",
    "batch_bars",
    "blobs_line",
    "plural",
    "progress_bar",
    "quality_line",
    "readable_duration",
    "summary_line",
    "tile_bar",
    "what_was_written",
]


@contextmanager
def progress_bar() -> Iterator[Callable[[str, int, int | None], None] | None]:
    """A rich progress bar on stderr, fed by the library's ``progress(phase, done, total)`` callback.

    None when stderr is not a terminal: a bar there is noise, and rich ends it with an empty line.
    """
    if not err.is_terminal:
        yield None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description:>8}"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True, disable=not err.is_terminal) as bar:
        tasks: dict[str, Any] = {}

        def report(phase: str, done: int, total: int | None) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(phase, total=total)
            bar.update(tasks[phase], completed=done, total=total)

        yield report


def what_was_written(layout: Any, written: Any, structures: int) -> str:
    """``104 masks in out and out/preview.png`` or ``seg.nii.gz and seg.statistics.json``."""
    from stuseg.results.write import Layout

    files = Layout(layout.target, layout.multilabel, written.products).files()
    shown = []
    if "nifti" in files:
        shown.append(
            f"{structures} masks in {layout.target}" if not layout.multilabel else str(layout.target)
        )
    for name, paths in files.items():
        if name != "nifti":
            shown.append(str(paths[0]))  # statistics: the JSON stands for its CSV twin
    return " and ".join(shown) or "nothing"


def blobs_line(removed: dict[str, int], min_mm3: float) -> str:
    """One line: what ``--remove-small-blobs`` removed."""
    if not removed:
        return f"stuseg: no piece of any structure was smaller than {min_mm3:g} mm3; nothing removed"
    shown = ", ".join(f"{name} {n}" for name, n in list(removed.items())[:6])
    more = f", and {len(removed) - 6} more" if len(removed) > 6 else ""
    total = sum(removed.values())
    return (
        f"stuseg: removed {total} voxels in pieces smaller than {min_mm3:g} mm3 from "
        f"{len(removed)} structure(s) ({shown}{more})"
    )


@contextmanager
def tile_bar(quiet: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A rich progress bar over sliding-window tiles, with ETA, on stderr (on a terminal only)."""
    if quiet or not err.is_terminal:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("tiles"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task("tiles", total=None)

        def report(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield report


def summary_line(seg: Any, what: str) -> str:
    """One line: what was written, time per stage and peak memory."""
    order = ("read", "load", "preprocess", "network", "softmax", "export", "write", "statistics", "preview",
             "dicom-seg", "rtstruct")  # fmt: skip
    times = ", ".join(f"{k} {seg.timings[k]:.1f}s" for k in order if k in seg.timings)
    memory = f"peak RAM {seg.peak_rss_bytes / 2**30:.2f} GB" if seg.peak_rss_bytes else "peak RAM unknown"
    if seg.peak_gpu_bytes is not None:
        memory += f", peak GPU {seg.peak_gpu_bytes / 2**30:.2f} GB"
    kind = f", {seg.precision}" if seg.precision != "float32" else ""
    return f"wrote {what} ({seg.size} on {seg.device}{kind}); {times}; {memory}"


def plural(n: int, noun: str) -> str:
    """``1 file``, ``3 files``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def readable_duration(seconds: float) -> str:
    """``42.0s``, ``3m 12s`` or ``2h 05m``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


class BatchBars:
    """The batch's progress on stderr: a bar over cases (ok / failed / skipped, ETA) and the tiles
    of the case in the network. Lines printed through it appear above the bars."""

    def __init__(self, progress: Any, total: int) -> None:
        self.progress = progress
        self.cases = progress.add_task("0 ok, 0 failed, 0 skipped", total=total) if progress else None
        self.tiles = None

    def print(self, line: str) -> None:
        if self.progress is None:
            say(line)
        else:
            self.progress.console.print(" ".join(line.splitlines()), markup=False, soft_wrap=True)

    def case_done(self, counts: dict[str, int]) -> None:
        if self.progress is None:
            return
        text = f"{counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} skipped"
        self.progress.update(self.cases, completed=sum(counts.values()), description=text)

    def tile(self, case: Any, done: int, total: int) -> None:
        if self.progress is None:
            return
        if self.tiles is None:
            self.tiles = self.progress.add_task(case.id, total=total)
        self.progress.update(self.tiles, completed=done, total=total, description=f"  {case.id}")


@contextmanager
def batch_bars(quiet: bool, total: int) -> Iterator[BatchBars]:
    """Rich bars on stderr (only on a terminal, and not with --quiet)."""
    if quiet or not err.is_terminal:
        yield BatchBars(None, total)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True) as progress:
        yield BatchBars(progress, total)


# At most this many findings are named in the quality line; statistics.json lists every flag.
QUALITY_LINE_ITEMS = 6


def quality_line(stats: Any) -> str | None:
    """One line naming the structures flagged ``wrong_side``, ``fragmented`` or ``low_confidence``,
    or None if none is.

    ``empty`` and ``touches_border`` are not named: most scans show part of a body, so a correct
    result raises them for many structures (statistics.json lists them).
    """
    from stuseg.analysis.quality import LOW_PROBABILITY
    from stuseg.structures.labels import left_right_pairs

    records = stats.by_name()
    items = [
        f"{left} on the wrong side of {right}"
        for left, right in left_right_pairs(records)
        if records[left]["wrong_side"] and records[right]["wrong_side"]
    ]
    for name in stats.flagged()["fragmented"]:
        rec = records[name]
        outside, stray = rec["outside_largest_share"], rec["stray_share"]
        share = f"{outside:.0%} outside the largest" + ("" if stray == outside else f", {stray:.0%} stray")
        items.append(f"{name} in {rec['fragments']} pieces ({share})")
    for name in stats.flagged()["low_confidence"]:
        rec = records[name]
        items.append(
            f"{name} unsure ({rec['low_probability_share']:.0%} of voxels below "
            f"p {LOW_PROBABILITY:g}, mean p {rec['mean_probability']:.2f})"
        )
    if not items:
        return None
    more = len(items) - QUALITY_LINE_ITEMS
    shown = items[:QUALITY_LINE_ITEMS] + ([f"and {more} more (see statistics.json)"] if more > 0 else [])
    return "stuseg: quality: " + "; ".join(shown)
