"""Unit tests for :class:`tome.TokenMerger` against slow, loop-based references."""

from __future__ import annotations

import pytest
import torch

import tome
from tome import TokenMerger

MODES = ("mean", "sum", "amax", "amin", "drop", "mlerp")


# -- slow references ---------------------------------------------------------------------------


def groups_of(source: torch.Tensor, num_tokens: int) -> list[list[list[int]]]:
    """groups[b][j] = the original tokens held by merged token j of sample b (Python loops)."""
    groups = []
    for row in source.tolist():
        per_sample = [[] for _ in range(num_tokens)]
        for i, j in enumerate(row):
            per_sample[j].append(i)
        groups.append(per_sample)
    return groups


def reference_merge(
    x: torch.Tensor, source: torch.Tensor, num_tokens: int, mode: str, protected: int = 0
) -> torch.Tensor:
    """One merge step (``source`` of a single, unchained merger), with Python loops over groups.

    Computes in float64 for floating inputs, in the input dtype otherwise.
    """
    work = x.double() if x.is_floating_point() else x
    out = []
    for b, sample in enumerate(groups_of(source, num_tokens)):
        rows = []
        for members in sample:
            assert members, "every merged token must hold at least one original token"
            vals = work[b, members]
            if mode == "mean":
                rows.append(vals.mean(0))
            elif mode == "sum":
                rows.append(vals.any(0) if x.dtype == torch.bool else vals.sum(0))
            elif mode == "amax":
                rows.append(vals.amax(0) if x.dtype != torch.bool else vals.any(0))
            elif mode == "amin":
                rows.append(vals.amin(0) if x.dtype != torch.bool else vals.all(0))
            elif mode == "drop":
                # the surviving token of a group is its B-set member (odd unprotected position),
                # or the token itself when nothing merged into it
                kept = [i for i in members if (i - protected) % 2 == 1] if len(members) > 1 else members
                assert len(kept) == 1
                rows.append(work[b, kept[0]])
            elif mode == "mlerp":
                mean = vals.mean(0)
                norms = vals.flatten(1).norm(dim=-1) if vals.dim() > 1 else vals.abs()
                rows.append(mean * norms.max() / mean.norm().clamp_min(1e-6))
            else:
                raise AssertionError(mode)
        out.append(torch.stack(rows) if rows else work.new_zeros((0, *x.shape[2:])))
    if not out:
        return work.new_zeros((0, num_tokens, *x.shape[2:]))
    return torch.stack(out)


def reference_group_mean(x0: torch.Tensor, source: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """(B, N, ...) mean of the original tokens ``x0`` (B, N0, ...) over every group, in float64."""
    return reference_merge(x0, source, num_tokens, "mean")


# -- the seed's snippets ------------------------------------------------------------------------


def test_seed_snippet_single_layer():
    keys = torch.randn(32, 128, 768)
    tm = TokenMerger(keys, 32)
    merged = tm(torch.randn(32, 128, 64))
    assert merged.shape == (32, 96, 64)
    assert tm.unmerge(merged).shape == (32, 128, 64)


def test_seed_snippet_chained():
    x = torch.randn(1, 16, 2)
    tm1 = TokenMerger(x, 4)
    x1 = tm1(x)
    assert x1.shape == (1, 12, 2)
    tm2 = TokenMerger(x1, 4, adm=tm1.adm)
    x2 = tm2(x1)
    assert x2.shape == (1, 8, 2)
    assert tm2.unmerge(x2).shape == (1, 16, 2)
    assert tm2.sizes.sum().item() == 16


def test_public_names():
    assert set(tome.MODES) == set(MODES)
    assert tome.max_r(197, protected=1) == 98


# -- every mode against the reference -----------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("protected", [0, 1, 3])
@pytest.mark.parametrize("trailing", [(), (5,), (2, 3)])
def test_modes_match_reference(mode, protected, trailing):
    torch.manual_seed(0)
    B, N, r = 3, 17, 6
    keys = torch.randn(B, N, 8)
    x = torch.randn(B, N, *trailing, dtype=torch.float64)
    tm = TokenMerger(keys, r, protected=protected)
    out = tm.merge(x, mode=mode)
    assert out.shape == (B, N - r, *trailing)
    assert out.dtype == x.dtype
    expected = reference_merge(x, tm.source, N - r, mode, protected)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)


