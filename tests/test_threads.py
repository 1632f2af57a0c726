"""The merge step runs on the calling thread alone (tome/core/threads.py): a busy machine stalls
every parallel region, and the merge step is many small ones."""

from __future__ import annotations

import threading

import pytest
import torch

import tome
from tome.core import merge as M
from tome.core.threads import calling_thread_only, can_run_alone


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_one_thread_inside_and_restored_after_an_error(two_threads):
    with pytest.raises(RuntimeError, match="boom"), calling_thread_only(torch.zeros(1)):
        assert torch.get_num_threads() == 1
        raise RuntimeError("boom")
    assert torch.get_num_threads() == 2


def test_nothing_changes_off_the_cpu(two_threads):
    with calling_thread_only(torch.zeros(1, device="meta")):
        assert torch.get_num_threads() == 2


def test_this_machine_can_confine_the_merge_step():
    # torch's Linux wheels run on libgomp: the busy-machine path must be live where CI runs.
    assert can_run_alone()


def test_other_python_threads_keep_their_count(two_threads):
    # Also a thread that starts using torch while the main thread is inside: torch.set_num_threads
    # would have given it one thread for good.
    seen: list[int] = []
    inside, release = threading.Event(), threading.Event()

    def other() -> None:
        inside.wait()
        seen.append(torch.get_num_threads())  # while the main thread is inside
        release.set()

    worker = threading.Thread(target=other)
    worker.start()
    with calling_thread_only(torch.zeros(1)):
        inside.set()
        release.wait(timeout=10)
    worker.join()
    assert seen == [2]
    assert torch.get_num_threads() == 2


def _recording_merge(monkeypatch) -> list[int]:
    counts: list[int] = []
    original = M.merge

    def merge(*args, **kwargs):
        counts.append(torch.get_num_threads())
        return original(*args, **kwargs)

    monkeypatch.setattr(M, "merge", merge)
    return counts


def test_a_patched_vit_merges_on_one_thread(monkeypatch, two_threads):
    timm = pytest.importorskip("timm")
    model = timm.create_model(
        "vit_small_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=3,
        num_heads=2,
    ).eval()
    tome.patch(model, r=3)
    counts = _recording_merge(monkeypatch)
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert counts and set(counts) == {1}
    assert torch.get_num_threads() == 2


def test_a_patched_unet_merges_on_one_thread(monkeypatch, two_threads):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=8,
        sample_size=16, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()  # fmt: skip
    tome.patch(unet, ratio=0.5)
    counts = _recording_merge(monkeypatch)
    with torch.no_grad():
        unet(torch.randn(2, 4, 16, 16), torch.tensor(500), torch.randn(2, 7, 32))
    assert counts and set(counts) == {1}
    assert torch.get_num_threads() == 2
