"""The fast paths of the merge engine against plain implementations; half precision; compiled
patched models; the benchmark's reference ToMe and FLOP count."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import tome
from tome.core import matching
from tome.core import merge as M

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


# -- plain implementations ----------------------------------------------------------------------


def plain_edges(metric, r, protected=0, sequence_ids=None, mask_id=-100):
    """The r strongest edges read off every A token's best edge (the whole score matrix)."""
    score, b_index = M.best_edges(metric, protected, sequence_ids, mask_id)
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices[:, :r]
    return order, b_index.gather(1, order)


def plain_mean(plan: M.MergePlan, x: torch.Tensor) -> torch.Tensor:
    """The size-weighted mean as the textbook writes it, in float64: sum of s_i x_i over each
    group, divided by the group's size."""
    B, N = x.shape[:2]
    work = x.to(torch.complex128 if x.is_complex() else torch.float64)
    weights = plan.in_sizes.double().view(B, N, *(1,) * (x.dim() - 2))
    out = work.new_zeros(B, N - plan.r, *x.shape[2:])
    out = out.scatter_add(1, M._expand_index(plan.index, work), work * weights)
    return out / plan.sizes.double().view(B, N - plan.r, *(1,) * (x.dim() - 2))


def chain(keys: torch.Tensor, rs: list[int], protected: int = 1):
    """Plans of a chain of merges on ``keys`` (sizes > 1 from the second plan on), and the
    tokens entering each plan."""
    history, plans, inputs = None, [], []
    for r in rs:
        plan = M.bipartite_soft_matching(keys, r, history, protected)
        plans.append(plan)
        inputs.append(keys)
        history = M.advance(history or M.start_history(*keys.shape[:2]), plan)
        keys = plain_mean(plan, keys).float()
    return plans, inputs


# -- matching -----------------------------------------------------------------------------------