def test_call_is_mean_merge():
    keys = torch.randn(2, 12, 4)
    x = torch.randn(2, 12, 3)
    tm = TokenMerger(keys, 5)
    torch.testing.assert_close(tm(x), tm.merge(x, mode="mean"))


@pytest.mark.parametrize("depth", [2, 3])
def test_chained_mean_is_exact_mean_of_originals(depth):
    torch.manual_seed(1)
    B, N0, C = 4, 31, 6
    x0 = torch.randn(B, N0, C, dtype=torch.float64)
    x, adm = x0, None
    for layer in range(depth):
        keys = x.float() + 0.1 * torch.randn(x.shape)  # similarity features differ from x
        tm = TokenMerger(keys, 5 - layer, adm=adm, protected=1)
        x = tm(x)
        adm = tm.adm
        expected = reference_group_mean(x0, tm.source, x.shape[1])
        torch.testing.assert_close(x, expected, rtol=1e-10, atol=1e-10)
        # unmerge gives every original token the mean of its group
        torch.testing.assert_close(tm.unmerge(x), expected.gather(1, tm.source[..., None].expand(-1, -1, C)))
    assert tm.sizes.sum(1).tolist() == [N0] * B


@pytest.mark.parametrize("mode", ["sum", "amax", "amin"])
def test_chained_reductions_reduce_over_originals(mode):
    torch.manual_seed(2)
    B, N0 = 2, 20
    x0 = torch.randn(B, N0, 3, dtype=torch.float64)
    x, adm = x0, None
    for r in (4, 3, 3):
        tm = TokenMerger(torch.randn(B, x.shape[1], 5), r, adm=adm)
        x, adm = tm.merge(x, mode=mode), tm.adm
    ref_mode = "sum" if mode == "sum" else mode
    torch.testing.assert_close(x, reference_merge(x0, tm.source, x.shape[1], ref_mode))


