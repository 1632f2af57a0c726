"""M-RoPE prompts (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): the positions of merged visual tokens and the
rewrite of a prompt whose images and videos were merged.

These models number every token with three positions ``(t, h, w)`` (3-D M-RoPE): text advances
all three together, a visual token gets its frame group's time and its row and column. What
every Qwen adapter does after merging, here once:

1. the positions of the prompt *as given* are computed first, exactly as the unpatched model
   would (:func:`original_positions`: the model's own ``get_rope_index``);
2. every text token keeps its position; each merged visual token gets the size-weighted mean,
   rounded per axis, of the positions of the tokens it holds (:func:`mean_positions`): a RoPE
   score against the mean position is, to first order in the offsets, the mean of the scores
   against its members' positions, so the mean biases no axis (time included);
3. the placeholders are cut to the merged tokens (:func:`~tome.adapters.common.vlm.shorten_prompts`,
   one modality at a time), the new ``position_ids`` go with them, and ``model.model.rope_deltas``
   is set so that a continuation without positions goes on from the original prompt's last
   position (:func:`rewrite_prompt`).

A modality's merged placeholders are described by :class:`Runs`: the runs of placeholders in
batch order (an image, a Qwen2.5 video, or one of a Qwen3-VL video's frame groups, which the
processor separates by timestamps), how many tokens each run keeps, and which merged token holds
each placeholder. A merged token may hold placeholders of several runs (a Qwen3-VL video's
temporal run spans frame groups); it is written into the run where it starts.

>>> ids = torch.tensor([[5, 9, 9, 9, 9, 6]])  # one image of 4 tokens (placeholder 9)
>>> runs = Runs.from_items(9, [torch.tensor([0, 1, 0, 1])], [2])
>>> pos = torch.tensor([[[0, 1, 2, 3, 4, 9]]])
>>> mean_positions(pos, ids, runs).tolist()  # (1 + 3) / 2, (2 + 4) / 2; the rest as it was
[[[0, 2, 3, 3, 4, 9]]]
>>> key_bias(ids, runs).exp().round().tolist()
[[1.0, 2.0, 2.0, 1.0, 1.0, 1.0]]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from tome.adapters.common.vlm import BIAS, shorten_prompts

__all__ = [
    "PER_TOKEN",
    "Runs",
    "cache_length",
    "key_bias",
    "mean_positions",
    "original_positions",
    "plain_prompt",
    "rewrite_prompt",
]

# Per-token inputs of forward() / generate() that lose the same positions as input_ids.
PER_TOKEN = ("labels", "token_type_ids", "mm_token_type_ids")


@dataclass(frozen=True)
class Runs:
    """One modality's merged placeholders.

    Attributes:
        placeholder: the placeholder token id (``image_token_id`` / ``video_token_id``).
        before: the placeholders of each run, runs in the order they come in the batch (row by
            row), as the model writes the features in.
        after: the merged tokens each run keeps (its first ``after[i]`` placeholders).
        index: ``(sum(before),)`` int64: for each placeholder (batch order), the merged token
            holding it, numbered batch-wide: run ``i``'s merged tokens are
            ``sum(after[:i]) ... sum(after[:i + 1]) - 1``, in order.
        sizes: ``(sum(after),)`` float32: how many placeholders each merged token holds.
    """

    placeholder: int
    before: list[int]
    after: list[int]
    index: torch.Tensor
    sizes: torch.Tensor

    @staticmethod
    def from_items(placeholder: int, sources: Sequence[torch.Tensor], after: Sequence[int]) -> Runs:
        """Runs of items merged each by itself (an image, a Qwen2.5 video): ``sources[i]`` maps
        item ``i``'s tokens to its merged tokens ``0 .. after[i] - 1``.

        >>> Runs.from_items(9, [torch.tensor([0, 0, 1]), torch.tensor([0, 1])], [2, 2]).index.tolist()
        [0, 0, 1, 2, 3]
        """
        after = [int(k) for k in after]
        if not sources:
            return Runs(placeholder, [], [], torch.zeros(0, dtype=torch.long), torch.zeros(0))
        device = sources[0].device
        first = torch.tensor([0, *after[:-1]], dtype=torch.long, device=device).cumsum(0)
        index = torch.cat([s.to(device).long() + first[i] for i, s in enumerate(sources)])
        sizes = torch.bincount(index, minlength=sum(after)).to(torch.float32)
        return Runs(placeholder, [int(s.shape[0]) for s in sources], after, index, sizes)

    def merges(self) -> bool:
        return self.before != self.after


def cache_length(kwargs: dict) -> int:
    """The length of the cache a call continues (0: a prompt of its own).

    >>> cache_length({}), cache_length({"cache": None})
    (0, 0)
    """
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is None:
        return 0
    length = getattr(cache, "get_seq_length", None)
    return int(length()) if callable(length) else 1


def plain_prompt(ids: object, kwargs: dict) -> bool:
    """Whether ``ids`` and ``kwargs`` are a prompt of their own the rewrite can shorten: 2-D
    ``input_ids``, no ``inputs_embeds``, no pre-computed ``mm_encoder_outputs``, no cache, a 2-D
    mask (if any) and ``position_ids`` (if any) of ``(B, L)``, ``(3, B, L)`` or ``(4, B, L)``.

    >>> ids = torch.ones(1, 4, dtype=torch.long)
    >>> plain_prompt(ids, {}), plain_prompt(ids, {"attention_mask": torch.ones(1, 9)})
    (True, False)
    """
    if (
        not isinstance(ids, torch.Tensor)
        or ids.dim() != 2
        or kwargs.get("inputs_embeds") is not None
        or kwargs.get("mm_encoder_outputs") is not None
        or cache_length(kwargs) > 0
    ):
        return False
    mask = kwargs.get("attention_mask")
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.shape != ids.shape):
        return False  # a 4-D mask, or one that covers a cache: not a prompt of its own
    given = kwargs.get("position_ids")
    return given is None or (
        isinstance(given, torch.Tensor)
        and given.shape[-2:] == ids.shape
        and (given.dim() == 2 or (given.dim() == 3 and given.shape[0] in (3, 4)))
    )


def original_positions(
    model: nn.Module, ids: torch.Tensor, kwargs: dict, generating: bool, *, forward_without_types: str
) -> torch.Tensor | None:
    """``(3, B, L)``: the M-RoPE positions the unpatched model gives the prompt as given (the
    given ``position_ids``, else the model's ``get_rope_index`` from ``mm_token_type_ids`` and the
    grids). Without ``mm_token_type_ids``: ``generate()``'s 1-D positions on every row; a direct
    forward numbers every column (``forward_without_types="arange"``: Qwen2 / 2.5) or gets
    ``None`` (``"refuse"``: Qwen3-VL, whose model raises its own error then)."""
    given = kwargs.get("position_ids")
    if isinstance(given, torch.Tensor):
        if given.dim() == 2:
            return given[None].expand(3, -1, -1)
        return given[-3:]  # (4, B, L): the text row first, then (t, h, w)
    mask = kwargs.get("attention_mask")
    types = kwargs.get("mm_token_type_ids")
    if types is not None and (
        kwargs.get("image_grid_thw") is not None or kwargs.get("video_grid_thw") is not None
    ):
        positions, _ = model.model.get_rope_index(
            ids,
            mm_token_type_ids=types,
            image_grid_thw=kwargs.get("image_grid_thw"),
            video_grid_thw=kwargs.get("video_grid_thw"),
            second_per_grid_ts=kwargs.get("second_per_grid_ts"),
            attention_mask=mask,
        )
        return positions
    B, L = ids.shape
    if generating and mask is not None:  # generate()'s own 1-D positions
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    elif generating or forward_without_types == "arange":  # a forward numbers every column
        positions = torch.arange(L, device=ids.device).expand(B, L)
    else:
        return None
    return positions[None].expand(3, B, L)


def _slots(ids: torch.Tensor, runs: Runs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The placeholders' flat indices into ``(B * L)``, which of them are kept (a run's first
    ``after`` ones), and the merged token each kept one carries."""
    device = ids.device
    where = (ids == runs.placeholder).reshape(-1).nonzero().squeeze(1)  # one host sync per call
    before = torch.as_tensor(runs.before, dtype=torch.long, device=device)
    after = torch.as_tensor(runs.after, dtype=torch.long, device=device)
    if where.shape[0] != int(before.sum()):
        raise ValueError(f"Runs: {where.shape[0]} placeholders for runs of {int(before.sum())} tokens")
    run = torch.repeat_interleave(torch.arange(len(runs.before), device=device), before)
    place = torch.arange(run.shape[0], device=device) - (before.cumsum(0) - before)[run]
    kept = place < after[run]
    carried = ((after.cumsum(0) - after)[run] + place)[kept]
    return where, kept, carried