# Small inputs take one path (fewer ops), large ones another: every test of the matching runs
# both, by setting the size limits to nothing or to everything.
@pytest.fixture(params=["small-input paths", "large-input paths"])
def matching_paths(request, monkeypatch):
    everything = request.param == "small-input paths"
    monkeypatch.setattr(matching, "_ONE_PASS_SCORES", 2**62 if everything else -1)
    monkeypatch.setattr(matching, "_SORT_AT_MOST", 2**62 if everything else -1)
    return request.param


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ties", [False, True])
def test_strongest_edges_equal_plain_ranking(seed, ties, matching_paths):
    gen = torch.Generator().manual_seed(seed)
    B, N, D = 3, int(torch.randint(8, 60, (1,), generator=gen)), 5
    protected = seed % 3
    keys = torch.randn(B, N, D, generator=gen)
    if ties:  # few distinct directions: many equal scores
        keys = torch.randint(-1, 2, (B, N, D), generator=gen).float()
    r = M.max_r(N, protected)
    for rr in (1, r // 2, r):
        got = M._match(keys, rr, protected, None, -100)
        expected = plain_edges(keys, rr, protected)
        assert all(torch.equal(g, e) for g, e in zip(got, expected, strict=True))


def test_strongest_edges_with_sequence_ids_equal_plain(matching_paths):
    gen = torch.Generator().manual_seed(3)
    keys = torch.randn(2, 25, 4, generator=gen)
    ids = torch.tensor([[0] * 13 + [1] * 12, [5] * 16 + [-100] * 9])
    got = M._match(keys, 6, 1, ids, -100)
    expected = plain_edges(keys, 6, 1, ids, -100)
    assert all(torch.equal(g, e) for g, e in zip(got, expected, strict=True))


def test_blockwise_matching_equals_whole_batch(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    keys = torch.randint(-1, 2, (7, 41, 6), generator=gen).float()  # with ties
    ids = torch.randint(0, 2, (7, 41), generator=gen)
    whole = [M.bipartite_soft_matching(keys, 9, None, 1), M.bipartite_soft_matching(keys, 5, None, 1, ids)]
    monkeypatch.setattr(matching, "_CPU_SCORE_BLOCK_BYTES", 3 * 4 * 20 * 20)  # blocks of 3 samples
    blocks = [M.bipartite_soft_matching(keys, 9, None, 1), M.bipartite_soft_matching(keys, 5, None, 1, ids)]
    for a, b in zip(whole, blocks, strict=True):
        for name in ("index", "kept", "src", "dst", "sizes"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_blockwise_matching_compiles_fullgraph(monkeypatch):
    torch._dynamo.reset()
    monkeypatch.setattr(matching, "_CPU_SCORE_BLOCK_BYTES", 2 * 4 * 16 * 16)

    def fn(keys, x):
        plan = M.bipartite_soft_matching(keys, 7, None, 1)
        return M.merge(plan, x), plan.index

    keys, x = torch.randn(5, 33, 8), torch.randn(5, 33, 4)
    got = torch.compile(fn, fullgraph=True, backend="eager")(keys, x)
    expected = fn(keys, x)
    torch.testing.assert_close(got[0], expected[0])
    assert torch.equal(got[1], expected[1])


@pytest.mark.parametrize("seed", range(4))
def test_top_indices_equal_stable_sort(seed, matching_paths):
    # topk where its values are strictly decreasing, the stable sort otherwise: the same
    # indices with ties, repeated infinities, NaN and -0.0 / 0.0 alike
    gen = torch.Generator().manual_seed(seed)
    cases = [torch.randn(4, 40, generator=gen), torch.randint(-2, 3, (4, 40), generator=gen).float()]
    special = torch.randn(4, 40, generator=gen)
    special[0, 3], special[0, 9], special[1, 5], special[1, 6] = float("nan"), float("nan"), 0.0, -0.0
    special[2, :10], special[3, ::3] = float("inf"), float("-inf")
    cases.append(special)
    for values in cases:
        for k in (0, 1, 5, 39, 40):
            expected = torch.sort(values, dim=-1, descending=True, stable=True).indices[:, :k]
            assert torch.equal(M._top_indices(values, k), expected), k


def test_chosen_rows_take_argmax_index_with_nan_and_infinite_scores(matching_paths):
    # max(dim).indices stands for argmax: the first maximum, a NaN counting as the maximum
    gen = torch.Generator().manual_seed(7)
    keys = torch.randint(-1, 2, (3, 31, 4), generator=gen).float()  # ties
    bias = torch.zeros(3, 31)
    bias[0, 4], bias[1, 7], bias[2, 3] = float("nan"), float("inf"), float("-inf")
    got = M._match(keys, 10, 1, None, -100, token_bias=bias)
    a, b, _, _ = M._split_ab(keys, 1, None)
    scores = a @ b.transpose(-1, -2) + bias[:, 1::2, None] + bias[:, None, 2::2]
    order = torch.sort(scores.amax(-1), dim=-1, descending=True, stable=True).indices[:, :10]
    assert torch.equal(got[0], order)
    assert torch.equal(got[1], scores.argmax(-1).gather(1, order))


@pytest.mark.parametrize("seed", range(3))
def test_kept_tokens_by_sort_equal_export_safe_scatter(seed, monkeypatch):
    # eager CPU finds the kept tokens with a stable sort; compiling and exporting use a
    # scatter into a spare slot: the same plans, with sizes > 1 and protected tokens
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randint(-1, 2, (4, 37, 5), generator=gen).float()  # with ties
    history = M.MergeHistory(
        torch.arange(37).expand(4, 37), torch.randint(1, 5, (4, 37), generator=gen).float()
    )
    for r in (1, 7, 18):
        by_sort = M.bipartite_soft_matching(keys, r, history, 1)
        monkeypatch.setattr(matching, "_eager", lambda: False)
        by_scatter = M.bipartite_soft_matching(keys, r, history, 1)
        monkeypatch.undo()
        for name in ("index", "kept", "src", "dst", "sizes"):
            assert torch.equal(getattr(by_sort, name), getattr(by_scatter, name)), (r, name)


def test_normalize_with_finite_keys_of_infinite_norm():
    # finite entries whose norm overflows: the cheap finiteness check (the sum of the norms)
    # falls back to the clean-up pass; the result is the plain formula's, zeros for that key
    keys = torch.randn(2, 7, 4)
    keys[0, 2] = 3e38
    for dtype in (torch.float32, torch.bfloat16):
        k = keys.to(dtype)
        expected = (k.float() / k.float().norm(dim=-1, keepdim=True).clamp_min(1e-6)).nan_to_num(
            0.0, 0.0, 0.0
        )
        assert torch.equal(M._normalize(k), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("width", [3, 4, 8])
def test_copy_destinations_as_words_equals_index_copy(dtype, width):
    # rows of 2- and 4-byte entries are copied as int64 words where their bytes allow
    gen = torch.Generator().manual_seed(1)
    keys = _all_into_one()
    plan = M.bipartite_soft_matching(keys, 10, None, 1)
    out = torch.randn(2, 11, width, generator=gen).to(dtype)
    rows = torch.randn(2, 10, width, generator=gen).to(dtype)
    rows = rows.gather(1, torch.zeros(2, 10, width, dtype=torch.long))  # one value per destination
    expected = out.clone()
    expected.view(22, width).index_copy_(0, M._rows(plan.dst, 11), rows.reshape(20, width))
    M._copy_destinations(out, plan, rows, None, M._rows(plan.dst, 11))
    assert torch.equal(out, expected)


@pytest.mark.parametrize("mode", ["mean", "mlerp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_equals_reference_step(mode, dtype):
    # the merge step written out op by op as it was before its ops were shared and made in
    # place (tome 2026-12-07): bit-identical results, with and without gradients
    gen = torch.Generator().manual_seed(5)
    keys = torch.randn(3, 41, 8, generator=gen)
    plans, _ = chain(keys, [8, 6, 5])
    for plan in plans:
        x = torch.randn(3, plan.index.shape[1], 2, 6, generator=gen).to(dtype)
        expected = _reference_merge(plan, x, mode)
        with torch.no_grad():
            assert torch.equal(M.merge(plan, x, mode), expected)
        assert torch.equal(M.merge(plan, x.requires_grad_(), mode).detach(), expected)


def _reference_merge(plan: M.MergePlan, x: torch.Tensor, mode: str) -> torch.Tensor:
    B, N = x.shape[:2]
    r, K = plan.r, N - plan.r
    trail = (1,) * (x.dim() - 2)
    flat = x.reshape(B * N, *x.shape[2:])
    dst_in = plan.kept.gather(1, plan.dst)
    src = torch.where(plan.in_sizes.gather(1, plan.src) == 0, dst_in, plan.src)
    both = flat[M._rows(torch.cat([src, dst_in], 1), N)].view(B, 2 * r, *x.shape[2:]).float()
    moved, target = both[:, :r], both[:, r:]
    weight = plan.in_sizes.gather(1, plan.src) / plan.sizes.gather(1, plan.dst).clamp_min(1e-12)
    term = (moved - target) * weight.view(weight.shape + trail)
    norms = both.flatten(2).norm(dim=-1)
    pair = torch.maximum(norms[:, :r], norms[:, r:])
    largest = norms.new_zeros(B, K).scatter_reduce(1, plan.dst, pair, reduce="amax").gather(1, plan.dst)
    if x.dtype == torch.float32:
        out = flat[M._rows(plan.kept, N)].view(B, K, *x.shape[2:]).clone()
        out.view(B * K, -1, 1).index_add_(0, M._rows(plan.dst, K), term.reshape(B * r, -1, 1))
        if mode == "mlerp":
            rows = out.view(B * K, *x.shape[2:])[M._rows(plan.dst, K)].view(B, r, *x.shape[2:])
            scale = largest / rows.flatten(2).norm(dim=-1).clamp_min(1e-6)
            out.view(B * K, -1)[M._rows(plan.dst, K)] = (rows * scale.view(scale.shape + trail)).reshape(
                B * r, -1
            )
        return out
    last = (
        torch.zeros(B, K, dtype=torch.long)
        .scatter_reduce(1, plan.dst, torch.arange(r).expand(B, r), reduce="amax")
        .gather(1, plan.dst)
    )
    sums = torch.zeros_like(term)
    sums.view(B * r, -1, 1).index_add_(0, M._rows(last, r), term.reshape(B * r, -1, 1))
    new = target + sums.view(B * r, *x.shape[2:])[M._rows(last, r)].view(term.shape)
    if mode == "mlerp":
        scale = largest / new.flatten(2).norm(dim=-1).clamp_min(1e-6)
        new = new * scale.view(scale.shape + trail)
    out = flat[M._rows(plan.kept, N)].view(B, K, *x.shape[2:]).clone()
    out.view(B * K, -1)[M._rows(plan.dst, K)] = new.to(x.dtype).reshape(B * r, -1)
    return out


# -- merging ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(), (6,), (3, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex64])
def test_mean_equals_plain_weighted_average(shape, dtype):
    gen = torch.Generator().manual_seed(1)
    keys = torch.randn(3, 40, 8, generator=gen)
    plans, _ = chain(keys, [6, 9, 9])
    for plan in plans:
        x = torch.randn(3, plan.index.shape[1], *shape, generator=gen).to(dtype)
        got = M.merge(plan, x, "mean")
        assert got.dtype == dtype and got.shape == (3, plan.index.shape[1] - plan.r, *shape)
        tol = 1e-12 if dtype == torch.float64 else 2e-6
        torch.testing.assert_close(got, plain_mean(plan, x).to(dtype), rtol=tol, atol=tol)


def _all_into_one(B: int = 2, N: int = 21) -> torch.Tensor:
    """Keys for which every A token's best partner is the same B token (token 2)."""
    keys = torch.randn(B, N, 4, generator=torch.Generator().manual_seed(5)) * 0.01
    keys[:, 2] = 1.0
    keys[:, 1::2] = 1.0 + keys[:, 1::2]  # A tokens (protected=1): all close to token 2
    return keys


def test_mean_many_into_one_destination_value_and_gradient():
    keys = _all_into_one()
    plan = M.bipartite_soft_matching(keys, 10, None, 1)
    assert (plan.dst == plan.dst[:, :1]).all()  # every merged token lands in one destination
    # a second merge on top, so that sizes differ
    history = M.advance(M.start_history(2, 21), plan)
    plan2 = M.bipartite_soft_matching(torch.randn(2, 11, 4), 4, history, 1)
    for p in (plan, plan2):
        x = torch.randn(2, p.index.shape[1], 3, dtype=torch.float64, requires_grad=True)
        weight = torch.randn(2, p.index.shape[1] - p.r, 3, dtype=torch.float64)
        got = M.merge(p, x, "mean")
        torch.testing.assert_close(got, plain_mean(p, x))
        (grad,) = torch.autograd.grad((got * weight).sum(), x)
        (expected,) = torch.autograd.grad((plain_mean(p, x) * weight).sum(), x)
        torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_merge(dtype):
    gen = torch.Generator().manual_seed(2)
    keys = torch.randn(2, 33, 8, generator=gen)
    plans, _ = chain(keys, [8, 6])
    for plan in plans:
        x = torch.randn(2, plan.index.shape[1], 16, generator=gen)
        got = M.merge(plan, x.to(dtype), "mean")
        assert got.dtype == dtype
        expected = plain_mean(plan, x.to(dtype)).to(dtype)
        # within rounding to the half type: the reduction itself runs in float32
        torch.testing.assert_close(got, expected)
    # values near fp16's limit: differences and sums of them would overflow in fp16
    plan = plans[0]
    big = torch.full((2, plan.index.shape[1], 4), 60000.0)
    big[:, 1::2] = -60000.0
    got = M.merge(plan, big.half(), "mean")
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), plain_mean(plan, big).float(), rtol=1e-3, atol=1.0)


@pytest.mark.parametrize("mode", ["mean", "mlerp"])
def test_gradients_when_many_tokens_merge_into_one(mode):
    # mlerp writes each destination once per token it received: its gradient must still count
    # once (it counted once per token before the fix).
    plan = M.bipartite_soft_matching(_all_into_one(), 10, None, 1)
    x = torch.randn(2, 21, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: M.merge(plan, t, mode), (x,))


@pytest.mark.parametrize("mode", ["mean", "mlerp"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_merge_rounds_the_float32_result_once(mode, dtype):
    # The half path gathers the kept tokens as they are and computes only the destinations in
    # float32: the float32 path's result, rounded (at most one rounding apart), gradients too.
    keys = _all_into_one()
    plan = M.bipartite_soft_matching(keys, 10, None, 1)  # many tokens into one destination
    history = M.advance(M.start_history(2, 21), plan)
    plan2 = M.bipartite_soft_matching(torch.randn(2, 11, 4), 4, history, 1)
    gen = torch.Generator().manual_seed(3)
    for p in (plan, plan2):
        x = (3 * torch.randn(2, p.index.shape[1], 2, 8, generator=gen)).to(dtype).requires_grad_()
        got = M.merge(p, x, mode)
        expected = M.merge(p, x.float(), mode)
        assert got.dtype == dtype
        ulp = torch.finfo(dtype).eps * expected.abs().clamp_min(1e-2)
        assert ((got.float() - expected).abs() <= ulp).all()
        weight = torch.randn(got.shape, generator=gen)
        (grad,) = torch.autograd.grad((got.float() * weight).sum(), x)
        (grad_float,) = torch.autograd.grad((expected * weight).sum(), x)
        torch.testing.assert_close(grad.float(), grad_float.float(), rtol=0.02, atol=0.02)


def test_half_precision_keys_match_like_float32():
    # the similarity is computed in float32 whatever the keys' dtype
    keys = torch.randn(2, 31, 8, generator=torch.Generator().manual_seed(4)).half()
    a = M.bipartite_soft_matching(keys, 7, None, 1)
    b = M.bipartite_soft_matching(keys.float(), 7, None, 1)
    assert torch.equal(a.index, b.index)


def test_matching_under_autocast_is_float32():
    # autocast would run the similarity in bfloat16, rounding close scores into ties
    keys = 1 + 0.05 * torch.randn(4, 197, 64, generator=torch.Generator().manual_seed(8))  # cos ~ 0.99
    expected = M.bipartite_soft_matching(keys, 40, None, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = M.bipartite_soft_matching(keys, 40, None, 1)
    assert torch.equal(got.index, expected.index)


@pytest.mark.parametrize("mode", ["sum", "amax", "amin", "drop"])
def test_other_modes_equal_plain(mode):
    gen = torch.Generator().manual_seed(6)
    keys = torch.randn(2, 30, 8, generator=gen)
    plan = M.bipartite_soft_matching(keys, 9, None, 1)
    x = torch.randn(2, 30, 5, generator=gen)
    got = M.merge(plan, x, mode)
    if mode == "drop":
        expected = x.gather(1, M._expand_index(plan.kept, x))
    else:
        out = torch.zeros(2, 21, 5) if mode == "sum" else torch.full((2, 21, 5), float("nan"))
        index = M._expand_index(plan.index, x)
        if mode == "sum":
            expected = out.scatter_add(1, index, x)
        else:
            expected = out.scatter_reduce(1, index, x, reduce=mode, include_self=False)
    torch.testing.assert_close(got, expected)


# -- compiled patched models --------------------------------------------------------------------


def test_transformers_compile_matches_eager():
    transformers = pytest.importorskip("transformers")
    torch._dynamo.reset()
    torch.manual_seed(0)
    config = transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=4, mlp_ratio=2, image_size=48, patch_size=8
    )
    model = transformers.Dinov2Model(config).eval()
    model.set_attn_implementation("sdpa")
    tome.patch(model, r=4, unmerge_output=True)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        expected = model(pixel_values=x).last_hidden_state
        for fullgraph in (False, True):
            torch._dynamo.reset()
            compiled = torch.compile(model, fullgraph=fullgraph, backend="aot_eager")
            got = compiled(pixel_values=x).last_hidden_state
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
            assert got.shape == (2, 37, 32)
            assert model.tome.tokens_per_layer == [37, 33, 29, 25]


# -- the benchmark's reference and FLOP count ---------------------------------------------------


@pytest.fixture
def benchmarks(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import reference_tome
    import speed

    return reference_tome, speed


def _tiny_timm(depth: int = 3):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_small_patch14_dinov2", pretrained=False, img_size=56, embed_dim=64, num_heads=2, depth=depth
    ).eval()
    for module in model.modules():
        if hasattr(module, "gamma"):
            torch.nn.init.constant_(module.gamma, 0.5)
    return model, torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))


def test_reference_tome(benchmarks):
    reference_tome, _ = benchmarks
    model, x = _tiny_timm(depth=1)
    with torch.no_grad():
        plain = model(x)
        state = reference_tome.apply(model, 0)
        torch.testing.assert_close(model(x), plain)
        reference_tome.remove(model)
        # one block: the same tokens merge (order aside), so the class token comes out the same
        state = reference_tome.apply(model, 6)
        ref = model(x)
        reference_tome.remove(model)
        tome.patch(model, r=6)
        ours = model(x)
        assert model.tome.tokens_per_layer == state.tokens_per_layer == [17, 11]
        tome.unpatch(model)
    torch.testing.assert_close(ref, ours, atol=1e-5, rtol=1e-5)
    assert torch.equal(state.source.sum(1), torch.ones(2, 17))  # every original token once
    assert "forward" not in model.blocks[0].__dict__


def test_flop_count_matches_torch_flop_counter(benchmarks):
    from torch.utils.flop_counter import FlopCounterMode

    _, speed = benchmarks
    model, x = _tiny_timm()
    for block in model.blocks:
        block.attn.fused_attn = False  # explicit attention matmuls, which the counter sees
    spec = speed._timm_model(model, 56)
    B, D = x.shape[0], 32  # head_dim: the matching metric is the keys averaged over heads
    for r in (0, 4):
        tome.patch(model, r=r)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
        tokens = model.tome.tokens_per_layer
        tome.unpatch(model)
        # the matching similarity A x B is extra work, not part of the model's FLOPs
        sets = [((n - 1 + 1) // 2, (n - 1) // 2) for n in tokens[:-1]]  # |A|, |B| (1 protected)
        matching = sum(2 * B * a * b * D for a, b in sets) if r else 0
        assert counter.get_total_flops() - matching == B * spec.flops(tokens)
