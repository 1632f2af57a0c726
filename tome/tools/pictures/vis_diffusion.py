"""Pictures of what a patched diffusion model merges: the merge groups of one block on the
latent grid, drawn with the same panels and colours as for ViTs (:mod:`tome.tools.pictures.vis`).

>>> import torch, diffusers, tome
>>> torch.manual_seed(0) and None
>>> model = diffusers.PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8,
...     in_channels=4, out_channels=8, num_layers=1, cross_attention_dim=16, sample_size=8,
...     caption_channels=12, norm_num_groups=4)
>>> inputs = {"hidden_states": torch.randn(2, 4, 8, 8), "encoder_hidden_states": torch.randn(2, 3, 12),
...     "timestep": torch.tensor([500, 500]), "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
>>> source, grid = merge_groups(tome.patch(model, ratio=0.5), inputs, block=0)
>>> source.shape, grid, int(source.max()) < 16
(torch.Size([2, 16]), (4, 4), True)
>>> panels = merge_panels(torch.rand(2, 3, 32, 32), source, grid, patch=8)
>>> panels.num_groups
[8, 8]

``tome viz PHOTOS --model diffusers:FOLDER`` (:func:`load_diffusion`, :func:`visualize_diffusion`)
draws, for each photo, the groups one block merged in one denoiser call on that photo:

- ``FOLDER`` is a local folder written by diffusers' ``save_pretrained``: a pipeline
  (``model_index.json``: its ``unet`` or ``transformer``, and its ``vae``; the text encoders are
  never loaded) or a bare denoiser (``UNet2DConditionModel``, ``PixArtTransformer2DModel``,
  ``DiTTransformer2DModel``, ``SD3Transformer2DModel``, ``FluxTransformer2DModel``), whose VAE
  then comes from ``--vae FOLDER``. Without a VAE it is an error, not random latents: groups
  matched on noise say nothing about the photo they would be drawn over.
- The photo, centre-cropped and resized to ``--img-size`` (default: the denoiser's own
  ``sample_size`` times the VAE's downsampling; 1024 px for Flux), is encoded by the VAE (the
  mean of its latent distribution, scaled and shifted as the pipelines do), then noised to
  ``--timestep`` (default 500 of 1000) with one seeded noise (``--seed``, the same noise for every
  photo, so a photo's picture never depends on the others): ``scheduler.add_noise`` with the
  pipeline's noise schedule (SD's scaled-linear betas for a bare UNet or PixArt, DiT's linear
  ones for DiT), or ``(1 - s) x + s noise`` with ``s = T / 1000`` for the flow-matching SD3 and
  Flux. Early timesteps (small ``T``) keep the photo's content, late ones are mostly noise.
- The text conditioning is 77 zero tokens of the width the denoiser takes (its
  ``cross_attention_dim``, PixArt's ``caption_channels``, SD3's and Flux's
  ``joint_attention_dim``), zero pooled projections, SDXL's size ids of the picture, DiT's
  unconditional class and Flux's guidance 3.5: no text encoder needed, and self-attention's
  merges (tomesd's matching on the block's input) hardly depend on it.
- Merging is tomesd's with tomesd's options, except ``use_rand`` (off by default here: each
  cell keeps its top-left token as the destination, the same picture for every batch).
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from tome.tools.errors import UserError
from tome.tools.pictures.vis import Panels, compose, merge_panels

__all__ = [
    "DEFAULT_RATIO",
    "DEFAULT_TIMESTEP",
    "DENOISERS",
    "DiffusionModel",
    "block_groups",
    "denoiser_inputs",
    "diffusion_panels",
    "is_diffusers_spec",
    "load_diffusion",
    "merge_groups",
    "merge_panels",
    "noised_latents",
    "visualize_diffusion",
]

# The denoisers tome.patch merges (tome.adapters.diffusers_unet, tome.adapters.diffusers_dit).
DENOISERS = (
    "UNet2DConditionModel",
    "PixArtTransformer2DModel",
    "DiTTransformer2DModel",
    "SD3Transformer2DModel",
    "FluxTransformer2DModel",
)
_FLOW = ("SD3Transformer2DModel", "FluxTransformer2DModel")  # flow matching: x_t = (1 - s) x + s noise
DEFAULT_RATIO = 0.5  # tomesd's
DEFAULT_TIMESTEP = 500
TEXT_TOKENS = 77  # CLIP's length: the shortest of the pipelines' text lengths
FLUX_SIZE = 1024  # Flux's config has no sample_size; its pipelines default to 1024 px
FLUX_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale
# Noise schedules for folders without a scheduler config (DDPM-style denoisers).
_SD_BETAS = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
_BETAS = {"DiTTransformer2DModel": {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}}


def is_diffusers_spec(spec: str | None) -> bool:
    """Whether ``--model`` names a diffusers folder (``diffusers:FOLDER``)."""
    return spec is not None and spec.strip().startswith("diffusers:")


# -- the groups of one call ------------------------------------------------------------------


def block_groups(
    model: nn.Module, inputs: dict, blocks: Sequence[int] | None = None
) -> dict[int, tuple[torch.Tensor, tuple[int, int]]]:
    """Run the patched denoiser ``model`` once on ``inputs`` (its forward's keywords) and
    return, for every block of ``blocks`` (indices into ``model.tome.blocks``; default: all)
    that merged in this call, ``(source, grid)``: ``source`` ``(B, h * w)`` the group (merged
    position) of every image token of the block's ``h x w`` grid. Blocks that merged nothing
    (a UNet block below ``max_downsample``, ``ratio`` 0) are left out. Reads what the handle
    publishes of the call (:meth:`~tome.adapters.common.diffusion.DiffusionHandle.merge_groups`)."""
    handle = model.tome
    wanted = set(range(len(handle.blocks)) if blocks is None else blocks)
    with torch.no_grad():
        model(**inputs)
    return {
        index: (groups.source, groups.grid)
        for index, groups in handle.merge_groups().items()
        if index in wanted
    }


def merge_groups(
    model: nn.Module, inputs: dict, block: int = 0
) -> tuple[torch.Tensor | None, tuple[int, int]]:
    """Run the patched denoiser ``model`` (``tome.patch``-ed UNet or DiT) once on ``inputs``
    (its forward's keywords) and return what block ``block`` (an index into
    ``model.tome.blocks``) merged: ``source`` ``(B, h * w)``, the group (merged position) of
    every image token of the block's ``h x w`` grid, and the grid; ``source`` is ``None`` when
    that block merged nothing (a UNet block below ``max_downsample``, ``ratio`` 0)."""
    found = block_groups(model, inputs, [block])
    return found.get(block, (None, (0, 0)))


def _resized_to(image: torch.Tensor, grid: tuple[int, int], least: int = 1) -> tuple[torch.Tensor, int]:
    """``image`` resized to a whole number (at least ``least``) of pixels per grid cell, and
    that number."""
    h, w = grid
    patch = max(least, min(image.shape[-2] // h, image.shape[-1] // w))
    unit = torch.nn.functional.interpolate(image.float(), size=(h * patch, w * patch), mode="bilinear")
    return unit.clamp(0, 1), patch


def diffusion_panels(
    model: nn.Module, inputs: dict, image: torch.Tensor, block: int = 0, *, average: str = "color"
) -> Panels:
    """The three panels (original, groups, mean colour per group) of block ``block``'s merges,
    drawn over ``image`` ``(B, 3, H, W)`` in [0, 1] (e.g. the decoded latents, or the
    picture an image-to-image run starts from), resized to the block's grid."""
    source, grid = merge_groups(model, inputs, block)
    if source is None:
        raise ValueError(f"block: block {block} ({model.tome.blocks[block]}) merged nothing in this call")
    unit, patch = _resized_to(image, grid)
    return merge_panels(unit, source, grid, patch, average=average)


# -- loading a diffusers folder -----------------------------------------------------------------


@dataclass
class DiffusionModel:
    """A diffusers denoiser and the VAE that makes its latents, as ``tome viz`` runs them.

    scheduler: the noise schedule's config (the pipeline's ``scheduler_config.json``, else the
    family's betas; flow-matching models need none). img_size: the photos' size in pixels.
    """

    denoiser: nn.Module
    vae: nn.Module
    name: str
    kind: str  # the denoiser's class, one of DENOISERS
    scheduler: dict
    img_size: int

    @property
    def flow(self) -> bool:
        return self.kind in _FLOW or str(self.scheduler.get("_class_name", "")).startswith("FlowMatch")

    @property
    def vae_scale(self) -> int:
        """Pixels per latent cell (the VAE's downsampling, as the pipelines compute it)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def multiple(self) -> int:
        """The photo's size must be a multiple of this (VAE x patches, or the UNet's levels)."""
        config = self.denoiser.config
        if self.kind == "UNet2DConditionModel":
            return self.vae_scale * 2 ** (len(config.down_block_types) - 1)
        packing = 2 if self.kind == "FluxTransformer2DModel" else 1  # Flux packs 2 x 2 latents
        return self.vae_scale * packing * int(config.patch_size)

    @property
    def train_timesteps(self) -> int:
        return int(self.scheduler.get("num_train_timesteps", 1000))

    @property
    def blocks(self) -> int:
        """How many transformer blocks ``tome.patch`` wraps."""
        from tome.adapters.common.diffusion import transformer_blocks

        return len(transformer_blocks(self.denoiser))

    def describe(self) -> str:
        latent = self.img_size // self.vae_scale
        noise = (
            "flow matching" if self.flow else str(self.scheduler.get("beta_schedule", "linear")) + " betas"
        )
        return (
            f"{self.name} ({self.kind}, {self.blocks} transformer blocks; {type(self.vae).__name__} /"
            f"{self.vae_scale}, {self.vae.config.latent_channels} channels; {self.img_size}px -> "
            f"{latent}x{latent} latents; noise: {noise}; text: {TEXT_TOKENS} zero tokens)"
        )


def _diffusers():
    if importlib.util.find_spec("diffusers") is None:
        raise UserError("diffusers: models need diffusers: pip install 'tome-merging[diffusers]'")
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    return diffusers


def _json(path: Path, flag: str) -> dict | None:
    """The JSON object in ``path``, None when there is no such file."""
    if not path.is_file():
        return None
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{flag}: cannot read {path} ({type(error).__name__})") from None
    if not isinstance(found, dict):
        raise UserError(f"{flag}: {path} is not a JSON object")
    return found


def _component(index: dict, key: str) -> str | None:
    """A pipeline component's class name from ``model_index.json`` (``[library, class]``)."""
    entry = index.get(key)
    if isinstance(entry, list | tuple) and len(entry) == 2 and entry[0] == "diffusers" and entry[1]:
        return str(entry[1])
    return None


