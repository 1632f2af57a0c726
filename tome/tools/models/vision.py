"""One wrapper over timm, transformers and torchvision ViTs: what the tools need to know of a model.

:class:`Model` gives, for a batch of pixels, the pooled/CLS feature, the patch features at full
length (unmerged), the logits of classifiers and the saliency map of models with the head, plus
the preprocessing, the patch grid and the number of protected (prefix) tokens.
:func:`from_module` wraps a model the user already built; :func:`tome.tools.models.loading.load_model`
builds one from a spec.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn

import tome
from tome.tools.errors import UserError
from tome.tools.images import IMAGENET_MEAN, IMAGENET_STD, normalize, to_unit
from tome.tools.models.saliency import SaliencyHead
from tome.tools.models.sizes import input_sizes
from tome.tools.schedule_text import Ratio, r_label

__all__ = [
    "SUPPORTED",
    "Model",
    "Outputs",
    "check_size",
    "family_of",
    "find_model",
    "from_module",
    "supported_classes",
]


@dataclass
class Outputs:
    """What one forward pass gives, every field for the whole batch (None when not available).

    pooled: (B, C) CLS / pooled feature. patches: (B, Np, C) patch features at full length
    (merged tokens given back to every patch they hold). logits: (B, K) for classifiers.
    saliency: (B, 1, H, W) for models with the saliency head. source: (B, Np) group of each patch
    (index in the merged sequence; protected tokens excluded); None when unpatched.
    """

    pooled: torch.Tensor
    patches: torch.Tensor
    logits: torch.Tensor | None = None
    saliency: torch.Tensor | None = None
    source: torch.Tensor | None = None


@dataclass
class Model:
    """A ViT from any supported library, with what ``tome`` commands need to know."""

    module: nn.Module
    family: str  # "timm" | "transformers" | "torchvision"
    name: str
    img_size: int
    patch_size: int
    protected: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_pct: float | None = None  # None: resize to img_size x img_size; else resize + centre crop
    num_classes: int = 0
    head: SaliencyHead | None = None
    labels: list[str] | None = None  # class names of classifiers
    synsets: list[str] | None = None  # WordNet ids of ImageNet classifiers
    notes: list[str] = field(default_factory=list)
    # The module the user gave when ``module`` is inside it (a torch.compile / DataParallel /
    # DistributedDataParallel wrapper, or their own module); None when ``module`` is it.
    container: nn.Module | None = None

    # -- geometry --------------------------------------------------------------------------

    @property
    def grid(self) -> tuple[int, int]:
        return (self.img_size // self.patch_size, self.img_size // self.patch_size)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def blocks(self) -> list[nn.Module]:
        return _find_blocks(self.module, self.family)

    @property
    def width(self) -> int:
        return _width(self.module, self.family)

    # -- patching --------------------------------------------------------------------------

    @property
    def patched(self) -> bool:
        return isinstance(self.module.__dict__.get("tome"), tome.ToMeHandle)

    def set_r(self, r, **kwargs) -> None:
        """Patch with the setting ``r`` (an ``r`` schedule, or a
        :class:`~tome.tools.schedule_text.Ratio` for ``tome.patch(ratio=...)``) and the
        :func:`tome.patch` options ``kwargs`` (output unmerged unless said otherwise); None:
        unpatch, the exact original model. A model already patched with those options only
        gets its schedule changed (``model.tome.r`` or ``model.tome.ratio``)."""
        if "ratio" in kwargs:
            raise TypeError(
                f"ratio: give a ratio as the setting, set_r(Ratio({kwargs['ratio']!r})), not as an option"
            )
        kwargs.setdefault("unmerge_output", True)
        ratio = r.value if isinstance(r, Ratio) else None
        try:
            if r is None:
                tome.unpatch(self.module)
            elif self.patched and kwargs.items() <= self.module.tome.patch_options().items():
                if ratio is None:
                    self.module.tome.r = r
                else:
                    self.module.tome.ratio = ratio
            elif ratio is None:
                tome.patch(self.module, r, **kwargs)
            else:
                tome.patch(self.module, ratio=ratio, **kwargs)
        except (ValueError, TypeError) as error:
            # A schedule that does not fit this model (e.g. more entries than layers) is a
            # user error on the command line.
            flag = f"--ratio {ratio:g}" if ratio is not None else f"--r {r_label(r)}"
            raise UserError(f"{flag}: {error}") from error

    # -- preprocessing ---------------------------------------------------------------------

    def preprocess(self, images: Sequence) -> torch.Tensor:
        """PIL RGB images -> normalised (B, 3, S, S) float32 pixels."""
        return normalize(self.to_unit(images), self.mean, self.std)

    def to_unit(self, images: Sequence) -> torch.Tensor:
        """PIL RGB images -> (B, 3, S, S) float32 in [0, 1], resized (and cropped) as the model
        sees them."""
        return to_unit(images, self.img_size, self.crop_pct)

    # -- forward ---------------------------------------------------------------------------

    def tokens(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The model's final token sequence (B, N0, C) at full length, and its logits."""
        family, module = self.family, self.module
        if family == "timm":
            x = module.forward_features(pixels)
            logits = module.forward_head(x) if self.num_classes else None
        elif family == "transformers":
            x, logits = _hf_tokens(module, pixels)
        else:
            x, logits = _torchvision_tokens(module, pixels, self.num_classes)
        if self.patched and x.shape[1] != self.protected + self.num_patches:
            x = module.tome.unmerge(x)
        return x, logits

    def pooled_from(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.family == "timm":
            return self.module.forward_head(tokens, pre_logits=True)
        if self.family == "transformers":
            return _hf_pool(self.module, tokens)
        return tokens[:, 0]

    @torch.inference_mode()
    def __call__(self, pixels: torch.Tensor, saliency: bool = True) -> Outputs:
        x, logits = self.tokens(pixels)
        pooled = self.pooled_from(x)
        patches = x[:, self.protected :]
        dense = None
        if saliency and self.head is not None:
            dense = self.head(patches, self.grid, tuple(pixels.shape[-2:]))
        source = None
        if self.patched and self.module.tome.source is not None:
            source = self.module.tome.source[:, self.protected :]
        return Outputs(pooled, patches, logits, dense, source)

    @torch.inference_mode()
    def run_backbone(self, pixels: torch.Tensor) -> object:
        """The plain forward the user would run (what ``bench`` times)."""
        if self.family == "transformers":
            return self.module(pixel_values=pixels)
        return self.module(pixels)

    def describe(self) -> str:
        extra = ", saliency head" if self.head is not None else ""
        extra += f", {self.num_classes} classes" if self.num_classes else ""
        return (
            f"{self.name} ({self.family}, {len(self.blocks)} blocks, width {self.width}, "
            f"{self.img_size}px, patch {self.patch_size}, {self.protected} protected{extra})"
        )


# -- per-family helpers ------------------------------------------------------------------------


def _hf_base(module: nn.Module) -> nn.Module:
    for name in ("vision_model", "dinov2", "vit"):
        if isinstance(getattr(module, name, None), nn.Module):
            return getattr(module, name)
    return module


def _hf_tokens(module: nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    base = _hf_base(module)
    if base is module:
        out = module(pixel_values=pixels)
        return out.last_hidden_state, None
    captured: dict = {}

    def hook(mod, args, output):
        captured["x"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

    handle = base.register_forward_hook(hook)
    try:
        out = module(pixel_values=pixels)
    finally:
        handle.remove()
    logits = getattr(out, "logits", None)
    return captured["x"], logits


def _hf_pool(module: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    base = _hf_base(module)
    post = getattr(base, "post_layernorm", None)  # CLIP: pooled = post_layernorm(CLS)
    cls = tokens[:, 0]
    return post(cls) if isinstance(post, nn.Module) else cls


def _torchvision_tokens(module: nn.Module, pixels: torch.Tensor, num_classes: int):
    x = module._process_input(pixels)
    cls = module.class_token.expand(x.shape[0], -1, -1)
    x = module.encoder(torch.cat([cls, x], dim=1))
    logits = module.heads(x[:, 0]) if num_classes else None
    return x, logits


def _find_blocks(module: nn.Module, family: str) -> list[nn.Module]:
    if family == "timm":
        return list(module.blocks)
    if family == "torchvision":
        return list(module.encoder.layers)
    base = _hf_base(module)
    for path in ("encoder.layer", "encoder.layers", "layers", "layer"):
        found: object = base
        for name in path.split("."):
            found = getattr(found, name, None)
        if isinstance(found, nn.ModuleList):
            return list(found)
    lists = [m for m in base.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise UserError(f"cannot find the transformer blocks of {type(module).__name__}")
    return list(max(lists, key=len))


def _width(module: nn.Module, family: str) -> int:
    if family == "timm":
        return int(module.embed_dim)
    if family == "torchvision":
        return int(module.hidden_dim)
    config = getattr(module, "config", None)
    config = getattr(config, "vision_config", config)
    return int(config.hidden_size)


# What this wrapper knows how to run, per family: class names found through the model's class
# hierarchy (so a user's subclass of a supported model counts), and the library they come from.
SUPPORTED: dict[str, tuple[str, ...]] = {
    "timm": ("VisionTransformer", "Eva"),
    "transformers": (
        "ViTModel",
        "ViTForImageClassification",
        "Dinov2Model",
        "Dinov2ForImageClassification",
        "Dinov2WithRegistersModel",
        "Dinov2WithRegistersForImageClassification",
        "CLIPVisionModel",
        "CLIPVisionModelWithProjection",
        "CLIPForImageClassification",
    ),
    "torchvision": ("VisionTransformer",),
}


def supported_classes() -> str:
    """One line per library, listing the model classes :func:`from_module` wraps."""
    return "\n".join(f"  {family}: {', '.join(names)}" for family, names in SUPPORTED.items())


def family_of(module: nn.Module) -> str | None:
    """``"timm"``, ``"transformers"`` or ``"torchvision"`` for a supported model (or a subclass of
    one), else None."""
    for cls in type(module).__mro__:
        for family, names in SUPPORTED.items():
            if cls.__name__ in names and cls.__module__.startswith(family + "."):
                return family
    return None


def _default_size(module: nn.Module, family: str) -> int:
    """The model's own input size: timm's ``patch_embed.img_size``, torchvision's
    ``image_size``, the transformers config's ``image_size`` (its pretraining size)."""
    if family == "timm":
        return int(module.patch_embed.img_size[0])
    if family == "torchvision":
        return int(module.image_size)
    config = getattr(module.config, "vision_config", module.config)
    size = config.image_size
    return int(size if isinstance(size, int | float) else size[0])


def check_size(model: Model, height: int, width: int | None = None) -> None:
    """Raise ``ValueError`` naming the sizes ``model`` accepts when it does not take
    ``height`` x ``width`` pixels (square when ``width`` is None)."""
    width = height if width is None else width
    sizes = input_sizes(model.module, model.family)
    if not sizes.accepts(height, width):
        raise ValueError(f"{model.name} takes {sizes.describe()}; got {height}x{width}")


# What from_module serves: vision transformers (tome.patch itself supports text encoders too).
_TOOLS = "tome.tune and the tome command (vision transformers)"


def _qualname(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def find_model(module: nn.Module) -> tuple[str, nn.Module]:
    """The supported model in ``module``, as :func:`tome.patch` finds it: ``module`` itself, or
    the one outermost supported submodule of a wrapper (``torch.compile``'s ``_orig_mod``,
    ``DataParallel`` / ``DistributedDataParallel``'s ``module``) or of a user's module.
    Returns ``(its name in module, the model)``; the name is ``""`` for ``module`` itself.

    Raises ``TypeError`` when nothing supported is inside (saying what was searched), or when
    ``module`` is a framework's model tome does not support (its head may need every token);
    ``ValueError`` when ``module`` holds several supported models (pass the one you mean).

    >>> import torch.nn as nn, timm
    >>> vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1)
    >>> find_model(nn.ModuleDict({"backbone": vit}))[0]
    'backbone'
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(module).__name__}")
    if family_of(module) is not None:
        return "", module
    if any(type(module).__module__.startswith(f"{family}.") for family in SUPPORTED):
        raise TypeError(
            f"model: {_TOOLS} do not support {_qualname(module)}; supported model classes:\n"
            f"{supported_classes()}"
        )
    found: list[tuple[str, nn.Module]] = []
    for name, sub in module.named_modules():
        if sub is module or any(name.startswith(f"{outer}.") for outer, _ in found):
            continue
        if family_of(sub) is not None:
            found.append((name, sub))
    if not found:
        raise TypeError(
            f"model: {_TOOLS} do not support {_qualname(module)}, and none of its "
            f"{sum(1 for _ in module.modules()) - 1} submodules is a supported model (searched the model "
            f"itself, then every submodule, outermost first); supported model classes:\n{supported_classes()}"
        )
    if len(found) > 1:
        names = ", ".join(f"{name} ({type(sub).__name__})" for name, sub in found)
        raise ValueError(
            f"model: {_qualname(module)} holds {len(found)} supported models ({names}); expected one. "
            f"Pass the one you mean, e.g. model.{found[0][0]}"
        )
    return found[0]


def from_module(module: nn.Module, *, img_size: int | None = None, name: str = "") -> Model:
    """Wrap a model you already built (timm, transformers or torchvision ViT), or a module
    holding one (``torch.compile(model)``, ``nn.DataParallel(model)``,
    ``DistributedDataParallel(model)``, a module of yours: see :func:`find_model`; the tools
    then run the model inside, eagerly, and ``Model.container`` is what you gave). The module
    is not changed: its training mode stays as it is (call ``.eval()`` for inference).

    ``img_size``: the (square) input size the tools feed it, any size the model accepts
    (see :mod:`tome.tools.models.sizes`); default: the model's own (for transformers models the
    config's ``image_size``). Raises ``TypeError`` for an unsupported model, ``ValueError``
    for a module holding several supported models and ``ValueError`` (naming the sizes it
    accepts) for an ``img_size`` it does not take.
    """
    given = module
    _, module = find_model(given)
    family = family_of(module)
    if img_size is not None and (isinstance(img_size, bool) or not isinstance(img_size, int)):
        raise TypeError(f"img_size: expected an int (pixels per side), got {type(img_size).__name__}")
    name = name or type(module).__name__
    if family == "timm":
        model = Model(
            module,
            "timm",
            name,
            _default_size(module, family),
            int(module.patch_embed.patch_size[0]),
            int(module.num_prefix_tokens),
            num_classes=int(module.num_classes),
        )
    elif family == "transformers":
        cfg = getattr(module.config, "vision_config", module.config)
        num = (
            int(getattr(module.config, "num_labels", 0))
            if any("ForImageClassification" in cls.__name__ for cls in type(module).__mro__)
            else 0
        )
        model = Model(
            module,
            "transformers",
            name,
            _default_size(module, family),
            int(cfg.patch_size),
            1 + int(getattr(cfg, "num_register_tokens", 0) or 0),
            num_classes=num,
        )
    else:
        model = Model(
            module,
            "torchvision",
            name,
            _default_size(module, family),
            int(module.patch_size),
            1,
            num_classes=int(module.heads[-1].out_features),
        )
    if given is not module:
        model.container = given
    if img_size is not None and img_size != model.img_size:
        try:
            check_size(model, img_size)
        except ValueError as error:
            raise ValueError(f"img_size: {error}") from None
        model.img_size = img_size
    return model
