"""``tome.tune``: the per-layer schedule that reaches a target speedup with the best fidelity.

The search, all forward passes under ``torch.inference_mode`` on a small calibration batch:

1. **Budget.** The FLOP model of :mod:`tome.tools.measure.bench` (token counts entering and leaving every
   block; computed here from the schedule, no forward pass needed) turns ``target_speedup`` into
   a FLOP budget: ``FLOPs(unmerged) / target``.
2. **Parametric start.** For every ramp shape ``(r, inflection)`` (inflection from -1, ToMe's
   decreasing schedule, to 0.5, merging later) the smallest ``r`` within the budget is found by
   bisection; each is scored on the calibration images and the best one is kept.
3. **Local search.** Coordinate moves that take ``step`` merges away from block ``i`` and give
   block ``j`` (|i - j| <= ``span``) the fewest extra merges that keep the FLOPs within budget
   (or none, when there is slack). A move is kept when it raises the fidelity significantly
   (its mean gain over the calibration images is more than twice its standard error: smaller
   gains are noise that the held-out check would throw away); steps shrink from coarse to 1
   merge; the search stops when no move helps or ``max_evals`` is spent.
   **Races.** Every forward pass is one model run per image, and they are all the cost. A
   candidate (a ramp, a move) first runs on a few of the calibration images
   (``max(4, n / 8)``), then twice as many, then all; it drops out as soon as it does no
   better than the best schedule so far on the images run (the same images: paired). Most
   candidates are worse and cost a fraction of a pass; a winner is always scored on every
   image, so what is kept passes the same test as before (``race=False`` scores every
   candidate on every image). Each schedule's per-image scores are cached.
   **Threads.** Each pass runs at torch's thread count or at 1, whichever did a FLOP faster
   lately (``threads="auto"``, :mod:`tome.tools.tune.threads`): on a busy CPU, small passes
   at 2 threads wait for each other at every op. Outputs, and so the result, do not change.
   **Held-out check.** The last ``holdout`` fraction of the images takes no part in the search
   (nor do images beyond the first ``search_images``, 32: they join the check);
   the searched schedule is kept only if it is at least as faithful on them as the schedule the
   search started from (a tie keeps the search; small moves can fit the calibration images'
   noise: on a real DINOv2, moving one merge changes the mean CLS cosine of 100 photos by up to
   0.005).
4. **Measured** (``budget="measured"``): the found schedule and merging switched off are timed
   in interleaved runs on this machine; when the measured speedup misses the target (or beats it
   by more than ``tolerance``), the FLOP target is corrected by ``target / measured`` and steps
   2-3 run again at the corrected target, starting from the better of its best ramp and the
   previous round's schedule rescaled to it (at most ``rounds`` times). The corrected FLOP
   target stays within ``max_correction`` (15%) of the requested speedup: timings on a busy
   machine can be far off, and a schedule should not give up fidelity for noise.
   Of the timed rounds, the most faithful one whose measured speedup reached the target (within
   ``tolerance``) is returned; if none did, the fastest. The result describes that round (its
   FLOP target, start and held-out check); ``history`` has every round.
   :func:`tome.tools.tune.report.report` prints it all.

Fidelity (the objective) is the mean cosine similarity of the pooled output (CLS token, or the
model's own pooling for models without a class token) to the unmerged model's, plus
``patch_weight`` times the mean cosine of the patch tokens after unmerge. The unmerged reference
is computed once; FLOPs are counted from the schedule (:class:`_Flops`), never run. With ``budget="flops"`` the result is deterministic (same model, images and
threads give the same schedule); the measured correction depends on the machine's timings.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from tome.tools.tune.budget import (
    FlopModel,
    best_reachable,
    effective_schedule,
    ramp_within,
    scaled_within,
    schedule_flops,
    schedule_tokens,
)
from tome.tools.tune.progress import Progress
from tome.tools.tune.scoring import TIE, Scorer, TuneError, calibration_pixels, restore_modes, wrap_model
from tome.tools.tune.threads import ThreadPicker, check_threads

__all__ = ["MIN_IMAGES", "TIE", "TuneError", "TuneResult", "schedule_flops", "schedule_tokens", "tune"]

MIN_IMAGES = 8
_INFLECTIONS = (-1.0, -0.75, -0.5, -0.25, 0.0, 0.25, 0.5)
# A search move is kept only when its gain over the calibration images is significant (mean
# paired gain > _Z standard errors): smaller gains are the images' noise (moving one merge
# changes a real DINOv2's mean CLS cosine on 100 photos by up to 0.005), which the held-out
# check then throws away, after the search has spent its passes chasing it.
_Z = 2.0


@dataclass
class TuneResult:
    """What :func:`tune` found. ``schedule`` goes straight into ``tome.patch(model, r=...)``."""

    schedule: list[int]
    tokens: list[int]  # tokens entering block 0, then left after each block
    target_speedup: float
    budget: str  # "flops" | "measured"
    flops_speedup: float  # FLOP-ideal speedup of the schedule
    measured_speedup: float | None  # interleaved timing on this machine (budget="measured")
    fidelity: float  # the objective: cls_cosine + patch_weight * patch_cosine
    cls_cosine: float  # mean over the calibration images
    min_cls_cosine: float
    patch_cosine: float
    start: str  # where the search started, e.g. "the best ramp (17.33, -0.5)"
    start_schedule: list[int]  # ... per layer
    start_cls_cosine: float
    start_patch_cosine: float
    images: int  # calibration images the search used
    evaluations: int  # schedules scored on every calibration image
    seconds: float
    history: list[dict] = field(default_factory=list)  # one entry per round (see _choose)
    heldout_images: int = 0
    heldout_fidelity: float | None = None  # the objective of ``schedule`` on the held-out images
    heldout_start_fidelity: float | None = None  # ... of ``start_schedule``
    search_kept: bool = True  # False: the held-out check fell back to the search's start
    # The round the schedule comes from (budget="measured" may run several, at corrected FLOP
    # targets; ``history`` has them all): its FLOP target, where its search started (``start``,
    # ``start_schedule``: the best ramp at that target, or an earlier round's schedule rescaled),
    # what the search found, and the held-out objectives the check compared.
    flop_target: float | None = None
    start_fidelity: float | None = None  # the objective of start_schedule (calibration images)
    start_flops_speedup: float | None = None
    searched_schedule: list[int] = field(default_factory=list)
    searched_fidelity: float | None = None
    heldout_searched_fidelity: float | None = None  # the held-out check: this vs heldout_start_fidelity
    patch_weight: float = 1.0  # objective = cls_cosine + patch_weight * patch_cosine
    round: int = 1
    choice: str = ""  # why this round's schedule was returned
    screened: int = 0  # schedules that dropped out of a race after a few images (see _Scorer.beats)
    images_run: int = 0  # forward passes of one image each, references and timing excluded: the cost
    threads: str = ""  # the thread count the passes ran at (see tome.tools.tune.threads)
    thread_seconds: dict = field(default_factory=dict)  # {"1": seconds of passes at 1 thread, ...}

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def r_text(self) -> str:
        """The schedule as ``--r`` takes it: ``[32,30,...]``."""
        return "[" + ",".join(str(r) for r in self.schedule) + "]"


def _parametric(flops: FlopModel, budget: float, layers: int, scorer: Scorer) -> tuple[list[int], str]:
    """The most faithful ramp ``(r, inflection)`` within ``budget``: the first scored on every
    image, each next one raced against the best so far."""
    best: tuple[list[int], str] | None = None
    for inflection in _INFLECTIONS:
        schedule = ramp_within(flops, budget, inflection, layers)
        if schedule is None:
            continue
        label = f"({sum(schedule) / layers:.2f}, {inflection:g})"
        if best is None:
            scorer(schedule)
            best = (schedule, label)
        elif scorer.beats(schedule, best[0])[0]:
            best = (schedule, label)
    assert best is not None  # reachability was checked
    return best


def _moves(schedule: list[int], step: int, span: int, flops: FlopModel, budget: float, first: int = 0):
    """``(i, schedule)`` one move away: ``step`` merges fewer in block i, the fewest more in
    block j (|i - j| <= span) that keep FLOPs within budget. Deterministic order: blocks i from
    ``first`` on, then from 0."""
    layers = len(schedule)
    for i in [*range(first, layers), *range(first)]:
        if schedule[i] < step:
            continue
        for j in sorted(range(max(0, i - span), min(layers, i + span + 1)), key=lambda j: (abs(j - i), j)):
            if j == i:
                continue
            moved = list(schedule)
            moved[i] -= step
            extra = 0
            while flops(moved) > budget:
                before = flops(moved)
                moved[j] += 1
                extra += 1
                if flops(moved) >= before:  # block j cannot merge more
                    moved = None
                    break
            if moved is None:
                continue
            yield i, effective_schedule(moved, flops.n0, flops.protected)


def _local_search(
    start: list[int],
    flops: FlopModel,
    budget: float,
    scorer: Scorer,
    *,
    span: int,
    max_evals: float,
    counter: Callable,
) -> list[int]:
    """First-improvement moves from ``start``, coarse steps to single merges; each candidate
    raced against the best so far (:meth:`Scorer.beats`). Stops when no move wins or the
    round's ``max_evals`` (passes over every calibration image) is spent."""
    best = list(start)
    scorer(best)
    mean_r = max(sum(best) / max(len(best), 1), 1.0)
    steps = sorted({max(1, round(mean_r / 4)), max(1, round(mean_r / 8)), 1}, reverse=True)
    for step in steps:
        improved, first = True, 0
        while improved and counter() < max_evals:
            improved = False
            for i, candidate in _moves(best, step, span, flops, budget, first):
                if counter() >= max_evals:
                    break
                if scorer.beats(candidate, best, _Z)[0]:
                    best, improved, first = candidate, True, i
                    # First improvement; the next sweep starts from the new schedule, at the
                    # block that moved (the blocks before it were just tried: no need to try
                    # them first again).
                    break
    return best


