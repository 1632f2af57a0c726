"""tome.patch on tiny random open_clip models (VisionTransformer, CLIP, CustomTextCLIP; no downloads)."""

from __future__ import annotations

import copy
import pickle
import threading

import pytest
import torch
import torch.nn as nn
from _patching import expected_counts, patched_state

import tome

open_clip = pytest.importorskip("open_clip")
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg, CustomTextCLIP  # noqa: E402
from open_clip.transformer import Transformer, VisionTransformer  # noqa: E402

N0 = 1 + (32 // 8) ** 2  # class token + 16 patches
WIDTH = 64


def make_vit(seed: int = 0, **overrides) -> VisionTransformer:
    torch.manual_seed(seed)
    kwargs = {
        "image_size": 32,
        "patch_size": 8,
        "width": WIDTH,
        "layers": 3,
        "heads": 2,
        "mlp_ratio": 2.0,
        "output_dim": 16,
        **overrides,
    }
    return VisionTransformer(**kwargs).eval()


def make_clip(cls: type = CLIP, seed: int = 0, **vision) -> nn.Module:
    torch.manual_seed(seed)
    vision_cfg = CLIPVisionCfg(
        **{"layers": 3, "width": WIDTH, "patch_size": 8, "image_size": 32, "head_width": 32, **vision}
    )
    text_cfg = CLIPTextCfg(context_length=8, vocab_size=64, width=32, heads=2, layers=2)
    return cls(embed_dim=16, vision_cfg=vision_cfg, text_cfg=text_cfg).eval()


def pixels(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def text(batch: int = 2, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, 64, (batch, 8), generator=torch.Generator().manual_seed(seed))


def assert_outputs_close(a, b, **kwargs) -> None:
    if isinstance(a, tuple):
        assert isinstance(b, tuple) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y, **kwargs)
    else:
        torch.testing.assert_close(a, b, **kwargs)


# Every layout a VisionTransformer can be built with (LayerScale, pooling kinds, custom blocks).
VARIANTS = {
    "default": {},
    "layer_scale": {"ls_init_value": 0.5},
    "avg_pool": {"pool_type": "avg"},
    "no_pool": {"pool_type": "none"},
    "final_ln_after_pool": {"pool_type": "avg", "final_ln_after_pool": True},
    "attentional_pool": {"attentional_pool": True, "attn_pooler_queries": 4, "attn_pooler_heads": 2},
    "output_tokens": {"output_tokens": True},
    "custom_qk_norm": {"qk_norm": True, "ls_init_value": 0.5},
    "custom_scaled": {"scale_attn": True, "scale_heads": True, "scale_attn_inner": True, "scale_fc": True},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_r0_matches_unpatched(variant):
    model = make_vit(**VARIANTS[variant])
    x = pixels()
    with torch.no_grad():
        ref = model(x)
        tome.patch(model, r=0)
        out = model(x)
    assert_outputs_close(out, ref, atol=1e-5, rtol=1e-5)
    assert model.tome.tokens_per_layer == [N0] * 4
    assert model.tome.family == "open_clip"


def test_r0_matches_unpatched_with_grad_and_batch_one():
    # with grad enabled nn.MultiheadAttention takes its slow path; batch 1 its own kernels
    model = make_vit()
    x = pixels(1)
    ref = model(x)
    tome.patch(model, r=0)
    torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["default", "custom_qk_norm", "attentional_pool", "no_pool"])
@pytest.mark.parametrize(("r", "per_layer"), [(4, [4, 4, 4]), ([6, 0, 2], [6, 0, 2]), ((4, -1.0), [8, 4, 0])])
def test_merging_counts_and_class_token(variant, r, per_layer):
    model = make_vit(**VARIANTS[variant])
    x = pixels()
    with torch.no_grad():
        ref = model(x)
        tome.patch(model, r=r)
        out = model(x)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert model.tome.tokens_per_layer == expected_counts(N0, per_layer)
    assert (model.tome.sizes[:, 0] == 1).all() and (model.tome.source[:, 0] == 0).all()
    assert (model.tome.sizes.sum(1) == N0).all()
    assert not torch.allclose(out, ref, atol=1e-4)


def test_ratio_schedule():
    model = make_vit()
    tome.patch(model, ratio=0.25)
    with torch.no_grad():
        model(pixels())
    assert model.tome.tokens_per_layer == model.tome.planned_tokens(N0) == [17, 13, 10, 8]


@pytest.mark.parametrize("cls", [CLIP, CustomTextCLIP])
def test_clip_merges_the_image_tower_only(cls):
    model = make_clip(cls)
    x, t = pixels(), text()
    with torch.no_grad():
        image_ref, text_ref = model.encode_image(x), model.encode_text(t)
        tome.patch(model, r=0)
        torch.testing.assert_close(model.encode_image(x), image_ref, atol=1e-5, rtol=1e-5)
        model.tome.r = 4
        image_out = model.encode_image(x)
        text_out = model.encode_text(t)
        features = model(x, t)
    assert model.tome.tokens_per_layer == [17, 13, 9, 5]
    assert not torch.allclose(image_out, image_ref, atol=1e-4)
    assert torch.equal(text_out, text_ref)  # encode_text runs exactly as before
    torch.testing.assert_close(features[0], nn.functional.normalize(image_out, dim=-1))
    torch.testing.assert_close(features[1], nn.functional.normalize(text_ref, dim=-1))
    assert all(name.startswith("visual.") for name in patched_state(model))


@pytest.mark.filterwarnings("ignore:tome. the schedule")
def test_patch_twice_and_r_settable():
    model = make_vit()
    tome.patch(model, r=4)
    tome.patch(model, r=2, prop_attn=False)
    assert len(model.transformer._forward_hooks) == 1
    for r in (2, 100, 0):
        model.tome.r = r
        with torch.no_grad():
            model(pixels())
        assert model.tome.tokens_per_layer == expected_counts(N0, [r] * 3)


def test_prop_attn_changes_output():
    model = make_vit()
    tome.patch(model, r=4, prop_attn=True)
    with torch.no_grad():
        a = model(pixels())
        model.tome.prop_attn = False
        b = model(pixels())
    assert not torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("build", ["vit", "clip"])
def test_unpatch_roundtrip_bit_identical(build):
    model = make_vit(pool_type="avg", ls_init_value=0.5) if build == "vit" else make_clip(pool_type="avg")
    run = model if build == "vit" else model.encode_image
    x = pixels()
    with torch.no_grad():
        ref = run(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    tome.patch(model, r=4, unmerge_output=True)
    with torch.no_grad():
        run(x)
    assert patched_state(model)
    assert list(model.state_dict()) == list(state)
    tome.unpatch(model)
    assert not hasattr(model, "tome")
    assert patched_state(model) == []
    with torch.no_grad():
        assert torch.equal(run(x), ref)
    after = model.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], state[k]) for k in state)


