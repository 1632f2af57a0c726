"""``tome embed --ray`` on a 3-node Ray cluster on this machine (``ray.cluster_utils.Cluster``,
1 CPU a node): the workers write the parts (a local path and a ``file://`` URI), a worker node
killed in the middle of a job, a killed driver, a job switched between runners, a worker that
cannot write, a node without the model's package. One cluster for the module (~1 min to start
and stop on 2 cores); every job is small."""

from __future__ import annotations

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
pytest.importorskip("ray")

import pyarrow.parquet as pq
import ray

from tome.tools.embed.job import embed, read_embeddings
from tome.tools.errors import UserError

# 128 px: enough work per part (~0.3 s on 2 cores) that a killed node holds one
TINY = {"model": "timm:vit_tiny_patch16_224", "random_init": True, "img_size": 128}
TINY_ARGS = ["--model", "timm:vit_tiny_patch16_224", "--random-init", "--img-size", "128", "-q"]
# Ray's health checks, faster than the defaults (a lost node is noticed in ~2 s, not ~30 s)
FAST_CHECKS = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 500,
    "health_check_timeout_ms": 1000,
    "health_check_failure_threshold": 3,
}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    made = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False, "_system_config": FAST_CHECKS},
    )
    workers = [made.add_node(num_cpus=1) for _ in range(2)]
    ray.init(address=made.address, logging_level="ERROR")
    made.wait_for_nodes()
    yield made, workers
    ray.shutdown()
    made.shutdown()


def _photos(folder: Path, source: Path, count: int) -> Path:
    found = sorted(p for p in source.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    folder.mkdir()
    for i in range(count):
        (folder / f"{i:03d}_{found[i % len(found)].name}").symlink_to(found[i % len(found)])
    return folder


def _rows(path) -> dict[str, np.ndarray]:
    keys, values, _ = read_embeddings(path)
    assert len(keys) == len(set(keys)), "a key written twice"
    return dict(zip(keys, (np.asarray(v, dtype=np.float32) for v in values), strict=True))


def _same_rows(got_file, want_file) -> None:
    got, want = _rows(got_file), _rows(want_file)
    assert list(got) == list(want)  # each row once, in input order
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, images_dir):
    """32 photos (and a corrupt one) and their rows from the local job."""
    folder = tmp_path_factory.mktemp("reference")
    photos = _photos(folder / "photos", images_dir, 32)
    (photos / "016_broken.jpg").write_bytes(b"not a jpeg")
    out = folder / "local.parquet"
    result = embed(photos, out, r=4, batch=4, chunk=4, progress=False, **TINY)
    assert result.rows == 32 and len(result.skipped) == 1
    return photos, out


def test_a_worker_node_killed_mid_job_loses_nothing(tmp_path, cluster, reference):
    made, workers = cluster
    photos, local = reference
    victim = workers[0]
    killed: list[float] = []

    def kill_a_node(rows: int) -> None:
        if not killed:  # after the first part: every actor holds parts
            made.remove_node(victim, allow_graceful=False)
            killed.append(time.perf_counter())

    out = tmp_path / "photos.parquet"
    result = embed(photos, out, r=4, batch=4, chunk=4, ray=True, on_chunk=kill_a_node, progress=False, **TINY)
    assert result.runner.startswith("Ray (3 node(s), 3 CPUs), 3 actor(s) writing 9 part(s)")
    assert result.rows == 32 and result.embedded == 32
    assert [key for key, _ in result.skipped] == [str(photos / "016_broken.jpg")]  # reported as locally
    assert "cannot read it as an image" in result.skipped[0][1]
    assert (tmp_path / "photos.parquet.skipped.tsv").is_file()
    # The node goes down after the first part came back; its actor may have finished the parts it
    # held by then (a fast machine), so nothing of it is retried, or not: both must end whole.
    named = f"{victim.node_ip_address} (node {victim.node_id[:8]})"
    assert result.nodes_lost in ([], [named]) and result.retried <= 9
    if result.retried:
        assert result.nodes_lost == [named]
        assert "actors lost on: " in result.summary() and "part(s) retried" in result.summary()
    assert not (tmp_path / "photos.parquet.parts").exists()
    _same_rows(out, local)


