"""tome: training-free token merging for transformers (Bolya et al., ICLR 2023).

>>> import torch, tome
>>> tm = tome.TokenMerger(torch.randn(2, 10, 8), r=3)
>>> tm(torch.randn(2, 10, 8)).shape
torch.Size([2, 7, 8])
"""

from tome.runtime.legacy import register_legacy_finder

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

# A model pickled by tome before the redesign names modules under tome.patch: loading it says
# which tome wrote it (patch format 1) instead of failing with a bare ModuleNotFoundError.
register_legacy_finder()

# Every public name loads on first use (PEP 562), so ``import tome`` itself imports no torch:
# ``tome --help`` stays light. The core and the adapters need only torch; the tools load only
# when tune / embed are used.
_LAZY = {
    "MODES": "tome.core.merge",
    "MergeHistory": "tome.core.merge",
    "attention_bias": "tome.core.merge",
    "max_r": "tome.core.merge",
    "TokenMerger": "tome.core.merger",
    "resolve_schedule": "tome.core.schedule",
    "MergeOptions": "tome.runtime.patching",
    "PatchedModels": "tome.runtime.patching",
    "ToMeHandle": "tome.runtime.patching",
    "patch": "tome.runtime.patching",
    "unpatch": "tome.runtime.patching",
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
