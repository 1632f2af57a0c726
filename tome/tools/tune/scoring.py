"""What :func:`tome.tune` scores schedules on: the model wrapped at the calibration images' size,
the calibration pixels, and :class:`Scorer`, the fidelity of a schedule against the unmerged
outputs, raced image by image.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from tome.tools.tune.threads import ThreadPicker

__all__ = ["TIE", "Scorer", "TuneError", "calibration_pixels", "race_bounds", "restore_modes", "wrap_model"]

TIE = 1e-6  # objectives closer than this are equal (the held-out check keeps the search on a tie)


class TuneError(ValueError):
    """A problem with what was asked of :func:`tome.tune` (too few images, unreachable target, ...)."""


def wrap_model(model, images) -> object:
    """``model`` as a :class:`tome.tools.models.vision.Model` at the input size of ``images``: the size of
    the pixels given (any size the model accepts), else the model's own size."""
    from tome.tools.models.vision import Model, check_size, from_module

    if isinstance(model, Model):
        wrapper = model
    elif not isinstance(model, nn.Module):
        raise TypeError(
            f"model: expected a torch.nn.Module or tome.tools.models.vision.Model, got {type(model).__name__}"
        )
    else:
        wrapper = from_module(model)  # a wrapper or a user's module: the model inside it
    if isinstance(images, torch.Tensor) and images.dim() == 4 and images.shape[1] == 3:
        height, width = images.shape[-2:]
        if height != width:
            raise TuneError(f"images: tune takes square pixels (B, 3, S, S), got {height}x{width}")
        try:
            check_size(wrapper, int(height), int(width))
        except ValueError as error:
            raise TuneError(f"images: {error}") from None
        if height != wrapper.img_size:
            wrapper = dataclasses.replace(wrapper, img_size=int(height))
    return wrapper


def restore_modes(modes: dict[nn.Module, bool]) -> None:
    for submodule, training in modes.items():
        submodule.training = training


def calibration_pixels(wrapper, images, min_images: int) -> torch.Tensor:
    from tome.tools.images import open_image

    if isinstance(images, torch.Tensor):
        pixels = images
        if pixels.dim() != 4 or pixels.shape[1] != 3:
            raise TuneError(
                f"images: expected preprocessed pixels (B, 3, H, W), got a tensor of shape {tuple(pixels.shape)}"
            )
    else:
        if isinstance(images, str | bytes) or not isinstance(images, Sequence):
            raise TypeError(
                "images: expected a (B, 3, H, W) tensor of preprocessed pixels, or a list of image "
                f"paths or PIL images, got {type(images).__name__}"
            )
        loaded = []
        for item in images:
            image = open_image(item) if not hasattr(item, "convert") else item.convert("RGB")
            if image is None:
                raise TuneError(f"images: cannot read {item} as an image")
            loaded.append(image)
        if len(loaded) < min_images:
            raise TuneError(f"images: tune needs at least {min_images} calibration images, got {len(loaded)}")
        pixels = wrapper.preprocess(loaded)
    if pixels.shape[0] < min_images:
        raise TuneError(f"images: tune needs at least {min_images} calibration images, got {pixels.shape[0]}")
    return pixels.float()


