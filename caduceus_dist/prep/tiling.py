"""Tiling modes: how a labelled interval becomes windows of exactly `window` bases.

- `reference`: the Caduceus/HyenaDNA pretraining sampler (docs/reference-recipe.md §2). Each BED row's end is replaced by
  start + 2^20 and that span is cut into 2^20 / window consecutive windows; a window past the contig end
  is moved left to end there (and right to start at 0). Consecutive rows overlap, as in the reference.
- `tile`: plain non-overlapping tiles from the interval start; the interval is first clipped to the
  contig, and a remainder shorter than a window is left out.

A contig shorter than one window yields nothing (every stored window has exactly `window` bases).

While a contig is still streaming its length is unknown (`contig_length=None`): a tiling then yields
the windows as if the contig were endless. Those that end within the bases read so far are final in
both modes (clamping only touches windows past the contig end), so the caller can emit them early.
"""

from __future__ import annotations

from collections.abc import Iterator

from caduceus_dist.prep.splits import Interval

REFERENCE_SPAN = 1 << 20  # MAX_ALLOWED_LENGTH of the reference HG38Dataset


class TilingError(ValueError):
    """A window size or tiling mode that cannot work; the message names the option."""


def reference_windows(interval: Interval, contig_length: int | None, window: int) -> Iterator[tuple[int, int]]:
    for shift in range(REFERENCE_SPAN // window):
        start = interval.start + shift * window
        end = start + window
        if contig_length is not None:
            if contig_length < window:
                return
            if end > contig_length:
                start, end = contig_length - window, contig_length
        yield start, end


def tile_windows(interval: Interval, contig_length: int | None, window: int) -> Iterator[tuple[int, int]]:
    end = interval.end if contig_length is None else min(interval.end, contig_length)
    for start in range(interval.start, end - window + 1, window):
        yield start, start + window


def check_reference(window: int, has_bed: bool) -> None:
    if not has_bed:
        raise TilingError(
            "--tiling reference extends BED rows to 2^20 bases and needs --bed; use --tiling tile for whole contigs"
        )
    if window > REFERENCE_SPAN or REFERENCE_SPAN % window:
        raise TilingError(
            f"--tiling reference needs a --window that divides 2^20 = {REFERENCE_SPAN} (a power of two up to it); "
            f"got {window}. Use --tiling tile for other sizes"
        )


def check_tile(window: int, has_bed: bool) -> None:
    """Any positive window works for plain tiling."""


TILINGS = {
    "reference": (reference_windows, check_reference),
    "tile": (tile_windows, check_tile),
}


def resolve_tiling(name: str | None, window: int, has_bed: bool):
    """The tiling function for `name` (default: reference with a BED, tile without), after checking it applies."""
    if window <= 0:
        raise TilingError(f"--window must be a positive number of bases, got {window}")
    name = name or ("reference" if has_bed else "tile")
    if name not in TILINGS:
        raise TilingError(f"--tiling {name!r} is unknown; choose one of {', '.join(TILINGS)}")
    windows, check = TILINGS[name]
    check(window, has_bed)
    return name, windows