def test_a_killed_driver_is_finished_by_the_same_command(tmp_path, cluster, reference):
    from tome.cli.main import main

    photos, local = reference
    out = tmp_path / "photos.parquet"
    command = [
        "embed",
        str(photos),
        "--out",
        str(out),
        "--r",
        "4",
        "--batch",
        "4",
        "--chunk",
        "4",
        *TINY_ARGS,
    ]
    driver = subprocess.Popen(
        [sys.executable, "-m", "tome.cli.main", *command, "--ray-address", cluster[0].address],
        stderr=subprocess.DEVNULL,
    )
    parts = tmp_path / "photos.parquet.parts"
    deadline = time.monotonic() + 180
    while driver.poll() is None and time.monotonic() < deadline:
        if len(list(parts.glob("part-*.parquet"))) >= 2:
            break
        time.sleep(0.05)
    if driver.poll() is not None:
        pytest.skip("the driver finished before it could be killed (a very fast machine)")
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    time.sleep(1)  # its actors die with it (Ray kills an owner's actors)
    written = sum(pq.ParquetFile(p).metadata.num_rows for p in parts.glob("part-*.parquet"))
    assert 0 < written < 32 and not out.exists()
    assert main([*command, "--ray"]) == 3  # the broken photo: exit 3, as locally
    _same_rows(out, local)


def test_a_job_switches_runners_both_ways_through_a_file_uri(tmp_path, cluster, reference):
    photos, local = reference
    settings = {"r": 4, "batch": 4, "chunk": 4, "progress": False, **TINY}

    def crash_after(n: int):
        def crash(rows: int) -> None:
            if rows >= n:
                raise RuntimeError("simulated crash")

        return crash

    # local, cut short, finished on Ray (the workers write to a file:// URI)
    uri = f"file://{tmp_path}/a.parquet"
    with pytest.raises(RuntimeError, match="simulated crash"):
        embed(photos, uri, on_chunk=crash_after(8), **settings)
    finished = embed(photos, uri, ray=True, **settings)
    assert (finished.already, finished.embedded, finished.rows) == (8, 24, 32)
    _same_rows(tmp_path / "a.parquet", local)
    # Ray, cut short, finished locally (a local path)
    out = tmp_path / "b.parquet"
    with pytest.raises(RuntimeError, match="simulated crash"):
        embed(photos, out, ray=True, on_chunk=crash_after(12), **settings)
    meta = (tmp_path / "b.parquet.parts" / "meta.json").read_text()
    again = embed(photos, out, **settings)
    assert again.already >= 12 and again.rows == 32 and again.already + again.embedded == 32
    _same_rows(out, local)
    assert read_embeddings(out)[2]["setting"] == "r=4" and '"setting": "r=4"' in meta


def test_a_worker_that_cannot_write_is_one_error_naming_node_and_path(tmp_path, cluster, reference):
    photos, _ = reference
    out = tmp_path / "photos.parquet"
    parts = tmp_path / "photos.parquet.parts"

    def folder_gone(rows: int) -> None:  # what a worker sees when the shared folder goes away
        if not parts.is_dir():
            return  # gone already: another part came back before the next one failed
        for part in parts.iterdir():
            part.unlink()
        parts.rmdir()
        parts.write_text("")

    with pytest.raises(
        UserError, match=r"node [0-9.]+ \(node [0-9a-f]{8}\): cannot write .*photos\.parquet\.parts"
    ):
        embed(photos, out, r=4, batch=4, chunk=4, ray=True, on_chunk=folder_gone, progress=False, **TINY)
    assert not out.exists() and parts.is_file()  # nothing left as if complete


def test_a_node_without_the_models_package_is_named(tmp_path, cluster, reference):
    made, _ = cluster
    photos, _ = reference
    fake = tmp_path / "no-timm"
    (fake / "timm").mkdir(parents=True)
    (fake / "timm" / "__init__.py").write_text(
        'raise ModuleNotFoundError("No module named \'timm\'", name="timm")\n'
    )
    paths = [str(fake), os.environ.get("PYTHONPATH", "")]
    bare = made.add_node(num_cpus=1, env_vars={"PYTHONPATH": os.pathsep.join(p for p in paths if p)})
    try:
        made.wait_for_nodes()
        # one actor a node (1 CPU each): one on the node without timm
        with pytest.raises(UserError) as caught:
            embed(photos, tmp_path / "x.parquet", r=4, ray=True, progress=False, **TINY)
        message = str(caught.value)
        assert f"node {bare.node_ip_address} (node {bare.node_id[:8]})" in message
        assert "the Python package 'timm' is missing there" in message
    finally:
        made.remove_node(bare)
