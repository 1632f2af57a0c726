"""tome.tune (tome.tools.tune.search) / tome tune: per-layer schedules for a target speedup, on tiny random models."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

import tome
from tome.cli.main import main
from tome.tools.data import demo_images
from tome.tools.models.vision import from_module
from tome.tools.schedule_text import parse_r, r_label
from tome.tools.tune.report import distinct, report
from tome.tools.tune.search import TuneError, TuneResult, schedule_flops, schedule_tokens

timm = pytest.importorskip("timm")

FAST = dict(budget="flops", progress=False, max_evals=12)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread is faster, and immune to a busy machine's thread contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _timm(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    kwargs = {"img_size": 64, "depth": 4, **kwargs}
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs).eval()


def _pixels(n: int = 8, size: int = 64) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def _state(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_reaches_flop_target_deterministically_and_restores_the_model():
    model, pixels = _timm(), _pixels()
    before = _state(model)
    with torch.no_grad():
        reference = model(pixels)
    result = tome.tune(model, pixels, 2.0, **FAST)
    again = tome.tune(model, pixels, 2.0, **FAST)
    assert result.schedule == again.schedule and result.fidelity == again.fidelity
    assert len(result.schedule) == 4 and all(isinstance(r, int) and r >= 0 for r in result.schedule)
    assert result.flops_speedup >= 2.0 and result.measured_speedup is None
    wrapper = from_module(model)
    assert result.flops_speedup == pytest.approx(
        schedule_flops(wrapper, [0] * 4) / schedule_flops(wrapper, result.schedule)
    )
    assert (
        -1 <= result.cls_cosine <= 1
        and result.fidelity >= result.start_cls_cosine + result.start_patch_cosine - 1e-6
    )
    assert "tome" not in model.__dict__  # unpatched again, bit-identical
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(pixels), reference)


def test_apply_leaves_the_schedule_and_token_counts_match():
    model, pixels = _timm(), _pixels()
    result = tome.tune(model, pixels, 1.5, apply=True, **FAST)
    assert model.tome.r == result.schedule
    with torch.no_grad():
        model(pixels)
    assert model.tome.tokens_per_layer == result.tokens == schedule_tokens(result.schedule, 17, 1)


def test_patched_model_keeps_its_settings():
    model, pixels = _timm(), _pixels()
    tome.patch(model, r=3, prop_attn=False)
    tome.tune(model, pixels, 1.5, **FAST)
    assert model.tome.r == 3 and model.tome.prop_attn is False
    result = tome.tune(model, pixels, 1.5, apply=True, **FAST)
    assert model.tome.r == result.schedule and model.tome.prop_attn is False


def test_model_without_class_token_uses_pooled_output():
    model = _timm(class_token=False, global_pool="avg")
    result = tome.tune(model, _pixels(), 1.5, **FAST)
    assert result.flops_speedup >= 1.5 and result.tokens[0] == 16


def test_transformers_and_paths():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("PIL")
    config = transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=4, mlp_ratio=2, image_size=48, patch_size=8
    )
    torch.manual_seed(0)
    model = transformers.Dinov2Model(config).eval()
    paths = [str(p) for p in demo_images()] * 3  # 9 images, read and preprocessed by tune
    result = tome.tune(model, paths, 1.6, **FAST)
    assert len(result.schedule) == 3 and result.flops_speedup >= 1.6
    assert result.images == 7 and result.heldout_images == 2  # holdout=0.25 of 9


def test_measured_budget_times_the_schedule():
    result = tome.tune(
        _timm(), _pixels(), 1.5, budget="measured", progress=False, max_evals=4, reps=1, rounds=1
    )
    assert result.measured_speedup > 0 and 1 <= len(result.history) <= 2
    # tiny models time badly (overheads): the FLOP target is corrected at most by max_correction
    assert all(1.5 / 1.15 - 1e-9 <= h["flop_target"] <= 1.5 * 1.15 + 1e-9 for h in result.history)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(images=_pixels(3)), TuneError, "at least 8 calibration images, got 3"),
        (dict(target_speedup=0.0), TuneError, "positive"),
        (dict(target_speedup=-2.0), TuneError, "positive"),
        (dict(target_speedup=1.0), TuneError, "> 1"),
        (dict(target_speedup=50.0), TuneError, "at most"),
        (dict(images=_pixels(8, 32)), TuneError, "64x64"),
        (dict(images="photos/"), TypeError, "images"),
        (dict(budget="fast"), ValueError, "budget"),
        (dict(patch_weight=-1.0), ValueError, "patch_weight: expected a number >= 0, got -1.0"),
        (dict(span=0), ValueError, "span: expected an int >= 1, got 0"),
        (dict(rounds=1.5), ValueError, "rounds: expected an int >= 0, got 1.5"),
    ],
)
def test_bad_input(kwargs, error, message):
    args = {"model": _timm(), "images": _pixels(), "target_speedup": 2.0, **FAST, **kwargs}
    with pytest.raises(error, match=message):
        tome.tune(**args)


def test_heldout_check():
    """The search's schedule is kept only if it does no worse than its starting ramp on images
    the search never saw; holdout=0 searches on every image, unchecked."""
    model, pixels = _timm(), _pixels(12)
    result = tome.tune(model, pixels, 2.0, **FAST)
    assert result.images == 9 and result.heldout_images == 3
    assert result.heldout_fidelity >= result.heldout_start_fidelity - 1e-6
    if not result.search_kept:
        assert result.schedule == result.start_schedule
    unchecked = tome.tune(model, pixels, 2.0, holdout=0, **FAST)
    assert unchecked.images == 12 and unchecked.heldout_images == 0 and unchecked.heldout_fidelity is None
    for bad in (1.0, -0.1, True, "0.2"):
        with pytest.raises(ValueError, match="holdout"):
            tome.tune(model, pixels, 2.0, holdout=bad, **FAST)


def test_keeps_every_training_mode():
    model = _timm().train()
    model.blocks[0].eval()  # a mixed state comes back as it was
    modes = [m.training for m in model.modules()]
    tome.tune(model, _pixels(), 1.5, **FAST)
    assert [m.training for m in model.modules()] == modes
    with pytest.raises(TuneError):  # also when tune refuses the input
        tome.tune(model, _pixels(3), 1.5, **FAST)
    assert [m.training for m in model.modules()] == modes
    model.eval()
    tome.tune(model, _pixels(), 1.5, **FAST)
    assert not any(m.training for m in model.modules())


def test_subclass_of_a_supported_model():
    class MyViT(timm.models.vision_transformer.VisionTransformer):
        pass

    torch.manual_seed(0)
    model = MyViT(img_size=64, patch_size=16, embed_dim=48, depth=2, num_heads=3).eval()
    result = tome.tune(model, _pixels(), 1.3, **FAST)
    assert len(result.schedule) == 2 and result.flops_speedup >= 1.3


def test_unsupported_model():
    with pytest.raises(TypeError, match="do not support torch"):
        tome.tune(nn.Linear(3, 3), _pixels(), 2.0, **FAST)


# -- input sizes: the size of the pixels given, any the model accepts ----------------------------


def _tiny_dinov2(**kwargs) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=4, mlp_ratio=2, image_size=64, patch_size=8,
        **kwargs,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.Dinov2Model(config).eval()


def test_runs_at_the_size_of_the_pixels_given():
    """A transformers DINOv2 whose config says 64 px takes 32 px (it interpolates its position
    embeddings), and so does a timm ViT built with dynamic_img_size; a wrapper made for another
    size is resized too."""
    model = _tiny_dinov2()
    result = tome.tune(model, _pixels(size=32), 1.3, **FAST)
    assert result.tokens[0] == 1 + 4 * 4 and result.flops_speedup >= 1.3
    assert "tome" not in model.__dict__
    wrapped = tome.tune(from_module(model), _pixels(size=48), 1.3, **FAST)
    assert wrapped.tokens[0] == 1 + 6 * 6
    dynamic = _timm(dynamic_img_size=True)
    result = tome.tune(dynamic, _pixels(size=96), 1.5, **FAST)
    assert result.tokens[0] == 1 + 6 * 6 and result.flops_speedup >= 1.5


def _tiny_vit(transformers) -> nn.Module:
    config = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        image_size=32, patch_size=8,
    )  # fmt: skip
    return transformers.ViTModel(config).eval()


def test_wrong_size_names_the_sizes_the_model_accepts():
    transformers = pytest.importorskip("transformers")
    cases = [
        (_timm(), _pixels(size=32), ["64x64 pixels only", "dynamic_img_size=True", "got 32x32"]),
        (_tiny_dinov2(), _pixels(size=36), ["any multiple of 8 pixels", "got 36x36"]),
        (
            _tiny_vit(transformers),
            _pixels(size=48),
            ["32x32 pixels only", "interpolate_pos_encoding", "got 48x48"],
        ),
        (_tiny_dinov2(), torch.randn(8, 3, 32, 48), ["square", "32x48"]),
    ]
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    vit = tv.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=3
    )
    cases.append((vit.eval(), _pixels(size=64), ["32x32 pixels only", "image_size=32", "got 64x64"]))
    for model, pixels, parts in cases:
        with pytest.raises(TuneError) as error:
            tome.tune(model, pixels, 1.3, **FAST)
        assert all(part in str(error.value) for part in parts), (str(error.value), parts)
        assert "tome" not in model.__dict__


@pytest.mark.slow
def test_real_dinov2_at_224_px(dinov2_dir, images_dir):
    """The natural call: the real DINOv2-S (config image_size 518) tuned on 224 px photos (8 of
    the shared ones; the 3 bundled photos, unchecked by a held-out split, without them)."""
    transformers = pytest.importorskip("transformers")
    from _dinov2_timm import load_images

    model = transformers.Dinov2Model.from_pretrained(str(dinov2_dir)).eval()
    pixels = load_images(images_dir, 8, size=224)
    few = {} if len(pixels) >= 8 else {"min_images": len(pixels), "holdout": 0}
    result = tome.tune(model, pixels, 1.5, budget="flops", progress=False, max_evals=4, batch=8, **few)
    assert result.tokens[0] == 1 + 16 * 16 and len(result.schedule) == 12
    assert result.flops_speedup >= 1.5 and result.cls_cosine > 0.9
    with pytest.raises(TuneError, match="any multiple of 14 pixels"):
        tome.tune(model, torch.randn(8, 3, 230, 230), 1.5, **FAST)


# -- the report: what was compared, at which FLOP target, why the result won --------------------


def _result(**kwargs) -> TuneResult:
    """A TuneResult of one flops round whose search moved one merge."""
    fields = dict(
        schedule=[5, 3], tokens=[17, 12, 9], target_speedup=1.5, budget="flops", flops_speedup=1.52,
        measured_speedup=None, fidelity=1.9, cls_cosine=0.99, min_cls_cosine=0.95, patch_cosine=0.91,
        start="the best ramp (4.00, -1)", start_schedule=[6, 2], start_cls_cosine=0.98,
        start_patch_cosine=0.9, images=6, evaluations=20, seconds=1.0, heldout_images=2,
        heldout_fidelity=1.928241, heldout_start_fidelity=1.928213, search_kept=True, flop_target=1.5,
        start_fidelity=1.88, start_flops_speedup=1.51, searched_schedule=[5, 3], searched_fidelity=1.9,
        heldout_searched_fidelity=1.928241,
    )  # fmt: skip
    fields.update(kwargs)
    fields["history"] = fields.get("history") or [
        {
            "round": 1, "flop_target": fields["flop_target"], "schedule": fields["schedule"],
            "flops_speedup": fields["flops_speedup"], "measured_speedup": fields["measured_speedup"],
            "fidelity": fields["fidelity"], "search_kept": fields["search_kept"],
        }
    ]  # fmt: skip
    return TuneResult(**fields)


def _line(lines: list[str], start: str) -> str:
    found = [line for line in lines if line.startswith(start)]
    assert len(found) == 1, lines
    return found[0]


def test_distinct_prints_enough_digits():
    assert distinct(1.9282, 1.9282) == ("1.92820000", "1.92820000")
    assert distinct(1.928213, 1.928241) == ("1.92821", "1.92824")
    assert distinct(0.98, 0.5) == ("0.9800", "0.5000")


def test_report_heldout_check_numbers_differ_and_say_who_won():
    """The issue's line: 'objective 1.9282 vs ramp 1.9282 (search not kept)'. Now the searched
    schedule's held-out objective is compared with its start's, with the digits that tell them
    apart, and the verdict says why."""
    lost = _result(
        schedule=[6, 2],
        search_kept=False,
        heldout_searched_fidelity=1.928213,
        heldout_start_fidelity=1.928241,
    )
    line = _line(report(lost), "held-out check")
    assert "on 2 images: search 1.92821 vs start 1.92824" in line
    assert "the start did better by 2.8e-05: the start is kept" in line
    won = _line(report(_result()), "held-out check")
    assert (
        "search 1.92824 vs start 1.92821" in won
        and "the search did better by 2.8e-05: its schedule is kept" in won
    )
    tie = _line(report(_result(heldout_searched_fidelity=1.9282, heldout_start_fidelity=1.9282)), "held-out")
    assert "a tie (within 1e-06): the search's schedule is kept" in tie
    same = _result(schedule=[6, 2], searched_schedule=[6, 2], searched_fidelity=1.88, fidelity=1.88)
    lines = report(same)
    assert "nothing to decide" in _line(lines, "held-out check")
    assert _line(lines, "search:") == "search: no move raised the objective; the start is the result"
    assert "none (holdout=0)" in _line(report(_result(heldout_images=0)), "held-out check")


def test_report_says_what_the_start_was_at_which_flop_target():
    lines = report(_result())
    assert _line(lines, "speedup:") == "speedup: 1.52x FLOP-ideal (searched at a FLOP target of 1.50x)"
    start = _line(lines, "search start:")
    assert start.startswith(
        "search start: the best ramp (4.00, -1) = [6,2], 1.51x FLOP-ideal: CLS cosine 0.9800"
    )
    assert "objective 1.8800" in start
    assert "found [5,3], objective 1.9000 vs 1.8800 at the start" in _line(lines, "search:")
    assert "objective (CLS cosine + 1 x patch cosine) 1.9000" in _line(lines, "fidelity on the 6 calibration")


def test_report_measured_rounds_mark_the_one_returned():
    history = [
        {"round": 1, "flop_target": 1.5, "schedule": [6, 2], "flops_speedup": 1.5, "measured_speedup": 1.3,
         "fidelity": 1.95, "search_kept": True},
        {"round": 2, "flop_target": 1.72, "schedule": [7, 3], "flops_speedup": 1.73, "measured_speedup": 1.49,
         "fidelity": 1.9, "search_kept": False},
    ]  # fmt: skip
    result = _result(
        budget="measured", history=history, round=2, flop_target=1.72, measured_speedup=1.49,
        choice="the only round whose measured speedup reached 1.47x (1.5x within 2%)",
    )  # fmt: skip
    lines = report(result)
    assert "searched at a FLOP target of 1.72x), 1.49x measured" in _line(lines, "speedup:")
    assert (
        "round 1: FLOP target 1.50x, [6,2]: 1.50x FLOP-ideal, 1.30x measured, objective 1.9500" in lines[-2]
    )
    assert "<-" not in lines[-2]
    assert lines[-1].endswith(
        "(its start: the held-out check)  <- returned: the only round whose measured speedup reached 1.47x "
        "(1.5x within 2%)"
    )


def test_result_describes_the_round_it_comes_from():
    """With the measured budget, the start, FLOP target and held-out check of the result are
    those of the round whose schedule is returned (not of the first round)."""
    result = tome.tune(
        _timm(), _pixels(12), 1.5, budget="measured", progress=False, max_evals=6, reps=1, rounds=2
    )
    chosen = result.history[result.round - 1]
    assert chosen["schedule"] == result.schedule and chosen["flop_target"] == result.flop_target
    assert chosen["start_schedule"] == result.start_schedule and chosen["start"] == result.start
    assert chosen["heldout_start_fidelity"] == result.heldout_start_fidelity
    assert chosen["heldout_searched_fidelity"] == result.heldout_searched_fidelity
    assert chosen["search_kept"] == result.search_kept and result.choice
    assert result.schedule == (result.searched_schedule if result.search_kept else result.start_schedule)
    assert [h["round"] for h in result.history] == list(range(1, len(result.history) + 1))
    lines = report(result)
    assert any(line.startswith("search start:") for line in lines)
    if len(result.history) > 1:
        assert sum("<- returned" in line for line in lines) == 1


def test_parse_r_per_layer_list():
    assert parse_r("8,[4,2,0],16:-1.0") == [8, [4, 2, 0], (16, -1.0)]
    assert r_label([4, 2, 0]) == "[4,2,0]"


TINY = ["--model", "timm:vit_tiny_patch16_224", "--random-init", "--img-size", "64", "-q"]


def test_cli_tune(tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        for path in demo_images():
            (folder / f"{i}_{path.name}").write_bytes(path.read_bytes())
    args = [
        "tune",
        "--images",
        str(folder),
        "--target",
        "1.5",
        "--budget",
        "flops",
        "--max-evals",
        "6",
        *TINY,
    ]
    assert main([*args, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["schedule"]) == 12 and data["flops_speedup"] >= 1.5
    assert data["images"] == 7 and data["heldout_images"] == 2  # --holdout 0.25 of 9
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "schedule: [" in out and "CLS cosine" in out and "held-out check" in out
    # the printed schedule goes into eval as it is
    assert (
        main(["eval", "--images", str(folder), "--limit", "2", "--r", r_label(data["schedule"]), *TINY]) == 0
    )
    capsys.readouterr()

    for extra, message in (
        (["--limit", "4"], "at least 8"),
        (["--target", "99"], "at most"),
        (["--target", "0.5"], "--target"),
        (["--holdout", "1.5"], "--holdout"),
        (["--holdout", "-0.1"], "--holdout"),
        (["--patch-weight", "-1"], "--patch-weight"),
    ):
        assert main([*args, *extra]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("tome: error:")]
        assert len(err) == 1 and message in err[0]


# -- speed: races, cached per-image scores, progress ----------------------------------------------


def test_races_drop_candidates_early_and_keep_winners_fully_scored():
    """With races (the default) most candidates run on a few images only; the schedule returned
    and its start are scored on every image, and the search never does worse than its start.
    race=False scores every candidate on every image."""
    from tome.tools.tune.scoring import race_bounds

    assert race_bounds(12) == [4, 8, 12] and race_bounds(75) == [10, 20, 40, 75] and race_bounds(3) == [3]
    model, pixels = _timm(), _pixels(16)
    raced = tome.tune(model, pixels, 2.0, budget="flops", progress=False, max_evals=20)
    assert raced.screened > 0 and raced.images == 12
    assert raced.searched_fidelity >= raced.start_fidelity - 1e-6
    full = tome.tune(model, pixels, 2.0, budget="flops", progress=False, max_evals=20, race=False)
    assert full.screened == 0 and full.flops_speedup >= 2.0
    # the result's numbers are those of a fresh full evaluation
    again = tome.tune(model, pixels, 2.0, budget="flops", progress=False, max_evals=20)
    assert again.schedule == raced.schedule and again.fidelity == raced.fidelity
    with pytest.raises(TypeError, match="race: expected True or False, got 1"):
        tome.tune(model, pixels, 2.0, race=1, **FAST)


def test_scorer_runs_each_image_once_per_schedule():
    """A schedule raced on the leading images, then scored on all of them, runs each image once;
    the per-image scores match a full evaluation in one go."""
    from tome.tools.progress import progress_bar
    from tome.tools.tune.scoring import Scorer

    model, pixels = _timm(), _pixels(12)
    wrapper = from_module(model)
    scorer = Scorer(wrapper, pixels, 16, 1.0, progress_bar(0, False, "test"))
    tome.patch(model, 0)
    try:
        base, other = [2, 2, 2, 2], [4, 2, 1, 1]
        scorer(base)
        assert scorer.images_run == 12 and scorer.cost == 1.0
        won, _ = scorer.beats(other, base)
        ran = scorer.images_run - 12
        assert ran in (4, 8, 12) and scorer.screened == (0 if ran == 12 else 1)
        full = scorer(other)
        assert scorer.images_run == 24 and scorer.evaluations == 2
        model.tome.r = 0  # the fresh scorer's reference: no merging
        fresh = Scorer(wrapper, pixels, 5, 1.0, progress_bar(0, False, "test"))
        assert fresh(other)[0] == pytest.approx(full[0], abs=1e-6)
        assert won == (full[0] > scorer(base)[0] + 1e-6)
    finally:
        tome.unpatch(model)


def test_progress_names_the_stage(monkeypatch):
    """The bar counts images and says which stage runs (reference, ramps, search, held-out)."""
    import tome.tools.progress as progress_module

    stages: list[str] = []

    class Bar:
        total = 0

        def update(self, n=1):
            Bar.total += n

        def set_description_str(self, text):
            stages.append(text)

        def close(self):
            pass

    monkeypatch.setattr(progress_module, "progress_bar", lambda *args, **kwargs: Bar())
    result = tome.tune(_timm(), _pixels(), 1.5, **{**FAST, "progress": True})
    assert stages[:4] == ["tune: unmerged reference", "tune: ramps", "tune: search", "tune: held-out check"]
    assert Bar.total >= 8 + result.evaluations * result.images


def test_search_images_caps_the_search_and_the_rest_join_the_check():
    """Of 24 images (6 held out), the search runs on search_images=8; the other 10 join the check."""
    model, pixels = _timm(), _pixels(24)
    result = tome.tune(model, pixels, 1.5, search_images=8, **FAST)
    assert result.images == 8 and result.heldout_images == 16 and result.heldout_fidelity is not None
    unchecked = tome.tune(model, pixels, 1.5, search_images=8, holdout=0, **FAST)
    assert unchecked.images == 24 and unchecked.heldout_images == 0
    with pytest.raises(ValueError, match="search_images: expected an int >= 1, got 0"):
        tome.tune(model, pixels, 1.5, search_images=0, **FAST)


# -- speed: the thread count of the passes, progress lines ----------------------------------------


def test_thread_picker_runs_the_faster_count_and_restores_torchs():
    """'auto' times both counts, then runs the faster (trying the other now and then, a small
    share of the time); torch's count is back after every pass, also after an error."""
    import time

    from tome.tools.tune.threads import ThreadPicker

    torch.set_num_threads(2)  # the fixture's 1 is restored after the test
    for slow, fast in ((2, 1), (1, 2)):
        picker = ThreadPicker("auto")
        seen = []

        def work(slow=slow, seen=seen):
            seen.append(torch.get_num_threads())
            time.sleep(0.006 if seen[-1] == slow else 0.002)

        for _ in range(120):
            picker.run(work, work=1.0)
            assert torch.get_num_threads() == 2
        assert seen[:2] == [1, 2] and picker.best == fast
        assert 1 <= seen[2:].count(slow) <= 8, seen
        # tries of the slower count: about a twentieth of the time (the load may have changed)
        assert picker.seconds[slow] < 0.4 * picker.seconds[fast]
        assert picker.summary().endswith(f"the time per FLOP of {fast})"), picker.summary()
    with pytest.raises(RuntimeError, match="boom"):
        picker.run(lambda: (_ for _ in ()).throw(RuntimeError("boom")), work=1.0)
    assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError, match="boom"), picker.at_best():
        assert torch.get_num_threads() == picker.best == 2
        raise RuntimeError("boom")
    assert torch.get_num_threads() == 2
    fixed = ThreadPicker(1)
    assert fixed.run(torch.get_num_threads, work=1.0) == 1 and torch.get_num_threads() == 2
    for bad in (0, -1, 1.5, True, "fast"):
        with pytest.raises(ValueError, match="threads: expected 'auto' or an int >= 1"):
            ThreadPicker(bad)