def _time(wrapper, schedule: list[int], size: int, reps: int, batch: int) -> float:
    """Measured speedup of ``schedule`` over merging switched off (r = 0 everywhere, the
    unmerged fast path), medians of interleaved runs on random pixels."""
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch, 3, size, size, generator=generator)
    handle = wrapper.module.tome
    off = [0] * len(schedule)
    times: dict[str, list[float]] = {"off": [], "on": []}
    for r in (off, schedule):  # warm-up
        handle.r = r
        wrapper.run_backbone(pixels)
    for _ in range(reps):
        for name, r in (("off", off), ("on", schedule)):
            handle.r = r
            start = time.perf_counter()
            wrapper.run_backbone(pixels)
            times[name].append(time.perf_counter() - start)
    return statistics.median(times["off"]) / statistics.median(times["on"])


def _choose(history: list[dict], target: float, tolerance: float) -> tuple[dict, str]:
    """The round whose schedule tune returns, and why. One round: that one. Timed rounds: the
    most faithful (calibration objective) of those whose measured speedup reached the target
    within ``tolerance``; if none did, the fastest."""
    if len(history) == 1:
        return history[0], "the only round"
    floor = target * (1 - tolerance)
    reached = [h for h in history if h["measured_speedup"] >= floor]
    if reached:
        chosen = max(reached, key=lambda h: h["fidelity"])
        others = len(reached) - 1
        why = (
            f"the most faithful of the {len(reached)} rounds whose measured speedup reached {floor:.2f}x"
            if others
            else f"the only round whose measured speedup reached {floor:.2f}x"
        )
        return chosen, f"{why} ({target:g}x within {tolerance:.0%})"
    chosen = max(history, key=lambda h: h["measured_speedup"])
    return chosen, f"the fastest of the {len(history)} rounds (none reached {floor:.2f}x measured)"


