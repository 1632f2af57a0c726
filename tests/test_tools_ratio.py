"""The ratio schedule in the tools (``tome.patch(model, ratio=P)``): ``--ratio`` wherever the
command line takes ``--r`` (viz, bench, eval, demo; not tune, which searches r schedules), one
or the other; ``Model.set_r`` with a :class:`Ratio` and with the handle's ``patch_options``
(which now hold ``"r"`` or ``"ratio"``). Tiny random timm models."""

from __future__ import annotations

import json

import pytest
import torch

import tome
from tome.cli.main import main
from tome.tools.errors import UserError
from tome.tools.models.vision import from_module
from tome.tools.schedule_text import Ratio, file_label, parse_ratio, r_label, setting_label

timm = pytest.importorskip("timm")
pytest.importorskip("PIL")

TINY = ["--model", "timm:vit_tiny_patch16_224", "--random-init", "--img-size", "64", "-q"]


def _model():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=4, num_classes=5)
    return from_module(vit.eval())


# -- text ------------------------------------------------------------------------------------


def test_parse_ratio_and_labels():
    assert parse_ratio("0.2") == [Ratio(0.2)]
    assert parse_ratio(" 0 , 0.1,0.25 ") == [0, Ratio(0.1), Ratio(0.25)]  # 0: the unmerged model
    for bad, message in (
        ("1.2", "--ratio: expected a number with 0 <= ratio < 1, got 1.2"),
        ("-0.1", "--ratio: expected a number with 0 <= ratio < 1, got -0.1"),
        ("nan", "--ratio: expected a number with 0 <= ratio < 1, got nan"),
        ("abc", "--ratio: cannot read 'abc'; expected a fraction of the tokens in [0, 1)"),
        ("0.1,", "--ratio: cannot read ''"),
    ):
        with pytest.raises(UserError) as error:
            parse_ratio(bad)
        assert str(error.value).startswith(message), str(error.value)
    with pytest.raises(ValueError, match="ratio: expected a number with 0 <= ratio < 1, got 1"):
        Ratio(1)
    assert (r_label(Ratio(0.2)), setting_label(Ratio(0.2)), file_label(Ratio(0.2))) == (
        "ratio=0.2", "ratio=0.2", "ratio0.2",
    )  # fmt: skip
    assert (r_label(16), setting_label((16, -1.0)), file_label([4, 2])) == ("16", "r=16:-1.0", "4-2")


# -- Model.set_r -----------------------------------------------------------------------------


def test_set_r_with_a_ratio_and_back():
    model, pixels = _model(), torch.randn(2, 3, 64, 64)
    model.set_r(Ratio(0.25))
    handle = model.module.tome
    assert handle.ratio == 0.25 and handle.r is None
    assert handle.patch_options()["ratio"] == 0.25 and "r" not in handle.patch_options()
    model(pixels)
    assert handle.tokens_per_layer == handle.planned_tokens(17) == [17, 13, 10, 8, 7]
    model.set_r(3)  # same options: only the schedule changes, on the same handle
    assert model.module.tome is handle and (handle.r, handle.ratio) == (3, None)
    assert handle.patch_options()["r"] == 3 and "ratio" not in handle.patch_options()
    model.set_r(Ratio(0.1))
    assert model.module.tome is handle and (handle.r, handle.ratio) == (None, 0.1)
    model.set_r(Ratio(0.1), mode="mean")  # other options: patched again, with the ratio
    assert model.module.tome is not handle
    assert model.module.tome.ratio == 0.1 and model.module.tome.options.mode == "mean"
    model.set_r(None)
    assert not model.patched


def test_set_r_reuses_the_patch_whatever_its_schedule():
    """The fast path compares the options with patch_options(), which holds the schedule too:
    a list, a ramp or a ratio there never forces a new patch."""
    model = _model()
    for first in ([2, 1, 0], (3, -1.0), Ratio(0.2)):
        model.set_r(None)
        model.set_r(first, mode="mean", keep_outliers=1)
        handle = model.module.tome
        for then in (4, Ratio(0.3), [1, 1]):
            model.set_r(then, mode="mean", keep_outliers=1)
            assert model.module.tome is handle
        # patching again with the handle's own options (minus its schedule) is the fast path too
        options = {k: v for k, v in handle.patch_options().items() if k not in ("r", "ratio")}
        model.set_r(2, **options)
        assert model.module.tome is handle and handle.r == 2


