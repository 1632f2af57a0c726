"""benchmarks/diffusion_flops.py: its FLOP counts (fake tensors) equal the real forward's, and
it counts the CPU attention kernel that torch's FlopCounterMode leaves at 0."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def flops(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import diffusion_flops

    return diffusion_flops


def test_cpu_attention_counted(flops):
    q, k, v = torch.randn(2, 3, 20, 8), torch.randn(2, 3, 12, 8), torch.randn(2, 3, 12, 8)
    with flops.flop_counter.FlopCounterMode(display=False, custom_mapping=flops.CUSTOM) as counter:
        F.scaled_dot_product_attention(q, k, v)
    assert counter.get_total_flops() == 4 * 2 * 3 * 20 * 12 * 8  # QK^T and PV, 2 FLOPs per MAC


@pytest.mark.parametrize(("model", "layers"), [("pixart", 1), ("sd3", 1), ("flux", 1), ("sd15", None)])
def test_fake_counts_equal_real(flops, model, layers):
    settings = [("0.5", 0.5, {}), ("0.5, merge_mlp", 0.5, {"merge_mlp": True})]
    fake = flops.count_row(model, 16, 2, layers, settings)
    real = flops.count_row(model, 16, 2, layers, settings, real=True)
    assert fake == real
    _, unpatched, patched = real
    assert unpatched.matching == 0 and unpatched.groups["self-attention"] > 0
    (_, attn), (_, mlp) = patched
    assert unpatched.total > attn.total > mlp.total and attn.matching == mlp.matching > 0
