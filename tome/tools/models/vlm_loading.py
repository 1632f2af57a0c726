"""Loading a vision-language model and its processor for ``tome eval --prompts``: ``hf:FOLDER``
(or a hub id), through ``AutoModelForImageTextToText`` and ``AutoProcessor``; and turning an
image and a prompt into the processor's inputs.

>>> is_vlm_spec("hf:./llava"), is_vlm_spec("timm:vit_small_patch16_224")
(True, False)
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from tome.tools.errors import UserError
from tome.tools.models.hub import Log, quiet_hub
from tome.tools.models.loading import from_hub, hf_config

__all__ = ["LoadedVLM", "is_vlm_spec", "load_vlm", "vlm_inputs"]


def is_vlm_spec(spec: str | None) -> bool:
    """Whether ``spec`` can name a vision-language model (``hf:``: the config decides)."""
    return bool(spec) and spec.startswith("hf:")


@dataclass
class LoadedVLM:
    """A vision-language model in eval mode, its processor and its name as the user wrote it."""

    name: str
    model: object
    processor: object


def load_vlm(spec: str, log: Log | None = None) -> LoadedVLM:
    """The model and processor of ``spec`` (``hf:FOLDER`` or ``hf:HUB_ID``), checked to be a
    vision-language class tome supports (:class:`UserError` naming the supported ones if not)."""
    if not is_vlm_spec(spec):
        raise UserError(
            f"--model {spec!r}: --prompts takes a vision-language model as hf:FOLDER or hf:HUB_ID"
        )
    import transformers

    from tome.runtime.registry import REDUCE_ONCE, adapters

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    quiet_hub()
    source = hf_config(spec[3:], log)
    supported = [a for a in adapters() if a.kind == REDUCE_ONCE]
    names = sorted(name for a in supported for name in a.classes)
    if source.arch not in names:
        raise UserError(
            f"{spec}: a {source.arch or 'model without architectures'}; --prompts takes a "
            f"vision-language model: {', '.join(names)}"
        )
    try:
        model = from_hub(
            spec,
            "its weights",
            partial(transformers.AutoModelForImageTextToText.from_pretrained, source.source),
            source.local,
            log,
        )
        processor = from_hub(
            spec,
            "its processor",
            partial(transformers.AutoProcessor.from_pretrained, source.source),
            source.local,
            log,
        )
    except UserError:
        raise
    except Exception as error:
        raise UserError(
            f"{spec}: cannot load the model or its processor: {type(error).__name__}: {error}"
        ) from None
    return LoadedVLM(spec, model.eval(), processor)


def vlm_inputs(processor, image, prompt: str) -> dict:
    """The processor's inputs for one ``image`` (a PIL image) and one text ``prompt``: through
    the processor's chat template when it has one (the image first, then the text, and the
    assistant's turn opened), else the prompt with the processor's image token in front (unless
    the prompt already holds it)."""
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
    else:
        token = getattr(processor, "image_token", None) or "<image>"
        text = prompt if token in prompt else f"{token}\n{prompt}"
    return dict(processor(images=[image], text=[text], return_tensors="pt"))
