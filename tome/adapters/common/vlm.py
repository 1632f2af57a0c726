"""Reduce once, before the decoder: what every vision-language adapter shares.

A vision-language model turns each image into ``n`` visual tokens (vision tower, projector) and
writes them into ``n`` placeholder tokens of the prompt (``input_ids == image_token_id``) before
the language model reads the prompt. Merging them once, between the two, shortens the sequence
the language model reads: the prefill does less work and the KV cache holds fewer tokens, for
every layer and every step of ``generate()``. Three pure pieces, no ``nn.Module``:

- :func:`kept_tokens`: how many tokens an image of ``n`` tokens keeps (``visual_tokens`` /
  ``visual_ratio``);
- :func:`reduce_images`: each image's features ``(n_i, D)`` merged down to its ``k_i`` tokens
  with tome's own core (bipartite soft matching, size-weighted means), repeated until ``k_i``
  is reached, since one step can remove at most half the tokens. An image's result depends on
  that image alone: images of one size are matched as one batch, each by its own similarities;
- :func:`shorten_prompts`: the prompt rewritten to match: each image's run of placeholders
  keeps ``k_i`` of its ``n_i`` tokens, every per-token input (``attention_mask``, ``labels``,
  ...) loses the same positions, and the rows are padded again to the longest, on the side the
  batch was padded on (left when it had none: the decoder convention for ``generate()``).

The language model then numbers the shorter sequence consecutively (its positions come from
the cache length), so text after an image sits ``n - k`` positions earlier than it would have:
the language model sees an image of ``k`` tokens, as if the vision side had produced that many.

>>> feats = [torch.randn(16, 8), torch.randn(16, 8)]
>>> [f.shape[0] for f in reduce_images(feats, visual_tokens=4, visual_ratio=None)]
[4, 4]
>>> ids = torch.tensor([[5, 9, 9, 9, 9, 6]])  # one image of 4 tokens (placeholder 9)
>>> shorten_prompts(ids, None, 9, [4], [2], {}, pad_id=0).tensors["input_ids"].tolist()
[[5, 9, 9, 6]]
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from tome.core import merge as M
from tome.runtime.base import PatchHandle
from tome.runtime.options import Option, flag

__all__ = [
    "BIAS",
    "VISUAL_DEFAULTS",
    "Shortened",
    "VisualHandle",
    "biased_mask",
    "forward_done",
    "forward_reduced",
    "generate_reduced",
    "install_prop_attn",
    "kept_tokens",
    "merged_positions",
    "prop_attn_pre_hook",
    "reduce_features",
    "reduce_images",
    "reduce_images_tracked",
    "shorten_prompts",
    "size_bias",
    "sliding_prop_attn_pre_hook",
]


def kept_tokens(num_tokens: int, visual_tokens: int | None, visual_ratio: float | None) -> int:
    """Tokens an image of ``num_tokens`` keeps: at most ``visual_tokens``, or all but
    ``floor(visual_ratio * num_tokens)`` (never fewer than 1); all of them when neither is set.

    >>> kept_tokens(576, 64, None), kept_tokens(576, None, 0.75), kept_tokens(10, 64, None)
    (64, 144, 10)
    """
    if visual_tokens is not None:
        return min(num_tokens, visual_tokens)
    if visual_ratio is not None:
        return max(1, num_tokens - int(num_tokens * visual_ratio + 1e-9))
    return num_tokens


def reduce_features(
    features: torch.Tensor, keep: int, protected: int = 0
) -> tuple[torch.Tensor, M.MergeHistory]:
    """``(I, n, D)`` -> ``(I, keep, D)`` and the merge history (which original tokens each
    merged token holds, and how many): every image's tokens merged down to ``keep`` by
    bipartite soft matching on their own cosine similarities, each merged token the
    size-weighted mean of the original tokens it holds (exact through the repeated steps).

    One matching step removes at most half the tokens, so ``576 -> 64`` takes four steps
    (288, 144, 72, 64), each matching the tokens the previous one left. Merged tokens keep the
    order of the tokens they merged into (raster order, for the 1-D positions that follow).
    The first ``protected`` tokens (a class token the model passes on) never merge, so at
    least ``protected + 1`` tokens remain.
    """
    images, n = features.shape[:2]
    history = M.start_history(images, n, features.device)
    x = features
    keep = max(keep, protected + 1)
    while x.shape[1] > keep:
        r = min(x.shape[1] - keep, M.max_r(x.shape[1], protected))
        # The features themselves are the similarity: what the language model will read.
        plan = M.bipartite_soft_matching(x, r, history, protected)
        x = M.merge(plan, x, "mean")
        history = M.advance(history, plan)
    return x, history


def reduce_images(
    features: Sequence[torch.Tensor],
    visual_tokens: int | None,
    visual_ratio: float | None,
    protected: int = 0,
) -> list[torch.Tensor]:
    """Each image's features ``(n_i, D)`` merged down to :func:`kept_tokens` of ``n_i`` (the
    first ``protected`` of them never merge); images of one size go through
    :func:`reduce_features` together (one loop step per distinct size, never per token); each
    image's result depends on that image alone."""
    groups: dict[int, list[int]] = {}
    for index, image in enumerate(features):
        groups.setdefault(image.shape[0], []).append(index)
    out: list[torch.Tensor] = list(features)
    for n, members in groups.items():
        keep = max(kept_tokens(n, visual_tokens, visual_ratio), protected + 1)
        if keep >= n:
            continue
        merged, _ = reduce_features(torch.stack([features[i] for i in members]), keep, protected)
        for row, index in enumerate(members):
            out[index] = merged[row]
    return out


