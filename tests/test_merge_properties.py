"""Property tests (hypothesis) for chains of :class:`tome.TokenMerger` layers.

Invariants (DESIGN.md): sizes sum to N0 and equal the group sizes of ``source``; ``source`` is a
valid map onto the current tokens and every current token holds at least one original token;
``unmerge(merge(x))`` is the per-group mean of the original ``x`` at any depth; protected tokens
never merge and stay at the front in order; different sequence ids never share a group, and
padding merges with padding first; same inputs give the same merges.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tome import TokenMerger, max_r

MASK_ID = -100
SETTINGS = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,  # reproducible in CI
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# -- slow, independent references ---------------------------------------------------------------


def group_mean(x0: torch.Tensor, source: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """(B, N, D) mean of the original tokens over every group of ``source``, in float64."""
    B, _, D = x0.shape
    out = torch.zeros(B, num_tokens, D, dtype=torch.float64)
    for b in range(B):
        counts = torch.bincount(source[b], minlength=num_tokens).double()
        out[b].index_add_(0, source[b], x0[b].double())
        out[b] /= counts[:, None]
    return out


def feasible_r(ids: torch.Tensor, protected: int, pad_only: bool = False) -> int:
    """Number of A tokens with a same-id B token (minimum over the batch), with Python loops.

    With ``pad_only``: only padding A tokens with a padding B token count.
    """
    best = None
    for row in ids[:, protected:].tolist():
        a, b = row[::2], set(row[1::2])
        count = sum(1 for i in a if i in b and (not pad_only or i == MASK_ID))
        best = count if best is None else min(best, count)
    return 0 if best is None else best


# -- strategies ---------------------------------------------------------------------------------


@st.composite
def keys_and_tokens(draw, max_batch: int = 3, max_tokens: int = 40):
    B = draw(st.integers(0, max_batch))
    N = draw(st.integers(1, max_tokens))
    D = draw(st.integers(1, 8))
    protected = draw(st.integers(0, min(3, N - 1)))
    seed = draw(st.integers(0, 2**31 - 1))
    # quantised keys produce many exact ties; continuous ones none
    quantised = draw(st.booleans())
    return B, N, D, protected, seed, quantised


def make_keys(gen: torch.Generator, shape: tuple[int, ...], quantised: bool) -> torch.Tensor:
    keys = torch.randn(shape, generator=gen)
    return keys.round() if quantised else keys


def make_sequence_ids(gen: torch.Generator, B: int, N: int, segments: int, pad: int) -> torch.Tensor:
    """Random contiguous segments (ids 0, 1, ...), followed by ``pad`` padding tokens."""
    ids = torch.full((B, N), MASK_ID, dtype=torch.long)
    content = N - pad
    for b in range(B):
        if content <= 0:
            continue
        cuts = torch.randperm(max(content - 1, 1), generator=gen)[: segments - 1] + 1
        bounds = sorted({0, content, *cuts.clamp_max(content).tolist()})
        for k, (lo, hi) in enumerate(itertools.pairwise(bounds)):
            ids[b, lo:hi] = k
    return ids


def run_chain(keys_seq, x0, protected, rs, sequence_ids=None):
    """Merge ``x0`` through len(rs) layers; keys of layer l: keys_seq(l, N). Returns the mergers
    and the merged tensors after every layer."""
    x, adm, ids = x0, None, sequence_ids
    mergers, outputs = [], []
    for layer, r in enumerate(rs):
        tm = TokenMerger(keys_seq(layer, x.shape[1]), r, adm=adm, protected=protected, sequence_ids=ids)
        x, adm, ids = tm(x), tm.adm, tm.merged_ids
        mergers.append(tm)
        outputs.append(x)
    return mergers, outputs


def check_history(tm: TokenMerger, B: int, N0: int, protected: int) -> None:
    N = tm.sizes.shape[1]
    assert tm.source.shape == (B, N0) and tm.source.dtype == torch.int64
    assert tm.sizes.shape == (B, N) and tm.sizes.dtype == torch.float32
    if B == 0:
        return
    # source is a valid map onto the current sequence, and every current token owns >= 1 original
    assert int(tm.source.min()) >= 0 and int(tm.source.max()) < N
    for b in range(B):
        counts = torch.bincount(tm.source[b], minlength=N)
        assert counts.shape == (N,)
        assert (counts >= 1).all()
        assert torch.equal(counts.float(), tm.sizes[b])
    assert torch.equal(tm.sizes.sum(1), torch.full((B,), float(N0)))
    # protected tokens: never merged, at the front, in order
    if protected:
        assert torch.equal(tm.source[:, :protected], torch.arange(protected).expand(B, protected))
        assert torch.equal(tm.sizes[:, :protected], torch.ones(B, protected))
        assert (tm.source[:, protected:] >= protected).all()


# -- properties ---------------------------------------------------------------------------------


@SETTINGS
@given(params=keys_and_tokens(), r_fractions=st.lists(st.floats(0, 1), min_size=1, max_size=12))
def test_chain_invariants(params, r_fractions):
    B, N0, D, protected, seed, quantised = params
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, N0, 3, generator=gen, dtype=torch.float64)
    all_keys = [make_keys(gen, (B, N0, D), quantised) for _ in r_fractions]

    def keys_seq(layer, N):
        return all_keys[layer][:, :N]

    rs, N = [], N0
    for f in r_fractions:
        r = round(f * max_r(N, protected))
        rs.append(r)
        N -= r

    mergers, outputs = run_chain(keys_seq, x0, protected, rs)
    N = N0
    for tm, out, r in zip(mergers, outputs, rs, strict=True):
        N -= r
        assert out.shape == (B, N, 3)
        check_history(tm, B, N0, protected)
        # merge is the exact mean over the original tokens, and unmerge spreads it back
        expected = group_mean(x0, tm.source, N)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
        full = tm.unmerge(out)
        assert full.shape == x0.shape
        torch.testing.assert_close(full, expected.gather(1, tm.source[..., None].expand(-1, -1, 3)))
        # merge_original agrees with merging layer by layer
        torch.testing.assert_close(tm.merge_original(x0), out, rtol=0, atol=1e-5)
        # protected tokens keep their exact values
        assert torch.equal(out[:, :protected], x0[:, :protected])

    # determinism: the same inputs give the same merges
    again, _ = run_chain(keys_seq, x0, protected, rs)
    for a, b in zip(mergers, again, strict=True):
        assert torch.equal(a.source, b.source) and torch.equal(a.sizes, b.sizes)


@SETTINGS
@given(
    params=keys_and_tokens(),
    segments=st.integers(1, 4),
    pad_fraction=st.floats(0, 0.6),
    r_fractions=st.lists(st.floats(0, 1), min_size=1, max_size=12),
)
def test_sequence_ids_never_mix(params, segments, pad_fraction, r_fractions):
    B, N0, D, protected, seed, quantised = params
    gen = torch.Generator().manual_seed(seed)
    pad = int(pad_fraction * (N0 - protected))
    ids0 = make_sequence_ids(gen, B, N0, segments, pad)
    x0 = torch.randn(B, N0, 2, generator=gen, dtype=torch.float64)

    x, adm, ids = x0, None, ids0
    for f in r_fractions:
        N = x.shape[1]
        limit = min(max_r(N, protected), feasible_r(ids, protected))
        r = round(f * limit)
        keys = make_keys(gen, (B, N, D), quantised)
        tm = TokenMerger(keys, r, adm=adm, protected=protected, sequence_ids=ids)
        # padding merges with padding first: while padding pairs remain, nothing else merges
        if r <= feasible_r(ids, protected, pad_only=True) and B:
            assert (ids.gather(1, tm.plan.src) == MASK_ID).all()
        check_history(tm, B, N0, protected)
        # every original token lies in a group of its own id: groups never mix ids
        assert torch.equal(tm.merged_ids.gather(1, tm.source), ids0)
        x = tm(x)
        torch.testing.assert_close(x, group_mean(x0, tm.source, N - r), rtol=0, atol=1e-5)
        adm, ids = tm.adm, tm.merged_ids


@SETTINGS
@given(params=keys_and_tokens(max_tokens=24), segments=st.integers(1, 3), pad=st.integers(0, 6))
def test_r_beyond_the_id_limit_is_refused(params, segments, pad):
    B, N, D, protected, seed, quantised = params
    gen = torch.Generator().manual_seed(seed)
    ids = make_sequence_ids(gen, B, N, segments, min(pad, N - protected))
    keys = make_keys(gen, (B, N, D), quantised)
    limit = feasible_r(ids, protected)
    if B == 0 or limit >= max_r(N, protected):
        return
    TokenMerger(keys, limit, protected=protected, sequence_ids=ids)
    with pytest.raises(ValueError, match=rf"^r: with these sequence_ids at most {limit} tokens"):
        TokenMerger(keys, limit + 1, protected=protected, sequence_ids=ids)


@SETTINGS
@given(
    params=keys_and_tokens(),
    mode=st.sampled_from(["sum", "amax", "amin", "drop"]),
    r_fraction=st.floats(0, 1),
)
def test_integer_modes_keep_dtype_and_totals(params, mode, r_fraction):
    B, N, D, protected, seed, quantised = params
    gen = torch.Generator().manual_seed(seed)
    keys = make_keys(gen, (B, N, D), quantised)
    r = round(r_fraction * max_r(N, protected))
    x = torch.randint(-50, 50, (B, N, 2), generator=gen)
    tm = TokenMerger(keys, r, protected=protected)
    out = tm.merge(x, mode=mode)
    assert out.dtype == torch.int64 and out.shape == (B, N - r, 2)
    if mode == "sum":
        assert torch.equal(out.sum(1), x.sum(1))
    elif mode in ("amax", "amin"):
        reduce = torch.amax if mode == "amax" else torch.amin
        full = tm.unmerge(out)
        # every original token is bounded by its group's max / min
        assert ((full >= x) if mode == "amax" else (full <= x)).all()
        if B and N:
            assert torch.equal(reduce(out, 1), reduce(x, 1))
    else:  # drop: the survivors are original tokens, in their original order
        kept = tm.plan.kept
        assert torch.equal(out, x.gather(1, kept[..., None].expand(-1, -1, 2)))
        assert (kept[:, 1:] > kept[:, :-1]).all()
