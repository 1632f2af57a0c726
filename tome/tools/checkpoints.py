"""Local checkpoints (``--weights PATH``): reading them and loading them into a model."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from tome.tools.errors import UserError

__all__ = ["load_state", "load_weights"]


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
        raise UserError(f"--weights {path}: cannot read it ({type(error).__name__}: {error})") from None
    for key in ("state_dict", "model", "state_dict_ema", "model_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"--weights {path}: not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_weights(module: nn.Module, path: Path, spec: str) -> None:
    """Load the checkpoint at ``path`` into ``module`` (strict); ``spec`` names the model in errors."""
    state = load_state(path)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first = str(error).strip().splitlines()
        detail = "; ".join(line.strip() for line in first[1:3]) or first[0]
        raise UserError(f"--weights {path} do not fit {spec}: {detail[:300]}") from None
