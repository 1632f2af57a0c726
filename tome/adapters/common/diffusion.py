"""What the diffusion adapters share (:mod:`tome.adapters.diffusers_unet`,
:mod:`tome.adapters.diffusers_dit`): tomesd's settings and their handle
(:class:`DiffusionHandle`), tomesd's matching, and the merge -> op -> unmerge forwards.

The pieces of one denoiser call reach each other through a per-thread slot
(:meth:`DiffusionHandle.slot`) that holds something only for the duration of that call: the
denoiser's call leaves its token grid (and its timestep, for the random choice) for the blocks
(:func:`run_denoiser`); a block's call leaves its merge for its ops (:func:`run_block`); each op
merges its input, runs and unmerges its output (:func:`op_forward`). The settings are never
written during a forward pass, so several threads can run one patched denoiser at once. A block
recomputed by gradient checkpointing (during backward, outside the denoiser's call) finds its
denoiser call from its input tensor (:class:`~tome.runtime.passes.TokenRegistry`, weak
references that live as long as the tensor) and merges exactly as it did the first time.

What the blocks merged in the latest call is public: :meth:`DiffusionHandle.merge_groups`
(``tome viz`` draws it).
"""

from __future__ import annotations

import math
import threading
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn

from tome.adapters.common.classes import library_class
from tome.core import merge as M
from tome.core.merge import MergePlan
from tome.core.merge2d import keep_prefix, random2d_matching
from tome.runtime.base import PatchHandle
from tome.runtime.options import Option, any_int, at_least, flag, one_of
from tome.runtime.passes import TokenRegistry

__all__ = [
    "BLOCKS",
    "DEFAULTS",
    "EXTRA_DEFAULTS",
    "OPS",
    "BlockGroups",
    "BlockMerge",
    "DenoiserCall",
    "DiffusionHandle",
    "block_forward",
    "block_key",
    "class_block_forward",
    "class_op_forward",
    "diffusers_class",
    "op_forward",
    "run_block",
    "run_denoiser",
    "transformer_blocks",
]

# tomesd's defaults (and meanings), ratio included.
DEFAULTS = {
    "ratio": 0.5,
    "max_downsample": 1,
    "sx": 2,
    "sy": 2,
    "use_rand": True,
    "merge_attn": True,
    "merge_crossattn": False,
    "merge_mlp": False,
    "seed": 0,
}
# tome's own options (not tomesd's): see DiffusionHandle
EXTRA_DEFAULTS = {
    "match_every": 1,
    "merge_queries": True,
}
# the ops of a BasicTransformerBlock and the setting that merges each
OPS = (("attn1", "merge_attn"), ("attn2", "merge_crossattn"), ("ff", "merge_mlp"))
_FLAGS = tuple(setting for _, setting in OPS)
# The transformer blocks of the diffusers denoisers tome merges (UNets: BasicTransformerBlock
# only): block class -> its ops and the setting that merges each ("rope": Flux's rotary
# attention, see tome.adapters.diffusers_dit).
BLOCKS: dict[str, tuple[tuple[str, str], ...]] = {
    "BasicTransformerBlock": tuple((op, op) for op, _ in OPS),  # by op name (see op_forward)
    "JointTransformerBlock": (("attn", "merge_attn"), ("attn2", "merge_attn"), ("ff", "merge_mlp")),
    "FluxTransformerBlock": (("attn", "rope"), ("ff", "merge_mlp")),
    "FluxSingleTransformerBlock": (("attn", "rope"), ("proj_mlp", "merge_mlp"), ("proj_out", "merge_mlp")),
}


_STRIDE = at_least(1, "the destination stride")


def _ratio(name: str, value: object) -> float:
    from tome.core.schedule import check_ratio

    return check_ratio(value)


# -- what the calls of one denoiser call leave each other -----------------------------------------


class _CallSlot(threading.local):
    """What the call running in this thread has left for the calls inside it."""

    call: DenoiserCall | None = None
    block: BlockMerge | None = None
    rope: tuple | None = None  # rotary tables of merged tokens, for Flux's q/k norms


class _TracedSlot:
    # torch.compile traces in one thread, and guards on thread-locals fail.
    call = None
    block = None
    rope = None