@pytest.mark.parametrize("mode", ["sum", "amax", "amin", "drop"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_integer_and_bool_keep_dtype(mode, dtype):
    torch.manual_seed(3)
    keys = torch.randn(2, 15, 4)
    x = torch.rand(2, 15, 3) > 0.5 if dtype == torch.bool else torch.randint(0, 10, (2, 15, 3)).to(dtype)
    tm = TokenMerger(keys, 6)
    out = tm.merge(x, mode=mode)
    assert out.dtype == dtype
    assert torch.equal(out, reference_merge(x, tm.source, 9, mode))


@pytest.mark.parametrize("mode", ["mean", "mlerp"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_mean_of_integers_raises(mode, dtype):
    tm = TokenMerger(torch.randn(1, 8, 4), 2)
    with pytest.raises(TypeError, match=r"x: mode .* floating point"):
        tm.merge(torch.zeros(1, 8, 2, dtype=dtype), mode=mode)


# -- argument checking --------------------------------------------------------------------------


def test_negative_r():
    with pytest.raises(ValueError, match=r"^r: .*r >= 0"):
        TokenMerger(torch.randn(1, 8, 4), -1)


@pytest.mark.parametrize(
    ("N", "protected", "limit"), [(8, 0, 4), (9, 0, 4), (10, 1, 4), (197, 1, 98), (5, 4, 0)]
)
def test_r_too_large_names_maximum(N, protected, limit):
    keys = torch.randn(2, N, 4)
    TokenMerger(keys, limit, protected=protected)  # the maximum itself is fine
    with pytest.raises(ValueError, match=rf"^r: at most {limit} tokens"):
        TokenMerger(keys, limit + 1, protected=protected)


@pytest.mark.parametrize("r", [1.0, "2", True, None])
def test_r_not_an_int(r):
    with pytest.raises(TypeError, match=r"^r: expected an int"):
        TokenMerger(torch.randn(1, 8, 4), r)


@pytest.mark.parametrize("shape", [(8, 4), (1, 8, 4, 2), (8,)])
def test_keys_not_3d(shape):
    with pytest.raises(ValueError, match=r"^keys: expected shape \(B, N, D\)"):
        TokenMerger(torch.randn(shape), 1)


def test_keys_not_a_float_tensor():
    with pytest.raises(TypeError, match=r"^keys:"):
        TokenMerger(torch.ones(1, 8, 4, dtype=torch.int64), 1)
    with pytest.raises(TypeError, match=r"^keys:"):
        TokenMerger([[1.0, 2.0]], 1)


@pytest.mark.parametrize("x_shape", [(3, 10, 5), (2, 9, 5), (2, 11, 5), (10,), (2,)])
def test_x_mismatched_with_keys(x_shape):
    tm = TokenMerger(torch.randn(2, 10, 4), 3)
    with pytest.raises(ValueError, match=r"^x: expected shape \(B, N, \.\.\.\) with \(B, N\) = \(2, 10\)"):
        tm.merge(torch.randn(x_shape))


def test_unmerge_mismatched():
    tm = TokenMerger(torch.randn(2, 10, 4), 3)
    with pytest.raises(ValueError, match=r"^x: .*\(2, 7\)"):
        tm.unmerge(torch.randn(2, 10, 5))  # unmerge takes merged tokens
    with pytest.raises(ValueError, match=r"^x: .*\(2, 7\)"):
        tm.unmerge(torch.randn(1, 7, 5))
    with pytest.raises(ValueError, match=r"^x: .*\(2, 10\)"):
        tm.merge_original(torch.randn(2, 7, 5))


def test_x_not_a_tensor():
    tm = TokenMerger(torch.randn(1, 6, 4), 1)
    with pytest.raises(TypeError, match=r"^x: expected a torch.Tensor"):
        tm.merge([[0.0] * 6])


@pytest.mark.parametrize(("N", "protected"), [(8, 8), (8, 9), (8, -1)])
def test_bad_protected(N, protected):
    with pytest.raises(ValueError, match=r"^protected: expected 0 <= protected < N"):
        TokenMerger(torch.randn(1, N, 4), 0, protected=protected)


def test_sequence_ids_wrong_shape():
    keys = torch.randn(2, 8, 4)
    for bad in (
        torch.zeros(2, 7, dtype=torch.long),
        torch.zeros(1, 8, dtype=torch.long),
        torch.zeros(2, 8, 1),
    ):
        with pytest.raises((ValueError, TypeError), match=r"^sequence_ids: "):
            TokenMerger(keys, 1, sequence_ids=bad)
    with pytest.raises(ValueError, match=r"^sequence_ids: expected shape \(B, N\) = \(2, 8\)"):
        TokenMerger(keys, 1, sequence_ids=torch.zeros(2, 7, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool, torch.complex64])
def test_sequence_ids_wrong_dtype(dtype):
    with pytest.raises(TypeError, match=r"^sequence_ids: expected an integer tensor"):
        TokenMerger(torch.randn(2, 8, 4), 1, sequence_ids=torch.zeros(2, 8, dtype=dtype))


def test_sequence_ids_not_a_tensor():
    with pytest.raises(TypeError, match=r"^sequence_ids: "):
        TokenMerger(torch.randn(1, 4, 4), 1, sequence_ids=[[0, 0, 0, 0]])


def test_adm_that_does_not_belong():
    tm1 = TokenMerger(torch.randn(2, 16, 4), 4)  # its adm belongs to (2, 12) tokens
    with pytest.raises(ValueError, match=r"^adm: .*\(2, 12\)"):
        TokenMerger(torch.randn(2, 16, 4), 2, adm=tm1.adm)  # forgot to merge
    with pytest.raises(ValueError, match=r"^adm: "):
        TokenMerger(torch.randn(3, 12, 4), 2, adm=tm1.adm)  # wrong batch
    with pytest.raises(ValueError, match=r"^adm: "):
        TokenMerger(torch.randn(2, 16, 4), 2, adm=tm1.dense_adm())  # dense, wrong N
    with pytest.raises(ValueError, match=r"^adm: "):
        TokenMerger(torch.randn(2, 12, 4), 2, adm=torch.ones(2, 12))  # not 3-D
    with pytest.raises(TypeError, match=r"^adm: "):
        TokenMerger(torch.randn(2, 12, 4), 2, adm="history")


def test_unknown_mode():
    tm = TokenMerger(torch.randn(1, 8, 4), 2)
    with pytest.raises(ValueError, match=r"^mode: expected one of mean, sum"):
        tm.merge(torch.randn(1, 8, 2), mode="max")


def test_r_too_large_for_sequence_ids():
    # ids: [0 0 0 0 | 1 1 1 1]; A = even positions, B = odd; every A token has a same-id B token.
    ids = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1]])
    keys = torch.randn(1, 8, 4)
    TokenMerger(keys, 4, sequence_ids=ids)
    # alternating ids: A tokens all have id 0, B tokens id 1: nothing can merge
    alternating = torch.tensor([[0, 1, 0, 1, 0, 1, 0, 1]])
    TokenMerger(keys, 0, sequence_ids=alternating)
    with pytest.raises(ValueError, match=r"^r: with these sequence_ids at most 0 tokens"):
        TokenMerger(keys, 1, sequence_ids=alternating)
    # the limit is the minimum over the batch
    both = torch.cat([ids, torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1]])])  # token 0 has no partner
    with pytest.raises(ValueError, match=r"^r: with these sequence_ids at most 3 tokens"):
        TokenMerger(torch.randn(2, 8, 4), 4, sequence_ids=both)
    # validate=False skips the (host-syncing) check
    TokenMerger(keys, 1, sequence_ids=alternating, validate=False)


