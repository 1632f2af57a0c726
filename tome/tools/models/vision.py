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
from tome.runtime.registry import Adapter, VisionInfo, adapter_for, adapters, framework_of, outermost
from tome.tools.errors import UserError
from tome.tools.images import IMAGENET_MEAN, IMAGENET_STD, normalize, to_unit
from tome.tools.models.saliency import SaliencyHead
from tome.tools.models.sizes import input_sizes
from tome.tools.schedule_text import Ratio, r_label

__all__ = [
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
    family: str  # the library: "timm" | "transformers" | "torchvision"
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
    def vision(self) -> VisionInfo:
        """What the model's adapter publishes for the tools."""
        return _vision_info(self.module)

    @property
    def blocks(self) -> list[nn.Module]:
        return self.vision.blocks(self.module)

    @property
    def width(self) -> int:
        return self.vision.width(self.module)

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
        module = self.module
        x, logits = self.vision.tokens(module, pixels)
        logits = logits if self.num_classes else None
        if self.patched and x.shape[1] != self.protected + self.num_patches:
            x = module.tome.unmerge(x)
        return x, logits

    def pooled_from(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.vision.pool(self.module, tokens)

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
        return self.vision.run(self.module, pixels)

    def describe(self) -> str:
        extra = ", saliency head" if self.head is not None else ""
        extra += f", {self.num_classes} classes" if self.num_classes else ""
        return (
            f"{self.name} ({self.family}, {len(self.blocks)} blocks, width {self.width}, "
            f"{self.img_size}px, patch {self.patch_size}, {self.protected} protected{extra})"
        )


# -- what the adapters publish for the tools --------------------------------------------------------


def _tools_adapter(module: nn.Module) -> Adapter | None:
    adapter = adapter_for(module)
    if adapter is None or adapter.vision is None:
        return None
    classes = adapter.vision.classes
    if classes is not None and not any(cls.__name__ in classes for cls in type(module).__mro__):
        return None
    return adapter


def _vision_info(module: nn.Module) -> VisionInfo:
    adapter = _tools_adapter(module)
    if adapter is None:
        raise TypeError(f"model: {_TOOLS} do not support {_qualname(module)}")
    return adapter.vision


def _supported() -> dict[str, list[str]]:
    names: dict[str, list[str]] = {}
    for adapter in adapters():
        if adapter.vision is not None:
            names.setdefault(adapter.library, []).extend(adapter.vision.classes or adapter.classes)
    return names


def supported_classes() -> str:
    """One line per library, listing the model classes :func:`from_module` wraps (read from the
    adapters' registry: those that publish :class:`~tome.runtime.registry.VisionInfo`)."""
    return "\n".join(f"  {family}: {', '.join(names)}" for family, names in _supported().items())


def family_of(module: nn.Module) -> str | None:
    """The library of a model the tools run (or of a subclass of one), else None."""
    adapter = _tools_adapter(module)
    return None if adapter is None else adapter.library


def check_size(model: Model, height: int, width: int | None = None) -> None:
    """Raise ``ValueError`` naming the sizes ``model`` accepts when it does not take
    ``height`` x ``width`` pixels (square when ``width`` is None)."""
    width = height if width is None else width
    sizes = input_sizes(model.module)
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
    if framework_of(module) in _supported():
        raise TypeError(
            f"model: {_TOOLS} do not support {_qualname(module)}; supported model classes:\n"
            f"{supported_classes()}"
        )
    found = outermost(module, lambda sub: family_of(sub) is not None)
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
    vision = _vision_info(module)
    model = Model(
        module,
        family,
        name,
        vision.default_size(module),
        vision.patch_size(module),
        vision.protected(module),
        num_classes=vision.num_classes(module),
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