def _load_part(cls_name: str, folder: Path, subfolder: str | None, flag: str):
    """``diffusers.<cls_name>.from_pretrained(folder, subfolder)`` in float32, the fp16 variant
    when that is all the folder has; failures as one-line :class:`UserError`."""
    diffusers = _diffusers()
    cls = getattr(diffusers, cls_name, None)
    if cls is None:
        raise UserError(f"{flag}: diffusers {diffusers.__version__} has no class {cls_name}")
    where = folder / subfolder if subfolder else folder
    variant = "fp16" if not any(where.glob("*model.safetensors")) and any(where.glob("*.fp16.*")) else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = cls.from_pretrained(
                str(folder),
                subfolder=subfolder,
                torch_dtype=torch.float32,
                variant=variant,
                local_files_only=True,
            )
    except Exception as error:
        raise UserError(
            f"{flag}: cannot load {cls_name} from {where} ({type(error).__name__}: {str(error)[:200]})"
        ) from None
    return module.eval()


def _is_vae(cls_name: str | None) -> bool:
    return bool(cls_name) and cls_name.startswith("Autoencoder")


def _vae_of(folder: Path, flag: str):
    """The VAE of ``--vae FOLDER``: a VAE folder, or a pipeline folder with a ``vae``."""
    if not folder.is_dir():
        raise UserError(f"{flag} {folder}: no such folder")
    index = _json(folder / "model_index.json", flag)
    if index is not None:
        cls_name = _component(index, "vae")
        if not _is_vae(cls_name):
            raise UserError(f"{flag} {folder}: this pipeline has no vae (model_index.json)")
        return _load_part(cls_name, folder, "vae", flag)
    cls_name = (_json(folder / "config.json", flag) or {}).get("_class_name")
    if not _is_vae(cls_name):
        raise UserError(
            f"{flag} {folder}: not a diffusers VAE folder (expected a config.json whose _class_name is "
            f"an Autoencoder..., or a pipeline folder with a vae/); found {cls_name or 'no _class_name'}"
        )
    return _load_part(cls_name, folder, None, flag)