# -- pooling ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("final_ln_after_pool", [False, True])
def test_avg_pool_is_the_size_weighted_average(final_ln_after_pool):
    model = make_vit(pool_type="avg", final_ln_after_pool=final_ln_after_pool)
    tome.patch(model, r=4)
    seen = {}
    model.transformer.resblocks[-1].register_forward_hook(lambda m, a, out: seen.update(tokens=out))
    with torch.no_grad():
        out = model(pixels())
        tokens, sizes = seen["tokens"], model.tome.sizes
        assert tokens.shape[1] == 5
        weights = sizes[:, 1:, None] / sizes[:, 1:].sum(1)[:, None, None]
        if final_ln_after_pool:
            weighted = model.ln_post((tokens[:, 1:] * weights).sum(1))
            plain = model.ln_post(tokens[:, 1:].mean(1))
        else:
            weighted = (model.ln_post(tokens)[:, 1:] * weights).sum(1)
            plain = model.ln_post(tokens)[:, 1:].mean(1)
    torch.testing.assert_close(out, weighted @ model.proj, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, plain @ model.proj, atol=1e-4)  # not the plain mean of merged tokens


def test_attentional_pool_sees_every_original_token():
    model = make_vit(**VARIANTS["attentional_pool"])
    tome.patch(model, r=4)
    seen = {}
    model.attn_pool.register_forward_hook(lambda m, args, out: seen.update(tokens=args[0]))
    with torch.no_grad():
        model(pixels())
    assert model.tome.tokens_per_layer[-1] == 5
    assert seen["tokens"].shape == (2, N0, WIDTH)
    for b in range(2):  # the 5 merged tokens, each repeated once per original token it holds
        assert len(torch.unique(seen["tokens"][b], dim=0)) == 5


def test_output_tokens_follow_unmerge_output():
    model = make_vit(output_tokens=True)
    tome.patch(model, r=4)
    with torch.no_grad():
        pooled, tokens = model(pixels())
        assert tokens.shape == (2, 4, WIDTH)  # merged: 5 tokens less the class token
        model.tome.unmerge_output = True
        pooled_full, tokens_full = model(pixels())
    assert tokens_full.shape == (2, N0 - 1, WIDTH)
    torch.testing.assert_close(pooled_full, pooled)  # the class token is not affected


