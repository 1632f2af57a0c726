"""diffusers ``UNet2DConditionModel`` (SD 1.x / 2.x, SDXL): merge -> op -> unmerge, as tomesd.

Every ``BasicTransformerBlock`` gets and returns full-length tokens: its self-attention (and,
with ``merge_crossattn`` / ``merge_mlp``, its cross-attention and feed-forward) runs on merged
tokens and its output is unmerged before the residual, so the UNet's convolutions and skips see
the shapes they expect. The matching is tomesd's (:mod:`tome.core.merge2d`): per block, on the block's
input tokens, one destination per ``sy x sx`` cell of the latent grid.

Nothing of the block is copied: the block's own ``forward`` runs unchanged, and the three ops
it calls (``attn1``, ``attn2``, ``ff``) are wrapped, each merging its input and unmerging its
output. The pieces of one call reach each other through a per-thread slot that holds something
only for the duration of that call: the UNet's call leaves the latent size (and its timestep,
for the random choice) for the blocks; a block's call leaves its merge plan for its ops. The
settings are never written during a forward pass, so several threads can run one patched UNet
at once. A block recomputed by gradient checkpointing (during backward, outside the UNet's
call) finds its UNet call from its input tensor (:class:`~tome.runtime.passes.TokenRegistry`,
weak references that live as long as the tensor) and merges exactly as it did the first time.

Randomness (``use_rand``, an even batch as tomesd requires): each block call picks its
destinations with a counter-based hash (:func:`tome.core.merge2d.hashed_offsets`) of
``block_key(seed, timestep, block)``, computed on the timestep's device: no generator, no
device-to-host copy (the timestep is never read on the host, so no sync per call and no graph
break under ``torch.compile``). The global RNG is never read or advanced, so patching does not
change the user's sampling, and the same call always merges the same way (threads, gradient
checkpointing's recomputation). tomesd instead forks the global RNG once per model and advances
its own generator call after call.
"""

from __future__ import annotations

import math
import threading
import warnings

import torch
import torch.nn as nn

from tome.core import merge as M
from tome.core.merge import MergePlan
from tome.core.merge2d import keep_prefix, random2d_matching
from tome.runtime.handle import MergeOptions, ToMeHandle
from tome.runtime.options import Option
from tome.runtime.passes import TokenRegistry
from tome.runtime.registry import MERGE_OP_UNMERGE, Adapter

__all__ = ["DEFAULTS", "DiffusionHandle", "apply", "block_key"]

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
_DOWNSAMPLES = (1, 2, 4, 8)
# the ops of a BasicTransformerBlock and the setting that merges each
_OPS = (("attn1", "merge_attn"), ("attn2", "merge_crossattn"), ("ff", "merge_mlp"))
_FLAGS = tuple(flag for _, flag in _OPS)


def _flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected True or False, got {value!r}")
    return value