def test_thread_count_changes_no_output_nor_the_schedule():
    """The patched model's outputs are bit-identical at 1 and 2 threads, so tune's choice does
    not depend on the count it runs at; torch's count is restored."""
    model, pixels = _timm(), _pixels(12)
    tome.patch(model, [6, 4, 2, 1])
    outs = {}
    with torch.inference_mode():
        for n in (1, 2):
            torch.set_num_threads(n)
            outs[n] = model.forward_features(pixels)
    tome.unpatch(model)
    assert torch.equal(outs[1], outs[2])
    torch.set_num_threads(2)
    auto = tome.tune(model, pixels, 1.5, **FAST)
    one = tome.tune(model, pixels, 1.5, threads=1, **FAST)
    assert torch.get_num_threads() == 2
    assert auto.schedule == one.schedule and auto.fidelity == one.fidelity
    assert one.threads == "1 thread" and set(one.thread_seconds) == {"1"}
    assert auto.threads and set(auto.thread_seconds) <= {"1", "2"}
    with pytest.raises(ValueError, match="threads: expected 'auto' or an int >= 1, got 0"):
        tome.tune(model, pixels, 1.5, threads=0, **FAST)


def test_progress_prints_a_line_per_stage_on_stderr_unless_quiet(capsys):
    model, pixels = _timm(), _pixels()
    tome.tune(model, pixels, 1.5, **{**FAST, "progress": True})
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("tune: unmerged reference on 6 + 2 held-out images")
    assert any(line.startswith("tune: ramps at 1.50x FLOP-ideal: start from the best ramp") for line in err)
    assert any(line.startswith("tune: search: ") and "image passes" in line for line in err)
    assert err[-1].startswith("tune: done in ") and "image passes at 1 thread" in err[-1]
    tome.tune(model, pixels, 1.5, **FAST)
    assert capsys.readouterr().err == ""