# -- degenerate keys ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_zero_and_nan_keys(mode):
    torch.manual_seed(4)
    B, N = 2, 14
    keys = torch.randn(B, N, 6)
    keys[0] = 0.0  # a whole sample of zero-norm keys
    keys[1, 3] = 0.0  # one zero key
    keys[1, 5, 2] = float("nan")
    keys[1, 6] = float("nan")
    keys[1, 7, 0] = float("inf")
    keys[1, 8, 1] = -float("inf")
    x = torch.randn(B, N, 3)
    tm = TokenMerger(keys, 6, protected=1)
    out = tm.merge(x, mode=mode)
    assert torch.isfinite(out).all()
    assert torch.isfinite(tm.unmerge(out)).all()
    assert tm.sizes.sum(1).tolist() == [N, N]
    expected = reference_merge(x, tm.source, N - 6, mode, protected=1)
    torch.testing.assert_close(out, expected.float(), rtol=1e-5, atol=1e-5)


def test_all_nan_keys():
    keys = torch.full((1, 10, 4), float("nan"))
    x = torch.randn(1, 10, 3)
    tm = TokenMerger(keys, 5)
    assert torch.isfinite(tm(x)).all()


def test_key_with_a_nan_entry_counts_as_all_zero():
    # Token 0 would equal token 1 if only its NaN entry were zeroed; as a whole zero key it has
    # similarity 0 with everything, so the one merge joins tokens 2 and 3 instead.
    keys = torch.tensor([[[float("nan"), 1.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.1], [1.0, 0.0, 0.0]]])
    tm = TokenMerger(keys, 1)
    assert tm.sizes.tolist() == [[1.0, 1.0, 2.0]]


def test_best_edges_gradients_stay_finite_with_nan_keys():
    from tome.core.merge import best_edges

    keys = torch.randn(2, 9, 4)
    keys[0, 3, 1] = float("nan")
    keys[1, 4] = float("inf")
    keys.requires_grad_(True)
    scores, _ = best_edges(keys, protected=1)
    scores.sum().backward()
    assert torch.isfinite(scores).all() and torch.isfinite(keys.grad).all()
    assert keys.grad[0, 3].abs().sum() == 0 and keys.grad[1, 4].abs().sum() == 0
    with torch.no_grad():  # the same scores as the fast path
        torch.testing.assert_close(best_edges(keys.detach(), protected=1)[0], scores)


def test_mlerp_zero_mean_group_is_finite():
    # two exactly opposite values merged: the mean is zero, rescaling must not produce NaN
    keys = torch.ones(1, 2, 4)
    x = torch.tensor([[[1.0, 2.0], [-1.0, -2.0]]])
    out = TokenMerger(keys, 1).merge(x, mode="mlerp")
    assert torch.isfinite(out).all()
    assert torch.equal(out, torch.zeros(1, 1, 2))


# -- edge shapes --------------------------------------------------------------------------------


def test_single_token():
    keys = torch.randn(2, 1, 4)
    tm = TokenMerger(keys, 0)
    x = torch.randn(2, 1, 3)
    assert torch.equal(tm(x), x)
    assert torch.equal(tm.unmerge(x), x)
    with pytest.raises(ValueError, match=r"^r: at most 0"):
        TokenMerger(keys, 1)
    tm = TokenMerger(keys, 0, protected=0)
    assert tm.source.tolist() == [[0], [0]]