@dataclass(frozen=True)
class Shortened:
    """A prompt batch rewritten by :func:`shorten_prompts`.

    Attributes:
        tensors: the rewritten per-token tensors, ``(B, width)`` each, by name
            (``"input_ids"``, ``"attention_mask"`` and the extras given).
        width: the new sequence length.
    """

    tensors: dict[str, torch.Tensor]
    width: int


# What new padding positions hold, per input name (input_ids: the pad id given)
_FILLS = {"attention_mask": 0, "labels": -100, "position_ids": 0, "token_type_ids": 0}


def shorten_prompts(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    placeholder: int,
    before: Sequence[int],
    after: Sequence[int],
    extra: Mapping[str, torch.Tensor],
    *,
    pad_id: int,
) -> Shortened | None:
    """Rewrite a prompt batch so that image ``i`` has ``after[i]`` placeholders, not ``before[i]``.

    Images are numbered in the order their placeholders come in the batch, row by row (the order
    in which the models write the features in). Image ``i``'s first ``after[i]`` placeholders
    stay, the others go, from ``input_ids`` and, position for position, from
    ``attention_mask`` and every ``extra`` ``(B, L)`` tensor (``labels``, ...). Padding is
    dropped and the rows padded again to the longest (``pad_id``; ``labels``: -100; others: 0),
    on the side the batch was padded on, left when it had none. A mask is made when the rows
    end up of different lengths and none was given.

    Returns ``None`` when the placeholders do not add up to ``sum(before)``: the caller then runs
    the model unchanged, so that the model raises its own error.
    """
    B, L = input_ids.shape
    device = input_ids.device
    is_image = input_ids == placeholder
    before_t = torch.as_tensor(list(before), dtype=torch.long, device=device)
    after_t = torch.as_tensor(list(after), dtype=torch.long, device=device)
    if int(is_image.sum()) != int(before_t.sum()):  # one host sync per call, not per token
        return None
    ends = before_t.cumsum(0)
    # The batch-wide number of every placeholder, row by row: its image and its place in it.
    number = is_image.reshape(-1).long().cumsum(0).reshape(B, L) - 1
    image = torch.searchsorted(ends, number.clamp_min(0), right=True).clamp_max(len(before) - 1)
    place = number - (ends - before_t)[image]
    real = torch.ones_like(is_image) if attention_mask is None else attention_mask.bool()
    keep = real & (~is_image | (place < after_t[image]))
    lengths = keep.sum(1)
    width = int(lengths.max())
    # Right padding only if the batch clearly had it (some row ends with padding, none starts
    # with it); otherwise left, as generate() wants.
    right = attention_mask is not None and bool((~real[:, -1]).any() & real[:, 0].all())
    rank = keep.long().cumsum(1) - 1
    if not right:
        rank = rank + (width - lengths)[:, None]
    # Dropped positions are written to a spare column at the end, which is cut off.
    target = torch.where(keep, rank, width)

    def rewrite(tensor: torch.Tensor, fill: int) -> torch.Tensor:
        out = torch.full((B, width + 1), fill, dtype=tensor.dtype, device=tensor.device)
        return out.scatter(1, target.to(tensor.device), tensor)[:, :width]

    tensors = {"input_ids": rewrite(input_ids, pad_id)}
    if attention_mask is not None:
        tensors["attention_mask"] = rewrite(attention_mask, 0)
    elif bool((lengths != width).any()):
        tensors["attention_mask"] = rewrite(torch.ones_like(input_ids), 0)
    for name, tensor in extra.items():
        tensors[name] = rewrite(tensor, _FILLS.get(name, 0))
    return Shortened(tensors, width)