def mean_positions(positions: torch.Tensor, ids: torch.Tensor, runs: Runs) -> torch.Tensor:
    """``positions`` ``(R, B, L)`` of the prompt as given, with each run's first ``after[i]``
    placeholders carrying its merged tokens' positions (the size-weighted mean of the positions
    of the placeholders each holds, rounded per row); every other token as it was. Before
    :func:`~tome.adapters.common.vlm.shorten_prompts` drops the other placeholders."""
    R, B, L = positions.shape
    if not runs.before:
        return positions
    where, kept, carried = _slots(ids.to(positions.device), runs)
    exact = torch.float32 if positions.device.type == "mps" else torch.float64  # MPS: no float64
    values = positions.reshape(R, B * L)[:, where].to(exact)
    index = runs.index.to(positions.device)
    total = int(runs.sizes.shape[0])
    sums = torch.zeros(R, total, dtype=exact, device=positions.device).index_add_(1, index, values)
    means = torch.round(sums / torch.bincount(index, minlength=total).to(exact)).to(positions.dtype)
    out = positions.reshape(R, B * L).clone()
    out[:, where[kept]] = means[:, carried]
    return out.reshape(R, B, L)


def key_bias(ids: torch.Tensor, runs: Runs) -> torch.Tensor:
    """``(B, L)`` float32: ``log(size)`` of the merged token each kept placeholder carries, 0
    everywhere else: the key bias of proportional attention, in the layout of the prompt as given."""
    B, L = ids.shape
    out = torch.zeros(B * L, dtype=torch.float32, device=ids.device)
    if runs.before:
        where, kept, carried = _slots(ids, runs)
        out[where[kept]] = runs.sizes.to(ids.device)[carried].log()
    return out.reshape(B, L)


