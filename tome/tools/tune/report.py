"""The text report of a :class:`tome.tools.tune.search.TuneResult`: what was compared, at which FLOP
target, and why the result won (what ``tome tune`` prints).

>>> distinct(1.92821, 1.92824)
('1.92821', '1.92824')
>>> distinct(0.5, 0.25)
('0.5000', '0.2500')
"""

from __future__ import annotations

from tome.tools.tune.search import TIE

__all__ = ["distinct", "report"]


def distinct(a: float, b: float, digits: int = 4, most: int = 8) -> tuple[str, str]:
    """``a`` and ``b`` with ``digits`` decimals, or as many more (up to ``most``) as it takes for
    the two to read differently (they read alike only when they are equal to ``most`` decimals)."""
    for d in range(digits, most + 1):
        left, right = f"{a:.{d}f}", f"{b:.{d}f}"
        if left != right:
            return left, right
    return f"{a:.{most}f}", f"{b:.{most}f}"


def _schedule(schedule: list[int]) -> str:
    return "[" + ",".join(str(r) for r in schedule) + "]"


def _verdict(search: float, start: float) -> str:
    """How the search's held-out objective compares with its start's."""
    if abs(search - start) <= TIE:
        return f"a tie (within {TIE:g}): the search's schedule is kept"
    if search > start:
        return f"the search did better by {search - start:.2g}: its schedule is kept"
    return (
        f"the start did better by {start - search:.2g}: the start is kept "
        "(the search's gain on the calibration images did not hold on images it never saw)"
    )


def _objective(weight: float) -> str:
    return f"CLS cosine + {weight:g} x patch cosine"


def report(result) -> list[str]:
    """The lines ``tome tune`` prints after its header for ``result`` (a
    :class:`~tome.tools.tune.search.TuneResult`)."""
    r = result
    lines = [f"schedule: {r.r_text}", f"tokens after each block: {' '.join(str(t) for t in r.tokens[1:])}"]
    measured = "" if r.measured_speedup is None else f", {r.measured_speedup:.2f}x measured"
    target = "" if r.flop_target is None else f" (searched at a FLOP target of {r.flop_target:.2f}x)"
    lines.append(f"speedup: {r.flops_speedup:.2f}x FLOP-ideal{target}{measured}")
    lines.append(
        f"fidelity on the {r.images} calibration images: CLS cosine {r.cls_cosine:.4f} "
        f"(min {r.min_cls_cosine:.4f}), patch cosine {r.patch_cosine:.4f}; "
        f"objective ({_objective(r.patch_weight)}) {r.fidelity:.4f}"
    )
    if r.start_fidelity is not None:
        start_speed = "" if r.start_flops_speedup is None else f", {r.start_flops_speedup:.2f}x FLOP-ideal"
        lines.append(
            f"search start: {r.start} = {_schedule(r.start_schedule)}{start_speed}: CLS cosine "
            f"{r.start_cls_cosine:.4f}, patch cosine {r.start_patch_cosine:.4f}, objective {r.start_fidelity:.4f}"
        )
        if r.searched_schedule == r.start_schedule:
            lines.append("search: no move raised the objective; the start is the result")
        else:
            found, start = distinct(r.searched_fidelity, r.start_fidelity)
            lines.append(
                f"search: found {_schedule(r.searched_schedule)}, objective {found} vs {start} "
                f"at the start (calibration images, same FLOP target)"
            )
    if r.heldout_images == 0:
        lines.append("held-out check: none (holdout=0): the search's schedule is kept unchecked")
    elif r.searched_schedule == r.start_schedule:
        lines.append(
            f"held-out check on {r.heldout_images} images: nothing to decide (the search ended where it started)"
        )
    elif r.heldout_searched_fidelity is not None and r.heldout_start_fidelity is not None:
        search, start = distinct(r.heldout_searched_fidelity, r.heldout_start_fidelity)
        lines.append(
            f"held-out check on {r.heldout_images} images: search {search} vs start {start}: "
            f"{_verdict(r.heldout_searched_fidelity, r.heldout_start_fidelity)}"
        )
    if len(r.history) > 1:
        lines.append(f"rounds (target {r.target_speedup:g}x measured; the FLOP target corrected each round):")
        for h in r.history:
            speed = "–" if h["measured_speedup"] is None else f"{h['measured_speedup']:.2f}x"
            held = "" if h["search_kept"] else " (its start: the held-out check)"
            mark = f"  <- returned: {r.choice}" if h["round"] == r.round else ""
            lines.append(
                f"  round {h['round']}: FLOP target {h['flop_target']:.2f}x, {_schedule(h['schedule'])}: "
                f"{h['flops_speedup']:.2f}x FLOP-ideal, {speed} measured, objective {h['fidelity']:.4f}{held}{mark}"
            )
    return lines