def test_set_r_errors_name_the_flag():
    model = _model()
    with pytest.raises(TypeError, match=r"ratio: give a ratio as the setting, set_r\(Ratio\(0\.2\)\)"):
        model.set_r(None, ratio=0.2)
    with pytest.raises(UserError, match=r"--r \[1,1,1,1,1\]: r: the list has 5 entries"):
        model.set_r([1] * 5)
    with pytest.raises(UserError, match=r"--ratio 0\.2: keep_outliers"):
        model.set_r(Ratio(0.2), keep_outliers=-1)


# -- the command line ------------------------------------------------------------------------


def test_bench_with_ratio(capsys):
    assert main(["bench", "--ratio", "0,0.1,0.3", "--batch", "2", "--reps", "1", "--json", *TINY]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [row["r"] for row in rows] == ["0", "ratio=0.1", "ratio=0.3"]
    assert rows[1]["tokens"] == [17, 16, 15, 14, 13, 12, 11, 10, 10, 10, 10, 10, 10]
    assert rows[2]["tokens"][-1] < rows[1]["tokens"][-1] and rows[2]["ideal"] > rows[1]["ideal"] > 1
    assert main(["bench", "--ratio", "0.2", "--batch", "2", "--reps", "1", *TINY]) == 0
    table = capsys.readouterr().out
    assert "| ratio=0.2 | 17→" in table and "  ratio=0.2  " in table  # tokens after each block


def test_eval_and_viz_with_ratio(tmp_path, photos, capsys):
    assert (
        main(["eval", "--images", str(photos), "--ratio", "0.2", "--speed-reps", "0", "--json", *TINY]) == 0
    )
    reference, merged = json.loads(capsys.readouterr().out)["rows"]
    assert (reference["r"], merged["r"]) == ("0", "ratio=0.2")
    assert merged["tokens"] < 17 and -1 <= merged["cls_cosine"] <= 1
    out = tmp_path / "out"
    assert main(["viz", str(photos), "--ratio", "0.2,0.4", "--out", str(out), *TINY]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in out.glob("*.png")) == [
        "astronaut_ratio0.2.png", "astronaut_ratio0.4.png", "chelsea_ratio0.2.png", "chelsea_ratio0.4.png",
    ]  # fmt: skip


@pytest.mark.parametrize("command", ["viz", "bench", "eval", "demo"])
def test_r_and_ratio_are_exclusive(command, photos, capsys):
    inputs = {"viz": [str(photos)], "eval": ["--images", str(photos)]}.get(command, [])
    # "16" as the default is written: an explicit --r 16 still counts as given
    with pytest.raises(SystemExit) as exit_info:
        main([command, *inputs, "--r", "16", "--ratio", "0.2", *TINY])
    assert exit_info.value.code == 2
    assert "argument --ratio: not allowed with argument --r" in capsys.readouterr().err


def test_bad_ratio_is_one_error_line(capsys):
    assert main(["bench", "--ratio", "1.5", *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["tome: error: --ratio: expected a number with 0 <= ratio < 1, got 1.5"]


def test_demo_takes_one_ratio_and_tune_none(photos, capsys):
    assert main(["demo", "--ratio", "0.1,0.2", *TINY]) == 2
    assert "tome: error: --ratio: expected one fraction here, got 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # tune searches r schedules: no --ratio
        main(["tune", "--images", str(photos), "--ratio", "0.2", *TINY])
    assert "unrecognized arguments: --ratio" in capsys.readouterr().err


def test_bench_ratio_rows_are_what_tome_patch_ratio_plans(capsys):
    """``tome bench --ratio P`` runs what ``tome.patch(model, ratio=P)`` runs."""
    assert main(["bench", "--ratio", "0.3", "--batch", "1", "--reps", "1", "--json", *TINY]) == 0
    row = json.loads(capsys.readouterr().out)["rows"][1]
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64)
    assert row["tokens"] == tome.patch(vit, ratio=0.3).tome.planned_tokens(17)