def rewrite_prompt(
    model: nn.Module,
    ids: torch.Tensor,
    kwargs: dict,
    merged: Sequence[tuple[Runs, str, object]],
    original: torch.Tensor,
    generating: bool,
    prop_attn: bool,
    drop: Sequence[str] = ("pixel_values", "pixel_values_videos"),
) -> tuple[dict, int] | None:
    """``kwargs`` rewritten for the merged prompt: ``merged`` holds, per modality, its
    :class:`Runs`, its ``mm_encoder_outputs`` key (``"image"`` / ``"video"``) and the model's
    encoder output holding the merged features; ``original``: :func:`original_positions`.
    ``input_ids`` and the per-token inputs shortened, ``position_ids`` of the shortened prompt
    (with the text row first in ``generate()``, as it builds them), the key bias under
    :data:`~tome.adapters.common.vlm.BIAS` (``prop_attn``), the pixels in ``drop`` replaced by
    ``mm_encoder_outputs``; and the new width. ``None``: nothing merged, or the placeholders do
    not match (the model raises its own error)."""
    if not any(runs.merges() for runs, _, _ in merged):
        return None
    mask = kwargs.get("attention_mask")
    given = kwargs.get("position_ids")
    positions = original
    bias = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
    for runs, _, _ in merged:
        if runs.merges():
            positions = mean_positions(positions, ids, runs)
            if prop_attn:
                bias = bias + key_bias(ids, runs)
    extra = {
        name: kwargs[name]
        for name in PER_TOKEN
        if isinstance(kwargs.get(name), torch.Tensor) and kwargs[name].shape == ids.shape
    }
    extra.update({f"_position_{row}": positions[row] for row in range(3)})
    if prop_attn:
        extra[BIAS] = bias
    pad = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
    pad = pad if isinstance(pad, int) else 0
    # One modality at a time: each shortening keeps the other's placeholders as they are.
    tensors, new_mask, width = {"input_ids": ids, **extra}, mask, ids.shape[1]
    for runs, _, _ in merged:
        if not runs.merges():
            continue
        rest = {k: v for k, v in tensors.items() if k not in ("input_ids", "attention_mask")}
        shortened = shorten_prompts(
            tensors["input_ids"], new_mask, runs.placeholder, runs.before, runs.after, rest, pad_id=pad
        )
        if shortened is None:
            return None
        tensors = dict(shortened.tensors)
        new_mask, width = tensors.get("attention_mask"), shortened.width
    rope = torch.stack([tensors.pop(f"_position_{row}") for row in range(3)])
    real = torch.ones_like(tensors["input_ids"]) if new_mask is None else new_mask.long()
    text = (real.cumsum(-1) - 1).masked_fill(real == 0, 0)  # what generate() numbers the tokens
    # A continuation without position_ids (the model's rope_deltas) goes on from the original
    # prompt's last position: delta = its max + 1 - the shortened row's real tokens.
    old_real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    highest = original.masked_fill(~old_real[None], 0).amax(dim=(0, 2))
    model.model.rope_deltas = (highest + 1 - real.sum(-1))[:, None]
    if generating or (isinstance(given, torch.Tensor) and given.dim() == 3 and given.shape[0] == 4):
        # generate(): the text row first (the causal mask is built from it), as generate() builds them
        tensors["position_ids"] = torch.cat([text[None], rope])
    else:
        tensors["position_ids"] = rope
    skip = {*drop, "input_ids", "inputs"}
    rewritten = {k: v for k, v in kwargs.items() if k not in skip}
    rewritten.update(tensors)
    rewritten["mm_encoder_outputs"] = {name: out for _, name, out in merged}
    return rewritten, width