def _check_denoiser(spec: str, cls_name: str | None, where: str) -> str:
    if cls_name in DENOISERS:
        return cls_name
    hint = "; give it as --vae and the denoiser's folder as --model" if _is_vae(cls_name) else ""
    raise UserError(
        f"--model {spec}: {where} is a {cls_name or 'model without _class_name'}{hint}; "
        f"tome viz draws {', '.join(DENOISERS)}"
    )


def _betas(kind: str, folder: Path, index: dict | None) -> dict:
    """The noise schedule: the pipeline's scheduler config, else the family's betas."""
    if index is not None and index.get("scheduler"):
        found = _json(folder / "scheduler" / "scheduler_config.json", "--model")
        if found is not None:
            return found
    return {"num_train_timesteps": 1000, **_BETAS.get(kind, _SD_BETAS)}


def _default_size(denoiser: nn.Module, kind: str, vae_scale: int) -> int:
    """The denoiser's own latent size in pixels (its ``sample_size`` is in latents)."""
    size = getattr(denoiser.config, "sample_size", None)
    if kind == "FluxTransformer2DModel" or size is None:
        return FLUX_SIZE
    if isinstance(size, list | tuple):
        size = size[0]
    return int(size) * vae_scale


def load_diffusion(
    spec: str, *, vae: str | Path | None = None, img_size: int | None = None
) -> DiffusionModel:
    """Load ``diffusers:FOLDER`` (see the module docstring) on CPU in float32, with the VAE of
    the pipeline or of ``vae`` (``--vae FOLDER``, which wins). Raises :class:`UserError`
    naming the argument for anything the user can fix: a folder that is not a diffusers
    model, a denoiser tome does not merge, no VAE, latents that do not fit, a bad size."""
    kind_name, _, name = spec.strip().partition(":")
    if kind_name != "diffusers" or not name:
        raise UserError(f"--model {spec!r}: expected diffusers:FOLDER")
    folder = Path(name).expanduser()
    if not folder.is_dir():
        raise UserError(
            f"--model {spec}: no such folder (diffusers: takes a local folder written by save_pretrained)"
        )
    index = _json(folder / "model_index.json", "--model")
    vae_module = None
    if index is not None:  # a pipeline: its denoiser and its VAE, never its text encoders
        key = next((k for k in ("unet", "transformer") if _component(index, k)), None)
        if key is None:
            raise UserError(
                f"--model {spec}: this pipeline has no diffusers unet or transformer (model_index.json)"
            )
        kind = _check_denoiser(spec, _component(index, key), f"its {key}")
        denoiser = _load_part(kind, folder, key, "--model")
        if vae is None and _is_vae(_component(index, "vae")):
            vae_module = _load_part(_component(index, "vae"), folder, "vae", "--model")
    else:
        config = _json(folder / "config.json", "--model")
        if config is None:
            raise UserError(
                f"--model {spec}: not a diffusers folder (expected model_index.json: a pipeline, or "
                "config.json with _class_name: a model written by save_pretrained)"
            )
        kind = _check_denoiser(spec, config.get("_class_name"), "this folder")
        denoiser = _load_part(kind, folder, None, "--model")
    if vae is not None:
        vae_module = _vae_of(Path(vae).expanduser(), "--vae")
    if vae_module is None:
        raise UserError(
            f"--model {spec}: no VAE to encode the photos into latents (a bare {kind}); give a pipeline "
            "folder with a vae/ or --vae FOLDER"
        )
    model = DiffusionModel(denoiser, vae_module, f"diffusers:{folder}", kind, _betas(kind, folder, index), 0)
    _check_latents(model, "--vae" if vae is not None else f"--model {spec}")
    model.img_size = _check_size(model, img_size)
    return model