def test_forward_intermediates_keep_the_grid():
    model = make_vit(pool_type="avg")
    x = pixels()
    tome.patch(model, r=4)
    with torch.no_grad():
        pooled = model(x)
        out = model.forward_intermediates(x, indices=3)
    maps = out["image_intermediates"]
    assert [tuple(m.shape) for m in maps] == [(2, WIDTH, 4, 4)] * 3
    torch.testing.assert_close(out["image_features"], pooled)
    assert len(torch.unique(maps[-1][0].flatten(1).T, dim=0)) == 4  # the last block's 4 patch tokens


def test_patch_dropout_in_training_keeps_the_class_token():
    model = make_vit(patch_dropout=0.5)
    tome.patch(model, r=2)
    model.train()
    model(pixels(4)).sum().backward()
    assert model.tome.tokens_per_layer == expected_counts(9, [2, 2, 2])  # class token + 8 kept patches
    assert (model.tome.source[:, 0] == 0).all() and (model.tome.sizes[:, 0] == 1).all()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_sequence_first_transformer_gives_the_batch_first_results():
    # open_clip's Transformer can run sequence-first (batch_first=False): the blocks then get
    # (tokens, batch, width) and nn.MultiheadAttention is built with batch_first=False.
    batch_first = make_vit()
    sequence_first = make_vit()
    sequence_first.transformer = Transformer(WIDTH, 3, 2, 2.0, batch_first=False)
    sequence_first.load_state_dict(batch_first.state_dict())
    assert not sequence_first.transformer.resblocks[0].attn.batch_first
    x = pixels()
    with torch.no_grad():
        ref = sequence_first(x)
        tome.patch(sequence_first, r=0)
        torch.testing.assert_close(sequence_first(x), ref, atol=1e-5, rtol=1e-5)
        for model in (batch_first, sequence_first):
            tome.patch(model, r=4, unmerge_output=True)
        out = sequence_first(x)
        torch.testing.assert_close(out, batch_first(x), atol=1e-5, rtol=1e-5)
        assert sequence_first.tome.tokens_per_layer == [17, 13, 9, 5]
        maps = sequence_first.forward_intermediates(x)["image_intermediates"]
    assert [tuple(m.shape) for m in maps] == [(2, WIDTH, 4, 4)] * 3


def test_a_callers_attn_mask_is_honoured_only_where_nothing_merges():
    model = make_vit()
    tokens = torch.randn(2, N0, WIDTH)
    mask = torch.zeros(N0, N0).masked_fill(torch.ones(N0, N0, dtype=torch.bool).triu(1), float("-inf"))
    with torch.no_grad():
        ref = model.transformer(tokens, attn_mask=mask)
        tome.patch(model, r=0)
        torch.testing.assert_close(model.transformer(tokens, attn_mask=mask), ref, atol=1e-5, rtol=1e-5)
        per_head = mask.expand(2 * 2, N0, N0)  # nn.MultiheadAttention's (batch * heads, L, S) layout
        torch.testing.assert_close(model.transformer(tokens, attn_mask=per_head), ref, atol=1e-5, rtol=1e-5)
        model.tome.r = 4
        with pytest.raises(ValueError, match="attn_mask"):
            model.transformer(tokens, attn_mask=mask)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype):
    model = make_vit(pool_type="avg").to(dtype)
    tome.patch(model, r=4)
    with torch.no_grad():
        out = model(pixels().to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert model.tome.tokens_per_layer == [17, 13, 9, 5]


def test_grad_checkpointing_is_exact():
    model = make_vit(ls_init_value=0.5)
    tome.patch(model, r=4)
    reference = copy.deepcopy(model)
    model.set_grad_checkpointing(True)
    for m in (model, reference):
        m.train()
    x = pixels()
    model(x).sum().backward()
    reference(x).sum().backward()
    assert model.tome.tokens_per_layer == reference.tome.tokens_per_layer == [17, 13, 9, 5]
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)


# -- bad input -------------------------------------------------------------------------------------


