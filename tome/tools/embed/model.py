"""The model side of ``tome embed``: the merge setting a job runs (:func:`resolve_setting`), the
patched model and the metadata that names what it computes (:func:`load_job_model`), and the
model's input from decoded pixels (:func:`pixels_for`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from tome.tools.embed.store import FORMAT
from tome.tools.errors import UserError

if TYPE_CHECKING:
    import torch

__all__ = ["effective_options", "load_job_model", "pixels_for", "resolve_setting"]


def resolve_setting(r=None, ratio=None, *, text: bool = False):
    """The one setting a job runs: an ``r`` schedule (int, ``(r, inflection)``, per-layer list,
    or text as ``--r`` writes it: ``"16:-0.75"``), a :class:`~tome.tools.schedule_text.Ratio`,
    or ``0`` (unmerged). Default: ``r=16`` for images, ``ratio=0.1`` for texts.

    >>> resolve_setting("16:-0.75"), resolve_setting(ratio=0.2), resolve_setting(text=True)
    ((16, -0.75), Ratio(value=0.2), Ratio(value=0.1))
    """
    from tome.core.schedule import check_schedule
    from tome.tools.schedule_text import Ratio, parse_r, parse_ratio

    if r is not None and ratio is not None:
        raise UserError("--r and --ratio: give one of them")
    if ratio is not None:
        values = parse_ratio(str(ratio))
        if len(values) != 1:
            raise UserError(f"--ratio: expected one fraction, got {len(values)}")
        return values[0]
    if r is None:
        return Ratio(0.1) if text else 16
    if isinstance(r, str):
        values = parse_r(r)
        if len(values) != 1:
            raise UserError(f"--r: expected one schedule, got {len(values)}")
        return values[0]
    try:
        check_schedule(r)
    except (TypeError, ValueError) as error:
        raise UserError(f"--r: {error}") from None
    return tuple(r) if isinstance(r, tuple) else r


def load_job_model(
    kind: str,
    spec: str | None,
    setting,
    options: dict,
    *,
    weights,
    random_init: bool,
    img_size: int | None,
    max_tokens: int | None,
    log: Callable[[str], None],
):
    """The model, patched with ``setting``, and the metadata that names what it computes."""
    import torch

    from tome.tools.schedule_text import setting_label

    if kind == "text":
        from tome.tools.models.text_loading import DEFAULT_TEXT_MODEL, check_text_spec, load_text_model

        spec = spec or DEFAULT_TEXT_MODEL
        check_text_spec(spec)
        for flag, value in {"weights": weights, "random_init": random_init, "img_size": img_size}.items():
            if value not in (None, False):
                raise UserError(f"--{flag.replace('_', '-')}: for image models; {spec} is a text model")
        model = load_text_model(spec, log=log)
        if max_tokens is not None:
            if not 2 <= max_tokens <= model.limit:
                raise UserError(f"--max-tokens {max_tokens}: {model.name} takes 2 to {model.limit} tokens")
            model.max_tokens = max_tokens
        model.set_setting(None if setting == 0 else setting, **options)
        extra = {"max_tokens": model.max_tokens, "img_size": None, "weights": None, "random_init": False}
    else:
        from tome.runtime.registry import adapter_named
        from tome.tools.models.loading import DEFAULT_MODEL, load_model
        from tome.tools.models.text_loading import is_text_spec

        spec = spec or DEFAULT_MODEL
        if is_text_spec(spec):
            raise UserError(f"--model {spec}: a text model needs text files (one text a line), not images")
        if max_tokens is not None:
            raise UserError("--max-tokens: for text models only")
        for name in adapter_named("transformers_text").options:  # the text encoders' own options
            if name in options:
                raise UserError(f"--{name.replace('_', '-')}: for text models only")
        if random_init:
            torch.manual_seed(0)  # the same random weights in every run: a resume must match
        model = load_model(spec, weights=weights, random_init=random_init, img_size=img_size, log=log)
        for note in model.notes:
            log(f"tome: warning: {model.name}: {note}")
        model.set_r(None if setting == 0 else setting, **options)
        extra = {
            "img_size": model.img_size,
            "max_tokens": None,
            "weights": os.path.abspath(weights) if weights else None,
            "random_init": bool(random_init),
        }
    meta = {
        "format": FORMAT,
        "kind": kind,
        "model": model.name,
        "setting": setting_label(setting),
        "options": effective_options(model.handle() if kind == "text" else model.module.__dict__.get("tome")),
        **extra,
    }
    return model, meta


def effective_options(handle) -> dict:
    """The options the patched model merges with, defaults included (so that a rerun under a tome
    whose defaults changed is refused, not mixed in); none when unpatched."""
    if handle is None or not hasattr(handle, "patch_options"):
        return {}
    found = {k: v for k, v in handle.patch_options().items() if k not in ("r", "ratio")}
    return json.loads(json.dumps(dict(sorted(found.items())), default=str))


def pixels_for(model, uint8) -> torch.Tensor:
    """(B, 3, S, S) uint8 numpy array -> the model's normalised float32 input, bit for bit what
    ``model.preprocess`` gives."""
    import numpy as np
    import torch

    from tome.tools.images import normalize

    unit = torch.from_numpy(np.ascontiguousarray(uint8)).float().div_(255)
    return normalize(unit, model.mean, model.std)
