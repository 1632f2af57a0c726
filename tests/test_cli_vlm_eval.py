"""``tome eval --prompts``: a vision-language model's agreement with itself unmerged, on a local
folder written by save_pretrained (a tiny random LLaVA and a real processor: CLIP image
processor, a word-level tokenizer), the chat-template path, and the user errors."""

from __future__ import annotations

import json

import pytest
from _cli_errors import one_error_line

from tome.cli.main import main

transformers = pytest.importorskip("transformers")
pytest.importorskip("PIL")
pytest.importorskip("tokenizers")

from _vlm import IMAGE, tiny_llava  # noqa: E402

WORDS = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(90)]
CHAT = (
    "{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> "
    "{% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %}w1{% endif %}"
)


def _processor(chat: bool):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {word: index for index, word in enumerate(WORDS)} | {"<image>": IMAGE}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=words, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        additional_special_tokens=["<image>"],
    )  # fmt: skip
    images = transformers.CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    return transformers.LlavaProcessor(
        image_processor=images, tokenizer=tokenizer, patch_size=4, vision_feature_select_strategy="default",
        image_token="<image>", num_additional_image_tokens=1, chat_template=CHAT if chat else None,
    )  # fmt: skip


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "chat-template"])
def llava_folder(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("llava")
    tiny_llava().save_pretrained(folder)
    _processor(request.param).save_pretrained(folder)
    return folder


@pytest.fixture
def prompts(tmp_path):
    file = tmp_path / "prompts.txt"
    file.write_text("w5 w6 w7\n\nw10 w11\n", encoding="utf-8")
    return file


def test_agreement_tokens_read_and_time_to_first_token(llava_folder, photos, prompts, capsys):
    args = ["eval", "--model", f"hf:{llava_folder}", "--images", str(photos), "--prompts", str(prompts)]
    assert (
        main(
            [*args, "--visual-tokens", "64,16", "--max-new-tokens", "4", "--speed-reps", "1", "--json", "-q"]
        )
        == 0
    )
    data = json.loads(capsys.readouterr().out)
    assert (data["images"], data["prompts"], data["max_new_tokens"]) == (2, 2, 4)
    unmerged, same, merged = data["rows"]
    assert [row["setting"] for row in data["rows"]] == ["unmerged", "visual_tokens=64", "visual_tokens=16"]
    assert unmerged["pairs"] == merged["pairs"] == 4
    # 64 placeholders an image (32 px, patch 4, CLS dropped): 64 tokens leave it whole
    assert unmerged["visual_tokens"] == same["visual_tokens"] == 64
    assert merged["visual_tokens"] == 16
    assert merged["prefill_tokens"] == unmerged["prefill_tokens"] - 48
    assert same["top1_agreement"] == same["exact_answers"] == 1.0 and same["first_token_kl"] < 1e-10
    assert 0 <= merged["top1_agreement"] <= 1 and merged["first_token_kl"] >= 0
    assert all(row["ttft_ms"] > 0 and row["speedup"] > 0 for row in data["rows"])


def test_the_table_and_the_default_settings(llava_folder, photos, prompts, capsys):
    args = ["eval", "--model", f"hf:{llava_folder}", "--images", str(photos), "--prompts", str(prompts)]
    assert main([*args, "--limit", "1", "--speed-reps", "0", "--max-new-tokens", "2", "-q"]) == 0
    out = capsys.readouterr().out
    assert "1 images x 2 prompts" in out and "first-token top-1" in out and "time to first token" not in out
    assert "| visual_ratio=0.5 | 2 |" in out and "| visual_ratio=0.75 | 2 |" in out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--visual-tokens", "8"], "--visual-tokens: for vision-language models only"),
        (["--prompts", "P", "--r", "8"], "--r: not for vision-language models"),
        (["--prompts", "P", "--visual-tokens", "8", "--visual-ratio", "0.5"], "give one of them"),
        (["--prompts", "P", "--visual-tokens", "0"], "--visual-tokens must be >= 1"),
        (["--prompts", "P", "--visual-tokens", "a"], "--visual-tokens: expected whole numbers"),
        (["--prompts", "P", "--visual-ratio", "1"], "--visual-ratio: expected fractions in [0, 1)"),
        (["--prompts", "P", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        (["--prompts", "absent.txt"], "--prompts absent.txt: no such file"),
        (["--prompts", "EMPTY"], "no prompts in it"),
    ],
)
def test_user_errors(extra, message, tmp_path, photos, prompts, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n", encoding="utf-8")
    extra = [{"P": str(prompts), "EMPTY": str(empty)}.get(a, a) for a in extra]
    assert main(["eval", "--model", "hf:/nowhere", "--images", str(photos), *extra]) == 2
    assert message in one_error_line(capsys)


def test_the_model_must_be_a_supported_vision_language_model(tmp_path, photos, prompts, capsys):
    assert main(["eval", "--images", str(photos), "--prompts", str(prompts)]) == 2
    assert "--model hf:FOLDER" in one_error_line(capsys)
    assert main(["eval", "--prompts", str(prompts), "--model", "hf:x"]) == 2
    assert "give --images DIR too" in one_error_line(capsys)
    vit = transformers.ViTModel(
        transformers.ViTConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
        )
    )
    vit.save_pretrained(tmp_path / "vit")
    assert (
        main(
            ["eval", "--model", f"hf:{tmp_path / 'vit'}", "--images", str(photos), "--prompts", str(prompts)]
        )
        == 2
    )
    line = one_error_line(capsys)
    assert (
        "a ViTModel; --prompts takes a vision-language model" in line
        and "LlavaForConditionalGeneration" in line
    )
