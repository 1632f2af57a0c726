"""Merging variants that were tried on the shared DINOv2-S/14 and did *not* make it into
``tome.patch`` (each measured at equal FLOPs against the original algorithm).

The variants need changes inside the merge step, so this script swaps parts of ``tome.core.merge`` and
of the patched model's handle for the duration of one row (nothing here is library API): the
handle's block protocol (``merge_layer(call, x, metric)``, ``attention_bias(call, dtype)``) and
the per-pass state a :class:`~tome.runtime.passes.BlockCall` carries (``call.pass_state``:
``histories``, ``deviations``, ``tokens``). Every row: 100 photos, 224 px, the tuned schedule
``[29,26,24,22,19,17,15,13,10,8,6,4]`` (FLOP-ideal 2.0x) with ``mode="mean"`` unless the row
says otherwise; CLS cosine and saliency correlation against the unmerged model, as in
``benchmarks/fidelity.py``.

    python experiments/fidelity_experiments.py              # all groups (~6 min on 2 cores)
    python experiments/fidelity_experiments.py --group split --limit 40
    python experiments/fidelity_experiments.py --group weighting --schedule 28,26,24,21,19,17,15,13,11,8,6,4

Groups:
    split      which tokens form set A: the plain result moves by up to 0.005 when only the
               parity of the alternating split changes (the noise floor of any comparison)
    protect    keep the tokens the class token attends to most out of the merge (EViT-like), in
               every block or only in the late ones
    weighting  merge by a mean weighted by the class token's attention (MCTF-like)
    prop_attn  scale proportional attention's log(size) (1 is ToMe)
    matching   several bipartite rounds per block; one-to-one matching; Ward-style size costs;
               a penalty on the spatial distance of the merged tokens
    metric     keys centred on their mean, without their bias, plus their mean; queries/values in
               the metric; per-head key norms
    refine     run the last block at full length on the unmerged tokens (with detail)
    restream   per-block merging with a full-resolution residual stream (ToMe-for-SD style:
               merge, run the block, unmerge the block's update)
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import fidelity as FB  # noqa: E402  (benchmarks/fidelity.py: model loading, FLOP model, metrics)

from tome.core import merge as M  # noqa: E402
from tome.runtime.handle import detail as pass_detail  # noqa: E402

SCHEDULE = [29, 26, 24, 22, 19, 17, 15, 13, 10, 8, 6, 4]
ORIGINAL = {"metric": "keys", "mode": "mean", "unmerge_detail": False}
HEADS = 6  # DINOv2-S


# -- swapping parts of the merge step ---------------------------------------------------------


@contextlib.contextmanager
def swapped(owner: object, name: str, value: object) -> Iterator[None]:
    old = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, old)


def split_matching(permutation: Callable[[int, int, int, int], torch.Tensor]):
    """``bipartite_soft_matching`` with set A = ``perm[0::2]``, B = ``perm[1::2]`` of the
    unprotected tokens (``permutation(B, N, protected, layer_call)`` -> (B, N) long)."""
    calls = [0]

    def matching(metric, r, history=None, protected=0, sequence_ids=None, mask_id=-100, token_bias=None):
        B, N = metric.shape[:2]
        perm = permutation(B, N, protected, calls[0])
        calls[0] += 1
        permuted = metric.gather(1, perm[..., None].expand(-1, -1, metric.shape[-1]))
        plan = ORIGINAL_MATCHING(permuted, r, None, protected, None, mask_id, None)
        # Map the plan's source/destination tokens back to the real token order and rebuild it.
        src = perm.gather(1, plan.src)
        dst_in = perm.gather(1, plan.kept.gather(1, plan.dst))
        return plan_from_edges(src, dst_in, N, history, metric.device)

    return matching


def plan_from_edges(src, dst_in, N, history, device) -> M.MergePlan:
    """A MergePlan (order-preserving, as tome's) from explicit edges src -> dst_in."""
    B, r = src.shape
    in_sizes = history.sizes if history is not None else torch.ones(B, N, device=device)
    keep = torch.ones(B, N, dtype=torch.bool, device=device)
    keep.scatter_(1, src, False)
    position = keep.cumsum(1) - 1
    dst = position.gather(1, dst_in)
    index = position.scatter(1, src, dst)
    slot = torch.where(keep, position, N - r)
    kept = torch.empty(B, N - r + 1, dtype=torch.long, device=device)
    kept = kept.scatter(1, slot, torch.arange(N, device=device).expand(B, N))[:, : N - r]
    sizes = in_sizes.gather(1, kept).scatter_add(1, dst, in_sizes.gather(1, src))
    return M.MergePlan(index, kept, src, dst, sizes, in_sizes)


ORIGINAL_MATCHING = M.bipartite_soft_matching


def parity_swap(B: int, N: int, p: int, call: int) -> torch.Tensor:
    idx = torch.arange(N - p)
    swapped_idx = torch.where((idx ^ 1) < N - p, idx ^ 1, idx)
    return torch.cat([torch.arange(p), swapped_idx + p]).expand(B, N)


def identity(B: int, N: int, p: int, call: int) -> torch.Tensor:
    return torch.arange(N).expand(B, N)


def checkerboard_first(B: int, N: int, p: int, call: int) -> torch.Tensor:
    n = N - p
    side = round(n**0.5)
    if side * side != n:  # only block 0 sees the full square grid with this schedule
        return identity(B, N, p, call)
    i = torch.arange(n)
    order = (((i // side) + (i % side)) % 2).argsort(stable=True)  # A = even squares, B = odd
    half = (n + 1) // 2
    inter = torch.empty(n, dtype=torch.long)
    inter[0::2], inter[1::2] = order[:half], order[half:]
    return torch.cat([torch.arange(p), inter + p]).expand(B, N)


def random_split(B: int, N: int, p: int, call: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(N)
    return torch.cat([torch.arange(p), torch.randperm(N - p, generator=g) + p]).expand(B, N)


def plan_from_scores(scores: torch.Tensor, r: int, protected: int, N: int, history) -> M.MergePlan:
    """ToMe's ranking on A x B edge ``scores`` (B, |A|, |B|): the r A tokens with the best edges
    merge into their best B partner."""
    a_index = scores.amax(-1).sort(dim=-1, descending=True, stable=True).indices[:, :r]
    chosen = scores.gather(1, a_index[..., None].expand(-1, -1, scores.shape[-1]))
    src = protected + 2 * a_index
    dst_in = protected + 1 + 2 * chosen.argmax(-1)
    return plan_from_edges(src, dst_in, N, history, scores.device)


def scored_matching(score: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]):
    """ToMe's ranking with a different edge score ``score(cos (B,A,B), size_a, size_b)``."""

    def matching(metric, r, history=None, protected=0, sequence_ids=None, mask_id=-100, token_bias=None):
        B, N = metric.shape[:2]
        sizes = history.sizes if history is not None else torch.ones(B, N)
        a, b, _, _ = M._split_ab(metric, protected, None)
        s = sizes[:, protected:]
        scores = score(a @ b.transpose(-1, -2), s[:, ::2, None], s[:, 1::2][:, None, :])
        return plan_from_scores(scores, r, protected, N, history)

    return matching


def centroids(history, N: int, protected: int, B: int) -> torch.Tensor:
    """(B, N, 2): every current token's mean patch position (grid units / side; protected: 0)."""
    N0 = history.source.shape[1] if history is not None else N
    side = round((N0 - protected) ** 0.5)
    i = torch.arange(N0 - protected)
    pos = torch.cat([torch.zeros(protected, 2), torch.stack([i // side, i % side], -1).float() / side])
    if history is None:
        return pos.expand(B, N, 2)
    index = history.source[..., None].expand(-1, -1, 2)
    total = torch.zeros(B, N, 2).scatter_add_(1, index, pos.expand(B, N0, 2))
    return total / history.sizes[..., None]


def locality_matching(weight: float):
    """ToMe's ranking with edge score ``cos - weight x distance`` between the tokens' mean patch
    positions: merged groups stay compact, like superpixels."""

    def matching(metric, r, history=None, protected=0, sequence_ids=None, mask_id=-100, token_bias=None):
        B, N = metric.shape[:2]
        a, b, _, _ = M._split_ab(metric, protected, None)
        c = centroids(history, N, protected, B)[:, protected:]
        scores = a @ b.transpose(-1, -2) - weight * torch.cdist(c[:, ::2], c[:, 1::2])
        return plan_from_scores(scores, r, protected, N, history)

    return matching


def one_to_one_matching(
    metric, r, history=None, protected=0, sequence_ids=None, mask_id=-100, token_bias=None
):
    """Greedy matching where every B token receives at most one A token per block."""
    B, N = metric.shape[:2]
    a, b, _, _ = M._split_ab(metric, protected, None)
    scores = a @ b.transpose(-1, -2)
    src, dst_in = [], []
    for sample in range(B):
        s = scores[sample].clone()
        pairs: list[tuple[int, int]] = []
        while len(pairs) < r:
            flat = int(s.argmax())
            i, j = divmod(flat, s.shape[1])
            pairs.append((i, j))
            s[i, :] = float("-inf")
            s[:, j] = float("-inf")
        src.append([protected + 2 * i for i, _ in pairs])
        dst_in.append([protected + 1 + 2 * j for _, j in pairs])
    return plan_from_edges(torch.tensor(src), torch.tensor(dst_in), N, history, metric.device)


# -- hooks on the patched model -----------------------------------------------------------------


class Probe:
    """Forward hooks that keep every layer's q and k projections of the latest pass."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.q: dict[int, torch.Tensor] = {}
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.k_bias = [layer.attention.k_proj.bias for layer in module.encoder.layer]
        self.handles = []
        for i, layer in enumerate(module.encoder.layer):
            attn = layer.attention
            for name, proj in (("q", attn.q_proj), ("k", attn.k_proj), ("v", attn.v_proj)):
                self.handles.append(proj.register_forward_hook(self._keep(name, i)))

    def _keep(self, name: str, index: int):
        def hook(module, args, output):
            getattr(self, name)[index] = output

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def record(call, history: M.MergeHistory) -> None:
    """What the handle's own merge step records for block ``call.index`` of its pass: the
    history of the block's output and its token count (no ``unmerge_detail`` residuals)."""
    state = call.pass_state
    state.deviations[call.index] = None
    state.histories[call.index] = history
    state.tokens[call.index + 1 : call.index + 2] = [history.num_tokens]


def replace_merge(handle, probe: Probe, metric_fn=None, bias_fn=None, merge_fn=None) -> None:
    """Swap the handle's merge step for one whose metric and token bias come from the probe.
    ``metric_fn(index, keys, call)`` and ``bias_fn(index, keys, call)`` get the block's
    :class:`~tome.runtime.passes.BlockCall` (``call.history``: its input tokens' history,
    ``call.merged``); ``merge_fn(index, plan, x, keys, call)``: the merged tokens, default
    ``M.merge``."""

    def merge_layer(call, x, metric):
        index = call.index
        r = handle.layer_r(index, x.shape[1])
        if r == 0:
            return original(call, x, metric)
        keys = probe.k[index].unflatten(-1, (HEADS, -1))
        if metric_fn is not None:
            metric = metric_fn(index, keys, call)
        bias = bias_fn(index, keys, call) if bias_fn is not None else None
        plan = M.bipartite_soft_matching(metric, r, call.history, handle.protected, token_bias=bias)
        record(call, M.advance(call.history, plan))
        if merge_fn is not None:
            return merge_fn(index, plan, x, keys, call)
        return M.merge(plan, x, handle.options.mode)

    original = handle.merge_layer
    handle.merge_layer = merge_layer


def class_attention(probe: Probe, index: int, keys: torch.Tensor, call) -> torch.Tensor:
    """(B, N): the class token's attention to every token (mean over heads, with prop-attn)."""
    q = probe.q[index][:, 0].unflatten(-1, (HEADS, -1))
    logits = torch.einsum("bhd,bnhd->bhn", q, keys) * keys.shape[-1] ** -0.5
    if call.merged:
        logits = logits + call.history.sizes.log()[:, None, :]
    return logits.softmax(-1).mean(1)


# -- one row ------------------------------------------------------------------------------------


class Bench:
    def __init__(self, limit: int, schedule: list[int] = SCHEDULE) -> None:
        torch.manual_seed(0)
        self.schedule = schedule
        self.model = FB.load_model(f"hf:{FB.MODEL}")
        paths, _ = FB.find_images([str(FB.IMAGES)])
        pixels = self.model.preprocess([FB.open_image(p) for p in paths[:limit]])
        self.batches = pixels.split(25)
        self.ref = FB.run(self.model, self.batches, None, {})
        self.base_flops = FB.flops([self.model.protected + self.model.num_patches] * 13, self.model.width)

    def row(self, label: str, setup=None, schedule=None, options=None, tokens_fix=None) -> None:
        """Patch, let ``setup(handle, probe, module)`` change things, run, print a table row."""
        model = self.model
        model.set_r(schedule or self.schedule, unmerge_output=True, **{**ORIGINAL, **(options or {})})
        probe = Probe(model.module)
        undo = setup(model.module.tome, probe, model.module) if setup else None
        try:
            out = run_patched(model, self.batches)
        finally:
            probe.remove()
            if undo:
                undo()
            model.set_r(None)
        tokens = tokens_fix(out["tokens"]) if tokens_fix else out["tokens"]
        ideal = self.base_flops / FB.flops(tokens, model.width)
        cls = F.cosine_similarity(out["pooled"], self.ref["pooled"], dim=-1)
        sal = FB.pearson(out["saliency"], self.ref["saliency"])
        print(
            f"| {label} | {ideal:.2f}x | {cls.mean():.4f} | {cls.min():.4f} | {sal.mean():.4f} |", flush=True
        )


def run_patched(model, batches) -> dict:
    """Like ``fidelity.run``, without re-patching (the row's changes stay in place)."""
    pooled, saliency, tokens = [], [], []
    for pixels in batches:
        out = model(pixels)
        pooled.append(out.pooled.float())
        saliency.append(out.saliency.float())
        tokens = list(model.module.tome.tokens_per_layer)
    return {"pooled": torch.cat(pooled), "saliency": torch.cat(saliency), "tokens": tokens}


def in_context(context: contextlib.AbstractContextManager):
    def setup(handle, probe, module):
        context.__enter__()
        return lambda: context.__exit__(None, None, None)

    return setup


def group_split(b: Bench) -> None:
    b.row("plain ToMe (set A = even positions)")
    for label, perm in (
        ("set A = odd positions", parity_swap),
        ("checkerboard split in block 0", checkerboard_first),
        ("random split", random_split),
    ):
        b.row(label, in_context(swapped(M, "bipartite_soft_matching", split_matching(perm))))


def group_protect(b: Bench) -> None:
    for k, first in ((8, 0), (16, 0), (4, 6), (8, 9)):

        def setup(handle, probe, module, k=k, first=first):
            def bias(index, keys, call):
                if index < first:
                    return None
                attn = class_attention(probe, index, keys, call)[:, handle.protected :]
                top = attn.topk(k, dim=-1).indices
                out = torch.zeros_like(attn).scatter_(1, top, -1e4)
                return torch.cat([torch.zeros(out.shape[0], handle.protected), out], 1)

            replace_merge(handle, probe, metric_fn=lambda i, keys, s: keys.mean(-2), bias_fn=bias)

        where = f" from block {first} on" if first else ""
        b.row(f"keep the {k} tokens the class token attends to most{where}", setup)
    for weight in (0.05, 0.2):

        def setup(handle, probe, module, weight=weight):
            def bias(index, keys, call):
                attn = class_attention(probe, index, keys, call)[:, handle.protected :]
                attn = attn / attn.mean(-1, keepdim=True)
                return torch.cat([torch.zeros(attn.shape[0], handle.protected), -weight * attn], 1)

            replace_merge(handle, probe, metric_fn=lambda i, keys, s: keys.mean(-2), bias_fn=bias)

        b.row(f"edge score - {weight} x class attention (relative)", setup)


def group_weighting(b: Bench) -> None:
    # Merge by a weighted mean, each token weighted by its size x (the class token's attention
    # per original token)^gamma: informative tokens dominate their group (as in MCTF, Lee et
    # al., CVPR 2024, which fuses tokens by attentiveness). gamma=0 is the plain size-weighted mean.
    for gamma in (0.25, 0.5, 1.0):

        def setup(handle, probe, module, gamma=gamma):
            def merge_fn(index, plan, x, keys, call):
                attn = class_attention(probe, index, keys, call)
                sizes = call.history.sizes.to(attn.dtype)
                weight = (sizes * (attn / sizes).pow(gamma)).unsqueeze(-1)
                total = M._scatter_into_kept(plan, x * weight, "sum")
                return total / M._scatter_into_kept(plan, weight, "sum")

            replace_merge(handle, probe, metric_fn=lambda i, keys, s: keys.mean(-2), merge_fn=merge_fn)

        b.row(f"weighted by class attention^{gamma}", setup)


def group_prop_attn(b: Bench) -> None:
    for label, scale, layers in (
        ("log(size) x 0.5", 0.5, None),
        ("log(size) x 1.5", 1.5, None),
        ("no log(size) in the last block", 0.0, {11}),
        ("log(size) x 0.7 in blocks 1-5", 0.7, {1, 2, 3, 4, 5}),
    ):

        def setup(handle, probe, module, scale=scale, layers=layers):
            original = handle.attention_bias

            def attention_bias(call, dtype):
                bias = original(call, dtype)
                if bias is None:
                    return None
                return bias * scale if layers is None or call.index in layers else bias

            handle.attention_bias = attention_bias

        b.row(label, setup)


def group_matching(b: Bench) -> None:
    for rounds in (2, 4):

        def setup(handle, probe, module, rounds=rounds):
            def merge_layer(call, x, metric):
                r = handle.layer_r(call.index, x.shape[1])
                if r == 0:
                    return original(call, x, metric)
                history = call.history
                for part in [r // rounds + (1 if j < r % rounds else 0) for j in range(rounds)]:
                    part = min(part, M.max_r(x.shape[1], handle.protected))
                    if part == 0:
                        continue
                    plan = M.bipartite_soft_matching(metric, part, history, handle.protected)
                    x, metric = M.merge(plan, x, "mean"), M.merge(plan, metric, "mean")
                    history = M.advance(history, plan)
                record(call, history)
                return x

            original = handle.merge_layer
            handle.merge_layer = merge_layer

        b.row(f"{rounds} bipartite rounds per block", setup)
    b.row(
        "one-to-one matching (greedy)", in_context(swapped(M, "bipartite_soft_matching", one_to_one_matching))
    )
    for label, score in (
        (
            "Ward cost: (1 - cos) x (sa sb / (sa + sb))^0.5",
            lambda c, sa, sb: -(1 - c) * (sa * sb / (sa + sb)) ** 0.5,
        ),
        ("cos - 0.01 log(sa + sb)", lambda c, sa, sb: c - 0.01 * torch.log(sa + sb)),
    ):
        b.row(label, in_context(swapped(M, "bipartite_soft_matching", scored_matching(score))))
    for weight in (0.05, 0.2):
        b.row(
            f"cos - {weight} x distance of mean positions (locality)",
            in_context(swapped(M, "bipartite_soft_matching", locality_matching(weight))),
        )


def group_metric(b: Bench) -> None:
    def centred(index, keys, call):
        return (keys - keys[:, 1:].mean(1, keepdim=True)).mean(-2)

    def with_projection(names):
        def metric(index, keys, call, names=names):
            parts = []
            for name in names:
                t = keys if name == "k" else getattr(probe_ref[0], name)[index].unflatten(-1, (HEADS, -1))
                parts.append(F.normalize(t.mean(-2), dim=-1))
            return torch.cat(parts, -1)

        return metric

    def without_bias(index, keys, call):
        # the key projection's bias is the same for every token: it pulls all keys one way
        bias = probe_ref[0].k_bias[index]
        return (keys - bias.view(HEADS, -1)).mean(-2)

    def plus_mean(index, keys, call):
        keys = keys.mean(-2)
        return keys + keys[:, 1:].mean(1, keepdim=True)

    probe_ref: list[Probe] = []
    variants = (
        ("keys minus their mean over tokens", centred),
        ("keys without the projection's bias", without_bias),
        ("keys plus their mean over tokens", plus_mean),
        ("queries and keys", with_projection("qk")),
        ("keys and values", with_projection("kv")),
        ("values", with_projection("v")),
        ("sum of per-head unit keys", lambda i, keys, s: F.normalize(keys, dim=-1).sum(-2)),
        ("keys / per-head mean norm", lambda i, keys, s: (keys / keys[:, 1:].norm(dim=-1).mean(1)[:, None, :, None]).mean(-2)),
    )  # fmt: skip
    for label, fn in variants:

        def setup(handle, probe, module, fn=fn):
            probe_ref[:] = [probe]
            replace_merge(handle, probe, metric_fn=fn)

        b.row(label, setup)


def group_refine(b: Bench) -> None:
    for detail in (False, True):

        def setup(handle, probe, module, detail=detail):
            layers = list(module.encoder.layer)
            last = layers[-1]
            forward = last.forward

            def full_length(hidden_states, attention_mask=None, **kwargs):
                # The pass of the tokens block 10 produced (the registry the handle's
                # begin_layer reads): the last block then gets them unmerged, as fresh tokens
                # of the same pass.
                state, block = handle._registry.lookup(hidden_states)
                history = state.histories[block]
                if history.num_tokens != history.num_original:
                    hidden_states = M.unmerge(history.source, hidden_states)
                    if detail:
                        hidden_states = hidden_states + detail_before(state, len(layers) - 1)
                    state.histories[block] = M.start_history(hidden_states.shape[0], history.num_original)
                    handle._registry.register(hidden_states, state, block)
                return forward(hidden_states, attention_mask, **kwargs)

            last.forward = full_length
            return lambda: setattr(last, "forward", forward)

        b.row(
            "last block at full length" + (" + detail" if detail else ""),
            setup,
            options={"unmerge_detail": detail},
            tokens_fix=lambda t: [*t[:-2], 257, 257],
        )


def detail_before(state, num_blocks: int) -> torch.Tensor:
    """The summed residuals of the first ``num_blocks`` blocks of the pass ``state``, per
    original token; they are then cleared, so that the handle does not add them again after
    the last block."""
    total = pass_detail(state, num_blocks)
    state.deviations[:num_blocks] = [None] * num_blocks
    return total


def group_restream(b: Bench) -> None:
    for r in (128, 100):

        def setup(handle, probe, module, r=r):
            handle.r = 0
            for layer in module.encoder.layer:

                def forward(hidden, attention_mask=None, layer=layer, **kwargs):
                    attn = layer.attention
                    keys = attn.k_proj(layer.norm1(hidden)).unflatten(-1, (HEADS, -1)).mean(-2)
                    plan = M.bipartite_soft_matching(keys, r, None, 1)
                    xm = M.merge(plan, hidden, "mean")
                    a = attn(layer.norm1(xm), attention_mask=plan.sizes.log()[:, None, None, :])[0]
                    x2 = xm + layer.layer_scale1(a)
                    x3 = x2 + layer.layer_scale2(layer.mlp(layer.norm2(x2)))
                    return hidden + M.unmerge(plan.index, x3 - xm)

                layer.forward = forward

            def undo():
                for layer in module.encoder.layer:
                    layer.__dict__.pop("forward", None)

            return undo

        b.row(
            f"re-match every block, r={r}, full-resolution residual",
            setup,
            tokens_fix=lambda t, r=r: [257] + [257 - r] * 12,
        )


GROUPS = {
    "split": group_split,
    "protect": group_protect,
    "weighting": group_weighting,
    "prop_attn": group_prop_attn,
    "matching": group_matching,
    "metric": group_metric,
    "refine": group_refine,
    "restream": group_restream,
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--group", choices=sorted(GROUPS), action="append", help="default: all")
    parser.add_argument("--limit", type=int, default=100, help="number of photos (default 100)")
    parser.add_argument(
        "--schedule",
        type=lambda text: [int(v) for v in text.split(",")],
        default=SCHEDULE,
        help="12 comma-separated ints (default: the schedule above)",
    )
    args = parser.parse_args()
    start = time.perf_counter()
    bench = Bench(args.limit, args.schedule)
    print(f"schedule {args.schedule}, mode=mean unless stated; {args.limit} photos\n")
    print("| variant | FLOP-ideal | CLS cos | min CLS cos | saliency corr |\n|---|---|---|---|---|")
    bench.row("plain ToMe")
    for name in args.group or list(GROUPS):
        GROUPS[name](bench)
    print(f"\n{time.perf_counter() - start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
