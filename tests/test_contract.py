"""The contract every registered model family keeps, parametrized over the adapter registry.

For each adapter in :func:`tome.runtime.registry.adapters`, on a tiny random model of one of its
classes: no merging (``r=0`` / ``ratio=0``) gives the unpatched outputs; merging changes them;
``unpatch`` gives back bit-identical outputs and ``state_dict``; patching leaves the
``state_dict`` as it was; deep copies and pickles are independent patched models with the same
outputs. Per-family files keep what is particular to each family.

A new family adds a builder to ``BUILDERS`` (the first test fails until it does).
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable

import pytest
import torch
from _vlm import IMAGE, tiny_llava, tiny_qwen, without_capture_hooks
from _vlm_internvl_qwen3 import tiny_internvl, tiny_qwen3

import tome
from tome.runtime.base import PatchHandle
from tome.runtime.registry import REDUCE_ONCE, adapter_for, adapters

Built = tuple[torch.nn.Module, Callable[[torch.nn.Module], torch.Tensor]]


def _out(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple):
        return _out(output[0])
    for name in ("last_hidden_state", "sample", "logits"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"no tensor in {type(output).__name__}")


def _images(size: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _timm_vit() -> Built:
    timm = pytest.importorskip("timm")
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=4,
        embed_dim=32,
        depth=3,
        num_heads=2,
    )
    x = _images(32)
    return model, lambda m: m(x)


def _timm_eva() -> Built:
    timm = pytest.importorskip("timm")
    model = timm.create_model(
        "eva02_tiny_patch14_224",
        pretrained=False,
        img_size=56,
        embed_dim=32,
        depth=3,
        num_heads=2,
        num_classes=5,
    )
    x = _images(56)
    return model, lambda m: m.forward_head(m.forward_features(x), pre_logits=True)


def _timm_naflex() -> Built:
    pytest.importorskip("timm")
    from timm.models.naflexvit import NaFlexVit, NaFlexVitCfg

    model = NaFlexVit(
        NaFlexVitCfg(patch_size=4, embed_dim=32, depth=3, num_heads=2, pos_embed_grid_size=(8, 8)),
        num_classes=5,
    )
    x = _images(32)
    return model, lambda m: m(x)


def _transformers_vision() -> Built:
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=4
    )  # fmt: skip
    model = transformers.ViTModel(config)
    x = _images(32)
    return model, lambda m: m(pixel_values=x).last_hidden_state[:, 0]


def _texts(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, vocab, (2, 40), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0
    ids[1, 30:] = 0
    return ids, mask


def _transformers_text() -> Built:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64
    )
    model = transformers.BertModel(config)
    ids, mask = _texts(50)
    return model, lambda m: m(input_ids=ids, attention_mask=mask).last_hidden_state


def _transformers_modernbert() -> Built:
    transformers = pytest.importorskip("transformers")
    config = transformers.ModernBertConfig(
        vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=128, local_attention=8, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        cls_token_id=1, sep_token_id=2,
    )  # fmt: skip
    model = transformers.ModernBertModel(config)
    model.set_attn_implementation("sdpa")
    ids, mask = _texts(50)
    return model, lambda m: m(input_ids=ids, attention_mask=mask).last_hidden_state


def _torchvision_vit() -> Built:
    models = pytest.importorskip("torchvision.models")
    model = models.VisionTransformer(
        image_size=32, patch_size=4, num_layers=3, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=5
    )
    torch.nn.init.normal_(model.heads.head.weight)  # torchvision initializes the head to zeros
    x = _images(32)
    return model, lambda m: m(x)


def _open_clip() -> Built:
    pytest.importorskip("open_clip")
    from open_clip.transformer import VisionTransformer

    model = VisionTransformer(
        image_size=32, patch_size=4, width=32, layers=3, heads=2, mlp_ratio=2.0, output_dim=16
    )
    x = _images(32)
    return model, lambda m: m(x)


def _diffusers_unet() -> Built:
    diffusers = pytest.importorskip("diffusers")
    model = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=16, attention_head_dim=8,
        sample_size=16, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )  # fmt: skip
    g = torch.Generator().manual_seed(1)
    inputs = {
        "sample": torch.randn(2, 4, 16, 16, generator=g),
        "timestep": torch.tensor(500),
        "encoder_hidden_states": torch.randn(2, 7, 16, generator=g),
    }
    return model, lambda m: m(**inputs).sample


def _diffusers_dit() -> Built:
    diffusers = pytest.importorskip("diffusers")
    model = diffusers.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=16, sample_size=16, patch_size=2, caption_channels=12, norm_num_groups=4,
    )  # fmt: skip
    g = torch.Generator().manual_seed(1)
    inputs = {
        "hidden_states": torch.randn(2, 4, 16, 16, generator=g),
        "encoder_hidden_states": torch.randn(2, 5, 12, generator=g),
        "timestep": torch.full((2,), 500),
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
    }
    return model, lambda m: m(**inputs).sample


def _vlm_prompts(ids: torch.Tensor, visual: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts, left-padded, each ``ids`` then one image of ``visual`` placeholders."""
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = 0, 0
    ids = torch.cat([ids, torch.full((2, visual), IMAGE), torch.full((2, 3), 7)], dim=1)
    return ids, torch.cat([mask, torch.ones(2, visual + 3, dtype=mask.dtype)], dim=1)


