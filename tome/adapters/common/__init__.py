"""Pieces several adapters share, public: adapters import these, never each other's modules.

- :mod:`~tome.adapters.common.classes`: classes found by name through the MRO.
- :mod:`~tome.adapters.common.mha`: ``nn.MultiheadAttention`` run through SDPA (torchvision, open_clip).
- :mod:`~tome.adapters.common.timm`: what the tools need to know of a timm ViT / Eva.
- :mod:`~tome.adapters.common.timm_blocks`: timm's ViT and Eva blocks, hooks and model methods.
- :mod:`~tome.adapters.common.rope`: rotary positions of merged tokens and their handle.
- :mod:`~tome.adapters.common.text`: the text encoders' handle, defaults and layer start.
- :mod:`~tome.adapters.common.diffusion`: the diffusion handle, tomesd's matching and the
  merge -> op -> unmerge forwards (UNets and DiTs).
"""