def tune(
    model,
    images,
    target_speedup: float = 2.0,
    *,
    budget: str = "measured",
    apply: bool = False,
    patch_weight: float = 1.0,
    max_evals: int = 24,
    span: int = 2,
    batch: int = 16,
    min_images: int = MIN_IMAGES,
    reps: int = 5,
    rounds: int = 2,
    tolerance: float = 0.02,
    max_correction: float = 0.15,
    holdout: float = 0.25,
    patch_kwargs: dict | None = None,
    progress: bool = True,
    race: bool = True,
    search_images: int = 32,
    threads: int | str = "auto",
) -> TuneResult:
    """Find the per-layer merge schedule that reaches ``target_speedup`` with the best fidelity
    to the unmerged model on the calibration ``images``.

    Important args:
        model: an ``nn.Module`` :func:`tome.patch` supports (patched or not), a module holding
            one (``torch.compile(model)``, ``nn.DataParallel``, ``DistributedDataParallel``, a
            module of yours: the model inside is tuned, run eagerly on this process), or a
            :class:`tome.tools.models.vision.Model`.
        images: preprocessed pixels ``(B, 3, S, S)`` at any size ``S`` the model accepts (tune
            runs the model at that size: e.g. 224 px on a DINOv2 whose config says 518), or a
            list of image paths / PIL images (preprocessed at the model's own size as
            :class:`tome.tools.models.vision.Model` does: resize, centre crop, the model's mean and std).
            At least ``min_images`` (8); 16-32 is plenty (the search runs on at most
            ``search_images``; more make the held-out check surer).
        target_speedup: > 1, e.g. 2.0.
        budget: ``"flops"`` (FLOP-ideal speedup >= target, deterministic) or ``"measured"``
            (also time the schedule on this machine and correct the FLOP target until the measured
            speedup is within ``tolerance`` of the target, at most ``rounds`` corrections, each
            keeping the FLOP target within ``max_correction`` of ``target_speedup``).
        apply: leave the model patched with the found schedule (a patched model keeps its
            settings; an unpatched one is patched with ``patch_kwargs``, a wrapper through
            ``tome.patch(wrapper, ...)`` so that ``tome.unpatch(wrapper)`` undoes it). Otherwise
            the model is returned to the state it came in (unpatched, or patched with its own
            ``r`` or ``ratio``).

    Args to tinker with:
        patch_weight: weight of the patch-token cosine (after unmerge) in the objective, next to
            the pooled/CLS cosine; 0 tunes for the pooled output only.
        max_evals: forward passes over the calibration images spent on the ramps and the local
            search, a race's partial pass counting as its share of the images (a measured
            correction round spends a quarter of it). Most searches stop before it.
        span: a move shifts merges between blocks at most this far apart.
        holdout: fraction of the images (the last ones) kept out of the search to check it
            (at least 2 images when > 0); 0 uses every image for the search, unchecked.
        batch: images per forward pass. reps: timed runs per setting (measured).
        progress: a tqdm bar on stderr (on a TTY): images run, and the stage; and a line on
            stderr as each stage ends (TTY or not). False: quiet.
        race: run each candidate on a few images first and drop it as soon as it does no better
            than the best so far (a winner is scored on every image); False scores every
            candidate on every image (slower; the same test for what is kept).
        search_images: the search runs on at most this many of the images; the others join
            the held-out check (with ``holdout=0``, the search runs on every image).
        threads: torch's thread count for the search's forward passes: ``"auto"`` times them at
            torch's own count and at 1 and runs them at the faster (on a busy CPU small passes
            often run several times faster on one thread; :mod:`tome.tools.tune.threads`), or
            an int. Set for the calling thread around each pass and restored after it; the
            timing of ``budget="measured"`` runs at torch's own count.

    Returns a :class:`TuneResult` (``.schedule``: one int per block).

    Raises ``TuneError`` (a ``ValueError``) for too few images, pixels of a size the model does
    not take (the message names the sizes it does), a target that is not > 1 or that no schedule
    reaches (the message gives the best reachable); ``ValueError`` for a module holding several
    supported models (pass the one to tune); ``TypeError`` for a model ``tome.patch`` does not
    support (nor anything inside it).
    """
    import tome
    from tome.tools.progress import progress_bar

    if isinstance(target_speedup, bool) or not isinstance(target_speedup, int | float):
        raise TypeError(f"target_speedup: expected a number, got {type(target_speedup).__name__}")
    if not target_speedup > 0:
        raise TuneError(f"target_speedup: expected a positive speedup such as 2.0, got {target_speedup}")
    if target_speedup <= 1:
        raise TuneError(
            f"target_speedup: {target_speedup} <= 1 needs no merging; ask for a speedup > 1, e.g. 2.0"
        )
    if budget not in ("flops", "measured"):
        raise ValueError(f"budget: expected 'flops' or 'measured', got {budget!r}")
    for name, value in (
        ("max_evals", max_evals),
        ("batch", batch),
        ("reps", reps),
        ("min_images", min_images),
        ("search_images", search_images),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    for name, value, low, kind in (
        ("span", span, 1, int),
        ("rounds", rounds, 0, int),
        ("patch_weight", patch_weight, 0, int | float),
        ("max_correction", max_correction, 0, int | float),
    ):
        if isinstance(value, bool) or not isinstance(value, kind) or not value >= low:
            what = "an int" if kind is int else "a number"
            raise ValueError(f"{name}: expected {what} >= {low}, got {value!r}")
    check_threads(threads)
    if not isinstance(race, bool):
        raise TypeError(f"race: expected True or False, got {race!r}")
    if isinstance(holdout, bool) or not isinstance(holdout, int | float) or not 0 <= holdout < 1:
        raise ValueError(f"holdout: expected a fraction in [0, 1), got {holdout!r}")

    wrapper = wrap_model(model, images)
    module = wrapper.module
    pixels = calibration_pixels(wrapper, images, min_images)
    held = max(2, round(holdout * len(pixels))) if holdout > 0 else 0
    if held and len(pixels) - held < 2:
        raise TuneError(
            f"images: {len(pixels)} images leave too few for the search after holdout={holdout:g}"
        )
    pixels, heldout_pixels = pixels[: len(pixels) - held], pixels[len(pixels) - held :]
    if held and len(pixels) > search_images:
        # The search needs few images (each costs a pass per candidate); the check gains from
        # many (it decides whether the search fitted noise), and costs two passes in all.
        heldout_pixels = torch.cat([pixels[search_images:], heldout_pixels])
        pixels = pixels[:search_images]
        held = len(heldout_pixels)
    layers = len(wrapper.blocks)
    flops = FlopModel(wrapper)
    reachable = best_reachable(flops, layers)
    if target_speedup > reachable:
        raise TuneError(
            f"target_speedup {target_speedup:g}x cannot be reached on this model: merging as much as "
            f"possible in every block gives at most {reachable:.2f}x (FLOP-ideal)"
        )

    started = time.perf_counter()
    # The search runs in eval mode; every submodule's own mode comes back afterwards.
    modes = {m: m.training for m in module.modules()}
    module.eval()
    previous = module.__dict__.get("tome")
    previous_schedule = _schedule_of(previous) if previous is not None else None
    # The bar counts images run: the references, then the search's passes (most end early: a
    # race drops most candidates after a few images), so it is an upper bound.
    extra = (max(max_evals // 4, 8) + 10) * (rounds if budget == "measured" else 0)
    bar = progress_bar(
        (max_evals + 11 + extra) * len(pixels) + len(pixels) + 3 * held, progress, "tune", unit="image"
    )
    says = Progress(bar, progress)
    picker = ThreadPicker(threads)
    try:
        # The unmerged reference first (untouched model, or r = 0); then patch once and only
        # change r.
        if previous is not None:
            module.tome.r = 0
        says.stage("tune: unmerged reference")
        scorer = Scorer(wrapper, pixels, batch, patch_weight, bar, race, picker, flops)
        checker = (
            Scorer(wrapper, heldout_pixels, batch, patch_weight, bar, True, picker, flops) if held else None
        )
        says.line(f"tune: unmerged reference on {len(pixels)} + {held} held-out images: {says.lap():.1f} s")
        if previous is None:
            tome.patch(module, 0, **(patch_kwargs or {}))
        round_start = 0.0

        def counter() -> float:
            return scorer.cost - round_start

        flop_target = float(target_speedup)
        history: list[dict] = []
        best: list[int] | None = None
        for index in range(1 + (rounds if budget == "measured" else 0)):
            flop_target = min(flop_target, reachable)
            limit = flops.base / flop_target
            where = f"tune: round {index + 1}, " if index else "tune: "
            says.stage(f"{where}ramps")
            ran = scorer.images_run
            ramp, label = _parametric(flops, limit, layers, scorer)
            start, start_label = ramp, f"the best ramp {label}"
            if best is not None:
                # A correction round may start from the best schedule so far, rescaled.
                scaled = scaled_within(flops, limit, best)
                if scaled is not None and scorer.beats(scaled, ramp)[0]:
                    start, start_label = scaled, f"the round-{index} schedule rescaled to this target"
            # A correction round starts from a good schedule already: a shorter search.
            evals = max_evals if index == 0 else max(max_evals // 4, 8)
            says.line(
                f"{where}ramps at {flop_target:.2f}x FLOP-ideal: start from {start_label}, objective "
                f"{scorer(start)[0]:.5f} ({scorer.images_run - ran} image passes, {says.lap():.1f} s)"
            )
            says.stage(f"{where}search")
            ran, tried = scorer.images_run, len(scorer.cache)
            searched = _local_search(start, flops, limit, scorer, span=span, max_evals=evals, counter=counter)
            moved = sum(a != b for a, b in zip(searched, start, strict=True))  # blocks changed
            says.line(
                f"{where}search: {len(scorer.cache) - tried} schedules tried, "
                + (
                    f"objective {scorer(searched)[0]:.5f} ({moved} blocks changed)"
                    if moved
                    else "no move kept"
                )
                + f" ({scorer.images_run - ran} image passes, {says.lap():.1f} s)"
            )
            # The held-out check: a searched schedule that does worse than where it started on
            # images it never saw fitted noise (a tie keeps the search).
            says.stage("tune: held-out check")
            heldout_start = checker(start)[0] if checker is not None else None
            heldout_searched = checker(searched)[0] if checker is not None else None
            kept = checker is None or heldout_searched >= heldout_start - TIE
            if checker is not None and searched != start:
                says.line(
                    f"{where}held-out check on {held} images: search {heldout_searched:.5f} vs start "
                    f"{heldout_start:.5f}: {'search kept' if kept else 'start kept'} ({says.lap():.1f} s)"
                )
            best = searched if kept else start
            round_start = scorer.cost
            history.append(
                {
                    "round": index + 1,
                    "flop_target": flop_target,
                    "start": start_label,
                    "start_schedule": list(start),
                    "start_fidelity": scorer(start)[0],
                    "start_flops_speedup": flops.speedup(start),
                    "searched_schedule": list(searched),
                    "searched_fidelity": scorer(searched)[0],
                    "heldout_start_fidelity": heldout_start,
                    "heldout_searched_fidelity": heldout_searched,
                    "search_kept": kept,
                    "schedule": list(best),
                    "fidelity": scorer(best)[0],
                    "flops_speedup": flops.speedup(best),
                    "measured_speedup": None,
                }
            )
            if budget == "flops":
                break
            says.stage(f"tune: round {index + 1}, timing")
            says.lap()
            measured = _time(wrapper, best, wrapper.img_size, reps, min(batch, len(pixels)))
            history[-1]["measured_speedup"] = measured
            says.line(
                f"{where}timing at {torch.get_num_threads()} threads: {measured:.2f}x measured vs "
                f"{flops.speedup(best):.2f}x FLOP-ideal ({says.lap():.1f} s)"
            )
            if abs(measured / target_speedup - 1) <= tolerance:
                break
            # Bounded: on a busy machine timings can be far off; never trade fidelity for noise.
            low, high = target_speedup / (1 + max_correction), target_speedup * (1 + max_correction)
            corrected = min(max(flops.speedup(best) * target_speedup / measured, low), high)
            if abs(corrected - flop_target) < 1e-9:
                break  # at the bound already: another round would find the same schedule
            flop_target = corrected
        bar.close()
        chosen, choice = _choose(history, target_speedup, tolerance)
        fidelity, cls, min_cls, patch = scorer(chosen["schedule"])
        _, start_cls, _, start_patch = scorer(chosen["start_schedule"])
        result = TuneResult(
            schedule=list(chosen["schedule"]),
            tokens=schedule_tokens(chosen["schedule"], flops.n0, flops.protected),
            target_speedup=float(target_speedup),
            budget=budget,
            flops_speedup=chosen["flops_speedup"],
            measured_speedup=chosen["measured_speedup"],
            fidelity=fidelity,
            cls_cosine=cls,
            min_cls_cosine=min_cls,
            patch_cosine=patch,
            start=chosen["start"],
            start_schedule=list(chosen["start_schedule"]),
            start_cls_cosine=start_cls,
            start_patch_cosine=start_patch,
            images=len(pixels),
            evaluations=scorer.evaluations,
            screened=scorer.screened,
            images_run=scorer.images_run + (checker.images_run if checker is not None else 0),
            seconds=time.perf_counter() - started,
            history=history,
            heldout_images=held,
            heldout_fidelity=checker(chosen["schedule"])[0] if checker is not None else None,
            heldout_start_fidelity=chosen["heldout_start_fidelity"],
            search_kept=chosen["search_kept"],
            flop_target=chosen["flop_target"],
            start_fidelity=chosen["start_fidelity"],
            start_flops_speedup=chosen["start_flops_speedup"],
            searched_schedule=list(chosen["searched_schedule"]),
            searched_fidelity=chosen["searched_fidelity"],
            heldout_searched_fidelity=chosen["heldout_searched_fidelity"],
            patch_weight=float(patch_weight),
            round=chosen["round"],
            choice=choice,
            threads=picker.summary(),
            thread_seconds={str(n): round(t, 3) for n, t in picker.seconds.items() if t > 0},
        )
        says.line(
            f"tune: done in {result.seconds:.1f} s, {result.images_run} image passes at {result.threads}"
        )
    except BaseException:
        apply = False
        raise
    finally:
        bar.close()
        if apply and previous is None and wrapper.container is not None:
            # Patched through what the user gave, so that tome.unpatch(it) undoes it.
            tome.unpatch(module)
            tome.patch(wrapper.container, list(result.schedule), **(patch_kwargs or {}))
        elif apply:
            module.tome.r = list(result.schedule)
        elif previous is None:
            tome.unpatch(module)
        else:
            setattr(module.tome, *previous_schedule)
        restore_modes(modes)
    return result


def _schedule_of(handle) -> tuple[str, object]:
    """``("r", schedule)`` or ``("ratio", fraction)``: what a patched model merges with now, to
    be set back with ``setattr(handle, *saved)``."""
    ratio = getattr(handle, "ratio", None)
    return ("ratio", ratio) if ratio is not None else ("r", handle.r)
