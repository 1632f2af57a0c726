"""Dominant tokens kept whole, the rest merged: the ``visual_dominant`` option of vision-language
models (VisionZip's split, Yang et al., CVPR 2025, "VisionZip: Longer is Better but Not
Necessary in Vision Language Models").

An image's kept tokens are of two kinds:

- **dominant** tokens: the image tokens the vision tower's class token attends to most, at the
  layer whose output the model reads (LLaVA-1.5: ``vision_feature_layer=-2``), its attention
  averaged over heads (VisionZip's dominant set); each is passed on unchanged, size 1. A tower
  with no class token ranks the tokens by the mean attention they receive from all tokens;
- the other kept tokens: every remaining token merged down to them by tome's own core
  (bipartite soft matching on the features the language model reads, size-weighted means),
  their sizes tracked so that proportional attention weighs them.

Where VisionZip differs (its "contextual" tokens): it picks its targets uniformly among the
remaining tokens and merges every other remaining token into its most similar target by the
similarity of the vision layer's keys, in one step, before the projector; tome matches the
projected features it hands to the language model, pairwise, in repeated halving steps.

Pieces, no ``nn.Module`` kept:

- :func:`attention_received`: the class token's attention over the image tokens (or the mean
  attention each token receives), from an attention layer's input, as the layer computes it;
- :func:`recording_attention`: a temporary forward pre-hook that calls it during one forward
  (SDPA / FlashAttention stay on; the hook is gone when the ``with`` block ends);
- :func:`dominant_count`: how many of an image's kept tokens are dominant;
- :func:`reduce_images_dominant`: each image's features reduced that way, with the source maps
  and sizes; :func:`sizes_bias`: the key bias of proportional attention from those sizes;
- :class:`DominantVisualHandle`: :class:`~tome.adapters.common.vlm.VisualHandle` with the
  ``visual_dominant`` option.

>>> feats = [torch.randn(16, 8)]
>>> scores = [torch.arange(16.0)]  # the last tokens draw the most attention
>>> merged, sources, sizes = reduce_images_dominant(feats, scores, 6, None, 4)
>>> merged[0].shape, sizes[0].tolist()[-4:]  # the 4 dominant tokens: last, size 1
(torch.Size([6, 8]), [1.0, 1.0, 1.0, 1.0])
>>> torch.equal(merged[0][-4:], feats[0][-4:])
True
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence

import torch
import torch.nn as nn

from tome.adapters.common.vlm import VisualHandle, kept_tokens, reduce_features
from tome.runtime.options import Option

__all__ = [
    "DominantVisualHandle",
    "attention_received",
    "dominant_count",
    "recording_attention",
    "reduce_images_dominant",
    "sizes_bias",
]


# -- the attention the tokens receive ----------------------------------------------------------


def attention_received(
    hidden: torch.Tensor,
    q_proj: nn.Module,
    k_proj: nn.Module,
    num_heads: int,
    scale: float,
    has_cls: bool,
) -> torch.Tensor:
    """``(B, N)`` float32 -> ``(B, N - has_cls)``: how much attention each image token gets, at
    the layer whose input (the layer-normed hidden states its attention reads) is ``hidden``.

    With a class token (first): its attention row, ``softmax(q_cls k^T * scale)`` over all the
    keys (itself included, as the layer computes it), averaged over heads, its own column
    dropped: VisionZip's dominant-token score. Without: the mean over all queries of the
    attention each key receives, averaged over heads (the full ``N x N`` attention of one layer,
    computed once). No bias or mask: the vision towers this serves attend over all tokens.

    >>> q, k = nn.Linear(4, 4), nn.Linear(4, 4)
    >>> attention_received(torch.randn(2, 5, 4), q, k, 2, 0.5, True).shape
    torch.Size([2, 4])
    """
    B, N, _ = hidden.shape
    with torch.no_grad():  # a discrete choice: no gradient goes through it
        queries = q_proj(hidden[:, :1] if has_cls else hidden)
        keys = k_proj(hidden)
        # float32 scores whatever the tower's dtype: a ranking, near-ties matter
        queries = queries.float().reshape(B, queries.shape[1], num_heads, -1).transpose(1, 2)
        keys = keys.float().reshape(B, N, num_heads, -1).transpose(1, 2)
        weights = torch.softmax(queries @ keys.transpose(-1, -2) * scale, dim=-1)  # (B, H, Q, N)
        received = weights.mean(dim=(1, 2))  # over heads and queries
    return received[:, 1:] if has_cls else received


def _attention_shape(module: nn.Module) -> tuple[int, float]:
    """The number of heads and the logit scale of a vision attention module (CLIP, SigLIP and
    kin: ``q_proj``, ``k_proj``, ``num_heads``, ``head_dim``, ``scale``)."""
    heads = getattr(module, "num_heads", None)
    if heads is None:
        heads = getattr(getattr(module, "config", None), "num_attention_heads", None)
    head_dim = getattr(module, "head_dim", None)
    scale = getattr(module, "scale", getattr(module, "scaling", None))
    if scale is None and isinstance(head_dim, int):
        scale = head_dim**-0.5
    if not (
        isinstance(getattr(module, "q_proj", None), nn.Module)
        and isinstance(getattr(module, "k_proj", None), nn.Module)
        and isinstance(heads, int)
        and isinstance(scale, float | int)
    ):
        raise NotImplementedError(
            f"visual_dominant: reads the vision tower's attention from q_proj / k_proj and the "
            f"number of heads of its attention module; a {type(module).__name__} has not all of "
            f"them; set model.tome.visual_dominant = None"
        )
    return heads, float(scale)


@contextlib.contextmanager
def recording_attention(attention: nn.Module, has_cls: bool) -> Iterator[list[torch.Tensor]]:
    """``with recording_attention(layer.self_attn, has_cls) as seen:`` -- every forward of
    ``attention`` run by this thread inside the block appends :func:`attention_received` of its
    input to ``seen``. A forward pre-hook, removed when the block ends (nothing stays on the
    model: it deep-copies and pickles as before); the attention itself runs as it would (SDPA /
    FlashAttention stay on): the scores are computed beside it from the same input.

    >>> import transformers
    >>> tower = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(hidden_size=8,
    ...     intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=8, patch_size=4))
    >>> with recording_attention(tower.encoder.layers[0].self_attn, True) as seen:
    ...     _ = tower(torch.randn(3, 3, 8, 8))
    >>> seen[0].shape  # 3 images, 4 patches each (the class token's own column dropped)
    torch.Size([3, 4])
    """
    heads, scale = _attention_shape(attention)
    seen: list[torch.Tensor] = []
    thread = threading.get_ident()

    def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if threading.get_ident() != thread:
            return  # another call running the same model: not this one's
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if isinstance(hidden, torch.Tensor) and hidden.dim() == 3:
            seen.append(attention_received(hidden, module.q_proj, module.k_proj, heads, scale, has_cls))

    hook = attention.register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield seen
    finally:
        hook.remove()


# -- choosing and merging -----------------------------------------------------------------------


def dominant_count(dominant: int | float | None, kept: int) -> int:
    """How many of an image's ``kept`` (mergeable) tokens are dominant: ``dominant`` itself (an
    int, at most ``kept``), or ``floor(dominant * kept)`` (a float: a fraction of the kept
    tokens; VisionZip's LLaVA-1.5 settings 54 / 64, 108 / 128, 162 / 192 are all 0.84375);
    0 for ``None``.

    >>> dominant_count(54, 64), dominant_count(0.84375, 64), dominant_count(54, 40), dominant_count(None, 64)
    (54, 54, 40, 0)
    """
    if dominant is None:
        return 0
    if isinstance(dominant, float):
        return min(kept, int(dominant * kept + 1e-9))
    return min(kept, dominant)


def _reduce_group(
    features: torch.Tensor, scores: torch.Tensor, keep: int, dominant: int, protected: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(G, n, D)`` features of images of one size, ``(G, n - protected)`` scores -> ``(G, keep,
    D)`` features, ``(G, n)`` source maps (-1: dropped) and ``(G, keep)`` float32 sizes: the
    first ``protected`` tokens stay first, the ``dominant`` best-scored tokens stay whole, the
    other tokens are merged down to ``keep - protected - dominant`` (dropped if that is 0), and
    the kept tokens are put in the order of their (mean) original place."""
    G, n, D = features.shape
    device = features.device
    # VisionZip's dominant set: the top scores; ascending indices (raster order).
    chosen = scores.topk(dominant, dim=1).indices.sort(dim=1).values + protected  # (G, d)
    is_dominant = torch.zeros(G, n, dtype=torch.bool, device=device).scatter(1, chosen, True)
    is_rest = ~is_dominant
    is_rest[:, :protected] = False
    rest_n = n - protected - dominant
    place = torch.arange(n, device=device).expand(G, n)
    rest_place = place[is_rest].reshape(G, rest_n)
    rest = features[is_rest].reshape(G, rest_n, D)
    contextual = keep - protected - dominant
    if contextual > 0:
        merged, history = reduce_features(rest, contextual)
        rest_sizes = history.sizes.float()
        # each merged token's place: the mean of its tokens' places (exact: small integers)
        mean_place = torch.zeros(G, contextual, dtype=torch.float64, device=device)
        mean_place = mean_place.scatter_add(1, history.source, rest_place.double()) / rest_sizes.double()
        rest_source = history.source
    else:  # every kept token is dominant: the others are dropped (VisionZip without contextual tokens)
        merged = features.new_zeros(G, 0, D)
        rest_sizes = torch.zeros(G, 0, device=device)
        mean_place = torch.zeros(G, 0, dtype=torch.float64, device=device)
        rest_source = None
    front = place[:, :protected]
    out = torch.cat(
        [features[:, :protected], features.gather(1, chosen[..., None].expand(G, dominant, D)), merged], 1
    )
    sizes = torch.cat([torch.ones(G, protected + dominant, device=device), rest_sizes], 1)
    places = torch.cat([front.double(), chosen.double(), mean_place], 1)
    order = places.argsort(dim=1, stable=True)  # the protected tokens have the lowest places
    rank = order.argsort(dim=1)  # where each concatenated token goes
    # For every original token, the concatenated token that holds it (-1: dropped)
    element = torch.full((G, n), -1, dtype=torch.long, device=device)
    element[:, :protected] = front
    element = element.scatter(
        1, chosen, protected + torch.arange(dominant, device=device).expand(G, dominant)
    )
    if rest_source is not None:
        element[is_rest] = (protected + dominant + rest_source).reshape(-1)
    source = torch.where(element >= 0, rank.gather(1, element.clamp_min(0)), element)
    index = order[..., None].expand(G, keep, D)
    return out.gather(1, index), source, sizes.gather(1, order)


def reduce_images_dominant(
    features: Sequence[torch.Tensor],
    scores: Sequence[torch.Tensor],
    visual_tokens: int | None,
    visual_ratio: float | None,
    dominant: int | float | None,
    protected: int = 0,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Each image's features ``(n_i, D)`` reduced to :func:`~tome.adapters.common.vlm.kept_tokens`
    of ``n_i``, of which :func:`dominant_count` are its best-scored tokens (``scores[i]``,
    ``(n_i - protected,)``: the attention they receive, :func:`attention_received`), passed on
    whole; the other kept tokens merge the rest (tome's core, size-weighted means); the first
    ``protected`` tokens (a class token the model passes on) stay first, whole. Kept tokens are
    in the order of their original places (a merged token: the mean place of its tokens), so the
    1-D positions the language model gives them follow the raster order.

    Returns the reduced features, each image's source map ``(n_i,)`` int64 (the kept token that
    holds each original token; -1 for a token dropped, when every kept token is dominant) and its
    sizes ``(k_i,)`` float32 (1 for a dominant token). Images of one size are reduced together;
    each one's result depends on it alone.
    """
    if len(scores) != len(features):
        raise ValueError(f"scores: expected one per image ({len(features)}), got {len(scores)}")
    groups: dict[int, list[int]] = {}
    for index, image in enumerate(features):
        if scores[index].shape != (image.shape[0] - protected,):
            raise ValueError(
                f"scores: expected ({image.shape[0] - protected},) for image {index} of "
                f"{image.shape[0]} tokens ({protected} protected), got {tuple(scores[index].shape)}"
            )
        groups.setdefault(image.shape[0], []).append(index)
    out: list[torch.Tensor] = list(features)
    sources = [torch.arange(image.shape[0], device=image.device) for image in features]
    sizes = [torch.ones(image.shape[0], device=image.device) for image in features]
    for n, members in groups.items():
        keep = max(kept_tokens(n, visual_tokens, visual_ratio), protected + 1)
        if keep >= n:
            continue
        d = dominant_count(dominant, keep - protected)
        stacked = torch.stack([features[i] for i in members])
        if d == 0:
            merged, history = reduce_features(stacked, keep, protected)
            group_sources, group_sizes = history.source, history.sizes.float()
        else:
            group_scores = torch.stack([scores[i].to(stacked.device) for i in members])
            merged, group_sources, group_sizes = _reduce_group(stacked, group_scores, keep, d, protected)
        for row, index in enumerate(members):
            out[index] = merged[row]
            sources[index] = group_sources[row]
            sizes[index] = group_sizes[row]
    return out, sources, sizes


def sizes_bias(
    input_ids: torch.Tensor, placeholder: int, sizes: Sequence[torch.Tensor], before: Sequence[int]
) -> torch.Tensor:
    """``(B, L)`` float32: ``log(sizes[i][j])`` at image ``i``'s ``j``-th placeholder (``j <
    len(sizes[i])``: the ones :func:`~tome.adapters.common.vlm.shorten_prompts` keeps), 0
    everywhere else; images numbered in the order their placeholders come, row by row, image
    ``i`` having ``before[i]`` placeholders. As :func:`~tome.adapters.common.vlm.size_bias`,
    from the sizes (a source map cannot say that a token was dropped).

    >>> ids = torch.tensor([[5, 9, 9, 9, 9, 6]])
    >>> sizes_bias(ids, 9, [torch.tensor([2.0, 1.0])], [4]).exp().tolist()
    [[1.0, 2.0, 1.0, 1.0, 1.0, 1.0]]
    """
    B, L = input_ids.shape
    device = input_ids.device
    out = torch.zeros(B * L, dtype=torch.float32, device=device)
    if not sizes:
        return out.reshape(B, L)
    where = (input_ids == placeholder).reshape(-1).nonzero().squeeze(1)
    logs = []
    for size, n in zip(sizes, before, strict=True):
        log = torch.zeros(n, dtype=torch.float32, device=device)
        log[: size.shape[0]] = size.to(device=device, dtype=torch.float32).log()
        logs.append(log)
    values = torch.cat(logs)
    if where.shape[0] != values.shape[0]:
        raise ValueError(f"sizes_bias: {where.shape[0]} placeholders for images of {values.shape[0]} tokens")
    out[where] = values
    return out.reshape(B, L)


# -- the option ---------------------------------------------------------------------------------


def _visual_dominant(name: str, value: object) -> int | float | None:
    if value is None:
        return None
    number = not isinstance(value, bool) and isinstance(value, int | float)
    if not number or value < 0 or (isinstance(value, float) and value > 1):
        raise ValueError(
            f"{name}: expected an int >= 0 (dominant tokens per image), a number in [0, 1] (a "
            f"fraction of each image's kept tokens) or None, got {value!r}"
        )
    return value


# The options that must agree: the dominant tokens are among the kept ones.
_TOGETHER = ("visual_tokens", "visual_ratio", "visual_dominant")


class DominantVisualHandle(VisualHandle):
    """``model.tome`` of a vision-language model that can keep dominant tokens whole: the options
    of :class:`~tome.adapters.common.vlm.VisualHandle` and :attr:`visual_dominant`.

    Attributes:
        visual_dominant: how many of each image's kept tokens are its dominant tokens (VisionZip:
            the tokens the vision tower's class token attends to most, at the layer the model
            reads, averaged over heads), passed on whole, size 1; the other kept tokens merge the
            rest (tome's core). An int (at most ``visual_tokens`` when that is set; with
            ``visual_ratio``, capped at each image's kept tokens), or a float in ``[0, 1]``: that
            fraction of each image's kept tokens, rounded down (VisionZip's LLaVA-1.5 split:
            0.84375, e.g. 54 of 64). ``None`` (the default) or 0: plain merging. Off by default:
            nothing here can show that it helps on a trained model (no trained VLM is reachable
            offline).
    """

    visual_dominant = Option(
        None,
        _visual_dominant,
        "how many of each image's kept tokens are its dominant tokens (the vision tower's class "
        "token attends to them most), kept whole; the rest merge",
    )

    def __setattr__(self, name: str, value: object) -> None:
        if name not in _TOGETHER:
            super().__setattr__(name, value)
            return
        saved = {key: self.__dict__[key] for key in ("_" + n for n in _TOGETHER) if key in self.__dict__}
        super().__setattr__(name, value)
        dominant, tokens = self.visual_dominant, self.visual_tokens
        if isinstance(dominant, int) and tokens is not None and dominant > tokens:
            for key in ("_" + n for n in _TOGETHER):  # as it was: a refused setting changes nothing
                self.__dict__.pop(key, None)
            self.__dict__.update(saved)
            raise ValueError(
                f"visual_dominant and visual_tokens: the dominant tokens are among each image's kept "
                f"tokens, so visual_dominant must be <= visual_tokens (got visual_dominant={dominant!r}, "
                f"visual_tokens={tokens!r})"
            )

    def dominant(self) -> bool:
        """Whether the settings keep dominant tokens (and something merges)."""
        return self.merges() and bool(self.visual_dominant)

    def __repr__(self) -> str:
        return super().__repr__()[:-1].replace("VisualHandle(", "DominantVisualHandle(", 1) + (
            f", visual_dominant={self.visual_dominant!r})"
        )