class DenoiserCall:
    """One call of the denoiser (a UNet or a DiT): its token grid at full resolution
    (``height x width``: the latent for a UNet, the patch grid for a DiT) and its timestep
    (a tensor stays on its device: randomness is keyed on it there)."""

    __slots__ = ("height", "plans", "shared", "timestep", "width")

    def __init__(self, height: int, width: int, timestep: object) -> None:
        self.height, self.width, self.timestep = height, width, timestep
        self.plans: dict[int, BlockMerge | None] = {}  # block index -> the merge it used
        self.shared: dict[int, list] = {}  # tokens -> [blocks that used it, the latest matching]


class BlockMerge:
    """One block call's merge: the plan, for inputs of ``(batch, tokens)``; ``text``: the
    number of leading (text) tokens the plan keeps as they are, in a joint sequence; ``grid``:
    the ``(h, w)`` grid of the block's image tokens."""

    __slots__ = ("batch", "grid", "plan", "text", "tokens")

    def __init__(
        self, plan: MergePlan, batch: int, tokens: int, text: int = 0, grid: tuple[int, int] = (0, 0)
    ) -> None:
        self.plan, self.batch, self.tokens, self.text, self.grid = plan, batch, tokens, text, grid


@dataclass(frozen=True)
class BlockGroups:
    """What one block merged in one denoiser call.

    Attributes:
        source: ``(B, h * w)`` int64: the merged position (group) of every image token of the
            block's grid, row-major.
        grid: ``(h, w)``: the block's grid of image tokens.
    """

    source: torch.Tensor
    grid: tuple[int, int]


_PRIME = 1_000_003


def block_key(seed: int, timestep: object, block: int) -> torch.Tensor:
    """The key of block ``block``'s random destinations in the denoiser call at ``timestep``
    (its first element when it is a batch of timesteps): ``(seed * P + round(1000 * t)) * P +
    block`` with ``P = 1_000_003``, an int64 tensor on the timestep's device (computed there:
    no host sync). Every step and every block gets its own destinations; the two halves of a
    classifier-free-guidance batch share them (one partition per batch).

    >>> block_key(0, torch.tensor(999), 3).item()
    999002997003
    """
    if isinstance(timestep, torch.Tensor) and timestep.numel():
        step = torch.round(timestep.detach().reshape(-1)[0].float() * 1000).long()
    else:
        step = torch.tensor(round(1000 * float(timestep or 0)), dtype=torch.long)
    return (seed * _PRIME + step) * _PRIME + block


# -- the handle -----------------------------------------------------------------------------------


