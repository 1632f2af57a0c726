"""Tiny random vision-language models and helpers shared by the VLM tests
(``test_patch_vlm.py``, ``test_patch_qwen_vl.py``, ``test_contract.py``)."""

from __future__ import annotations

import copy
import pickle

import torch

import tome

IMAGE, VIDEO, START, END = 99, 98, 97, 96  # image_token_id, video_token_id, vision start / end
PAD = 0
TEXT = {
    "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "pad_token_id": PAD, "bos_token_id": 1,
    "eos_token_id": 2,
}  # fmt: skip
QWEN_TOKENS = {
    "image_token_id": IMAGE,
    "video_token_id": VIDEO,
    "vision_start_token_id": START,
    "vision_end_token_id": END,
}


def tiny_llava(seed: int = 0) -> torch.nn.Module:
    """CLIP vision (32 px, patch 4: 64 visual tokens an image, CLS dropped) + Llama."""
    import transformers

    torch.manual_seed(seed)
    vision = transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
        patch_size=4,
    )  # fmt: skip
    config = transformers.LlavaConfig(
        vision_config=vision, text_config=transformers.LlamaConfig(**TEXT), image_token_id=IMAGE
    )
    return transformers.LlavaForConditionalGeneration(config).eval()


def tiny_qwen(version: str = "2.5", seed: int = 0) -> torch.nn.Module:
    """Qwen2.5-VL (window attention) or Qwen2-VL, patch 4, the 2x2 patch merger, M-RoPE."""
    import transformers

    torch.manual_seed(seed)
    text = {
        **TEXT,
        "rope_parameters": {"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 1e4},
    }
    if version == "2.5":
        vision = {
            "depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 32,
            "patch_size": 4, "window_size": 16, "fullatt_block_indexes": [1],
        }  # fmt: skip
        config = transformers.Qwen2_5_VLConfig(vision_config=vision, text_config=text, **QWEN_TOKENS)
        return transformers.Qwen2_5_VLForConditionalGeneration(config).eval()
    vision = {"depth": 2, "embed_dim": 32, "hidden_size": 32, "mlp_ratio": 2, "num_heads": 2, "patch_size": 4}
    config = transformers.Qwen2VLConfig(vision_config=vision, text_config=text, **QWEN_TOKENS)
    return transformers.Qwen2VLForConditionalGeneration(config).eval()


def without_capture_hooks(model: torch.nn.Module) -> torch.nn.Module:
    """transformers 5 installs local closures as forward hooks on the first call that captures
    hidden states (LLaVA and Qwen do, for their vision features), after which even the unpatched
    model does not pickle; they are dropped here (transformers reinstalls them on the next
    call), so what is checked is tome's part."""
    for module in model.modules():
        for key, hook in list(module._forward_hooks.items()):
            if getattr(hook, "__name__", "") == "output_capturing_hook":
                del module._forward_hooks[key]
        module.__dict__.pop("_output_capturing_hooks_installed", None)
    return model


def language_model_calls(model: torch.nn.Module, run) -> list[dict]:
    """What the language model reads, call by call (the first: the prefill): the sequence
    length and the position ids given."""
    seen: list[dict] = []

    def hook(module, args, kwargs):
        seen.append({"length": kwargs["inputs_embeds"].shape[1], "position_ids": kwargs.get("position_ids")})

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return seen


def check_copies_and_unpatch(model: torch.nn.Module, run, **settings) -> None:
    """Patch ``model`` with ``settings``; deep copies and pickles generate as it does and unpatch
    on their own; ``unpatch`` gives back the original outputs and ``state_dict`` exactly.
    ``run(model)`` is a ``generate(..., return_dict_in_generate=True, output_logits=True)``."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    reference = run(model)
    tome.patch(model, **settings)
    merged = run(model)
    assert not torch.equal(merged.logits[0], reference.logits[0])
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(without_capture_hooks(model)))):
        assert all(getattr(twin.tome, name) == value for name, value in settings.items())
        assert torch.equal(run(twin).sequences, merged.sequences)
        tome.unpatch(twin)
        assert torch.equal(run(twin).sequences, reference.sequences)
    assert torch.equal(run(model).sequences, merged.sequences)  # the original: still patched
    tome.unpatch(model)
    assert "tome" not in model.__dict__ and "generate" not in model.__dict__
    out = run(model)
    assert torch.equal(out.sequences, reference.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.logits, reference.logits, strict=True))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