def _next_token_logits(inputs: dict) -> Callable[[torch.nn.Module], torch.Tensor]:
    def run(m: torch.nn.Module) -> torch.Tensor:
        logits = m(**inputs).logits[:, -1]  # the next token's: the same shape, merged or not
        without_capture_hooks(m)  # so that the copies test checks tome's part
        return logits

    return run


def _transformers_llava() -> Built:
    pytest.importorskip("transformers")
    ids, mask = _vlm_prompts(torch.randint(3, 90, (2, 20), generator=torch.Generator().manual_seed(1)), 64)
    return tiny_llava(), _next_token_logits(
        {"input_ids": ids, "attention_mask": mask, "pixel_values": _images(32)}
    )


def _transformers_qwen_vl() -> Built:
    pytest.importorskip("transformers")
    ids, mask = _vlm_prompts(torch.randint(3, 90, (2, 12), generator=torch.Generator().manual_seed(1)), 16)
    inputs = {
        "input_ids": ids,
        "attention_mask": mask,
        "mm_token_type_ids": (ids == IMAGE).int(),
        "image_grid_thw": torch.tensor([[1, 8, 8], [1, 8, 8]]),  # 8x8 patches -> 16 tokens (2x2 merger)
        "pixel_values": torch.randn(128, 3 * 2 * 4 * 4, generator=torch.Generator().manual_seed(2)),
    }
    return tiny_qwen(), _next_token_logits(inputs)


def _transformers_llava_next() -> Built:
    pytest.importorskip("transformers")
    from _vlm_next import anyres_batch, tiny_llava_next

    model = tiny_llava_next()
    # two left-padded prompts, images of two sizes (88 and 52 packed tokens)
    inputs = anyres_batch(model, [[1, 5, 6, (32, 32), 7, 8, 9], [1, 11, (16, 32), 12, 13]])
    return model, _next_token_logits(inputs)


def _transformers_internvl() -> Built:
    pytest.importorskip("transformers")
    # each prompt: one image of two tiles (2 x 16 tokens), the tiles in pixel_values
    ids, mask = _vlm_prompts(torch.randint(3, 90, (2, 12), generator=torch.Generator().manual_seed(1)), 32)
    inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": _images(32, batch=4)}
    return tiny_internvl(), _next_token_logits(inputs)


def _transformers_qwen3_vl() -> Built:
    pytest.importorskip("transformers")
    ids, mask = _vlm_prompts(torch.randint(3, 90, (2, 12), generator=torch.Generator().manual_seed(1)), 16)
    inputs = {
        "input_ids": ids,
        "attention_mask": mask,
        "mm_token_type_ids": (ids == IMAGE).int(),
        "image_grid_thw": torch.tensor([[1, 8, 8], [1, 8, 8]]),  # 8x8 patches -> 16 tokens (2x2 merger)
        "pixel_values": torch.randn(128, 3 * 2 * 4 * 4, generator=torch.Generator().manual_seed(2)),
    }
    return tiny_qwen3(), _next_token_logits(inputs)


def _transformers_gemma3() -> Built:
    pytest.importorskip("transformers")
    from _vlm_gemma_idefics import gemma_batch, tiny_gemma3

    inputs = gemma_batch([([1, 5, 6, 8, 9], 1, [7, 7, 7]), ([1, 11], 1, [12])])  # left-padded, token_type_ids
    return tiny_gemma3(), _next_token_logits(inputs)


def _transformers_idefics3() -> Built:
    pytest.importorskip("transformers")
    from _vlm_gemma_idefics import idefics_batch, tiny_idefics3

    inputs = idefics_batch([([1, 5, 6], [(1, 2)], [7, 7]), ([1, 11], [(0, 0)], [12])])  # 3 tiles; 1 tile
    return tiny_idefics3(), _next_token_logits(inputs)


