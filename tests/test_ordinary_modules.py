"""Patched models behave like ordinary modules: threads, copies, pickling, export, training.

Every test runs on one tiny random model of each family (timm, transformers, torchvision)."""

from __future__ import annotations

import copy
import io
import pickle
import threading
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import tome
from tome.runtime import install

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
tv_vit = pytest.importorskip("torchvision.models.vision_transformer")


class HFFeatures(nn.Module):
    """A transformers model as a plain ``pixels -> tensor`` module (for export)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixels).last_hidden_state


def _timm(seed: int = 0, **kwargs) -> tuple[nn.Module, int]:
    torch.manual_seed(seed)
    model = timm.create_model(
        "vit_small_patch14_reg4_dinov2",
        pretrained=False,
        **{"img_size": 56, "embed_dim": 64, "num_heads": 2, "depth": 3, "num_classes": 10, **kwargs},
    )
    for module in model.modules():  # LayerScale starts at 1e-5: give merging an effect
        if hasattr(module, "gamma") and isinstance(module.gamma, nn.Parameter):
            with torch.no_grad():
                module.gamma.fill_(0.5)
    return model.eval(), 56


def _hf(seed: int = 0, **kwargs) -> tuple[nn.Module, int]:
    torch.manual_seed(seed)
    config = transformers.Dinov2Config(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        mlp_ratio=2,
        image_size=48,
        patch_size=8,
        **kwargs,
    )
    model = transformers.Dinov2Model(config)
    model.set_attn_implementation("sdpa")
    return model.eval(), 48


def _torchvision(seed: int = 0, **kwargs) -> tuple[nn.Module, int]:
    torch.manual_seed(seed)
    model = tv_vit.VisionTransformer(
        image_size=32,
        patch_size=8,
        num_layers=3,
        num_heads=2,
        hidden_dim=32,
        mlp_dim=64,
        num_classes=10,
        **kwargs,
    )
    with torch.no_grad():  # torchvision starts its head at zero
        model.heads.head.weight.normal_(0, 0.2)
    return model.eval(), 32


FAMILIES = {"timm": _timm, "transformers": _hf, "torchvision": _torchvision}
# unmerge_output for transformers: last_hidden_state keeps the original length.
PATCH = {"timm": {"r": 4}, "transformers": {"r": 4, "unmerge_output": True}, "torchvision": {"r": 4}}


def make(family: str, seed: int = 0, **kwargs) -> tuple[nn.Module, nn.Module, int]:
    """(the patched model, a ``pixels -> tensor`` view of it, image size)."""
    model, size = FAMILIES[family](seed, **kwargs)
    tome.patch(model, **PATCH[family])
    return model, (HFFeatures(model) if family == "transformers" else model), size


def pixels(batch: int, size: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def assert_merges(model: nn.Module) -> None:
    counts = model.tome.tokens_per_layer
    assert counts[-1] < counts[0], counts


# -- threads ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_threads_give_the_outputs_of_serial_calls(family):
    model, run, size = make(family)
    batches = [pixels(b, size, seed=b) for b in (1, 2, 3, 4, 5, 6)]
    with torch.no_grad():
        serial = [run(x) for x in batches]
    assert_merges(model)
    results: dict[tuple[int, int], torch.Tensor] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def work(worker: int) -> None:
        try:
            start.wait()
            for step in range(12):
                index = (worker + step) % len(batches)
                with torch.no_grad():
                    results[worker, step] = (index, run(batches[index]))
        except BaseException as error:  # reported below, with the thread's traceback lost otherwise
            errors.append(error)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert len(results) == 48
    for index, out in results.values():
        torch.testing.assert_close(out, serial[index], atol=1e-6, rtol=1e-6)


def test_unmerge_follows_each_threads_own_pass():
    model, _, size = make("timm")
    a, b = pixels(2, size, seed=3), pixels(3, size, seed=4)
    with torch.no_grad():
        features_a = model.forward_features(a)
        features_b = model.forward_features(b)  # the latest pass is b's
        expected = model.tome.unmerge(features_a)
    assert model.tome.source.shape[0] == 3
    assert expected.shape == (2, 4 + 1 + 16, 64)
    torch.testing.assert_close(
        expected,
        torch.gather(features_a, 1, model.tome.history_of(features_a).source[..., None].expand(-1, -1, 64)),
    )
    assert model.tome.history_of(features_b) is not model.tome.history_of(features_a)


# -- copies and saving ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_deepcopy_is_an_independent_patched_model(family):
    model, run, size = make(family)
    x = pixels(2, size)
    with torch.no_grad():
        merged = run(x)
    twin = copy.deepcopy(run)
    twin_model = twin.model if family == "transformers" else twin
    assert twin_model.tome is not model.tome
    with torch.no_grad():
        torch.testing.assert_close(twin(x), merged)
        twin_model.tome.r = 0
        unmerged_twin = twin(x)
        torch.testing.assert_close(run(x), merged)  # the original is untouched
        assert not torch.allclose(unmerged_twin, merged, atol=1e-4)
        tome.unpatch(twin_model)
        torch.testing.assert_close(twin(x), unmerged_twin, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(run(x), merged)  # still patched, still merging
    assert isinstance(model.tome, tome.ToMeHandle)
    assert_merges(model)
    assert "tome" not in twin_model.__dict__
    assert not any("forward" in m.__dict__ or m._forward_hooks for m in twin_model.modules())


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_save_and_load_round_trip(family, how):
    model, run, size = make(family)
    x = pixels(2, size)
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        merged = run(x)
    if how == "pickle":
        loaded = pickle.loads(pickle.dumps(run))
    else:
        buffer = io.BytesIO()
        torch.save(run, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
    loaded_model = loaded.model if family == "transformers" else loaded
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), merged)
    assert loaded_model.tome.r == model.tome.r
    assert_merges(loaded_model)
    # state_dict keys and values are those of the unpatched model
    state = loaded_model.state_dict()
    assert list(state) == list(keys) and all(torch.equal(state[k], keys[k]) for k in keys)
    tome.unpatch(loaded_model)
    tome.unpatch(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), run(x))


def test_loading_a_model_from_another_patch_format_names_both_versions():
    _, run, _ = make("timm")
    data = pickle.dumps(run)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(install, "FORMAT", 99)
        with pytest.raises(
            RuntimeError, match=r"saved by tome \S+ \(patch format 2\); tome \S+ reads patch format 99"
        ):
            pickle.loads(data)


def test_state_dict_unchanged_by_patching():
    for family in FAMILIES:
        model, _ = FAMILIES[family]()
        before = model.state_dict()
        tome.patch(model, r=4)
        after = model.state_dict()
        assert list(after) == list(before)
        assert all(torch.equal(after[k], before[k]) for k in before)


# -- export ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_torch_export(family):
    model, run, size = make(family)
    x = pixels(2, size)
    with torch.no_grad():
        ref = run(x)
        exported = torch.export.export(run, (x,))
        torch.testing.assert_close(exported.module()(x), ref, atol=1e-5, rtol=1e-5)
    assert_merges(model)
    assert type(model.tome.source) is torch.Tensor  # the eager pass's results, not the trace's


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_onnx_export_matches_eager(family, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model, run, size = make(family)
    x = pixels(2, size)
    with torch.no_grad():
        ref = run(x)
    program = torch.onnx.export(run, (x,), dynamo=True, verbose=False)
    path = tmp_path / f"{family}.onnx"
    program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), ref, atol=1e-4, rtol=1e-4)
    assert_merges(model)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_jit_script_refuses_with_the_paths_to_use(family):
    model, _, _ = make(family)
    with pytest.raises(TypeError, match=r"torch.jit.script.*torch.export.export.*dynamo=True"):
        torch.jit.script(model)
    tome.unpatch(model)
    assert not any("__prepare_scriptable__" in m.__dict__ for m in model.modules())


# -- training --------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_train_mode_gives_finite_gradients_for_every_used_parameter(family):
    extra = {
        "timm": {"drop_rate": 0.1, "drop_path_rate": 0.1, "attn_drop_rate": 0.1},
        "transformers": {"hidden_dropout_prob": 0.1, "drop_path_rate": 0.1},
        "torchvision": {"dropout": 0.1, "attention_dropout": 0.1},
    }[family]
    model, run, size = make(family, **extra)
    model.train()
    x = pixels(4, size)
    out = run(x)
    out.float().pow(2).mean().backward()
    assert_merges(model)
    unused = {"mask_token"}  # DINOv2's mask token is only used with bool_masked_pos
    for name, p in model.named_parameters():
        if name.split(".")[-1] in unused or "mask_token" in name:
            continue
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    # dropout is active: two training passes differ, two eval passes do not
    with torch.no_grad():
        assert not torch.allclose(run(x), run(x))
        model.eval()
        torch.testing.assert_close(run(x), run(x))


def test_loss_falls_on_real_photos(images_dir):
    from _dinov2_timm import load_images

    images = load_images(images_dir, 8, size=56)
    labels = torch.arange(len(images))
    model, _ = _timm(num_classes=len(images))
    tome.patch(model, r=6)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(25):
        flip = torch.rand(len(images)) < 0.5  # light augmentation, so it cannot just memorise pixels
        batch = torch.where(flip[:, None, None, None], images.flip(-1), images)
        loss = nn.functional.cross_entropy(model(batch), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert_merges(model)
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses


@pytest.mark.parametrize("reentrant", [False, True])
def test_timm_grad_checkpointing_is_exact(reentrant, monkeypatch):
    import timm.layers.config as timm_config

    monkeypatch.setattr(timm_config, "_USE_REENTRANT_CKPT", reentrant)
    model, _, size = make("timm")
    reference = copy.deepcopy(model)
    model.set_grad_checkpointing(True)
    for m in (model, reference):
        m.train()
    x = pixels(2, size)
    torch.manual_seed(0)
    model(x.requires_grad_(True)).sum().backward()
    torch.manual_seed(0)
    x2 = x.detach().clone().requires_grad_(True)
    reference(x2).sum().backward()
    assert model.tome.tokens_per_layer == reference.tome.tokens_per_layer
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-4)


def test_hf_grad_checkpointing_is_exact():
    model, _, size = make("transformers")
    reference = copy.deepcopy(model)
    model.gradient_checkpointing_enable()
    for m in (model, reference):
        m.train()
    x = pixels(2, size)
    HFFeatures(model)(x).sum().backward()
    HFFeatures(reference)(x).sum().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        if q.grad is None:
            assert p.grad is None, name
            continue
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)


# -- bad input -------------------------------------------------------------------------------------


def test_blocks_out_of_order_still_get_the_clear_error():
    model, _, size = make("timm")
    tokens = model._pos_embed(model.patch_embed(pixels(2, size)))
    with pytest.raises(RuntimeError, match=r"block 1 received .* do not come from block 0"):
        model.blocks[1](tokens)
    after_first = model.blocks[0](tokens)
    with pytest.raises(RuntimeError, match="block 2 received"):
        model.blocks[2](after_first)
    model.blocks[1](after_first)  # in order: fine


# -- DDP -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(tmp_path):
    import _ddp_worker
    import torch.multiprocessing as mp

    out = tmp_path / "grads.pt"
    mp.spawn(_ddp_worker.run, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    result = torch.load(out)

    model = _ddp_worker.build_model()
    images, labels = _ddp_worker.batch()
    nn.functional.cross_entropy(model(images), labels).backward()
    assert result["tokens"] == model.tome.tokens_per_layer == [17, 14, 11, 8]
    for name, p in model.named_parameters():
        torch.testing.assert_close(result["grads"][name], p.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_a_model_saved_before_the_layout_change_names_its_format():
    """tests/data/patched_format1.pkl: a tiny torchvision ViT patched (r=1) and pickled by tome
    0.1.0 at d63f885, whose modules lived under tome.patch; loading it names both formats."""
    path = Path(__file__).parent / "data" / "patched_format1.pkl"
    with pytest.raises(
        RuntimeError, match=r"saved by tome 0\.1\.0 \(patch format 1\); tome \S+ reads patch format 2"
    ):
        pickle.loads(path.read_bytes())