class Scorer:
    """Fidelity of a schedule on the calibration images, against the unmerged outputs (computed
    once). Each schedule's per-image scores are cached, image by image in a fixed order, so that
    a schedule first scored on the leading images (a screening) and later on all of them runs
    each image once."""

    def __init__(
        self,
        wrapper,
        pixels: torch.Tensor,
        batch: int,
        patch_weight: float,
        bar,
        race: bool = True,
        picker: ThreadPicker | None = None,
        flops: Callable[[Sequence[int]], float] | None = None,
    ) -> None:
        self.wrapper, self.pixels, self.batch, self.patch_weight, self.bar = (
            wrapper,
            pixels,
            batch,
            patch_weight,
            bar,
        )
        # The thread count of each pass (see :mod:`tome.tools.tune.threads`), and the FLOPs per
        # image of a schedule, which it weighs a pass's time by.
        self.picker = picker if picker is not None else ThreadPicker(torch.get_num_threads())
        self.flops = flops
        self.n = len(pixels)
        # Where a race checks a candidate (see :meth:`beats`): a quarter-ish of the images first,
        # then twice as many each time, then all of them.
        self.bounds = race_bounds(self.n) if race else [self.n]
        self.cache: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        self.full: dict[tuple[int, ...], tuple[float, float, float, float]] = {}
        self.images_run = 0  # merged forward passes, per image (the search's cost)
        self.ref_pooled, self.ref_patches = self._outputs(0, self.n, None)
        self.bar.update(self.n)

    def _outputs(
        self, start: int, stop: int, schedule: Sequence[int] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled and patch outputs of images ``start:stop`` (``schedule``: what the model
        merges with now, None for no merging)."""
        layers = len(self.wrapper.blocks)
        per_image = self.flops(schedule or [0] * layers) if self.flops is not None else 1.0
        pooled, patches = [], []
        for first in range(start, stop, self.batch):
            chunk = self.pixels[first : min(first + self.batch, stop)]
            out = self.picker.run(
                lambda chunk=chunk: self.wrapper(chunk, saliency=False), len(chunk) * per_image
            )
            pooled.append(out.pooled.float())
            patches.append(out.patches.float())
        return torch.cat(pooled), torch.cat(patches)

    def _per_image(self, schedule: Sequence[int], stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cls cosine, patch cosine)`` of each of the first ``stop`` images, run as needed."""
        key = tuple(schedule)
        cls, patch = self.cache.get(key, (torch.empty(0), torch.empty(0)))
        done = len(cls)
        if done < stop:
            self.wrapper.module.tome.r = list(schedule)
            pooled, patches = self._outputs(done, stop, schedule)
            with self.picker.at_best():  # small ops: at the passes' thread count
                cls = torch.cat([cls, F.cosine_similarity(pooled, self.ref_pooled[done:stop], dim=-1)])
                patch = torch.cat(
                    [patch, F.cosine_similarity(patches, self.ref_patches[done:stop], dim=-1).mean(1)]
                )
            self.cache[key] = (cls, patch)
            self.images_run += stop - done
            self.bar.update(stop - done)
        return cls[:stop], patch[:stop]

    def _objective(self, schedule: Sequence[int], stop: int) -> float:
        cls, patch = self._per_image(schedule, stop)
        return cls.mean().item() + self.patch_weight * patch.mean().item()

    def __call__(self, schedule: Sequence[int]) -> tuple[float, float, float, float]:
        """``(fidelity, cls cosine, min cls cosine, patch cosine)`` on every image."""
        key = tuple(schedule)
        if key not in self.full:
            c, p = self._per_image(schedule, self.n)
            score = c.mean().item() + self.patch_weight * p.mean().item()
            self.full[key] = (score, c.mean().item(), c.min().item(), p.mean().item())
        return self.full[key]

    def beats(self, candidate: Sequence[int], best: Sequence[int], z: float = 0.0) -> tuple[bool, float]:
        """Whether ``candidate`` is more faithful than ``best`` on every image (by more than
        :data:`TIE`), and its objective (on every image when it won, else on the images run).

        A race: ``candidate`` runs on the leading images first and drops out as soon as it does
        no better than ``best`` on the images run so far (paired: the same images), so that a
        worse schedule, most of a search's candidates, costs a fraction of a full evaluation.
        A winner is always scored on every image: what it is kept for is the same test as a
        full evaluation's."""
        for stop in self.bounds[:-1]:
            value = self._objective(candidate, stop)
            if value <= self._objective(best, stop) + TIE:
                return False, value
        value = self(candidate)[0]
        if not value > self(best)[0] + TIE:
            return False, value
        if z > 0 and self.n > 1:
            # Significant: the mean paired gain stands ``z`` standard errors above zero.
            gain = self._gains(candidate, best)
            return gain.mean().item() > z * gain.std().item() / self.n**0.5, value
        return True, value

    def _gains(self, candidate: Sequence[int], best: Sequence[int]) -> torch.Tensor:
        (c1, p1), (c0, p0) = self._per_image(candidate, self.n), self._per_image(best, self.n)
        return (c1 - c0) + self.patch_weight * (p1 - p0)

    @property
    def evaluations(self) -> int:
        """Schedules scored on every calibration image."""
        return len(self.full)

    @property
    def screened(self) -> int:
        """Schedules that dropped out of a race before the last image."""
        return sum(1 for key in self.cache if key not in self.full)

    @property
    def cost(self) -> float:
        """Merged forward passes so far, in passes over every calibration image."""
        return self.images_run / self.n


def race_bounds(n: int) -> list[int]:
    """Where a race checks a candidate: ``max(4, n / 8)`` images, twice as many each time, all.

    >>> race_bounds(12), race_bounds(75), race_bounds(3)
    ([4, 8, 12], [10, 20, 40, 75], [3])
    """
    bounds, stop = [], max(4, -(-n // 8))
    while stop < n:
        bounds.append(stop)
        stop *= 2
    return [*bounds, n]