def _transformers_llava_next_video() -> Built:
    pytest.importorskip("transformers")
    from _vlm_next import tiny_next_video, video_batch

    model = tiny_next_video()
    # two left-padded prompts, images of two sizes (88 and 52 packed tokens); the contract's settings
    # are visual_ratio's, so no video here (videos: tests/test_patch_video_families.py)
    inputs = video_batch(
        model,
        [{"text": [1, 5, 6], "image": (32, 32), "seed": 1}, {"text": [1, 11], "image": (16, 32), "seed": 2}],
    )
    return model, _next_token_logits(inputs)


BUILDERS: dict[str, Callable[[], Built]] = {
    "timm_vit": _timm_vit,
    "timm_eva": _timm_eva,
    "timm_naflex": _timm_naflex,
    "transformers_vision": _transformers_vision,
    "transformers_text": _transformers_text,
    "transformers_modernbert": _transformers_modernbert,
    "torchvision_vit": _torchvision_vit,
    "open_clip": _open_clip,
    "diffusers_unet": _diffusers_unet,
    "diffusers_dit": _diffusers_dit,
    "transformers_llava": _transformers_llava,
    "transformers_qwen_vl": _transformers_qwen_vl,
    "transformers_llava_next": _transformers_llava_next,
    "transformers_internvl": _transformers_internvl,
    "transformers_qwen3_vl": _transformers_qwen3_vl,
    "transformers_gemma3": _transformers_gemma3,
    "transformers_idefics3": _transformers_idefics3,
    "transformers_llava_next_video": _transformers_llava_next_video,
}
NAMES = [adapter.name for adapter in adapters()]


def _settings(name: str, merging: bool) -> dict:
    adapter = next(a for a in adapters() if a.name == name)
    if adapter.kind == REDUCE_ONCE:  # vision-language models: each image's tokens, once
        return {"visual_ratio": 0.5 if merging else 0.0}
    if not adapter.takes_r:
        return {"ratio": 0.5 if merging else 0.0}
    options = {"min_tokens": 0} if "min_tokens" in adapter.options else {}
    return {"r": 4 if merging else 0, **options}


def _build(name: str) -> Built:
    torch.manual_seed(0)
    model, run = BUILDERS[name]()
    return model.eval(), run


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_every_registered_family_has_a_builder():
    assert sorted(BUILDERS) == sorted(NAMES), "add a tiny model of the new family to BUILDERS"


@pytest.mark.parametrize("name", NAMES)
def test_the_builder_makes_a_model_of_its_family(name):
    model, _ = _build(name)
    assert adapter_for(model).name == name


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_no_merging_is_exact_and_merging_changes_the_output(name):
    model, run = _build(name)
    reference = _out(run(model))
    state = _state(model)
    tome.patch(model, **_settings(name, merging=False))
    torch.testing.assert_close(_out(run(model)), reference, rtol=1e-5, atol=1e-5)
    tome.patch(model, **_settings(name, merging=True))
    merged = _out(run(model))
    assert merged.shape == reference.shape
    assert not torch.allclose(merged, reference, atol=1e-6), "nothing merged"
    assert _same_state(_state(model), state), "patching changed the state_dict"
    tome.unpatch(model)
    assert "tome" not in model.__dict__
    assert torch.equal(_out(run(model)), reference)
    assert _same_state(_state(model), state)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@torch.no_grad()
def test_copies_are_independent_patched_models(name, how):
    model, run = _build(name)
    tome.patch(model, **_settings(name, merging=True))
    merged = _out(run(model))
    twin = copy.deepcopy(model) if how == "deepcopy" else pickle.loads(pickle.dumps(model))
    assert torch.equal(_out(run(twin)), merged)
    tome.unpatch(twin)
    assert isinstance(model.tome, PatchHandle)  # the original stays patched
    assert torch.equal(_out(run(model)), merged)


@pytest.mark.parametrize("name", NAMES)
def test_every_family_option_is_a_patch_keyword_and_a_handle_attribute(name):
    model, _ = _build(name)
    adapter = adapter_for(model)
    options = adapter.options
    given = {n: option.default for n, option in options.items()}
    if not adapter.takes_r:
        given.pop("ratio", None)
    tome.patch(model, **{**_settings(name, merging=True), **given})
    for option_name, option in options.items():
        assert getattr(model.tome, option_name) == given.get(option_name, getattr(model.tome, option_name))
        assert model.tome.patch_options()[option_name] == getattr(model.tome, option_name)
        setattr(model.tome, option_name, getattr(model.tome, option_name))  # settable
        with pytest.raises((TypeError, ValueError), match=option_name):
            setattr(model.tome, option_name, object())
        assert option.doc
    with pytest.raises(TypeError, match=r"not_an_option: not an option of tome\.patch"):
        tome.patch(model, r=2, not_an_option=1)
