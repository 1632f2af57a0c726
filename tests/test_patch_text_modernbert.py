"""tome.patch on ModernBERT (RoPE, alternating global / sliding-window attention), tiny random
configs: r=0 exact, merging happens, unpatch exact, padding and batch invariance, packed
sequences, local windows after merging, copies and pickles."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import tome

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "ModernBertModel"):
    pytest.skip("this transformers has no ModernBERT", allow_module_level=True)

VOCAB = 100


def make(name: str = "ModernBertModel", attn: str = "sdpa", seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    settings = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
        max_position_embeddings=128, local_attention=8, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        cls_token_id=1, sep_token_id=2, num_labels=3, classifier_pooling="mean",
    )  # fmt: skip
    config = transformers.ModernBertConfig(**{**settings, **overrides})
    model = getattr(transformers, name)(config)
    model.set_attn_implementation(attn)
    return model.eval()


def patch(model, **kwargs):
    kwargs.setdefault("min_tokens", 0)  # tiny texts: no floor
    return tome.patch(model, **kwargs)


def texts(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (len(lengths), max(lengths)), generator=generator)
    mask = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
        ids[row, length:] = 0
    return ids, mask


def output(model, ids, mask, **kwargs) -> torch.Tensor:
    out = model(input_ids=ids, attention_mask=mask, **kwargs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("name", ["ModernBertModel", "ModernBertForSequenceClassification"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_r0_is_exact_merging_happens_and_unpatch_is_exact(name, attn):
    model = make(name, attn)
    ids, mask = texts([30, 17, 6])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        reference = output(model, ids, mask)
        patch(model, r=0)
        torch.testing.assert_close(output(model, ids, mask), reference, atol=1e-5, rtol=1e-5)
        model.tome.r = 3
        merged = output(model, ids, mask)
        assert merged.shape == reference.shape and torch.isfinite(merged).all()
        assert model.tome.tokens_per_layer[-1] < 30
        assert not torch.allclose(merged, reference, rtol=1e-3, atol=0)
        tome.unpatch(model)
        assert torch.equal(output(model, ids, mask), reference)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize(
    "settings", [{"ratio": 0.25}, {"r": 3}, {"ratio": 0.3, "positions": "mean", "window": "position"}]
)
def test_a_text_gives_the_same_output_alone_or_in_a_padded_batch(attn, settings):
    settings = dict(settings)
    rules = {k: settings.pop(k) for k in ("positions", "window") if k in settings}
    model = patch(make(attn=attn), **settings)
    for key, value in rules.items():
        setattr(model.tome, key, value)
    lengths = [31, 9, 2, 1, 16, 24]
    ids, mask = texts(lengths)
    with torch.no_grad():
        batched = output(model, ids, mask)
        assert model.tome.tokens_per_layer[-1] < 31
        for row, length in enumerate(lengths):
            alone = output(model, ids[row : row + 1, :length], mask[row : row + 1, :length])
            torch.testing.assert_close(batched[row, :length], alone[0], atol=1e-5, rtol=1e-4)


def test_padding_never_merges_with_real_tokens():
    model = patch(make(), r=4, unmerge_output=False)
    ids, mask = texts([28, 11])
    with torch.no_grad():
        out = output(model, ids, mask)
        source, sizes = model.tome.source, model.tome.sizes
        changed = ids.clone()
        changed[1, 11:] = torch.randint(3, VOCAB, (17,))  # other ids at the padding
        again = output(model, changed, mask)
    real = source[1, :11].unique()
    assert not set(real.tolist()) & set(source[1, 11:].tolist()) - set(real.tolist())
    assert sizes.sum(1).tolist() == [28.0, 11.0]
    torch.testing.assert_close(again[1, real], out[1, real])


def test_the_local_window_of_merged_tokens():
    from tome.adapters.transformers_modernbert import _group_positions, _merged_mask
    from tome.core.merge import MergeHistory
    from tome.runtime.passes import BlockCall, PassState

    handle = patch(make(), r=1).tome
    reachable = torch.finfo(torch.float32).min / 2
    # 8 originals -> 5 tokens: {0}, {1, 6}, {2, 3}, {4}, {5, 7}
    source = torch.tensor([[0, 1, 2, 2, 3, 4, 1, 4]])
    history = MergeHistory(source, torch.tensor([[1.0, 2, 2, 1, 2]]))
    call = BlockCall(PassState(4), 1, history, merged=True)
    assert (handle.positions, handle.window) == ("first", "span")  # the defaults
    handle.positions = "mean"
    spans = _group_positions(handle, call, torch.arange(8)[None])
    assert spans[0].tolist() == [[0.0, 3.5, 2.5, 4.0, 6.0]]  # mean original position
    assert spans[1].tolist() == [[0.0, 1.0, 2.0, 4.0, 5.0]] and spans[2].tolist() == [
        [0.0, 6.0, 3.0, 4.0, 7.0]
    ]
    allowed = _merged_mask(handle, call, torch.float32, 1, spans)[0, 0] > reachable
    # span rule: {0} sees {1, 6} (0 and 1 are 1 apart) but not {4}; {5, 7} sees {1, 6} and {4}
    assert allowed[0, 1] and not allowed[0, 3] and allowed[4, 1] and allowed[4, 3] and not allowed[4, 0]
    assert torch.equal(allowed, allowed.T)
    handle.window = "position"
    allowed = _merged_mask(handle, call, torch.float32, 1, spans)[0, 0] > reachable
    # by mean positions: 0 vs 3.5 too far; 3.5 vs 2.5 and 4.0 near
    assert not allowed[0, 1] and allowed[1, 2] and allowed[1, 3] and not allowed[0, 2]
    handle.positions = "first"
    assert _group_positions(handle, call, torch.arange(8)[None])[0].tolist() == [[0.0, 1.0, 2.0, 4.0, 5.0]]
    with pytest.raises(ValueError, match="positions: expected one of first, mean"):
        handle.positions = "middle"


def test_a_window_wider_than_the_text_is_global_attention():
    # local_attention >= 2 N: every local layer is global; merged outputs agree too.
    rope = {
        kind: {"rope_type": "default", "rope_theta": 10000.0}
        for kind in ("full_attention", "sliding_attention")
    }
    wide = patch(make(local_attention=128, rope_parameters=rope), ratio=0.25)
    full = patch(make(layer_types=["full_attention"] * 4, rope_parameters=rope), ratio=0.25)
    ids, mask = texts([30, 12])
    real = mask.bool()  # what padding positions hold is the models' own business
    with torch.no_grad():
        torch.testing.assert_close(
            output(wide, ids, mask)[real], output(full, ids, mask)[real], atol=1e-4, rtol=1e-4
        )


def test_packed_sequences_never_merge_across_texts():
    model = patch(make(), r=0)
    a_ids, _ = texts([14], seed=1)
    b_ids, _ = texts([11], seed=2)
    packed = torch.cat([a_ids, b_ids], dim=1)
    documents = torch.tensor([[0] * 14 + [1] * 11])
    positions = torch.cat([torch.arange(14), torch.arange(11)])[None]

    def run(ids, doc_ids=None, pos=None):
        kwargs = {} if doc_ids is None else {"tome_sequence_ids": doc_ids}
        return model(input_ids=ids, position_ids=pos, **kwargs).last_hidden_state

    with torch.no_grad():
        alone = [run(a_ids), run(b_ids)]
        together = run(packed, documents, positions)
        torch.testing.assert_close(together[:, :14], alone[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(together[:, 14:], alone[1], atol=1e-5, rtol=1e-4)
        model.tome.r = 3
        run(packed, documents, positions)
        source = model.tome.source
    assert not set(source[0, :14].tolist()) & set(source[0, 14:].tolist())
    assert model.tome.tokens_per_layer[-1] < 25


def test_copies_pickles_and_settings():
    model = patch(make(), ratio=0.25)
    model.tome.positions, model.tome.window = "mean", "position"
    ids, mask = texts([20, 9])
    with torch.no_grad():
        reference = output(model, ids, mask)
        twin = copy.deepcopy(model)
        twin.tome.ratio = 0.0
        torch.testing.assert_close(output(model, ids, mask), reference)
        loaded = pickle.loads(pickle.dumps(model))
        assert (loaded.tome.positions, loaded.tome.window) == ("mean", "position")
        torch.testing.assert_close(output(loaded, ids, mask), reference)
    assert model.tome.patch_options()["min_tokens"] == 0


def test_tiny_rows_and_refusals():
    model = patch(make(), ratio=0.4)
    ids, mask = texts([1, 2, 5])
    mask[0] = 0  # an all-padding row
    with torch.no_grad():
        assert torch.isfinite(output(model, ids, mask)).all()
    with pytest.raises(ValueError, match="attention_mask: expected 0/1"):
        model(input_ids=ids, attention_mask=mask * 2)
    with pytest.raises(ValueError, match="keep_outliers"):
        tome.patch(make(), ratio=0.2, keep_outliers=1)
    with pytest.raises(TypeError, match="ModernBertModel"):
        tome.patch(transformers.ModernBertForMaskedLM(make().config), r=2)


@pytest.mark.slow
def test_export_and_compile_agree_with_eager():
    model = patch(make(), ratio=0.25)
    ids, mask = texts([20, 9])

    class Encoder(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    with torch.no_grad():
        reference = output(model, ids, mask)
        exported = torch.export.export(Encoder(model), (ids, mask))
        torch.testing.assert_close(exported.module()(ids, mask), reference, atol=1e-5, rtol=1e-5)
        compiled = torch.compile(Encoder(model), backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(ids, mask), reference, atol=1e-5, rtol=1e-5)


def test_batch_zero_behaves_as_unpatched():
    model = make()
    ids, mask = texts([8])
    try:
        with torch.no_grad():
            expected = output(model, ids[:0], mask[:0]).shape
    except RuntimeError as error:  # ModernBERT itself cannot run an empty batch
        expected = type(error)
    patch(model, ratio=0.3)
    if isinstance(expected, type):
        with pytest.raises(expected):
            output(model, ids[:0], mask[:0])
    else:
        with torch.no_grad():
            assert output(model, ids[:0], mask[:0]).shape == expected
