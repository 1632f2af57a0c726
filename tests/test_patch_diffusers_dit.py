"""diffusers DiTs (PixArt, DiT, SD3, Flux): merge -> op -> unmerge on tiny random models."""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch

import tome
from tome.core.merge import bipartite_soft_matching
from tome.core.merge2d import keep_prefix, random2d_matching

diffusers = pytest.importorskip("diffusers")
dit = pytest.importorskip("tome.adapters.diffusers_dit")
from tome.adapters.common import diffusion as tome_diffusion  # noqa: E402
from tome.runtime.base import PatchHandle  # noqa: E402


def _flux_ids(h: int, w: int) -> torch.Tensor:
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(-1, 3)


def _pixart(batch: int = 2, size: int = 16):
    torch.manual_seed(0)
    model = diffusers.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=16, sample_size=size, patch_size=2, caption_channels=12, norm_num_groups=4,
    ).eval()  # fmt: skip
    g = torch.Generator().manual_seed(1)
    return model, {
        "hidden_states": torch.randn(batch, 4, size, size, generator=g),
        "encoder_hidden_states": torch.randn(batch, 5, 12, generator=g),
        "timestep": torch.full((batch,), 500),
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
    }


def _dit(batch: int = 2, size: int = 16):
    torch.manual_seed(0)
    model = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2, sample_size=size,
        patch_size=2, norm_num_groups=4,
    ).eval()  # fmt: skip
    g = torch.Generator().manual_seed(1)
    return model, {
        "hidden_states": torch.randn(batch, 4, size, size, generator=g),
        "timestep": torch.full((batch,), 500),
        "class_labels": torch.arange(batch),
    }


def _sd3(batch: int = 2, size: int = 16):
    torch.manual_seed(0)
    model = diffusers.SD3Transformer2DModel(
        sample_size=size, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16,
        pooled_projection_dim=10, out_channels=4, pos_embed_max_size=size, dual_attention_layers=(0,),
    ).eval()  # fmt: skip
    g = torch.Generator().manual_seed(1)
    return model, {
        "hidden_states": torch.randn(batch, 4, size, size, generator=g),
        "encoder_hidden_states": torch.randn(batch, 5, 12, generator=g),
        "pooled_projections": torch.randn(batch, 10, generator=g),
        "timestep": torch.full((batch,), 500),
    }


def _flux(batch: int = 2, h: int = 8, w: int = 8):
    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=10, axes_dims_rope=(4, 6, 6),
    ).eval()  # fmt: skip
    g = torch.Generator().manual_seed(1)
    return model, {
        "hidden_states": torch.randn(batch, h * w, 16, generator=g),
        "encoder_hidden_states": torch.randn(batch, 5, 12, generator=g),
        "pooled_projections": torch.randn(batch, 10, generator=g),
        "timestep": torch.full((batch,), 0.5),
        "img_ids": _flux_ids(h, w),
        "txt_ids": torch.zeros(5, 3),
    }


FAMILIES = {"pixart": _pixart, "dit": _dit, "sd3": _sd3, "flux": _flux}


def _run(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).sample


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("family", FAMILIES)
def test_ratio_zero_exact_merging_happens_unpatch_exact(family):
    model, inputs = FAMILIES[family]()
    reference = _run(model, inputs)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    tome.patch(model, ratio=0.0)
    assert torch.equal(_run(model, inputs), reference)
    assert model.tome.family == "diffusers" and len(model.tome.blocks) >= 2
    model.tome.ratio = 0.5
    attention_only = _run(model, inputs)
    assert 1e-4 < _rel(attention_only, reference) < 0.5  # merging happens, outputs stay close
    model.tome.merge_mlp = True
    assert not torch.equal(_run(model, inputs), attention_only)  # the MLPs merge too
    assert tome.unpatch(model) is model
    assert torch.equal(_run(model, inputs), reference)
    restored = model.state_dict()
    assert restored.keys() == state.keys() and all(torch.equal(restored[k], state[k]) for k in state)
    assert not any("tome" in m.__dict__ or "forward" in m.__dict__ for m in model.modules())


def _attention_lengths(model) -> list[int]:
    """Record the sequence length every attention's query projection sees."""
    lengths: list[int] = []
    for name, module in model.named_modules():
        if name.endswith(("attn.to_q", "attn1.to_q")):
            module.register_forward_hook(lambda m, args, out: lengths.append(args[0].shape[1]))
    return lengths


