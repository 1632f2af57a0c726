"""tome: training-free token merging for transformers (Bolya et al., ICLR 2023).

>>> import torch, tome
>>> tm = tome.TokenMerger(torch.randn(2, 10, 8), r=3)
>>> tm(torch.randn(2, 10, 8)).shape
torch.Size([2, 7, 8])
"""

from tome.core.merge import MODES, MergeHistory, attention_bias, max_r
from tome.core.merger import TokenMerger
from tome.core.schedule import resolve_schedule
from tome.runtime.install import register_legacy_finder
from tome.runtime.patching import MergeOptions, PatchedModels, ToMeHandle, patch, unpatch

# A model pickled by tome before the redesign names modules under tome.patch: loading it says
# which tome wrote it (patch format 1) instead of failing with a bare ModuleNotFoundError.
register_legacy_finder()

__all__ = [
    "MODES",
    "MergeHistory",
    "MergeOptions",
    "PatchedModels",
    "ToMeHandle",
    "TokenMerger",
    "TuneResult",
    "attention_bias",
    "embed",
    "max_r",
    "patch",
    "resolve_schedule",
    "tune",
    "unpatch",
]
__version__ = "0.2.0"

# The tools layer (tome.tools) loads on first use of its names: ``import tome`` is the core and
# the adapters only.
_LAZY = {
    "tune": "tome.tools.tune.search",
    "TuneResult": "tome.tools.tune.search",
    "embed": "tome.tools.embed.job",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tome' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