def _check_latents(model: DiffusionModel, vae_flag: str) -> None:
    """The VAE's latents must be what the denoiser takes, and its conditioning ours."""
    config = model.denoiser.config
    channels = int(model.vae.config.latent_channels)
    wanted = int(config.in_channels) // (4 if model.kind == "FluxTransformer2DModel" else 1)
    if wanted != channels or (model.kind == "FluxTransformer2DModel" and int(config.in_channels) % 4):
        raise UserError(
            f"{vae_flag}: the VAE's latents have {channels} channels; this {model.kind} takes "
            f"{config.in_channels} input channels (an inpainting or otherwise conditioned model?), i.e. a VAE "
            f"with {wanted}"
        )
    if model.kind != "UNet2DConditionModel":
        return
    unsupported = [
        f"{key}={getattr(config, key)!r}"
        for key, allowed in (
            ("class_embed_type", (None,)),
            ("addition_embed_type", (None, "text", "text_time")),
            ("encoder_hid_dim_type", (None, "text_proj")),
        )
        if getattr(config, key, None) not in allowed
    ]
    if unsupported:
        raise UserError(
            f"--model {model.name}: a UNet conditioned by {', '.join(unsupported)}; tome viz gives only text "
            "(and SDXL's size) conditioning"
        )


def _check_size(model: DiffusionModel, img_size: int | None) -> int:
    multiple = model.multiple
    if img_size is None:
        default = _default_size(model.denoiser, model.kind, model.vae_scale)
        return max(multiple, default // multiple * multiple)
    if img_size <= 0 or img_size % multiple:
        raise UserError(
            f"--img-size {img_size}: {model.kind} with this VAE takes multiples of {multiple} pixels "
            f"(the VAE's /{model.vae_scale} times the denoiser's patches or levels)"
        )
    return img_size


# -- inputs of one denoiser call ---------------------------------------------------------------


@torch.no_grad()
def noised_latents(model: DiffusionModel, unit: torch.Tensor, timestep: int, seed: int = 0) -> torch.Tensor:
    """Photos ``unit`` ``(B, 3, S, S)`` in [0, 1] -> their VAE latents ``(B, C, S / f, S / f)``
    (scaled and shifted as the pipelines do), noised to ``timestep`` with one seeded noise."""
    if not 0 <= timestep < model.train_timesteps:
        raise UserError(f"--timestep {timestep}: expected 0 <= T < {model.train_timesteps}")
    encoded = model.vae.encode(unit * 2 - 1)
    dist = getattr(encoded, "latent_dist", None)
    latents = dist.mode() if dist is not None else encoded.latents  # AutoencoderTiny: .latents
    config = model.vae.config
    shift = getattr(config, "shift_factor", None) or 0.0
    latents = (latents - shift) * float(getattr(config, "scaling_factor", 1.0) or 1.0)
    # one noise for every photo: a photo's picture never depends on its batch
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((1, *latents.shape[1:]), generator=g).expand_as(latents)
    if model.flow:
        sigma = timestep / model.train_timesteps
        return (1 - sigma) * latents + sigma * noise
    from diffusers import DDPMScheduler

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scheduler = DDPMScheduler.from_config(model.scheduler)
    return scheduler.add_noise(latents, noise, torch.full((latents.shape[0],), timestep))


def _text_width(model: DiffusionModel) -> int:
    config = model.denoiser.config
    if model.kind == "UNet2DConditionModel":
        if getattr(config, "encoder_hid_dim", None) is not None:
            return int(config.encoder_hid_dim)  # projected to cross_attention_dim by the UNet
        width = config.cross_attention_dim
        return int(width[0] if isinstance(width, list | tuple) else width)
    if model.kind == "PixArtTransformer2DModel":
        return int(config.caption_channels or config.cross_attention_dim)
    return int(config.joint_attention_dim)


def denoiser_inputs(model: DiffusionModel, latents: torch.Tensor, timestep: int) -> dict:
    """The keywords of one denoiser call on ``latents`` at ``timestep``, with zero text
    conditioning (see the module docstring)."""
    B, _, h, w = latents.shape
    config = model.denoiser.config
    kind = model.kind
    text = torch.zeros(B, TEXT_TOKENS, _text_width(model)) if kind != "DiTTransformer2DModel" else None
    t = torch.full((B,), timestep)
    if kind == "UNet2DConditionModel":
        inputs = {"sample": latents, "timestep": t, "encoder_hidden_states": text}
        if config.addition_embed_type == "text_time":  # SDXL: pooled text + (size, crop, target) ids
            size = h * model.vae_scale, w * model.vae_scale
            pooled = int(config.projection_class_embeddings_input_dim) - 6 * int(
                config.addition_time_embed_dim
            )
            ids = torch.tensor([size[0], size[1], 0, 0, size[0], size[1]], dtype=torch.float32)
            inputs["added_cond_kwargs"] = {
                "text_embeds": torch.zeros(B, pooled),
                "time_ids": ids.repeat(B, 1),
            }
        return inputs
    if kind == "PixArtTransformer2DModel":
        conditions = {"resolution": None, "aspect_ratio": None}
        if model.denoiser.use_additional_conditions:  # PixArt-alpha 1024: size and aspect ratio
            pixels = torch.tensor([[h * model.vae_scale, w * model.vae_scale]], dtype=torch.float32)
            conditions = {"resolution": pixels.repeat(B, 1), "aspect_ratio": torch.full((B, 1), h / w)}
        return {
            "hidden_states": latents,
            "encoder_hidden_states": text,
            "timestep": t,
            "added_cond_kwargs": conditions,
        }
    if kind == "DiTTransformer2DModel":
        return {"hidden_states": latents, "timestep": t, "class_labels": torch.full((B,), _null_class(model))}
    pooled = torch.zeros(B, int(config.pooled_projection_dim))
    if kind == "SD3Transformer2DModel":
        return {
            "hidden_states": latents,
            "encoder_hidden_states": text,
            "pooled_projections": pooled,
            "timestep": t,
        }
    # Flux: 2 x 2 latents packed into one token, positions (0, row, column); timestep in [0, 1]
    C = latents.shape[1]
    packed = latents.view(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, h * w // 4, C * 4)
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    guidance = torch.full((B,), FLUX_GUIDANCE) if config.guidance_embeds else None
    return {
        "hidden_states": packed, "encoder_hidden_states": text, "pooled_projections": pooled,
        "timestep": t / model.train_timesteps, "img_ids": ids.reshape(-1, 3), "txt_ids": torch.zeros(TEXT_TOKENS, 3),
        "guidance": guidance,
    }  # fmt: skip


def _null_class(model: DiffusionModel) -> int:
    """DiT's unconditional class (classifier-free guidance's label), else class 0."""
    for module in model.denoiser.modules():
        if type(module).__name__ == "LabelEmbedding":
            return int(module.num_classes) if module.dropout_prob > 0 else 0
    return 0


# -- the pictures --------------------------------------------------------------------------------


def _patch(model: DiffusionModel, ratio: float, options: dict) -> None:
    """``tome.patch`` with tomesd's options; their errors name the command's flags."""
    import tome

    try:
        tome.patch(model.denoiser, ratio=ratio, **options)
    except (ValueError, TypeError) as error:
        name, _, message = str(error).partition(": ")  # "sx: expected ..."
        raise UserError(f"--{name.replace('_', '-')}: {message}") from None


def _block_index(block: int | str | None, names: Sequence[str], spec: str) -> int | None:
    """``--block``: an index into ``model.tome.blocks`` or one of its names; None: default."""
    if block is None:
        return None
    text = str(block).strip()
    if text.lstrip("-").isdigit():
        index = int(text)
        if not 0 <= index < len(names):
            raise UserError(
                f"--block {text}: {spec} has {len(names)} transformer blocks (0..{len(names) - 1})"
            )
        return index
    if text in names:
        return names.index(text)
    raise UserError(
        f"--block {text!r}: not a block of {spec}; expected 0..{len(names) - 1} or a name like {names[0]}"
    )


def _merging(found: dict) -> str:
    return ", ".join(str(i) for i in found) if found else "none"


def _pick_block(model: DiffusionModel, found: dict, block: int | None, ratio: float) -> int:
    """The block to draw: ``block``, or the first one that merged; one-line errors else."""
    handle = model.denoiser.tome
    unet = model.kind == "UNet2DConditionModel"
    why = f"ratio {ratio:g}" + (f", --max-downsample {handle.max_downsample}" if unet else "")
    if block is None:
        if not found:
            hint = " (a larger --max-downsample lets coarser levels merge)" if unet else ""
            raise UserError(f"--ratio {ratio:g}: no block of {model.name} merged at {why}{hint}")
        return next(iter(found))
    if block not in found:
        raise UserError(
            f"--block {block}: block {block} ({handle.blocks[block]}) merges nothing at {why}; "
            f"blocks that merge: {_merging(found)}"
        )
    return block


def visualize_diffusion(
    model: DiffusionModel,
    images: Sequence,
    ratio: float,
    *,
    block: int | str | None = None,
    timestep: int = DEFAULT_TIMESTEP,
    seed: int = 0,
    options: dict | None = None,
    outlines: bool = True,
    average: str = "color",
    titles: bool = True,
) -> tuple[list, int]:
    """Patch ``model``'s denoiser with ``ratio`` and tomesd's ``options`` (``use_rand`` off
    unless given), run it once on the PIL ``images`` encoded and noised to ``timestep``, and
    return one composed PIL picture per image of block ``block``'s merge groups (an index into
    ``denoiser.tome.blocks`` or a name; default: the first block that merges), and the block
    drawn. Errors name the command's flags (:class:`UserError`)."""
    from tome.tools.images import to_unit

    if not 0 < ratio < 1:
        raise UserError(f"--ratio {ratio:g}: a diffusion picture needs 0 < ratio < 1 (at 0 nothing merges)")
    _patch(model, ratio, {"use_rand": False, **(options or {})})
    handle = model.denoiser.tome
    wanted = _block_index(block, handle.blocks, model.name)
    unit = to_unit(images, model.img_size, 1.0)  # the centre square, as image-to-image pipelines crop
    latents = noised_latents(model, unit, timestep, seed)
    found = block_groups(model.denoiser, denoiser_inputs(model, latents, timestep))
    chosen = _pick_block(model, found, wanted, ratio)
    source, grid = found[chosen]
    # at least 8 px per latent cell: the 1 px outlines on both sides of a border leave colour
    unit, patch = _resized_to(unit, grid, least=8)
    panels = merge_panels(unit, source, grid, patch, average=average)
    pictures = []
    for i in range(len(images)):
        heading = None
        if titles:
            heading = (
                f"original, t={timestep}",
                f"ratio={ratio:g}, block {chosen}: {grid[0] * grid[1]} -> {panels.num_groups[i]}",
                f"mean {average} per group",
            )
        pictures.append(compose(panels, i, outlines=outlines, titles=heading))
    return pictures, chosen
