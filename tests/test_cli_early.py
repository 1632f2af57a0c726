"""Errors before work (issue 28 item 5): ``tome --help`` and argument errors need no torch,
``tome --help`` names every kind of model, and ``tome embed`` / ``tome viz`` refuse what they
can refuse before the model loads (each test replaces the loader by one that fails the test)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from _cli_errors import one_error_line

from tome.cli.main import main
from tome.tools.data import demo_images

TINY = ["--model", "timm:vit_tiny_patch16_224", "--random-init", "--img-size", "64", "-q"]


class Loaded(Exception):
    """Raised by the replaced loaders: the command got as far as loading the model."""


def _no_loading(*args, **kwargs):
    raise Loaded


PHOTOS = [str(path) for path in demo_images()[:2]]  # read only


# -- parsing needs no torch ------------------------------------------------------------------

# Every ``tome.cli`` module is imported, the parser built, and help and argument errors given,
# with the ``tome`` package's own __init__ (which imports the core, torch) left out: what is
# checked is tome.cli alone.
_PARSE_ONLY = """
import contextlib, importlib.util, io, json, sys, types
package = types.ModuleType("tome")
package.__path__ = list(importlib.util.find_spec("tome").submodule_search_locations)
package.__version__ = "0"
sys.modules["tome"] = package
from tome.cli.main import build_parser, main
build_parser()
codes = []
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    for argv in (["--help"], *([c, "--help"] for c in ("demo", "viz", "bench", "eval", "tune", "embed")),
                 ["bench", "--r"], ["embed", "photos/"], ["viz", "--scale", "x", "a.jpg"], []):
        try:
            codes.append(main(argv))
        except SystemExit as exit:
            codes.append(exit.code)
heavy = sorted(m for m in ("torch", "numpy", "PIL", "tome.core", "tome.runtime", "tome.tools.models")
               if m in sys.modules)
print(json.dumps({"codes": codes, "heavy": heavy}))
"""


def test_help_and_argument_errors_import_no_torch():
    done = subprocess.run([sys.executable, "-c", _PARSE_ONLY], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert found["heavy"] == []
    assert found["codes"] == [0] * 7 + [2, 2, 2, 2]


def test_the_tome_command_parses_without_torch_once_import_tome_needs_none():
    """The whole ``tome --help``, package included: light only when ``tome/__init__.py`` does not
    import torch (today it imports the core; then this is skipped, saying so)."""
    code = "import sys, tome; print('torch' in sys.modules)"
    light = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    if light.stdout.strip() != "False":
        pytest.skip("import tome imports torch (tome/__init__.py): tome --help cannot be lighter than that")
    code = (
        "import sys\nfrom tome.cli.main import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules, file=sys.stderr)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stderr.strip().splitlines()[-1] == "False"


def test_the_parsers_copies_are_the_librarys():
    """tome.cli.flags copies the library's names its help shows (so that parsing needs no torch)."""
    from tome.adapters import transformers_modernbert, transformers_text
    from tome.cli import flags
    from tome.runtime.handle import MERGE_MODES, METRICS, MergeOptions
    from tome.tools.models.loading import DEFAULT_MODEL
    from tome.tools.models.text_loading import DEFAULT_TEXT_MODEL

    assert (flags.DEFAULT_MODEL, flags.DEFAULT_TEXT_MODEL) == (DEFAULT_MODEL, DEFAULT_TEXT_MODEL)
    assert (flags.MERGE_MODES, flags.METRICS) == (MERGE_MODES, METRICS)
    default = MergeOptions()
    assert default.mode == flags.DEFAULT_MODE and default.metric == flags.DEFAULT_METRIC
    assert default.keep_outliers == flags.DEFAULT_KEEP_OUTLIERS
    assert transformers_text.TEXT_DEFAULTS["metric"] == flags.DEFAULT_TEXT_METRIC
    assert flags.DEFAULT_MIN_TOKENS == transformers_text.DEFAULT_MIN_TOKENS
    assert flags.DEFAULT_HIDDEN_WEIGHT == transformers_text.DEFAULT_HIDDEN_WEIGHT
    assert flags.POSITION_RULES == transformers_modernbert.POSITION_RULES
    assert flags.WINDOW_RULES == transformers_modernbert.WINDOW_RULES