def _stride(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected an int >= 1 (the destination stride), got {value!r}")
    return value


def _downsample(name: str, value: object) -> int:
    if isinstance(value, bool) or value not in _DOWNSAMPLES:
        raise ValueError(
            f"{name}: expected one of 1, 2, 4, 8 (the largest downsampling merged), got {value!r}"
        )
    return value


def _seed(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {value!r}")
    return value


def _every(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"{name}: expected an int >= 1 (how many blocks of one resolution share a matching), got {value!r}"
        )
    return value


def _ratio(name: str, value: object) -> float:
    from tome.core.schedule import check_ratio

    return check_ratio(value)


class _CallSlot(threading.local):
    """What the call running in this thread has left for the calls inside it."""

    unet: _UNetCall | None = None
    block: _BlockMerge | None = None
    rope: tuple | None = None  # rotary tables of merged tokens, for Flux's q/k norms


class _TracedSlot:
    # torch.compile traces in one thread, and guards on thread-locals fail.
    unet = None
    block = None
    rope = None


class _UNetCall:
    """One call of the denoiser (a UNet or a DiT): its token grid at full resolution
    (``height x width``: the latent for a UNet, the patch grid for a DiT) and its timestep
    (a tensor stays on its device: randomness is keyed on it there)."""

    __slots__ = ("height", "plans", "shared", "timestep", "width")

    def __init__(self, height: int, width: int, timestep: object) -> None:
        self.height, self.width, self.timestep = height, width, timestep
        self.plans: dict[int, _BlockMerge | None] = {}  # block index -> the merge it used
        self.shared: dict[int, list] = {}  # tokens -> [blocks that used it, the latest matching]


class _BlockMerge:
    """One block call's merge: the plan, for inputs of ``(batch, tokens)``; ``text``: the
    number of leading (text) tokens the plan keeps as they are, in a joint sequence."""

    __slots__ = ("batch", "plan", "text", "tokens")

    def __init__(self, plan: MergePlan, batch: int, tokens: int, text: int = 0) -> None:
        self.plan, self.batch, self.tokens, self.text = plan, batch, tokens, text


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


class DiffusionHandle(ToMeHandle):
    """``unet.tome`` of a patched diffusers UNet: tomesd's settings, each settable.

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
        _downsample,
        "blocks at a downsampling of at most this (1, 2, 4 or 8) merge",
    )
    sx = Option(DEFAULTS["sx"], _stride, "the destination stride across: one destination per sy x sx cell")
    sy = Option(DEFAULTS["sy"], _stride, "the destination stride down: one destination per sy x sx cell")
    use_rand = Option(
        DEFAULTS["use_rand"], _flag, "a random destination in each cell (else the top-left one)"
    )
    merge_attn = Option(DEFAULTS["merge_attn"], _flag, "self-attention runs on merged tokens")
    merge_crossattn = Option(DEFAULTS["merge_crossattn"], _flag, "cross-attention runs on merged tokens")
    merge_mlp = Option(DEFAULTS["merge_mlp"], _flag, "the feed-forward runs on merged tokens")
    seed = Option(DEFAULTS["seed"], _seed, "the seed of the random destinations (see block_key)")
    match_every = Option(
        EXTRA_DEFAULTS["match_every"],
        _every,
        "k consecutive merging blocks of one resolution share one matching",
    )
    merge_queries = Option(
        EXTRA_DEFAULTS["merge_queries"],
        _flag,
        "False: merge only self-attention's keys and values (ToDo-style)",
    )

    def __init__(self, blocks: list[str], **settings) -> None:
        super().__init__(len(blocks), 0, protected=0, **settings)
        self.blocks = list(blocks)

    def _init_transient(self) -> None:
        super()._init_transient()
        self._slot = _CallSlot()
        self._traced_slot = _TracedSlot()
        self._calls = TokenRegistry()  # block input tensor -> its UNet call (for recomputation)
        self._grid_cache: tuple | None = None  # Flux: (weakref to img_ids, its grid)

    def __getstate__(self) -> dict:
        saved = super().__getstate__()
        transient = ("_slot", "_traced_slot", "_calls", "_grid_cache")
        saved["state"] = {k: v for k, v in saved["state"].items() if k not in transient}
        return saved

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
        self._r = None
        self._r_per_layer = [0] * self.num_layers

    def patch_options(self) -> dict:
        return {name: getattr(self, name) for name in (*DEFAULTS, *EXTRA_DEFAULTS)}

    def slot(self) -> _CallSlot | _TracedSlot:
        """The per-thread slot of the calls running in this thread."""
        return self._traced_slot if torch.compiler.is_compiling() else self._slot

    def merges(self, op: str) -> bool:
        """Whether the op ``"attn1"``, ``"attn2"`` or ``"ff"`` (or the setting named ``op``:
        ``"merge_attn"``, ...) runs on merged tokens."""
        return getattr(self, op if op in _FLAGS else dict(_OPS)[op])

    def plan(self, index: int, hidden: torch.Tensor, call: _UNetCall | None) -> _BlockMerge | None:
        """The merge of block ``index`` for its input ``hidden`` ``(B, N, C)`` in the denoiser
        call ``call`` (tomesd's rules), or ``None`` when it merges nothing."""
        if call is None or self.ratio == 0 or not any(getattr(self, flag) for flag in _FLAGS):
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
        current = self._match(index, hidden, call)
        call.shared[N] = [1, current]
        call.plans[index] = current
        return current

    def _match(self, index: int, hidden: torch.Tensor, call: _UNetCall) -> _BlockMerge | None:
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
        return None if plan is None else _BlockMerge(plan, B, N)

    def unmerge(self, tokens: torch.Tensor) -> torch.Tensor:
        raise TypeError(
            "tome: a patched diffusion model unmerges inside every block (merge -> op -> unmerge); "
            "its outputs are already full length"
        )

    def __repr__(self) -> str:
        options = ", ".join(f"{name}={getattr(self, name)!r}" for name in (*DEFAULTS, *EXTRA_DEFAULTS))
        return f"DiffusionHandle(family={self.family!r}, blocks={self.num_layers}, {options})"


# -- installed forwards (module-level: patched models pickle and deep-copy) ----------------------


def _unet_forward(unet: nn.Module, handle: DiffusionHandle, *args, **kwargs):
    sample = args[0] if args else kwargs["sample"]
    timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
    slot = handle.slot()
    previous = slot.unet
    slot.unet = _UNetCall(sample.shape[-2], sample.shape[-1], timestep)
    try:
        return type(unet).forward(unet, *args, **kwargs)
    finally:
        slot.unet = previous


def _block_forward(block: nn.Module, index: int, handle: DiffusionHandle, *args, **kwargs):
    return _run_block(block, index, handle, 0, args, kwargs)


def _run_block(block: nn.Module, index: int, handle: DiffusionHandle, text: int, args, kwargs):
    """Run ``block`` with its merge plan in the slot; ``text``: leading text tokens its ops see
    in front of the block's image tokens (kept as they are)."""
    hidden = args[0] if args else kwargs["hidden_states"]
    slot = handle.slot()
    call = slot.unet
    if not torch.compiler.is_compiling():
        if call is None:  # gradient checkpointing recomputing this block during backward?
            found = handle._calls.lookup(hidden)
            call = None if found is None or found[1] != index else found[0]
        elif torch.is_grad_enabled() or hidden.requires_grad:
            handle._calls.register(hidden, call, index)
    previous = slot.block
    current = handle.plan(index, hidden, call)
    if current is not None and text:
        current = _BlockMerge(keep_prefix(current.plan, text), current.batch, current.tokens + text, text)
    slot.block = current
    try:
        return type(block).forward(block, *args, **kwargs)
    finally:
        slot.block = previous


def _op_forward(module: nn.Module, op: str, handle: DiffusionHandle, *args, **kwargs):
    """An op of a block (``op``: the setting that merges it, or a BasicTransformerBlock's op
    name): merge its input, run it, unmerge its output (the first one, for ops that return
    several: joint attention returns the image and the text tokens)."""
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
        return type(module).forward(module, *args, **kwargs)
    if (
        op in ("attn1", "merge_attn")
        and kwargs.get("attention_mask") is not None
        and kwargs.get("encoder_hidden_states") is None
    ):
        raise ValueError(
            "tome: a patched UNet cannot merge self-attention under an attention_mask over its "
            "tokens; set unet.tome.merge_attn = False (or ratio = 0) or unpatch the UNet"
        )
    merged = M.merge(current.plan, hidden, "mean")
    if op == "attn1" and not handle.merge_queries and kwargs.get("encoder_hidden_states") is None:
        # ToDo-style: full-length queries attend to the merged tokens' keys and values, as in
        # cross-attention; the output is already full length.
        if len(args) > 1:
            raise TypeError(
                "tome: merge_queries=False expects attn1's arguments by keyword, as diffusers passes them"
            )
        return type(module).forward(module, hidden, **{**kwargs, "encoder_hidden_states": merged})
    if args:
        out = type(module).forward(module, merged, *args[1:], **kwargs)
    else:
        out = type(module).forward(module, **{**kwargs, "hidden_states": merged})
    if isinstance(out, tuple):
        return (M.unmerge(current.plan.index, out[0]), *out[1:])
    return M.unmerge(current.plan.index, out)


# -- patching ---------------------------------------------------------------------------------------


def _is_block(module: nn.Module) -> bool:
    return any(
        cls.__name__ == "BasicTransformerBlock" and cls.__module__.startswith("diffusers.")
        for cls in type(module).__mro__
    )


def _downsampling(name: str, levels: int) -> int | None:
    """The downsampling of a UNet block from its module name (for the patch-time check)."""
    parts = name.split(".")
    if parts[0] == "down_blocks":
        return 2 ** int(parts[1])
    if parts[0] == "up_blocks":
        return 2 ** (levels - 1 - int(parts[1]))
    if parts[0] == "mid_block":
        return 2 ** (levels - 1)
    return None


def _check_settings(r, prop_attn, unmerge_output, options) -> None:
    if r is not None:
        raise TypeError(
            f"r: a diffusion model merges a ratio of every merging block's tokens, as tomesd does; "
            f"pass ratio= instead of r (got r={r!r})"
        )
    other = {
        "prop_attn": (prop_attn, True),
        "unmerge_output": (unmerge_output, False),
        **{name: (getattr(options, name), getattr(MergeOptions(), name)) for name in vars(MergeOptions())},
    }
    for name, (value, default) in other.items():
        if value != default:
            raise TypeError(
                f"{name}: not an option for diffusion models (tome merges them as tomesd does: "
                "merge -> op -> unmerge in every block); their options are ratio, max_downsample, "
                "sx, sy, use_rand, merge_attn, merge_crossattn, merge_mlp, seed, match_every and merge_queries"
            )


def apply(
    model: nn.Module,
    *,
    r=None,
    ratio: float | None = None,
    prop_attn: bool = True,
    unmerge_output: bool = False,
    options: MergeOptions | None = None,
    **diffusion,
) -> DiffusionHandle:
    _check_settings(r, prop_attn, unmerge_output, MergeOptions() if options is None else options)
    unknown = sorted(set(diffusion) - set(DEFAULTS) - set(EXTRA_DEFAULTS))
    if unknown:
        raise TypeError(f"{unknown[0]}: not an option of tome.patch")
    settings = {**diffusion, "ratio": DEFAULTS["ratio"] if ratio is None else ratio}
    blocks = [(name, m) for name, m in model.named_modules() if _is_block(m)]
    if not blocks:
        raise TypeError(
            f"model: this {type(model).__name__} has no BasicTransformerBlock (no attention); "
            "there is nothing for tome to merge"
        )
    handle = DiffusionHandle([name for name, _ in blocks], **settings)  # checks every setting
    levels = len(getattr(model, "down_blocks", ())) or 1
    downsamplings = [_downsampling(name, levels) for name, _ in blocks]
    if handle.ratio > 0 and all(d is not None and d > handle.max_downsample for d in downsamplings):
        warnings.warn(
            f"tome: no attention block of this UNet runs at a downsampling <= max_downsample="
            f"{handle.max_downsample} (the finest is {min(downsamplings)}x, as in SDXL); nothing "
            f"will merge: pass max_downsample={min(downsamplings)} to merge it",
            stacklevel=4,
        )
    with handle.installing():
        handle.install_method(model, "forward", _unet_forward, handle)
        for index, (_, block) in enumerate(blocks):
            handle.install_method(block, "forward", _block_forward, index, handle)
            for op, _ in _OPS:
                module = getattr(block, op, None)
                if isinstance(module, nn.Module):
                    handle.install_method(module, "forward", _op_forward, op, handle)
    return handle


ADAPTER = Adapter(
    library="diffusers",
    classes=("UNet2DConditionModel",),
    kind=MERGE_OP_UNMERGE,
    title="diffusion models (a diffusers UNet2DConditionModel, PixArt / DiT / SD3 / Flux transformer, or DiffusionPipeline)",
    apply=apply,
    handle=DiffusionHandle,
    merged="before self-attention (and optionally cross-attention, MLP), unmerged after: full-length outputs",
    tested_on="tiny random UNets; tomesd as the reference",
    takes_r=False,
)