def test_two_tokens():
    x = torch.tensor([[[1.0, 0.0], [3.0, 2.0]]])
    tm = TokenMerger(x, 1)
    torch.testing.assert_close(tm(x), torch.tensor([[[2.0, 1.0]]]))
    torch.testing.assert_close(tm.unmerge(tm(x)), torch.tensor([[[2.0, 1.0], [2.0, 1.0]]]))
    assert tm.source.tolist() == [[0, 0]]
    assert tm.sizes.tolist() == [[2.0]]


@pytest.mark.parametrize("N", [3, 7, 15, 33])
def test_odd_n_max_r(N):
    torch.manual_seed(N)
    keys = torch.randn(2, N, 4)
    r = N // 2
    tm = TokenMerger(keys, r)
    x = torch.randn(2, N, 3, dtype=torch.float64)
    out = tm(x)
    assert out.shape == (2, N - r, 3)
    torch.testing.assert_close(out, reference_merge(x, tm.source, N - r, "mean"))
    # with r = |B| every B token receives exactly one A token except one (N odd: |A| = |B| + 1)
    assert (tm.sizes >= 1).all() and tm.sizes.sum().item() == 2 * N


def test_batch_of_one_equals_batched():
    torch.manual_seed(5)
    keys = torch.randn(4, 20, 8)
    x = torch.randn(4, 20, 3)
    batched = TokenMerger(keys, 7, protected=1)
    for b in range(4):
        single = TokenMerger(keys[b : b + 1], 7, protected=1)
        assert torch.equal(single.source, batched.source[b : b + 1])
        torch.testing.assert_close(single(x[b : b + 1]), batched(x)[b : b + 1])


@pytest.mark.parametrize("mode", MODES)
def test_empty_batch(mode):
    keys = torch.randn(0, 10, 4)
    tm = TokenMerger(keys, 3, protected=1, sequence_ids=torch.zeros(0, 10, dtype=torch.long))
    out = tm.merge(torch.randn(0, 10, 5), mode=mode)
    assert out.shape == (0, 7, 5)
    assert tm.unmerge(out).shape == (0, 10, 5)
    assert tm.source.shape == (0, 10) and tm.sizes.shape == (0, 7)
    tm2 = TokenMerger(torch.randn(0, 7, 4), 2, adm=tm.adm)
    assert tm2.unmerge(tm2(out)).shape == (0, 10, 5)


@pytest.mark.parametrize("protected", [0, 1])
def test_r_zero_is_identity(protected):
    torch.manual_seed(6)
    keys = torch.randn(3, 9, 4)
    x = torch.randn(3, 9, 5)
    tm = TokenMerger(keys, 0, protected=protected)
    for mode in MODES:
        assert torch.equal(tm.merge(x, mode=mode), x)
    assert torch.equal(tm.unmerge(x), x)
    assert tm.source.tolist() == [list(range(9))] * 3
    assert torch.equal(tm.sizes, torch.ones(3, 9))
    # r = 0 in the middle of a chain keeps the history
    tm1 = TokenMerger(keys, 3)
    tm2 = TokenMerger(torch.randn(3, 6, 4), 0, adm=tm1.adm)
    assert torch.equal(tm2.source, tm1.source) and torch.equal(tm2.sizes, tm1.sizes)
    y = tm1(x)
    assert torch.equal(tm2(y), y)
    assert torch.equal(tm2.unmerge(y), tm1.unmerge(y))


@pytest.mark.parametrize("trailing", [(), (4,), (2, 3), (1, 2, 2)])
def test_trailing_dims(trailing):
    torch.manual_seed(7)
    keys = torch.randn(2, 12, 4)
    x = torch.randn(2, 12, *trailing, dtype=torch.float64)
    tm = TokenMerger(keys, 5)
    out = tm(x)
    assert out.shape == (2, 7, *trailing)
    torch.testing.assert_close(out, reference_merge(x, tm.source, 7, "mean"))
    full = tm.unmerge(out)
    assert full.shape == x.shape
    for b in range(2):
        for i in range(12):
            assert torch.equal(full[b, i], out[b, tm.source[b, i]])
    # merge_original: per-original-token tensors averaged over the groups
    torch.testing.assert_close(tm.merge_original(x), out)