def reduce_images_tracked(
    features: Sequence[torch.Tensor],
    visual_tokens: int | None,
    visual_ratio: float | None,
    protected: int = 0,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """As :func:`reduce_images`, and each image's source map too: ``(n_i,)`` int64, the index
    of the merged token (``0 .. k_i - 1``) that holds each of the image's original tokens (the
    identity for an image left as it was). What :func:`merged_positions` needs.

    >>> merged, sources = reduce_images_tracked([torch.randn(8, 4)], 2, None)
    >>> merged[0].shape, sources[0].shape, sorted(set(sources[0].tolist()))
    (torch.Size([2, 4]), torch.Size([8]), [0, 1])
    """
    groups: dict[int, list[int]] = {}
    for index, image in enumerate(features):
        groups.setdefault(image.shape[0], []).append(index)
    out: list[torch.Tensor] = list(features)
    sources = [torch.arange(image.shape[0], device=image.device) for image in features]
    for n, members in groups.items():
        keep = max(kept_tokens(n, visual_tokens, visual_ratio), protected + 1)
        if keep >= n:
            continue
        merged, history = reduce_features(torch.stack([features[i] for i in members]), keep, protected)
        for row, index in enumerate(members):
            out[index] = merged[row]
            sources[index] = history.source[row]
    return out, sources


def merged_positions(
    positions: torch.Tensor,
    input_ids: torch.Tensor,
    placeholder: int,
    sources: Sequence[torch.Tensor],
    after: Sequence[int],
) -> torch.Tensor:
    """Positions for a prompt whose images were merged, before :func:`shorten_prompts` drops
    the placeholders: ``positions`` ``(R, B, L)`` (e.g. M-RoPE's ``(t, h, w)`` rows) of the
    prompt as given; image ``i``'s ``j``-th placeholder gets the position of its merged token
    ``j``: the size-weighted mean of the positions of the original tokens it holds (rounded to
    the nearest integer, per row), so that its first ``after[i]`` placeholders, the ones
    :func:`shorten_prompts` keeps, carry its merged tokens' positions. Every other token keeps
    its position (text after an image included).

    Images are numbered as in :func:`shorten_prompts` (in the order their placeholders come,
    row by row); ``sources[i]`` is image ``i``'s source map and ``after[i]`` its number of
    merged tokens (:func:`reduce_images_tracked`).

    >>> ids = torch.tensor([[5, 9, 9, 9, 9, 6]])
    >>> pos = torch.tensor([[[0, 1, 2, 3, 4, 9]]])
    >>> merged_positions(pos, ids, 9, [torch.tensor([0, 1, 0, 1])], [2]).tolist()  # (1+3)/2, (2+4)/2
    [[[0, 2, 3, 3, 4, 9]]]
    """
    R, B, L = positions.shape
    if not sources:
        return positions
    device = positions.device
    is_image = (input_ids == placeholder).reshape(-1).to(device)
    before_t = torch.tensor([s.shape[0] for s in sources], dtype=torch.long, device=device)
    after_t = torch.as_tensor(list(after), dtype=torch.long, device=device)
    # one entry per placeholder, in batch order: its image, its place in it, its merged token
    image = torch.repeat_interleave(torch.arange(len(sources), device=device), before_t)
    place = torch.arange(image.shape[0], device=device) - (before_t.cumsum(0) - before_t)[image]
    first = (after_t.cumsum(0) - after_t)[image]  # the image's first merged token, batch-wide
    group = first + torch.cat([s.to(device) for s in sources])
    where = is_image.nonzero().squeeze(1)  # one host sync per call
    if where.shape[0] != image.shape[0]:
        raise ValueError(
            f"merged_positions: {where.shape[0]} placeholders for images of {image.shape[0]} tokens"
        )
    exact = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
    values = positions.reshape(R, B * L)[:, where].to(exact)
    total = int(sum(after))
    sums = torch.zeros(R, total, dtype=exact, device=device).index_add_(1, group, values)
    means = torch.round(sums / torch.bincount(group, minlength=total).to(exact)).to(positions.dtype)
    # the j-th placeholder of image i takes merged token j of image i (j < after[i])
    slot = place < after_t[image]
    out = positions.reshape(R, B * L).clone()
    out[:, where[slot]] = means[:, (first + place)[slot]]
    return out.reshape(R, B, L)


def size_bias(
    input_ids: torch.Tensor, placeholder: int, sources: Sequence[torch.Tensor], after: Sequence[int]
) -> torch.Tensor:
    """``(B, L)`` float32: ``log(size)`` of merged token ``j`` of image ``i`` at image ``i``'s
    ``j``-th placeholder (the ones :func:`shorten_prompts` keeps), 0 everywhere else: the key
    bias of proportional attention, in the layout of the prompt as given (images numbered as in
    :func:`shorten_prompts`; ``sources`` and ``after`` from :func:`reduce_images_tracked`).

    >>> ids = torch.tensor([[5, 9, 9, 9, 9, 6]])
    >>> size_bias(ids, 9, [torch.tensor([0, 0, 0, 1])], [2]).exp().round().tolist()
    [[1.0, 3.0, 1.0, 1.0, 1.0, 1.0]]
    """
    B, L = input_ids.shape
    device = input_ids.device
    out = torch.zeros(B * L, dtype=torch.float32, device=device)
    if not sources:
        return out.reshape(B, L)
    where = (input_ids == placeholder).reshape(-1).nonzero().squeeze(1)
    logs = []
    for source, k in zip(sources, after, strict=True):
        sizes = torch.bincount(source.to(device), minlength=source.shape[0]).to(torch.float32)
        sizes[k:] = 1.0  # the placeholders shorten_prompts drops
        logs.append(sizes.log())
    values = torch.cat(logs)
    if where.shape[0] != values.shape[0]:
        raise ValueError(f"size_bias: {where.shape[0]} placeholders for images of {values.shape[0]} tokens")
    out[where] = values
    return out.reshape(B, L)


# -- the handle of vision-language models ---------------------------------------------------------

# visual_ratio=0.75: LLaVA-1.5's 576 tokens -> 144. Not measured on a trained model (none is
# reachable offline): the middle of the published range of training-free reductions (VisionZip
# keeps 192 / 128 / 64 of 576, i.e. 67-89% removed, at ~98-94% of the accuracy) and a ratio, so
# that it means the same for any image size.
VISUAL_DEFAULTS = {"visual_tokens": None, "visual_ratio": 0.75}


def _visual_tokens(name: str, value: object) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name}: expected an int >= 1 (tokens per image) or None, got {value!r}")
    return value


