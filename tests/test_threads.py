"""The merge step runs on the calling thread alone where that is faster (tome/core/threads.py): a
busy machine stalls every parallel region, and the merge step is many small ones."""

from __future__ import annotations

import threading
from collections import deque

import pytest
import torch

import tome
from tome.core import merge as M
from tome.core.threads import (
    RETRY_EVERY,
    STALL_MEMORY,
    STALLED,
    StepThreads,
    _Ways,
    calling_thread_count,
    calling_thread_only,
    can_run_alone,
)


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


def test_any_count_for_the_calling_thread_alone(two_threads):
    # tome.tune's passes run at a picked count this way: a thread that starts using torch during
    # a pass keeps torch's count (torch.set_num_threads would have given it the pass's for good).
    seen: list[int] = []
    inside, release = threading.Event(), threading.Event()

    def other() -> None:
        inside.wait()
        seen.append(torch.get_num_threads())
        release.set()

    worker = threading.Thread(target=other)
    worker.start()
    with pytest.raises(RuntimeError, match="boom"), calling_thread_count(1):
        assert torch.get_num_threads() == 1
        inside.set()
        release.wait(timeout=10)
        raise RuntimeError("boom")
    worker.join()
    assert seen == [2] and torch.get_num_threads() == 2
    with calling_thread_count(2):  # its own count: nothing to change
        assert torch.get_num_threads() == 2


def _recording_merge(monkeypatch) -> list[int]:
    counts: list[int] = []
    original = M.merge

    def merge(*args, **kwargs):
        counts.append(torch.get_num_threads())
        return original(*args, **kwargs)

    monkeypatch.setattr(M, "merge", merge)
    return counts


def test_the_faster_way_is_taken_and_the_other_retried():
    choice = StepThreads()
    x = torch.zeros(4, 8)
    ways = []
    for _ in range(4):  # each way twice first
        with choice.step(x):
            ways.append(choice.alone)
    assert sorted(ways) == [False, False, True, True]
    with choice.step(torch.zeros(2, 8)):  # another shape: timed apart
        pass
    assert sorted(choice.shapes) == [(2, 8), (4, 8)]
    kind = choice.shapes[(4, 8)]
    kind.timings = {True: deque([1.0] * 5), False: deque([1e-9] * 5)}  # on all threads: faster
    kind.steps = 0
    picked = [kind.pick() for _ in range(RETRY_EVERY)]
    assert picked.count(True) == 1 and picked[-1] is True  # the slower way, every RETRY_EVERY steps


def test_a_stalled_shared_step_sends_every_shape_alone_for_a_while():
    # Load is the machine's: once a step on torch's threads stalls, every step of the thread runs
    # alone for STALL_MEMORY steps (a stall costs far more than a step alone on an idle machine).
    choice = StepThreads()
    shapes = [torch.zeros(n, 8) for n in (4, 3, 2)]
    for x in shapes:
        kind = choice.shapes[tuple(x.shape)] = _Ways()
        kind.timings = {True: deque([2.0] * 5), False: deque([1.0] * 5)}  # shared faster: taken
    picks = []
    for x in shapes:
        with choice.step(x):
            picks.append(choice.alone)
    assert picks == [False, False, False] and choice.stalled_at is None
    timed = choice.step(shapes[0])
    assert not choice.alone
    with timed:
        timed.start -= 10 * STALLED  # far longer than its shape's mean: the load arrived
    assert choice.stalled_at == choice.steps
    picks = []
    for i in range(STALL_MEMORY):
        with choice.step(shapes[i % 3]):
            picks.append(choice.alone)
    assert all(picks)
    for x in shapes:  # then the means decide again (shared is still the faster here)
        choice.shapes[tuple(x.shape)].timings = {True: deque([2.0] * 5), False: deque([1.0] * 5)}
        choice.shapes[tuple(x.shape)].steps = 1
    with choice.step(shapes[1]):
        assert not choice.alone


def _tiny_vit(depth: int, r: int) -> torch.nn.Module:
    timm = pytest.importorskip("timm")
    model = timm.create_model(
        "vit_small_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=depth,
        num_heads=2,
    ).eval()
    tome.patch(model, r=r)
    return model


def _both_ways(monkeypatch, model, run) -> None:
    counts = _recording_merge(monkeypatch)
    outputs = {}
    for alone in (True, False):
        counts.clear()
        monkeypatch.setattr(StepThreads, "_pick", lambda self, ways, alone=alone: alone)
        with torch.no_grad():
            outputs[alone] = run()
        assert counts and set(counts) == ({1} if alone else {2})
        assert torch.get_num_threads() == 2
    assert torch.equal(outputs[True], outputs[False])  # the same result either way


def test_a_patched_vit_merges_alone_or_on_all_threads_with_one_result(monkeypatch, two_threads):
    model = _tiny_vit(depth=3, r=3)
    x = torch.randn(2, 3, 32, 32)
    _both_ways(monkeypatch, model, lambda: model(x))


def test_a_patched_unet_merges_alone_or_on_all_threads_with_one_result(monkeypatch, two_threads):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=8,
        sample_size=16, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()  # fmt: skip
    tome.patch(unet, ratio=0.5)
    inputs = (torch.randn(2, 4, 16, 16), torch.tensor(500), torch.randn(2, 7, 32))
    _both_ways(monkeypatch, unet, lambda: unet(*inputs).sample)


def test_copies_and_pickles_carry_no_timings():
    import copy
    import pickle

    model = _tiny_vit(depth=2, r=2)
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert model.tome._threads.shapes
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert other.tome._threads.shapes == {}
