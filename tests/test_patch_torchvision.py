"""tome.patch on a tiny random torchvision VisionTransformer (no downloads)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from _patching import expected_counts, patched_state

import tome

tv = pytest.importorskip("torchvision.models.vision_transformer")

N0 = 1 + (32 // 8) ** 2  # class token + 16 patches


def make(seed: int = 0, **overrides) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    kwargs = {
        "image_size": 32,
        "patch_size": 8,
        "num_layers": 3,
        "num_heads": 2,
        "hidden_dim": 32,
        "mlp_dim": 64,
        "num_classes": 10,
        **overrides,
    }
    model = tv.VisionTransformer(**kwargs).eval()
    nn.init.normal_(model.heads.head.weight)  # torchvision zero-initialises the head
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed + 1))
    return model, x


def test_r0_matches_unpatched():
    model, x = make()
    with torch.no_grad():
        ref = model(x)
        tome.patch(model, r=0)
        out = model(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert model.tome.tokens_per_layer == [N0] * 4
    assert model.tome.family == "torchvision"


def test_r0_matches_unpatched_with_grad_and_batch_one():
    # with grad enabled nn.MultiheadAttention takes its slow path; batch 1 its own kernels
    model, x = make()
    ref = model(x[:1])
    tome.patch(model, r=0)
    torch.testing.assert_close(model(x[:1]), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("r", "per_layer"), [(4, [4, 4, 4]), ([6, 0, 2], [6, 0, 2]), ((4, -1.0), [8, 4, 0])])
def test_merging_counts_and_class_token(r, per_layer):
    model, x = make()
    with torch.no_grad():
        ref = model(x)
    tome.patch(model, r=r)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert model.tome.tokens_per_layer == expected_counts(N0, per_layer)
    assert (model.tome.sizes[:, 0] == 1).all() and (model.tome.source[:, 0] == 0).all()
    assert (model.tome.sizes.sum(1) == N0).all()
    assert not torch.allclose(out, ref, atol=1e-4)


def test_r_settable():
    model, x = make()
    tome.patch(model, r=0)
    for r in (2, 100, 0):
        model.tome.r = r
        with torch.no_grad():
            model(x)
        assert model.tome.tokens_per_layer == expected_counts(N0, [r] * 3)


def test_unpatch_roundtrip_bit_identical():
    model, x = make()
    with torch.no_grad():
        ref = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    tome.patch(model, r=4, unmerge_output=True)
    with torch.no_grad():
        model(x)
    assert patched_state(model)
    tome.unpatch(model)
    assert not hasattr(model, "tome")
    assert patched_state(model) == []
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    after = model.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], state[k]) for k in state)


def test_patch_twice_is_one_patch():
    model, x = make()
    tome.patch(model, r=4)
    tome.patch(model, r=2, prop_attn=False)
    assert len(model.encoder.ln._forward_hooks) <= 1
    with torch.no_grad():
        model(x)
    assert model.tome.tokens_per_layer == expected_counts(N0, [2, 2, 2])
    tome.unpatch(model)
    assert patched_state(model) == []


def test_unmerge_output():
    model, x = make()
    tome.patch(model, r=4, unmerge_output=True, unmerge_detail=False)  # plain copies
    seq = torch.cat([model.class_token.expand(2, -1, -1), model._process_input(x)], dim=1)
    with torch.no_grad():
        logits = model(x)
        out = model.encoder(seq)
    assert out.shape == (2, N0, 32)
    assert model.tome.tokens_per_layer[-1] == 5
    for b in range(2):
        assert len(torch.unique(out[b], dim=0)) == 5
    model.tome.unmerge_output = False
    with torch.no_grad():
        assert model.encoder(seq).shape == (2, 5, 32)
        torch.testing.assert_close(model(x), logits)  # the class token is not affected


def test_prop_attn_changes_output():
    model, x = make()
    tome.patch(model, r=4, prop_attn=True)
    with torch.no_grad():
        a = model(x)
        model.tome.prop_attn = False
        b = model(x)
    assert not torch.allclose(a, b, atol=1e-6)


def test_training_backward():
    model, x = make(dropout=0.1, attention_dropout=0.1)
    model.train()
    tome.patch(model, r=4)
    model(x).sum().backward()
    assert model.tome.tokens_per_layer == [17, 13, 9, 5]
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.conv_proj.weight.grad.abs().sum() > 0


def test_eval_matches_reference_attention():
    # our attention == nn.MultiheadAttention on the same module, with merging on
    model, x = make()
    reference = copy.deepcopy(model)
    tome.patch(model, r=4, prop_attn=False)
    with torch.no_grad():
        model(x)
    mha = reference.encoder.layers[0].self_attention
    y = torch.randn(2, 9, 32)
    with torch.no_grad():
        expected, _ = mha(y, y, y, need_weights=False)
        from tome.adapters.common.mha import self_attention

        got, keys = self_attention(model.encoder.layers[0].self_attention, y, None)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert keys.shape == (2, 9, 2, 16)  # per head


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_first": False}, "batch_first"),
        ({"kdim": 16, "vdim": 16}, "kdim"),
        ({"add_bias_kv": True}, "add_bias_kv"),
        ({"add_zero_attn": True}, "add_zero_attn"),
    ],
)
def test_unsupported_attention_config(kwargs, message):
    model, _ = make()
    layer = model.encoder.layers[1]
    layer.self_attention = nn.MultiheadAttention(32, 2, **{"batch_first": True, **kwargs})
    with pytest.raises(TypeError, match=message):
        tome.patch(model, r=4)
    assert not hasattr(model, "tome")
    assert patched_state(model) == []


def test_unsupported_block():
    model, _ = make()
    model.encoder.layers[0] = nn.Identity()
    with pytest.raises(TypeError, match="EncoderBlock"):
        tome.patch(model, r=4)
    assert patched_state(model) == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype):
    model, x = make()
    model.to(dtype)
    tome.patch(model, r=4, unmerge_output=True)
    with torch.no_grad():
        out = model(x.to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert model.tome.tokens_per_layer == [17, 13, 9, 5]


def test_compile_fullgraph():
    torch._dynamo.reset()
    model, x = make()
    tome.patch(model, r=4)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        out = compiled(x)
        assert model.tome.tokens_per_layer == [17, 13, 9, 5]
        torch.testing.assert_close(out, model(x), atol=1e-5, rtol=1e-5)