# -- protected tokens and sequence ids ----------------------------------------------------------


@pytest.mark.parametrize("protected", [1, 2, 5])
def test_protected_tokens_stay_in_front(protected):
    torch.manual_seed(8)
    B, N = 3, 25
    # make the protected tokens the most similar to everything: they must still never merge
    keys = torch.randn(B, N, 6)
    keys[:, :protected] = keys[:, protected:].mean(1, keepdim=True)
    x = torch.randn(B, N, 4)
    x0, adm = x, None
    for _ in range(3):
        tm = TokenMerger(keys, (N - protected) // 2, adm=adm, protected=protected)
        x, adm = tm(x), tm.adm
        N = x.shape[1]
        keys = x.clone()
        assert torch.equal(x[:, :protected], x0[:, :protected])
        assert torch.equal(tm.sizes[:, :protected], torch.ones(B, protected))
        assert tm.source[:, :protected].tolist() == [list(range(protected))] * B
        # no other original token ends up in a protected token
        assert (tm.source[:, protected:] >= protected).all()


def test_sequence_ids_never_mix():
    torch.manual_seed(9)
    B, N = 3, 24
    ids = torch.tensor([[0] * 10 + [1] * 8 + [-100] * 6, [0] * 24, [0] * 5 + [1] * 5 + [2] * 14])
    keys = torch.randn(B, N, 4)
    x0 = torch.randn(B, N, 2)
    x, adm, cur_ids = x0, None, ids
    for r in (4, 3, 3):
        tm = TokenMerger(keys[:, : x.shape[1]], r, adm=adm, sequence_ids=cur_ids, protected=0)
        merged_ids = tm.merged_ids
        # every original token's id equals the id of the token that holds it
        assert torch.equal(merged_ids.gather(1, tm.source), ids)
        x, adm, cur_ids = tm(x), tm.adm, merged_ids
    assert merged_ids.dtype == ids.dtype


def test_padding_merges_with_padding_first():
    torch.manual_seed(10)
    B, N, pad = 2, 20, 8
    ids = torch.zeros(B, N, dtype=torch.long)
    ids[:, N - pad :] = -100
    # content tokens are near-duplicates (cosine ~1), padding keys random: without the padding
    # rule content tokens would merge first
    keys = torch.randn(B, 1, 6).expand(B, N, 6) + 1e-3 * torch.randn(B, N, 6)
    keys = keys.clone()
    keys[:, N - pad :] = torch.randn(B, pad, 6)
    tm = TokenMerger(keys, pad // 2, sequence_ids=ids)
    # only padding merged: every content token is alone in its group
    sizes_of_originals = tm.sizes.gather(1, tm.source)
    assert (sizes_of_originals[:, : N - pad] == 1).all()
    assert (tm.merged_ids[:, -(pad // 2) :] == -100).all()
    # a custom mask_id works the same way
    tm = TokenMerger(keys, pad // 2, sequence_ids=ids.masked_fill(ids == -100, 7), mask_id=7)
    assert (tm.sizes.gather(1, tm.source)[:, : N - pad] == 1).all()


def test_sequence_ids_with_protected():
    ids = torch.tensor([[5, 0, 0, 0, 0, 1, 1, 1, 1]])
    keys = torch.randn(1, 9, 4)
    tm = TokenMerger(keys, 4, sequence_ids=ids, protected=1)
    assert tm.source[0, 0].item() == 0 and tm.sizes[0, 0].item() == 1
    assert torch.equal(tm.merged_ids.gather(1, tm.source), ids)


# -- gradients ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_gradients_flow_through_merge(mode):
    torch.manual_seed(11)
    keys = torch.randn(2, 12, 4, requires_grad=True)
    x = torch.randn(2, 12, 3, dtype=torch.float64, requires_grad=True)
    tm = TokenMerger(keys, 5, protected=1)
    out = tm.merge(x, mode=mode)
    assert out.requires_grad
    tm.unmerge(out).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert keys.grad is None  # matching carries no gradient
    assert not tm.sizes.requires_grad and not tm.source.requires_grad


def test_mean_gradient_values():
    torch.manual_seed(12)
    x = torch.randn(2, 10, 3, requires_grad=True)
    tm = TokenMerger(x.detach(), 4)
    tm(x).sum().backward()
    # d(sum of group means)/dx_i = 1 / size(group of i)
    expected = (1.0 / tm.sizes.gather(1, tm.source))[..., None].expand(-1, -1, 3)
    torch.testing.assert_close(x.grad, expected)


def test_gradcheck_mean_chain():
    torch.manual_seed(13)
    keys = torch.randn(1, 9, 4)
    tm1 = TokenMerger(keys, 3)
    tm2 = TokenMerger(torch.randn(1, 6, 4), 2, adm=tm1.adm)
    x = torch.randn(1, 9, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: tm2.unmerge(tm2(tm1(t))), (x,))


def test_keys_that_require_grad_are_the_tokens():
    # the common pattern: the similarity features are the very tokens being merged
    x = torch.randn(2, 16, 8, requires_grad=True)
    tm = TokenMerger(x, 6)
    tm(x).pow(2).sum().backward()
    assert x.grad is not None


# -- dtypes -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["mean", "sum", "amax", "amin", "drop", "mlerp"])
def test_float_dtypes(dtype, mode):
    torch.manual_seed(14)
    keys = torch.randn(2, 40, 16)
    x32 = torch.randn(2, 40, 8)
    tm = TokenMerger(keys.to(dtype), 18, protected=1)
    tm32 = TokenMerger(keys, 18, protected=1)
    out = tm.merge(x32.to(dtype), mode=mode)
    assert out.dtype == dtype
    # half keys are compared in float32: the same merges as with float32 keys (random keys,
    # no near ties at this size)
    assert torch.equal(tm.source, tm32.source)
    ref = tm32.merge(x32.to(dtype).float(), mode=mode)
    tol = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)
    assert tm.sizes.dtype == torch.float32 and tm.source.dtype == torch.int64


def test_half_precision_mean_of_many_tokens_does_not_overflow():
    # equal keys pile 127 of the 128 tokens into one group: 127 x 1000 > fp16 max (65504), so the
    # size-weighted sum must accumulate in float32
    B, N0 = 1, 128
    x = torch.full((B, N0, 2), 1000.0, dtype=torch.float16)
    keys = torch.ones(B, N0, 4)
    adm = None
    for _ in range(6):
        tm = TokenMerger(keys[:, : x.shape[1]], x.shape[1] // 2, adm=adm)
        x, adm = tm(x), tm.adm
    assert x.shape[1] == 2 and tm.sizes.max().item() == 127
    assert torch.isfinite(x).all()
    assert torch.equal(x, torch.full_like(x, 1000.0))


# -- dense adjacency ----------------------------------------------------------------------------


def test_dense_adm_matches_source():
    torch.manual_seed(15)
    tm1 = TokenMerger(torch.randn(2, 15, 4), 5)
    tm2 = TokenMerger(torch.randn(2, 10, 4), 3, adm=tm1.adm)
    for tm in (tm1, tm2):
        dense = tm.dense_adm()
        B, N, N0 = dense.shape
        assert (2, tm.sizes.shape[1], 15) == (B, N, N0)
        assert dense.dtype == torch.float32
        for b in range(B):
            for i in range(N0):
                column = dense[b, :, i]
                assert column.sum().item() == 1 and column[tm.source[b, i]].item() == 1
        torch.testing.assert_close(dense.sum(-1), tm.sizes)
    assert tm1.dense_adm(torch.bool).dtype == torch.bool


def test_dense_seed_adm_is_accepted():
    torch.manual_seed(16)
    x = torch.randn(2, 16, 4)
    tm1 = TokenMerger(x, 4)
    x1 = tm1(x)
    via_history = TokenMerger(x1, 3, adm=tm1.adm)
    via_dense = TokenMerger(x1, 3, adm=tm1.dense_adm())
    assert torch.equal(via_dense.source, via_history.source)
    assert torch.equal(via_dense.sizes, via_history.sizes)
    torch.testing.assert_close(via_dense(x1), via_history(x1))
    # any dtype of 0/1 matrix, including our own dense_adm(torch.bool)
    for dtype in (torch.bool, torch.float16, torch.int64):
        assert torch.equal(TokenMerger(x1, 3, adm=tm1.dense_adm(dtype)).source, via_history.source)
    # the seed's first-layer adm: the identity matrix
    eye = torch.eye(16).expand(2, 16, 16)
    assert torch.equal(TokenMerger(x, 4, adm=eye).source, tm1.source)


# -- determinism --------------------------------------------------------------------------------


def test_deterministic():
    torch.manual_seed(17)
    keys = torch.randn(4, 50, 8)
    a = TokenMerger(keys, 20, protected=1)
    b = TokenMerger(keys.clone(), 20, protected=1)
    assert torch.equal(a.source, b.source) and torch.equal(a.sizes, b.sizes)


@pytest.mark.parametrize("protected", [0, 1])
def test_ties_resolve_deterministically(protected):
    # all keys equal: every edge ties. Ties go to the lowest B index, and equal scores merge in
    # token order.
    B, N, r = 2, 11 + protected, 4
    for keys in (torch.ones(B, N, 8), torch.zeros(B, N, 8), torch.randn(1, 1, 8).expand(B, N, 8)):
        sources = {
            tuple(TokenMerger(keys, r, protected=protected).source.flatten().tolist()) for _ in range(3)
        }
        assert len(sources) == 1
        tm = TokenMerger(keys, r, protected=protected)
        p = protected
        # A tokens p, p+2, p+4, p+6 all merge into the first B token (p + 1)
        holder = tm.source[:, p + 1]
        assert (tm.source[:, [p, p + 2, p + 4, p + 6]] == holder[:, None]).all()
        assert tm.sizes[:, p].tolist() == [r + 1] * B


def test_repr():
    tm = TokenMerger(torch.randn(2, 10, 4), 3, protected=1)
    assert repr(tm) == "TokenMerger(B=2, N=10, r=3, protected=1, N0=10)"


# -- torch.compile ------------------------------------------------------------------------------


def _merge_unmerge(keys: torch.Tensor, x: torch.Tensor, r: int):
    tm = TokenMerger(keys, r, protected=1)
    merged = tm(x)
    tm2 = TokenMerger(merged, r, adm=tm.adm, protected=1)
    merged2 = tm2(merged)
    return merged, merged2, tm2.unmerge(merged2), tm2.sizes, tm2.source


@pytest.mark.parametrize(
    "backend",
    [
        "eager",  # dynamo tracing only: fast, and enough to prove there is no graph break
        "aot_eager",
        pytest.param("inductor", marks=pytest.mark.slow),  # ~30 s on 2 CPU cores
    ],
)
def test_torch_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    torch.manual_seed(18)
    keys = torch.randn(2, 33, 8)
    x = torch.randn(2, 33, 16)
    # fullgraph: any host sync (.item(), data-dependent shape, Python branch on a tensor) in the
    # merge path would be a graph break and fail here
    compiled = torch.compile(_merge_unmerge, fullgraph=True, backend=backend)
    got = compiled(keys, x, 8)
    expected = _merge_unmerge(keys, x, 8)
    for g, e in zip(got, expected, strict=True):
        if e.is_floating_point():
            torch.testing.assert_close(g, e)
        else:
            assert torch.equal(g, e)


def test_torch_compile_fullgraph_with_sequence_ids():
    torch._dynamo.reset()

    def fn(keys, x, ids):
        tm = TokenMerger(keys, 3, sequence_ids=ids, protected=1)
        return tm(x), tm.source

    keys = torch.randn(2, 17, 8)
    x = torch.randn(2, 17, 4)
    ids = torch.tensor([[0] * 9 + [1] * 8, [0] * 12 + [-100] * 5])
    got = torch.compile(fn, fullgraph=True, backend="eager")(keys, x, ids)
    expected = fn(keys, x, ids)
    torch.testing.assert_close(got[0], expected[0])
    assert torch.equal(got[1], expected[1])


def test_torch_compile_fullgraph_backward():
    torch._dynamo.reset()

    def fn(keys, x):
        tm = TokenMerger(keys, 6, protected=1)
        return tm.unmerge(tm(x)).pow(2).sum()

    keys = torch.randn(2, 21, 8)
    x = torch.randn(2, 21, 4, requires_grad=True)
    fn(keys, x).backward()
    expected = x.grad.clone()
    x.grad = None
    torch.compile(fn, fullgraph=True, backend="aot_eager")(keys, x).backward()
    torch.testing.assert_close(x.grad, expected)