def _visual_ratio(name: str, value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise ValueError(
            f"{name}: expected a number in [0, 1) (the fraction of each image's tokens merged away) "
            f"or None, got {value!r}"
        )
    return float(value)


class _OneOfTwo(Option):
    """An option of a pair of which one is active: setting it to a value (not ``None``) sets
    the other one to ``None``, so the latest one set is the one that counts."""

    def __init__(self, default: object, check, doc: str, *, other: str) -> None:
        super().__init__(default, check, doc)
        self.other = other

    def __set__(self, obj, value) -> None:
        super().__set__(obj, value)
        if value is not None:
            obj.__dict__["_" + self.other] = None


class _CallSlot(threading.local):
    """The key bias of the call running in this thread (proportional attention)."""

    bias: torch.Tensor | None = None  # (B, prompt length): log(size), 0 for the other tokens
    generating: bool = False  # inside generate(): its forward calls leave the bias alone
    # The biased mask of the latest forward step and what it was made from: every layer of one
    # step gets the same mask, so it is built once a step, not once a layer.
    made_from: tuple = ()
    mask: torch.Tensor | None = None


class VisualHandle(PatchHandle):
    """``model.tome`` of a patched vision-language model: how far each image is reduced.

    Attributes:
        visual_tokens: each image reaches the language model as at most this many tokens
            (``None``: :attr:`visual_ratio` decides).
        visual_ratio: the fraction of each image's tokens merged away (``0 <= visual_ratio < 1``;
            ``None``: :attr:`visual_tokens` decides).
        visual_prop_attn: proportional attention in the language model: every attention layer
            adds ``log(size)`` of each merged visual token (the number of original tokens it
            holds) to its keys' logits, in the prefill and in every decode step, so that a merged
            token draws the attention its tokens together would have (``True``, the default);
            text and new tokens get 0. Eager and SDPA attention only.

    Of ``visual_tokens`` and ``visual_ratio`` one is active: setting one (to a value) sets the other to ``None``. Both
    ``None``: nothing merges.
    """

    _transient = ("_slot",)

    visual_tokens = _OneOfTwo(
        VISUAL_DEFAULTS["visual_tokens"],
        _visual_tokens,
        "each image reaches the language model as at most this many tokens",
        other="visual_ratio",
    )
    visual_ratio = _OneOfTwo(
        VISUAL_DEFAULTS["visual_ratio"],
        _visual_ratio,
        "the fraction of each image's visual tokens merged away before the language model",
        other="visual_tokens",
    )
    # True: docs/vlm.md's fidelity proxy (held out, tome's read-out loss ~3x lower with it).
    visual_prop_attn = Option(
        True,
        flag,
        "proportional attention in the language model: log(size) of each merged visual token "
        "added to its keys' attention logits",
    )

    def _init_transient(self) -> None:
        super()._init_transient()
        self._slot = _CallSlot()

    def __init__(self, **options: object) -> None:
        tokens, ratio = options.get("visual_tokens"), options.get("visual_ratio")
        if tokens is not None and ratio is not None:
            raise ValueError(
                f"visual_tokens and visual_ratio: give one, not both (got visual_tokens={tokens!r}, "
                f"visual_ratio={ratio!r})"
            )
        if tokens is not None:
            options["visual_ratio"] = None  # else the default ratio would be set after it
        super().__init__(0, **options)  # no blocks: one merge, before the language model

    @property
    def r(self) -> None:
        """A vision-language model merges by :attr:`visual_tokens` / :attr:`visual_ratio`; ``r``
        is always ``None``."""
        return None

    @r.setter
    def r(self, value) -> None:
        if value is not None:
            raise TypeError(
                f"r: a vision-language model merges each image's tokens once, before the language "
                f"model; set model.tome.visual_tokens or model.tome.visual_ratio (got r={value!r})"
            )

    @property
    def ratio(self) -> None:
        """Always ``None``: see :attr:`visual_ratio`."""
        return None

    @ratio.setter
    def ratio(self, value) -> None:
        if value is not None:
            raise TypeError(
                f"ratio: a vision-language model merges each image's tokens once, before the "
                f"language model; set model.tome.visual_ratio (got ratio={value!r})"
            )

    def merges(self) -> bool:
        """Whether the settings merge anything at all."""
        return self.visual_tokens is not None or bool(self.visual_ratio)

    def unmerge(self, tokens: torch.Tensor) -> torch.Tensor:
        raise TypeError(
            "tome: a patched vision-language model merges each image once, before the language "
            "model; there is nothing to unmerge"
        )

    def __repr__(self) -> str:
        return (
            f"VisualHandle(family={self.family!r}, visual_tokens={self.visual_tokens!r}, "
            f"visual_ratio={self.visual_ratio!r}, visual_prop_attn={self.visual_prop_attn!r})"
        )


# -- what the installed generate() and forward pre-hook of every family share -----------------------

Reduce = Callable[[torch.Tensor, dict], "tuple[dict, int] | None"]

# The key under which a reduce function returns the key bias of proportional attention, (B, width)
# float32, with the rewritten keyword arguments (taken out before the model sees them).
BIAS = "_tome_size_bias"


def generate_reduced(
    model: nn.Module, args: tuple, kwargs: dict, reduce: Reduce, handle: VisualHandle | None = None
):
    """The model's own ``generate(*args, **kwargs)`` on the reduced prompt: ``reduce(ids,
    kwargs)`` gives the rewritten keyword arguments and the shortened prompt's width (or
    ``None``: run unchanged). The returned sequences start with the prompt exactly as given,
    then the new tokens (beam search and ``num_return_sequences`` repeat each prompt, in order);
    ``max_length`` / ``min_length`` count the prompt as given. With ``handle`` and its
    ``visual_prop_attn``, the key bias the reduce function returned (under ``BIAS``) is the
    call's for its duration (:func:`install_prop_attn`)."""
    # generate(inputs=None, ...): the prompt comes positionally, as inputs= or as input_ids=.
    ids = args[0] if args else kwargs.get("inputs", kwargs.get("input_ids"))
    with torch.no_grad():  # as generate() itself encodes the images
        reduced = reduce(ids, kwargs)
    if reduced is None:
        return _generate_with_bias(model, handle, None, args, kwargs)
    rewritten, width = reduced
    bias = rewritten.pop(BIAS, None)
    for name in ("max_length", "min_length"):
        if isinstance(rewritten.get(name), int):
            rewritten[name] -= ids.shape[1] - width
    if args:  # the shortened prompt where the prompt was
        args = (rewritten.pop("input_ids"), *args[1:])
    out = _generate_with_bias(model, handle, bias, args, rewritten)
    sequences = out if isinstance(out, torch.Tensor) else out.sequences
    prompt = ids.to(sequences.device).repeat_interleave(sequences.shape[0] // ids.shape[0], dim=0)
    sequences = torch.cat([prompt, sequences[:, width:]], dim=1)
    if isinstance(out, torch.Tensor):
        return sequences
    out.sequences = sequences
    return out


def _generate_with_bias(model, handle, bias, args, kwargs):
    if handle is None:
        return type(model).generate(model, *args, **kwargs)
    slot = handle._slot
    saved = slot.bias, slot.generating
    slot.bias = bias if handle.visual_prop_attn else None
    slot.generating = True
    try:
        return type(model).generate(model, *args, **kwargs)
    finally:
        slot.bias, slot.generating = saved
        slot.made_from, slot.mask = (), None  # hold no mask past the call


def forward_reduced(
    model: nn.Module, args: tuple, kwargs: dict, reduce: Reduce, handle: VisualHandle | None = None
) -> tuple | None:
    """What a forward pre-hook (with keyword arguments) returns for ``model(*args, **kwargs)``:
    ``None`` (run unchanged) or ``((), rewritten keyword arguments)``. With ``handle``, a call
    from outside ``generate()`` sets the call's key bias (``None`` when nothing merged); the
    forward hook :func:`forward_done` clears it."""
    slot = handle._slot if handle is not None else None
    top = slot is not None and not slot.generating
    if top:
        slot.bias = None  # a call of its own: no bias left from an earlier one
    if kwargs.get("pixel_values") is None and kwargs.get("pixel_values_videos") is None and len(args) < 2:
        return None  # the common case (every decode step): nothing to look at
    if args:  # positional arguments, by the class's own signature
        bound = inspect.signature(type(model).forward).bind(model, *args, **kwargs)
        named = dict(bound.arguments)
        named.pop(next(iter(named)))  # self
        kwargs = {**named.pop("kwargs", {}), **named}
    reduced = reduce(kwargs.get("input_ids"), kwargs)
    if reduced is None:
        return None
    rewritten = reduced[0]
    bias = rewritten.pop(BIAS, None)
    if top and handle.visual_prop_attn:
        slot.bias = bias
    return (), rewritten


def forward_done(handle: VisualHandle, model: nn.Module, args: tuple, output: object) -> None:
    """The forward hook paired with :func:`forward_reduced`: a call from outside ``generate()``
    leaves no bias behind."""
    slot = handle._slot
    if not slot.generating:
        slot.bias = None
        slot.made_from, slot.mask = (), None


# -- proportional attention in the language model ---------------------------------------------------


def install_prop_attn(handle: VisualHandle, language_model: nn.Module) -> None:
    """A forward pre-hook on the self-attention of every decoder layer of ``language_model``
    (``language_model.layers[i].self_attn``, as Llama and Qwen2 have them): while a call's key
    bias is set, the ``attention_mask`` the attention receives becomes a float additive mask
    ``(B, 1, Q, K)`` with the bias added on the first ``prompt length`` key columns (the merged
    visual tokens' ``log(size)``; 0 for the others and for every generated token, whose keys come
    after the prompt). Without a mask the mask it stands for is built (SDPA: causal; eager: none).
    Eager and SDPA attention only (they take any float mask). A sliding-window layer (its
    attention has an int ``sliding_window``: Gemma 3, Mistral, Qwen2's sliding layers) gets
    :func:`sliding_prop_attn_pre_hook`, which follows the keys its cache drops."""
    for layer in language_model.layers:
        attention = layer.self_attn
        sliding = isinstance(getattr(attention, "sliding_window", None), int)
        hook = sliding_prop_attn_pre_hook if sliding else prop_attn_pre_hook
        handle.install_pre_hook(attention, hook, handle)


def prop_attn_pre_hook(handle: VisualHandle, module: nn.Module, args: tuple, kwargs: dict):
    bias = handle._slot.bias
    if bias is None:
        return None
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    if not isinstance(hidden, torch.Tensor):
        return None
    implementation = getattr(getattr(module, "config", None), "_attn_implementation", "sdpa")
    if implementation not in ("eager", "sdpa"):
        raise NotImplementedError(
            f"tome: visual_prop_attn adds a bias to the attention mask, which {implementation!r} "
            "attention does not take; use attn_implementation='sdpa' or 'eager', or set "
            "model.tome.visual_prop_attn = False"
        )
    B, Q = hidden.shape[:2]
    if B % bias.shape[0]:
        return None  # not this call's batch
    given = kwargs.get("attention_mask")
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    length = getattr(cache, "get_seq_length", None)
    past = int(length(module.layer_idx)) if given is None and callable(length) else 0
    made_from = (bias, given, past, B, Q, hidden.dtype, hidden.device)
    slot = handle._slot
    if len(slot.made_from) != len(made_from) or any(
        a is not b if isinstance(a, torch.Tensor) else a != b
        for a, b in zip(slot.made_from, made_from, strict=True)
    ):
        slot.mask = biased_mask(bias, given, past, B, Q, hidden, implementation, module)
        slot.made_from = made_from
    return args, {**kwargs, "attention_mask": slot.mask}


def sliding_prop_attn_pre_hook(handle: VisualHandle, module: nn.Module, args: tuple, kwargs: dict):
    """The proportional-attention pre-hook of a sliding-window layer. While the layer's cache
    holds every key since the start (the prefill, and decode steps until ``sliding_window``
    tokens), its keys are the sequence's, column for column: the shared hook. Past that, the
    cache keeps the latest ``sliding_window - 1`` keys and the mask covers those and the new
    ones: the bias, in the layout of the whole sequence, is shifted by the keys the window
    dropped."""
    bias = handle._slot.bias
    if bias is None:
        return None
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    length = getattr(cache, "get_seq_length", None)
    past = int(length(module.layer_idx)) if callable(length) else 0
    window = getattr(module, "sliding_window", None)
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    given = kwargs.get("attention_mask")
    if not isinstance(window, int) or not isinstance(hidden, torch.Tensor):
        return prop_attn_pre_hook(handle, module, args, kwargs)
    B, Q = hidden.shape[:2]
    if isinstance(given, torch.Tensor):
        dropped = past + Q - given.shape[-1]  # the keys before the mask's first column
    else:
        # no mask: every key since the start is visible (transformers builds one once the
        # window binds); a cache past the window without one is not a layout to guess at
        dropped = 0 if past < window - 1 else -1
    if dropped == 0:
        return prop_attn_pre_hook(handle, module, args, kwargs)
    if dropped < 0 or B % bias.shape[0]:
        raise NotImplementedError(
            "tome: visual_prop_attn could not line its bias up with the keys of a sliding-window "
            f"layer (cache of {past} tokens, window {window}); set model.tome.visual_prop_attn = False"
        )
    implementation = getattr(getattr(module, "config", None), "_attn_implementation", "sdpa")
    if implementation not in ("eager", "sdpa"):
        return prop_attn_pre_hook(handle, module, args, kwargs)  # its clear error
    if dropped >= bias.shape[1]:
        return None  # the window has moved past the prompt: no merged key left in it
    mask = biased_mask(bias[:, dropped:], given, 0, B, Q, hidden, implementation, module)
    return args, {**kwargs, "attention_mask": mask}


def biased_mask(
    bias: torch.Tensor,
    mask: torch.Tensor | None,
    past: int,
    B: int,
    Q: int,
    hidden: torch.Tensor,
    implementation: str,
    module: nn.Module,
) -> torch.Tensor:
    """The float additive mask ``(B, 1, Q, K)`` an attention layer gets: ``mask`` (float, bool,
    or ``None``: what no mask means for ``implementation``) plus ``bias`` on the prompt's keys."""
    bias = bias.to(device=hidden.device).repeat_interleave(B // bias.shape[0], dim=0)  # beams
    dtype = hidden.dtype if hidden.is_floating_point() else torch.float32
    low = torch.finfo(dtype).min
    if mask is None:
        K = past + Q
        mask = torch.zeros(Q, K, dtype=dtype, device=hidden.device)
        # what no mask means: SDPA's causal fast path (several queries), eager's full attention
        if implementation == "sdpa" and Q > 1 and getattr(module, "is_causal", True):
            keys = torch.arange(K, device=hidden.device)
            queries = torch.arange(past, past + Q, device=hidden.device)
            mask = mask.masked_fill(keys[None, :] > queries[:, None], low)
        mask = mask[None, None].expand(B, 1, Q, K)
    elif mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, low)
    mask = mask.expand(B, *mask.shape[1:]).clone() if mask.shape[0] != B else mask.clone()
    width = min(bias.shape[1], mask.shape[-1])
    mask[..., :width] += bias[:, None, None, :width].to(mask.dtype)
    return mask