@pytest.mark.parametrize("family", FAMILIES)
def test_image_tokens_merge_by_the_ratio_text_tokens_never(family):
    model, inputs = FAMILIES[family]()
    tome.patch(model, ratio=0.5, use_rand=False)
    lengths = _attention_lengths(model)
    _run(model, inputs)
    tokens = 64  # 8 x 8 patches in every family here
    if family == "flux":
        # double-stream: the image queries alone (32 of 64 left); single-stream: 5 text + 32
        assert lengths == [32, 5 + 32, 5 + 32]
    else:
        assert lengths == [tokens // 2] * 2


def _identity_plans(monkeypatch):
    # Every merging block gets a plan that merges nothing (r = 0), so the merged path (rotary
    # tables included) runs and must give the unpatched outputs.
    def plan(self, index, hidden, call):
        if call is None:
            return None
        identity = bipartite_soft_matching(hidden, 0)
        return tome_diffusion.BlockMerge(identity, hidden.shape[0], hidden.shape[1])

    monkeypatch.setattr(tome_diffusion.DiffusionHandle, "plan", plan)


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_path_with_nothing_merged_equals_unpatched(family, monkeypatch):
    model, inputs = FAMILIES[family]()
    reference = _run(model, inputs)
    tome.patch(model, ratio=0.5, merge_crossattn=True, merge_mlp=True)
    _identity_plans(monkeypatch)
    got = _run(model, inputs)
    assert torch.allclose(got, reference, atol=1e-6, rtol=1e-5), (got - reference).abs().max()


def test_rotate_equals_diffusers_apply_rotary_emb():
    from diffusers.models.embeddings import apply_rotary_emb

    cos, sin = diffusers.models.transformers.transformer_flux.FluxPosEmbed(10000, [4, 6, 6])(_flux_ids(3, 4))
    x = torch.randn(2, 12, 3, 16)
    expected = apply_rotary_emb(x, (cos, sin), sequence_dim=1)
    assert torch.equal(dit.rotate(x, cos, sin), expected)
    per_sample = dit.rotate(x, cos.expand(2, -1, -1), sin.expand(2, -1, -1))
    assert torch.equal(per_sample, expected)


def test_flux_merged_tokens_take_their_destinations_rotary_positions():
    model, inputs = _flux()
    tome.patch(model, ratio=0.5, use_rand=False)
    ids = torch.cat([inputs["txt_ids"], inputs["img_ids"]])
    cos, sin = model.pos_embed(ids)
    seen = []

    def look(module, args, out):
        slot = model.tome.slot()
        seen.append((slot.rope, slot.block))

    for block in (model.transformer_blocks[0], model.single_transformer_blocks[0]):
        block.attn.norm_k.register_forward_hook(look)
    _run(model, inputs)
    (double, double_block), (single, single_block) = seen
    kept = double_block.plan.kept  # image tokens (B, 32): the destinations and unmerged sources
    assert torch.equal(double[0], cos[5 + kept]) and torch.equal(double[1], sin[5 + kept])
    assert torch.equal(double[2], cos[:5])  # text keeps its own positions
    joint = single_block.plan.kept  # text in front, then the image tokens
    assert torch.equal(joint[:, :5], torch.arange(5).expand(2, 5))
    assert torch.equal(single[0], cos[joint]) and single[2] is None
    # every kept token sits at its own position: merged groups at their destination's
    destinations = joint.gather(1, single_block.plan.dst)
    assert bool((destinations >= 5).all())


def test_keep_prefix_keeps_text_in_front():
    x = torch.randn(2, 16, 4)
    plan = random2d_matching(x, 4, 4, 2, 2, r=6)
    joint = keep_prefix(plan, 3)
    text = torch.randn(2, 3, 4)
    merged = tome.core.merge.merge(joint, torch.cat([text, x], 1), "mean")
    assert torch.equal(merged[:, :3], text)
    assert torch.allclose(merged[:, 3:], tome.core.merge.merge(plan, x, "mean"))
    back = tome.core.merge.unmerge(joint.index, merged)
    assert torch.equal(back[:, :3], text) and back.shape == (2, 19, 4)


def test_flux_img_ids_that_are_no_grid_do_not_merge():
    model, inputs = _flux()
    reference = _run(model, inputs)
    tome.patch(model, ratio=0.5)
    shuffled = {**inputs, "img_ids": inputs["img_ids"].flip(0)}
    with pytest.warns(UserWarning, match="img_ids"):
        got = _run(model, shuffled)
    tome.unpatch(model)
    assert torch.equal(got, _run(model, shuffled))
    assert not torch.equal(got, reference)


@pytest.mark.parametrize("family", FAMILIES)
def test_randomness_is_reproducible_and_leaves_the_global_rng_alone(family):
    model, inputs = FAMILIES[family]()
    tome.patch(model, ratio=0.5, use_rand=True)
    state = torch.get_rng_state()
    first = _run(model, inputs)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(_run(model, inputs), first)
    model.tome.seed = 1
    assert not torch.equal(_run(model, inputs), first)


def test_odd_batches_and_non_square_grids():
    for build, kwargs in ((_pixart, {"batch": 3, "size": 12}), (_flux, {"batch": 3, "h": 6, "w": 10})):
        model, inputs = build(**kwargs)
        reference = _run(model, inputs)
        tome.patch(model, ratio=0.5)
        got = _run(model, inputs)
        assert got.shape == reference.shape and torch.isfinite(got).all()
        assert not torch.equal(got, reference)


@pytest.mark.parametrize("family", ["pixart", "flux"])
def test_pickle_and_deepcopy_round_trip(family):
    model, inputs = FAMILIES[family]()
    tome.patch(model, ratio=0.5, merge_mlp=True)
    expected = _run(model, inputs)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for other in (
        copy.deepcopy(model),
        pickle.loads(pickle.dumps(model)),
        torch.load(buffer, weights_only=False),
    ):
        assert other.tome is not model.tome
        assert torch.equal(_run(other, inputs), expected)
        tome.unpatch(other)
        assert torch.equal(_run(other, inputs), _run(FAMILIES[family]()[0], inputs))
    assert torch.equal(_run(model, inputs), expected)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_equals_eager(family):
    model, inputs = FAMILIES[family]()
    tome.patch(model, ratio=0.5, merge_mlp=True)
    expected = _run(model, inputs)
    compiled = torch.compile(model, backend="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = _run(compiled, inputs)
    assert torch.allclose(got, expected, atol=1e-6, rtol=1e-5)


def test_gradient_checkpointing_recomputes_the_same_merges():
    model, inputs = _pixart()
    tome.patch(model, ratio=0.5, merge_mlp=True)
    model.train()

    def gradients():
        model.zero_grad()
        model(**inputs).sample.square().mean().backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    expected = gradients()
    model.enable_gradient_checkpointing()
    got = gradients()
    assert len(got) == len(expected)
    assert all(torch.allclose(g, e, atol=1e-6, rtol=1e-5) for g, e in zip(got, expected, strict=True))


def test_bad_arguments_are_refused():
    model, _ = _sd3()
    for kwargs, error, match in [
        ({"ratio": 1.0}, ValueError, "ratio"),
        ({"r": 8}, TypeError, "ratio"),
        ({"sx": 0}, ValueError, "sx"),
        ({"mode": "mean"}, TypeError, "mode"),
    ]:
        with pytest.raises(error, match=match):
            tome.patch(model, **kwargs)
        assert "tome" not in model.__dict__


def test_pixart_pipeline_call_with_prompt_embeds():
    transformer, _ = _pixart()
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8, sample_size=16,
    )  # fmt: skip
    pipe = diffusers.PixArtAlphaPipeline(
        tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
        scheduler=diffusers.DPMSolverMultistepScheduler(),
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    embeds, negative = torch.randn(1, 5, 12, generator=g), torch.randn(1, 5, 12, generator=g)
    mask = torch.ones(1, 5, dtype=torch.long)

    def generate():
        return pipe(
            prompt_embeds=embeds, prompt_attention_mask=mask, negative_prompt=None, negative_prompt_embeds=negative,
            negative_prompt_attention_mask=mask, num_inference_steps=2, height=16, width=16,
            use_resolution_binning=False, generator=torch.Generator().manual_seed(0), output_type="pt",
        ).images  # fmt: skip

    reference = generate()
    assert tome.patch(pipe, ratio=0.5) is pipe
    assert isinstance(pipe.transformer.tome, PatchHandle)
    merged = generate()
    assert merged.shape == reference.shape and torch.isfinite(merged).all()
    assert not torch.equal(merged, reference)
    tome.unpatch(pipe)
    assert "tome" not in pipe.transformer.__dict__
    assert torch.equal(generate(), reference)


def test_random_destinations_need_no_host_read_of_the_timestep():
    # fullgraph: a .item() / float() of the timestep would be a graph break, hence an error
    from tome.core.merge2d import grid_destinations

    def destinations(t):
        return grid_destinations(8, 8, 2, 2, key=tome_diffusion.block_key(0, t, 3))

    compiled = torch.compile(destinations, fullgraph=True, backend="eager")
    t = torch.tensor(500)
    assert torch.equal(compiled(t), destinations(t))
    assert not torch.equal(destinations(torch.tensor(499)), destinations(t))


def test_merge_groups_on_the_latent_grid_for_one_block():
    from tome.tools.pictures.vis_diffusion import diffusion_panels, merge_groups

    model, inputs = _flux()
    tome.patch(model, ratio=0.5)
    for block in (0, 2):  # a double-stream block; a single-stream one (text tokens left out)
        source, grid = merge_groups(model, inputs, block)
        assert grid == (8, 8) and source.shape == (2, 64)
        assert sorted(set(source[0].tolist())) == list(range(32))  # 32 groups of the 64 tokens
    panels = diffusion_panels(model, inputs, torch.rand(2, 3, 64, 64), block=0)
    assert panels.colors.shape == (2, 64, 64, 3) and panels.num_groups == [32, 32]
    model.tome.ratio = 0.0
    assert merge_groups(model, inputs, 0)[0] is None