def _assert_refused(model: nn.Module, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        tome.patch(model, r=4)
    assert not hasattr(model, "tome")
    assert patched_state(model) == []


def test_unsupported_block_names_it_and_the_supported_ones():
    model = make_vit()
    model.transformer.resblocks[1] = nn.Identity()
    _assert_refused(model, r"block 1 is a torch.nn.modules.linear.Identity.*ResidualAttentionBlock")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"add_bias_kv": True}, "add_bias_kv"),
        ({"add_zero_attn": True}, "add_zero_attn"),
        ({"kdim": 16, "vdim": 16}, "kdim"),
    ],
)
def test_unsupported_multihead_attention(kwargs, message):
    model = make_vit()
    model.transformer.resblocks[2].attn = nn.MultiheadAttention(WIDTH, 2, batch_first=True, **kwargs)
    _assert_refused(model, rf"block 2: nn.MultiheadAttention with .*{message}")


def test_scaled_cosine_attention_is_refused():
    _assert_refused(
        make_vit(scaled_cosine_attn=True), r"block 0 \(CustomResidualAttentionBlock\): scaled cosine"
    )


def test_patch_dropout_that_may_drop_the_class_token_is_refused():
    model = make_vit(patch_dropout=0.5)
    model.patch_dropout.exclude_first_token = False
    _assert_refused(model, "class token")


def test_a_clip_without_a_vision_transformer_is_refused():
    _assert_refused(make_clip(layers=(1, 1, 1, 1), width=16, head_width=8), r"CLIP.visual is ModifiedResNet")


def test_the_support_list_names_open_clip():
    from tome.runtime.registry import supported_families

    assert "open_clip: VisionTransformer, CLIP, CustomTextCLIP" in supported_families()


# -- ordinary modules: copies, pickles, export, compile, threads ------------------------------------


def test_deepcopy_and_pickle_round_trips():
    model = make_clip(pool_type="avg")
    tome.patch(model, r=4)
    x, t = pixels(), text()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        merged = model.encode_image(x)
        text_ref = model.encode_text(t)
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert twin.tome is not model.tome and twin.tome.r == 4
        with torch.no_grad():
            torch.testing.assert_close(twin.encode_image(x), merged)
            assert torch.equal(twin.encode_text(t), text_ref)
            twin.tome.r = 0
            unmerged = twin.encode_image(x)
            torch.testing.assert_close(model.encode_image(x), merged)  # the original is untouched
            tome.unpatch(twin)
            torch.testing.assert_close(twin.encode_image(x), unmerged, atol=1e-5, rtol=1e-5)
        assert patched_state(twin) == []
        after = twin.state_dict()
        assert list(after) == list(state) and all(torch.equal(after[k], state[k]) for k in state)
    assert model.tome.tokens_per_layer == [17, 13, 9, 5]


class ImageFeatures(nn.Module):
    """A CLIP model's image tower as a plain ``pixels -> features`` module (for export)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)


@pytest.mark.parametrize("build", ["vit", "clip"])
def test_torch_export(build):
    model = make_vit(qk_norm=True) if build == "vit" else make_clip(pool_type="avg")
    tome.patch(model, r=4)
    run = model if build == "vit" else ImageFeatures(model)
    x = pixels()
    with torch.no_grad():
        ref = run(x)
        exported = torch.export.export(run, (x,))
        torch.testing.assert_close(exported.module()(x), ref, atol=1e-5, rtol=1e-5)
    assert model.tome.tokens_per_layer == [17, 13, 9, 5]


@pytest.mark.parametrize("variant", ["default", "avg_pool", "custom_qk_norm"])
def test_compile_fullgraph_matches_eager(variant):
    torch._dynamo.reset()
    model = make_vit(**VARIANTS[variant])
    tome.patch(model, r=4)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = pixels()
    with torch.no_grad():
        out = compiled(x)
        assert model.tome.tokens_per_layer == [17, 13, 9, 5]
        torch.testing.assert_close(out, model(x), atol=1e-5, rtol=1e-5)


def test_threads_give_the_outputs_of_serial_calls():
    model = make_clip(pool_type="avg")
    tome.patch(model, r=4)
    batches = [pixels(b, seed=b) for b in (1, 2, 3, 4)]
    with torch.no_grad():
        serial = [model.encode_image(x) for x in batches]
    results: dict[tuple[int, int], tuple[int, torch.Tensor]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(3)

    def work(worker: int) -> None:
        try:
            start.wait()
            for step in range(8):
                index = (worker + step) % len(batches)
                with torch.no_grad():
                    results[worker, step] = (index, model.encode_image(batches[index]))
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert len(results) == 24
    for index, out in results.values():
        torch.testing.assert_close(out, serial[index], atol=1e-6, rtol=1e-6)