class DiffusionHandle(PatchHandle):
    """``unet.tome`` (or ``transformer.tome``) of a patched diffusers denoiser: tomesd's settings,
    each settable. Each block merges and unmerges inside its own call (merge -> op -> unmerge),
    so there is no ``r`` schedule, nothing to unmerge after the model and no per-pass token
    results: what the blocks merged in the latest call is :meth:`merge_groups`.

    Attributes:
        ratio: the fraction of each merging block's tokens merged away (``0 <= ratio < 1``;
            at most ``1 - 1 / (sx * sy)`` can go: every cell keeps its destination).
        max_downsample: blocks at a downsampling of at most this (1, 2, 4 or 8) merge.
        sx, sy: the destination stride: one destination per ``sy x sx`` cell.
        use_rand: a random destination in each cell (else the top-left one); off for odd
            batches, as in tomesd (a batch without both CFG halves would merge each half
            its own way).
        merge_attn, merge_crossattn, merge_mlp: which ops run on merged tokens.
        seed: the seed of the random choice (see :func:`block_key`).
        match_every: tome's: ``k`` consecutive merging blocks of one resolution in a denoiser
            call share one matching (computed on the first one's input); 1 (tomesd): every
            block matches its own input.
        merge_queries: tome's: ``False`` merges only the keys and values of self-attention
            (ToDo-style, Smith et al. 2024): every token keeps its own query, so the
            attention's output needs no unmerge; ``BasicTransformerBlock`` self-attention
            only (UNets, PixArt, DiT), joint attention (SD3, Flux) always merges queries.
        blocks: the patched blocks' module names, in call order of a forward pass.
    """

    ratio = Option(DEFAULTS["ratio"], _ratio, "the fraction of each merging block's tokens merged away")
    max_downsample = Option(
        DEFAULTS["max_downsample"],
        one_of(1, 2, 4, 8, described="1, 2, 4, 8 (the largest downsampling merged)"),
        "blocks at a downsampling of at most this (1, 2, 4 or 8) merge",
    )
    sx = Option(DEFAULTS["sx"], _STRIDE, "the destination stride across: one destination per sy x sx cell")
    sy = Option(DEFAULTS["sy"], _STRIDE, "the destination stride down: one destination per sy x sx cell")
    use_rand = Option(DEFAULTS["use_rand"], flag, "a random destination in each cell (else the top-left one)")
    merge_attn = Option(DEFAULTS["merge_attn"], flag, "self-attention runs on merged tokens")
    merge_crossattn = Option(DEFAULTS["merge_crossattn"], flag, "cross-attention runs on merged tokens")
    merge_mlp = Option(DEFAULTS["merge_mlp"], flag, "the feed-forward runs on merged tokens")
    seed = Option(DEFAULTS["seed"], any_int, "the seed of the random destinations (see block_key)")
    match_every = Option(
        EXTRA_DEFAULTS["match_every"],
        at_least(1, "how many blocks of one resolution share a matching"),
        "k consecutive merging blocks of one resolution share one matching",
    )
    merge_queries = Option(
        EXTRA_DEFAULTS["merge_queries"],
        flag,
        "False: merge only self-attention's keys and values (ToDo-style)",
    )

    _transient = ("_slot", "_traced_slot", "_calls", "_grid_cache", "_latest")

    def __init__(self, blocks: list[str], **settings) -> None:
        # ratio is checked after the other options, as it always was
        ratio = settings.pop("ratio", None)
        super().__init__(len(blocks), **settings)
        if ratio is not None:
            self.ratio = ratio
        self.blocks = list(blocks)

    def _init_transient(self) -> None:
        super()._init_transient()
        self._slot = _CallSlot()
        self._traced_slot = _TracedSlot()
        self._calls = TokenRegistry()  # block input tensor -> its denoiser call (for recomputation)
        self._grid_cache: tuple | None = None  # Flux: (weakref to img_ids, its grid)
        self._latest: DenoiserCall | None = None  # the latest denoiser call that finished

    @property
    def r(self) -> None:
        """Diffusion models merge by :attr:`ratio`; ``r`` is always ``None``."""
        return None

    @r.setter
    def r(self, value) -> None:
        if value is not None and not (value == 0 and type(value) is int):
            raise TypeError(
                f"r: a diffusion model merges a ratio of every merging block's tokens (tomesd's "
                f"meaning); set model.tome.ratio instead of r (got r={value!r})"
            )

    def unmerge(self, tokens: torch.Tensor) -> torch.Tensor:
        """Nothing to unmerge: every block unmerges its own ops' outputs (an error that says
        so, for code written for token models)."""
        raise TypeError(
            "tome: a patched diffusion model unmerges inside every block (merge -> op -> unmerge); "
            "its outputs are already full length"
        )

    def slot(self) -> _CallSlot | _TracedSlot:
        """The per-thread slot of the calls running in this thread."""
        return self._traced_slot if torch.compiler.is_compiling() else self._slot

    def merges(self, op: str) -> bool:
        """Whether the op ``"attn1"``, ``"attn2"`` or ``"ff"`` (or the setting named ``op``:
        ``"merge_attn"``, ...) runs on merged tokens."""
        return getattr(self, op if op in _FLAGS else dict(OPS)[op])

    def merge_groups(self) -> dict[int, BlockGroups]:
        """What the blocks merged in the latest denoiser call that finished, in any thread:
        block index (into :attr:`blocks`) -> its :class:`BlockGroups`, for every block that
        merged (a UNet block below ``max_downsample`` or ``ratio`` 0 merges nothing): empty
        before the first call and after one that merged nothing. Calls that ``torch.compile`` /
        ``torch.export`` trace are not recorded; a copy starts with none."""
        call = self._latest
        if call is None:  # no call yet, or the latest had no grid (a Flux call without one)
            return {}
        return {
            index: BlockGroups(merge.plan.index, merge.grid)
            for index, merge in sorted(call.plans.items())
            if merge is not None
        }

    def plan(self, index: int, hidden: torch.Tensor, call: DenoiserCall | None) -> BlockMerge | None:
        """The merge of block ``index`` for its input ``hidden`` ``(B, N, C)`` in the denoiser
        call ``call`` (tomesd's rules), or ``None`` when it merges nothing."""
        if call is None or self.ratio == 0 or not any(getattr(self, setting) for setting in _FLAGS):
            return None
        if index in call.plans:  # recomputed by gradient checkpointing: the same merge
            return call.plans[index]
        N = hidden.shape[1]
        shared = call.shared.get(N)
        if self.match_every > 1 and shared is not None and shared[0] < self.match_every:
            # the matching of an earlier block of this resolution in this call
            shared[0] += 1
            call.plans[index] = shared[1]
            return shared[1]
        with self.merge_step(hidden):  # small ops: alone where that is faster (a busy machine)
            current = self._match(index, hidden, call)
        call.shared[N] = [1, current]
        call.plans[index] = current
        return current

    def _match(self, index: int, hidden: torch.Tensor, call: DenoiserCall) -> BlockMerge | None:
        B, N = hidden.shape[:2]
        original = call.height * call.width
        downsample = max(1, math.ceil(math.sqrt(original // max(N, 1))))
        if downsample > self.max_downsample:
            return None
        h, w = math.ceil(call.height / downsample), math.ceil(call.width / downsample)
        if h * w != N:
            warnings.warn(
                f"tome: block {self.blocks[index]} has {N} tokens for a {call.height} x {call.width} latent, "
                f"not the {h} x {w} grid of a {downsample}x downsampling; it does not merge",
                stacklevel=4,
            )
            return None
        r = int(N * self.ratio)
        key = None
        if self.use_rand and B % 2 == 0:
            key = block_key(self.seed, call.timestep, index).to(hidden.device)
        plan = random2d_matching(hidden, h, w, self.sx, self.sy, r, key=key)
        return None if plan is None else BlockMerge(plan, B, N, grid=(h, w))


# -- patching -------------------------------------------------------------------------------------


def diffusers_class(module: nn.Module, names) -> str | None:
    """The first class of ``module``'s MRO that diffusers defines under one of ``names``."""
    return library_class(module, names, "diffusers")


def transformer_blocks(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """The transformer blocks of a diffusers denoiser that tome merges in (classes of
    :data:`BLOCKS`): ``(module name, block, block class)``, in module order."""
    return [(name, m, kind) for name, m in model.named_modules() if (kind := diffusers_class(m, BLOCKS))]


# -- installed forwards (module-level: patched models pickle and deep-copy) ----------------------


def run_denoiser(model: nn.Module, handle: DiffusionHandle, call: DenoiserCall | None, args, kwargs):
    """Run the denoiser's own forward with its ``call`` in the slot (``None``: nothing merges in
    this call), then keep the call as the latest (:meth:`DiffusionHandle.merge_groups`)."""
    slot = handle.slot()
    previous = slot.call
    slot.call = call
    try:
        out = type(model).forward(model, *args, **kwargs)
    finally:
        slot.call = previous
    if not torch.compiler.is_compiling():
        handle._latest = call
    return out


def class_block_forward(block: nn.Module, forward, index: int, handle: DiffusionHandle, *args, **kwargs):
    """``forward`` of a patched block whose ops see its tokens alone; ``forward``: its class's
    own forward, bound at patch time (see :func:`class_op_forward`)."""
    return run_block(block, index, handle, 0, args, kwargs, forward)


def block_forward(block: nn.Module, index: int, handle: DiffusionHandle, *args, **kwargs):
    """:func:`class_block_forward` as installed on models patched (and pickled) before it: they
    still load and run, and compile with graph breaks only."""
    return run_block(block, index, handle, 0, args, kwargs)


def run_block(block: nn.Module, index: int, handle: DiffusionHandle, text: int, args, kwargs, forward=None):
    """Run ``block`` with its merge plan in the slot; ``text``: leading text tokens its ops see
    in front of the block's image tokens (kept as they are); ``forward``: the block's class's
    forward bound at patch time, for Dynamo (:func:`_own_forward`)."""
    forward = _own_forward(block, forward)
    hidden = args[0] if args else kwargs["hidden_states"]
    slot = handle.slot()
    call = slot.call
    if not torch.compiler.is_compiling():
        if call is None:  # gradient checkpointing recomputing this block during backward?
            found = handle._calls.lookup(hidden)
            call = None if found is None or found[1] != index else found[0]
        elif torch.is_grad_enabled() or hidden.requires_grad:
            handle._calls.register(hidden, call, index)
    previous = slot.block
    current = handle.plan(index, hidden, call)
    if current is not None and text:
        current = BlockMerge(
            keep_prefix(current.plan, text), current.batch, current.tokens + text, text, current.grid
        )
    slot.block = current
    try:
        return forward(block, *args, **kwargs)
    finally:
        slot.block = previous


def class_op_forward(module: nn.Module, forward, op: str, handle: DiffusionHandle, *args, **kwargs):
    """An op of a block (``op``: the setting that merges it, or a BasicTransformerBlock's op
    name): merge its input, run it, unmerge its output (the first one, for ops that return
    several: joint attention returns the image and the text tokens). ``forward``: the op's
    class's own forward, bound at patch time: diffusers marks its blocks and ``Attention``
    ``torch._dynamo.allow_in_graph``, and Dynamo cannot look up ``type(module).forward`` on such
    a class, so a lookup here would break ``torch.compile(fullgraph=True)``."""
    return _run_op(module, forward, op, handle, args, kwargs)


def op_forward(module: nn.Module, op: str, handle: DiffusionHandle, *args, **kwargs):
    """:func:`class_op_forward` as installed on models patched (and pickled) before it: they
    still load and run, and compile with graph breaks only."""
    return _run_op(module, None, op, handle, args, kwargs)


def _own_forward(module: nn.Module, bound):
    """The forward of ``module``'s class: looked up now in eager mode (a class swapped in after
    patching, as tomesd's ``apply_patch`` does on a copy, is honoured), the one ``bound`` at patch
    time while Dynamo traces (it cannot look it up on an ``allow_in_graph`` class)."""
    if bound is not None and torch.compiler.is_compiling():
        return bound
    return type(module).forward


def _run_op(module: nn.Module, forward, op: str, handle: DiffusionHandle, args, kwargs):
    forward = _own_forward(module, forward)
    current = handle.slot().block
    hidden = args[0] if args else kwargs.get("hidden_states")
    if (
        current is None
        or not handle.merges(op)
        or not isinstance(hidden, torch.Tensor)
        or hidden.dim() != 3
        or tuple(hidden.shape[:2]) != (current.batch, current.tokens)
    ):
        # Not merging here (or a chunked feed-forward: its chunks are not the block's tokens).
        return forward(module, *args, **kwargs)
    if (
        op in ("attn1", "merge_attn")
        and kwargs.get("attention_mask") is not None
        and kwargs.get("encoder_hidden_states") is None
    ):
        raise ValueError(
            "tome: a patched UNet cannot merge self-attention under an attention_mask over its "
            "tokens; set unet.tome.merge_attn = False (or ratio = 0) or unpatch the UNet"
        )
    with handle.merge_step_part(hidden):
        merged = M.merge(current.plan, hidden, "mean")
    if op == "attn1" and not handle.merge_queries and kwargs.get("encoder_hidden_states") is None:
        # ToDo-style: full-length queries attend to the merged tokens' keys and values, as in
        # cross-attention; the output is already full length.
        if len(args) > 1:
            raise TypeError(
                "tome: merge_queries=False expects attn1's arguments by keyword, as diffusers passes them"
            )
        return forward(module, hidden, **{**kwargs, "encoder_hidden_states": merged})
    if args:
        out = forward(module, merged, *args[1:], **kwargs)
    else:
        out = forward(module, **{**kwargs, "hidden_states": merged})
    if isinstance(out, tuple):
        return (M.unmerge(current.plan.index, out[0]), *out[1:])
    return M.unmerge(current.plan.index, out)