def test_tome_help_names_every_kind_of_model(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for spec in ("dinov2-s-saliency", "timm:NAME", "hf:ID_OR_FOLDER", "torchvision:NAME"):
        assert spec in out
    assert "text: or text:minilm" in out and "text:FOLDER_OR_NAME" in out
    assert "diffusers:FOLDER" in out and "tome viz" in out


# -- tome embed: a resume with other settings is refused before the model loads ---------------


@pytest.fixture
def no_embed_model(monkeypatch):
    pytest.importorskip("pyarrow")
    import tome.tools.embed.job as job

    monkeypatch.setattr(job, "load_job_model", _no_loading)


def _written(out: Path, **meta) -> None:
    """An output file of ``tome embed`` with the metadata ``meta`` (and one row)."""
    from tome.tools.embed.store import FORMAT, Store

    store = Store(out, {"format": FORMAT, **meta})
    store.check()
    store.open()
    store.write(["x"], [[1.0, 2.0]])
    store.finish()


def test_embed_refuses_another_setting_before_the_model_loads(tmp_path, no_embed_model, capsys):
    out = tmp_path / "photos.parquet"
    _written(
        out, kind="image", model="timm:vit_tiny_patch16_224", weights=None, random_init=True, img_size=64,
        max_tokens=None, setting="r=1", options={"keep_outliers": 0, "metric": "keys", "mode": "mlerp"},
    )  # fmt: skip
    command = ["embed", *PHOTOS, "--out", str(out), *TINY]
    assert main([*command, "--r", "2"]) == 2
    assert "its rows were made with another setting 'r=1', this run 'r=2'" in one_error_line(capsys)
    assert main([*command, "--r", "1", "--img-size", "32"]) == 2
    assert "another img_size 64, this run 32" in one_error_line(capsys)
    assert main([*command, "--r", "1", "--mode", "mean"]) == 2
    assert "another mode 'mlerp', this run 'mean'" in one_error_line(capsys)
    with pytest.raises(Loaded):  # the same settings: on to the model (and its whole check after)
        main([*command, "--r", "1", "--mode", "mlerp"])


def test_embed_texts_refuse_another_ratio_before_the_model_loads(tmp_path, no_embed_model, capsys):
    lines = tmp_path / "lines.txt"
    lines.write_text("one text\nanother text\n", encoding="utf-8")
    out = tmp_path / "lines.parquet"
    _written(
        out, kind="text", model="sentence-transformers/all-MiniLM-L6-v2", weights=None, random_init=False,
        img_size=None, max_tokens=128, setting="ratio=0.1", options={"hidden_weight": 0.5, "min_tokens": 24},
    )  # fmt: skip
    assert main(["embed", str(lines), "--out", str(out), "--ratio", "0.2", "-q"]) == 2
    assert "another setting 'ratio=0.1', this run 'ratio=0.2'" in one_error_line(capsys)
    assert main(["embed", str(lines), "--out", str(out), "--max-tokens", "64", "-q"]) == 2
    assert "another max_tokens 128, this run 64" in one_error_line(capsys)
    assert main(["embed", str(lines), "--out", str(out), "--min-tokens", "8", "-q"]) == 2
    assert "another min_tokens 24, this run 8" in one_error_line(capsys)
    with pytest.raises(Loaded):
        main(["embed", str(lines), "--out", str(out), "--min-tokens", "24", "--max-tokens", "128", "-q"])


def test_embed_checks_before_the_model_agree_with_a_real_run(tmp_path, monkeypatch, capsys):
    """What is checked before the model loads is what a real run writes: its own rerun is let
    through to the model, another setting is not."""
    pytest.importorskip("pyarrow")
    pytest.importorskip("timm")
    import tome.tools.embed.job as job

    out = tmp_path / "photos.parquet"
    command = ["embed", *PHOTOS, "--out", str(out), "--r", "1", "--mode", "mean", "--keep-outliers", "1"]
    assert main([*command, *TINY]) == 0
    capsys.readouterr()
    monkeypatch.setattr(job, "load_job_model", _no_loading)
    with pytest.raises(Loaded):
        main([*command, *TINY])
    assert main([*command, *TINY, "--keep-outliers", "2"]) == 2
    assert "another keep_outliers 1, this run 2" in one_error_line(capsys)


# -- tome viz: no readable image is an error before the model loads ---------------------------


@pytest.fixture
def no_viz_model(monkeypatch):
    pytest.importorskip("PIL")
    import tome.tools.models.loading as loading
    import tome.tools.pictures.vis_diffusion as vis_diffusion

    monkeypatch.setattr(loading, "load_model", _no_loading)
    monkeypatch.setattr(vis_diffusion, "load_diffusion", _no_loading)


@pytest.mark.parametrize("model", [TINY, ["--model", "diffusers:/no/such/folder", "-q"]])
def test_viz_of_no_image_fails_before_the_model_loads(model, tmp_path, no_viz_model, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"garbage")
    assert main(["viz", str(notes), str(broken), "--out", str(tmp_path / "out"), *model]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "tome: error: no readable images"
    assert f"skipped {notes}: cannot read it as an image" in err and "2 unreadable image(s) skipped" in err
    with pytest.raises(Loaded):  # one readable image is enough to go on
        main(["viz", str(broken), *PHOTOS, "--out", str(tmp_path / "out"), *model])


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (["viz", "{notes}", "--model", "text:"], "tome viz runs vision models"),
        (["tune", "--images", "{notes}", "--model", "diffusers:/no/such"], "tome tune runs ViTs"),
        (["eval", "--images", "{notes}", "--model", "diffusers:/no/such"], "tome eval runs ViTs"),
    ],
)
def test_a_model_of_another_kind_is_refused_before_the_images_are_read(
    command, message, tmp_path, no_viz_model, capsys
):
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    assert main([arg.format(notes=notes) for arg in command]) == 2
    assert message in one_error_line(capsys)
