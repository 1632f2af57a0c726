"""Local checkpoints (``--weights PATH``): reading them and loading them into a model."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from tome.tools.errors import UserError

__all__ = ["FORMATS", "fit_problems", "load_state", "load_weights"]

FORMATS = "a .safetensors file, or a torch.save file (.pth, .pt, .bin, .ckpt) of a state dict"
_POSITION_KEYS = ("pos_embed", "position_embeddings", "position_embedding", "pos_embedding")
_SHOWN = 3  # keys named per kind of problem


def load_state(path: Path) -> dict:
    """The tensors of a local checkpoint (``.safetensors``, or a ``torch.save`` file, also one that
    nests them under ``state_dict`` / ``model`` / ``..._ema``), ``module.`` prefixes removed."""
    if not path.is_file():
        raise UserError(f"--weights {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:
        said = f"{type(error).__name__}: {error}".strip()
        raise UserError(
            f"--weights {path}: cannot read it: not a checkpoint tome reads ({FORMATS}); "
            f"loading it said {said[:120]}"
        ) from None
    for key in ("state_dict", "model", "state_dict_ema", "model_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(
            f"--weights {path}: not a state dict of tensors (a {type(state).__name__}); expected {FORMATS}"
        )
    return {k.removeprefix("module."): v for k, v in state.items()}


def _shape(tensor: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in tensor.shape) + ")"


def _some(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN])
    return shown + (f", ... ({len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else "")


def fit_problems(model_state: dict, checkpoint: dict) -> str | None:
    """A one-line summary of why ``checkpoint`` does not load into a model with ``model_state``
    (strictly): how many tensors have another shape, are missing or are unexpected, with the
    first few of each; None when it fits.

    >>> import torch
    >>> fit_problems({"a": torch.zeros(2), "b": torch.zeros(3)}, {"a": torch.zeros(4), "c": torch.zeros(1)})
    '1 of 2 tensors with another shape (a: (4) in the checkpoint, (2) in the model); 1 missing (b); 1 unexpected (c)'
    """
    shapes = [k for k, v in model_state.items() if k in checkpoint and checkpoint[k].shape != v.shape]
    missing = [k for k in model_state if k not in checkpoint]
    unexpected = [k for k in checkpoint if k not in model_state]
    parts = []
    if shapes:
        detail = "; ".join(
            f"{k}: {_shape(checkpoint[k])} in the checkpoint, {_shape(model_state[k])} in the model"
            for k in shapes[:_SHOWN]
        )
        more = f"; ... ({len(shapes) - _SHOWN} more)" if len(shapes) > _SHOWN else ""
        parts.append(f"{len(shapes)} of {len(model_state)} tensors with another shape ({detail}{more})")
        if all(k.split(".")[-1] in _POSITION_KEYS for k in shapes):
            parts[-1] += ": a checkpoint for another input size? try --img-size"
    if missing:
        parts.append(f"{len(missing)} missing ({_some(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({_some(unexpected)})")
    return "; ".join(parts) or None


def load_weights(module: nn.Module, path: Path, spec: str) -> None:
    """Load the checkpoint at ``path`` into ``module`` (strict); ``spec`` names the model in errors."""
    state = load_state(path)
    problems = fit_problems(module.state_dict(), state)
    if problems is not None:
        raise UserError(f"--weights {path} do not fit {spec}: {problems}")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as error:  # what the comparison above does not see
        first = str(error).strip().splitlines()
        detail = "; ".join(line.strip() for line in first[1:3]) or first[0]
        raise UserError(f"--weights {path} do not fit {spec}: {detail[:300]}") from None
