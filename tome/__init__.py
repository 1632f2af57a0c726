"""tome: training-free token merging for transformers (Bolya et al., ICLR 2023).

>>> import torch, tome
>>> tm = tome.TokenMerger(torch.randn(2, 10, 8), r=3)
>>> tm(torch.randn(2, 10, 8)).shape
torch.Size([2, 7, 8])
"""

from tome.merge import MODES, MergeHistory, attention_bias, max_r
from tome.merger import TokenMerger
from tome.patch import MergeOptions, ToMeHandle, patch, unpatch
from tome.schedule import resolve_schedule
from tome.tune import TuneResult, tune

__all__ = [
    "MODES",
    "MergeHistory",
    "MergeOptions",
    "ToMeHandle",
    "TokenMerger",
    "TuneResult",
    "attention_bias",
    "max_r",
    "patch",
    "resolve_schedule",
    "tune",
    "unpatch",
]
__version__ = "0.1.0"
