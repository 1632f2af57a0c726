"""The adapter registry: one entry per model family, declared by the family's own module.

Every module directly inside :mod:`tome.adapters` (``tome.adapters.common`` holds shared pieces,
not families) ends with ``ADAPTER = Adapter(...)``: the classes it patches, its kind, its handle
class (whose :class:`~tome.runtime.options.Option` attributes are the family's options), its
defaults for the shared options, the support-table lines, and what the tools need to know of a
model of it (:class:`VisionInfo`). ``tome.patch``'s routing and errors, the support table, the
tools' model wrapper and the command line read it here. Adding a family = its module + its tests.

Adapter modules import no framework at module level (classes are matched by name through the
MRO), so reading the registry imports none either.

>>> [a.name for a in adapters() if a.library == "timm"]
['timm_eva', 'timm_naflex', 'timm_vit']
>>> adapter_named("torchvision_vit").patches
('torchvision.VisionTransformer',)
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch.nn as nn

from tome.runtime.options import Option, declared_options

__all__ = [
    "CARRY",
    "KINDS",
    "MASKED",
    "MERGE_OP_UNMERGE",
    "REDUCE_ONCE",
    "Adapter",
    "InputSizes",
    "VisionInfo",
    "adapter_for",
    "adapter_named",
    "adapters",
    "framework_of",
    "option_owners",
    "outermost",
    "supported_families",
]

# The three kinds of adapter (DESIGN.md): how merging sits in a block.
CARRY = "carry"  # merge between attention and MLP; the shorter sequence goes on
MASKED = "masked"  # carry, with a per-row rule: a row never depends on the rest of its batch
MERGE_OP_UNMERGE = "merge → op → unmerge"  # each block gets and returns full-length tokens
# vision-language models: each image's visual tokens merge once, between the vision side and the
# language model, so the prefill and the KV cache shrink
REDUCE_ONCE = "reduce once, before the decoder"
KINDS = (CARRY, MASKED, MERGE_OP_UNMERGE, REDUCE_ONCE)


@dataclass(frozen=True)
class InputSizes:
    """The input sizes a model accepts: exactly ``fixed`` (height, width), or any multiple of
    ``multiple`` pixels per side. ``why`` says where that comes from (for messages).

    >>> InputSizes(multiple=14, why="DINOv2").describe()
    'any multiple of 14 pixels per side (e.g. 224x224 or 518x518; DINOv2)'
    >>> InputSizes(fixed=(64, 64)).accepts(64, 64), InputSizes(fixed=(64, 64)).accepts(32, 32)
    (True, False)
    """

    fixed: tuple[int, int] | None = None
    multiple: int | None = None
    why: str = ""

    def accepts(self, height: int, width: int) -> bool:
        if self.fixed is not None:
            return (height, width) == self.fixed
        step = self.multiple or 1
        return height >= step and width >= step and height % step == 0 and width % step == 0

    def describe(self) -> str:
        """E.g. ``"64x64 pixels only (...)"`` or ``"any multiple of 14 pixels per side (...)"``."""
        why = f"; {self.why}" if self.why else ""
        if self.fixed is not None:
            return f"{self.fixed[0]}x{self.fixed[1]} pixels only" + (f" ({self.why})" if self.why else "")
        step = self.multiple or 1
        examples = sorted({step * k for k in (224 // step, 518 // step) if k > 0})
        shown = " or ".join(f"{s}x{s}" for s in examples)
        return f"any multiple of {step} pixels per side (e.g. {shown}{why})"


def pair(value) -> tuple[int, int]:
    """``(height, width)`` from an int or a pair."""
    if isinstance(value, int | float):
        return int(value), int(value)
    height, width = value
    return int(height), int(width)


@dataclass(frozen=True)
class VisionInfo:
    """What the tools (``tome bench/eval/viz/tune/embed``) need to know of an image model of a
    family: module-level functions of the adapter, each taking the model.

    Attributes:
        tokens: ``(model, pixels) -> (tokens (B, N, C) after the last block, logits or None)``.
        pool: ``(model, tokens) -> (B, C)``: the pooled / CLS feature the model gives.
        run: ``(model, pixels) -> output``: the plain forward a user runs (what bench times).
        blocks: ``model -> list of its transformer blocks``.
        width: ``model -> hidden width``.
        default_size: ``model -> its own input size`` (pixels per side).
        patch_size: ``model -> patch size``.
        protected: ``model -> leading tokens never merged`` (class, registers).
        num_classes: ``model -> classes of its classifier head`` (0: none).
        input_sizes: ``model -> InputSizes``: which sizes it accepts in a plain forward.
        classes: the class names the tools run (``None``: every class the adapter patches).
    """

    tokens: Callable
    pool: Callable
    run: Callable
    blocks: Callable
    width: Callable
    default_size: Callable
    patch_size: Callable
    protected: Callable
    num_classes: Callable
    input_sizes: Callable
    classes: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Adapter:
    """A model family tome patches (see the module docstring).

    Attributes:
        patches: the classes it patches, each as ``"library.ClassName"`` (``"timm.Eva"``): a
            class of that name from a module of that library, or a user's subclass of one.
        apply: ``apply(model, *, r, **settings) -> handle``: patch the model in place.
        merged: what is merged, for the support table.
        tested_on: what the test suite runs it on, for the support table.
        kind: one of :data:`KINDS` (default: carry).
        handle: the handle class ``apply`` returns (default: ``ToMeHandle``); its
            :class:`Option` attributes are the family's options (``tome.patch`` keywords and
            handle attributes).
        title: what the family is, in words, for messages naming the families that take an
            option (``"text encoders (...)"``; default: the library and class names).
        defaults: the family's defaults of shared ``tome.patch`` options (``metric``,
            ``unmerge_output``) where they differ from tome's.
        schedule: for families that merge by their own options instead of an ``r`` schedule and
            the token models' settings (diffusion: ``("ratio",)``; vision-language models:
            ``("visual_tokens", "visual_ratio")``): those options. ``tome.patch`` then refuses
            ``r`` and the token settings (``prop_attn``, ``unmerge_output``, ``metric``, ``mode``,
            ...) itself, naming them, and ``apply`` gets the family's options only.
        vision: what the tools need of its image models (``None``: the tools don't run it).
        library, classes: read off ``patches`` (one library per adapter).
        name: the adapter module's short name (filled in by the registry).
    """

    patches: tuple[str, ...]
    apply: Callable
    merged: str
    tested_on: str
    kind: str = CARRY
    handle: type | None = None
    title: str = ""
    defaults: Mapping[str, object] = field(default_factory=dict)
    schedule: tuple[str, ...] = ()
    vision: VisionInfo | None = None
    library: str = field(init=False)
    classes: tuple[str, ...] = field(init=False)
    name: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind: expected one of {', '.join(KINDS)}, got {self.kind!r}")
        libraries = {name.partition(".")[0] for name in self.patches}
        if len(libraries) != 1 or not all("." in name for name in self.patches):
            raise ValueError(
                f"patches: expected 'library.ClassName' names of one library, got {self.patches!r}"
            )
        # frozen: the derived fields are set once, here
        object.__setattr__(self, "library", libraries.pop())
        object.__setattr__(self, "classes", tuple(name.partition(".")[2] for name in self.patches))
        if self.handle is None:
            from tome.runtime.handle import ToMeHandle

            object.__setattr__(self, "handle", ToMeHandle)
        if not self.title:
            object.__setattr__(self, "title", f"{self.library} {', '.join(self.classes)}")

    @property
    def takes_r(self) -> bool:
        """Whether it merges by an ``r`` schedule (with the token models' settings)."""
        return not self.schedule

    @property
    def options(self) -> dict[str, Option]:
        """The family's own options (declared on its handle class), by name."""
        return declared_options(self.handle)

    def matches(self, cls: type) -> bool:
        return cls.__name__ in self.classes and cls.__module__.startswith(self.library + ".")


@functools.cache
def adapters() -> tuple[Adapter, ...]:
    """Every registered adapter, ordered by module name (imports the adapter modules, which
    import no framework)."""
    import tome.adapters as package

    found = []
    for info in pkgutil.iter_modules(package.__path__):
        if info.ispkg or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"tome.adapters.{info.name}")
        adapter = getattr(module, "ADAPTER", None)
        if not isinstance(adapter, Adapter):
            raise TypeError(f"tome.adapters.{info.name}: expected ADAPTER = Adapter(...) at module level")
        found.append(_named(adapter, info.name))
    return tuple(sorted(found, key=lambda a: a.name))


def _named(adapter: Adapter, name: str) -> Adapter:
    # frozen: the registry names each adapter by its module
    object.__setattr__(adapter, "name", name)
    return adapter


def adapter_named(name: str) -> Adapter:
    """The adapter of the module ``tome.adapters.<name>``.

    >>> adapter_named("torchvision_vit").classes
    ('VisionTransformer',)
    """
    for adapter in adapters():
        if adapter.name == name:
            return adapter
    raise KeyError(f"no adapter module tome.adapters.{name}")


def adapter_for(model: nn.Module) -> Adapter | None:
    """The adapter of ``model``'s class (or of the nearest supported base class), else None."""
    for cls in type(model).__mro__:
        for adapter in adapters():
            if adapter.matches(cls):
                return adapter
    return None


def framework_of(model: object) -> str | None:
    """The library ``model``'s class comes from, if it is one tome has adapters for."""
    module = type(model).__module__
    return next((a.library for a in adapters() if module.startswith(a.library + ".")), None)


def outermost(model: nn.Module, accepts: Callable[[nn.Module], bool]) -> list[tuple[str, nn.Module]]:
    """The outermost submodules of ``model`` (not ``model`` itself) that ``accepts``, with their
    names, in module order: what ``tome.patch`` and the tools look for inside a wrapper."""
    found: list[tuple[str, nn.Module]] = []
    for name, sub in model.named_modules():
        if sub is model or any(name.startswith(f"{outer}.") for outer, _ in found):
            continue
        if accepts(sub):
            found.append((name, sub))
    return found


def supported_families() -> str:
    """One line per library, listing the model classes ``tome.patch`` accepts.

    >>> supported_families().splitlines()[0].startswith("  diffusers: PixArtTransformer2DModel")
    True
    """
    names: dict[str, list[str]] = {}
    for adapter in adapters():
        names.setdefault(adapter.library, []).extend(adapter.classes)
    return "\n".join(f"  {library}: {', '.join(classes)}" for library, classes in names.items())


def option_owners(name: str) -> list[Adapter]:
    """The adapters that declare the option ``name``."""
    return [a for a in adapters() if name in a.options]
