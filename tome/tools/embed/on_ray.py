"""``tome embed --ray``: the job of :mod:`tome.tools.embed.job` on Ray Data.

The pipeline: the items (paths, or texts) become a dataset; Ray tasks read, decode and resize
the images (``map_batches``, one CPU each); an actor pool runs the model (each actor holds its
own copy of the patched model: the driver's, pickled, so every actor computes exactly what the
local run computes); the rows stream back to the driver in input order, which writes them with
the local job's chunk writer: the same parquet file, the same resume, the same skip report.
Embeddings are small (1.5 KB a row at 384 floats), so streaming them back costs little next to
the images; and writing on the driver means ``--out`` can be any path the driver can write.

On one machine ``--ray`` starts Ray for the job and stops it after. On a cluster:

.. code-block:: console

    # on the head node (and `ray start --address HEAD:6379` on each worker node)
    ray start --head
    # every node needs the same Python packages (pip install 'tome-merging[ray]' and the model's
    # extras) and the images at the same paths (a shared file system)
    tome embed /shared/photos --out photos.parquet --ray-address auto --ray-actors 8 --threads 4

``--ray-address`` takes what ``ray.init(address=...)`` takes (``auto``, ``HOST:6379``, or
``ray://HOST:10001`` through Ray Client). ``--ray-actors`` model copies (default: one per
node), each using ``--threads`` torch threads (default: the node's CPU count).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence

import numpy as np

from tome.tools.embed.decode import decode_batch, shipped_by_value
from tome.tools.embed.inputs import Item
from tome.tools.embed.local import Sink, Stats
from tome.tools.embed.model import pixels_for

__all__ = ["decoding_tasks", "run_ray", "start_ray", "stop_ray"]


class _Embedder:
    """A Ray actor: one copy of the patched model (``model``: ``[object ref]``), run on batches
    of pixels (or texts)."""

    def __init__(self, model: list, kind: str, batch: int, threads: int | None) -> None:
        import ray
        import torch

        # Ray sets OMP_NUM_THREADS to the actor's CPUs (1); the model wants the node's cores.
        torch.set_num_threads(threads or os.cpu_count() or 1)
        self.model = ray.get(model[0])
        self.kind, self.batch = kind, batch
        self.dim: int | None = None

    def _embed_images(self, uint8: np.ndarray):
        pixels = pixels_for(self.model, uint8)
        return self.model(pixels, saliency=False).pooled.float().numpy()

    def __call__(self, rows: dict) -> dict:
        n = len(rows["key"])
        start = time.perf_counter()
        tokenize = 0.0
        if self.kind == "image":
            errors = rows["error"]
            ok = np.array([not e for e in errors], dtype=bool)
            found = self._embed_images(rows["pixels"][ok]) if ok.any() else None
        else:
            errors = np.array([""] * n, dtype=object)
            ok = np.ones(n, dtype=bool)
            prepared = self.model.prepare([str(t) for t in rows["text"]], self.batch)
            tokenize = time.perf_counter() - start
            found = self.model.encode(prepared).numpy()
        if found is not None:
            self.dim = found.shape[1]
        elif self.dim is None:  # every image of the first batch unreadable: ask the model its width
            self.dim = self._embed_images(np.zeros((1, *rows["pixels"].shape[1:]), np.uint8)).shape[1]
        embedding = np.zeros((n, self.dim), dtype=np.float32)
        if found is not None:
            embedding[ok] = found
        model_s = time.perf_counter() - start - tokenize
        decode_s = rows["decode_s"] if "decode_s" in rows else np.full(n, tokenize / n)
        return {
            "key": rows["key"],
            "error": errors,
            "embedding": embedding,
            "decode_s": decode_s,
            "model_s": np.full(n, model_s / n),
        }


def _blocks(items: Sequence[Item], batch: int) -> list:
    """The items as pyarrow tables of ``batch`` rows (the last one shorter): one Ray Data block
    per model batch. Blocks of other sizes make Ray Data bundle two or more blocks per actor task
    and return their rows together, a task later than they are done (measured: 400 photos in 13
    blocks of 30-31 rows came back 62 rows at a time, the first ~4 s after it was embedded)."""
    import pyarrow as pa

    return [
        pa.table(
            {
                "key": [item.key for item in part],
                "path": [item.path for item in part],
                "text": [item.text or "" for item in part],
            }
        )
        for part in (items[i : i + batch] for i in range(0, len(items), batch))
    ]


def start_ray(address: str | None) -> bool:
    """Connect to the Ray at ``address`` (``auto``, ``HOST:6379``, ``ray://HOST:10001``), or
    start a local one when None, unless this process has a Ray already; True when it started
    or connected one here (the caller shuts it down with :func:`stop_ray`).

    No ``worker_process_setup_hook`` pre-imports the model's library: measured on 2 cores it
    made every worker (decoding tasks too) import torch and transformers at once, and the job
    slower (400 photos, r=16:-0.75, `tome embed --ray --json`, one run each: 48 s with it, 39 s
    without).
    """
    import ray

    if ray.is_initialized():
        return False
    try:
        # "local": a new Ray for this job even when a cluster runs on this machine (plain
        # ray.init() would join that one); --ray-address joins a cluster.
        ray.init(
            address=address or "local",
            include_dashboard=False,
            logging_level=logging.ERROR,
        )
    except (ConnectionError, ValueError, RuntimeError) as error:
        from tome.tools.errors import UserError

        where = f"--ray-address {address}" if address else "--ray"
        raise UserError(f"{where}: cannot start or reach Ray ({error})".replace("\n", " ")) from None
    return True


def stop_ray() -> None:
    import ray

    ray.shutdown()


def run_ray(
    model,
    kind: str,
    items: Sequence[Item],
    sink: Sink,
    stats: Stats,
    *,
    batch: int,
    actors: int | None,
    threads: int | None,
    workers: int | None = None,
    log: Callable[[str], None],
) -> str:
    """Embed ``items`` on the Ray this process is connected to (:func:`start_ray`) into
    ``sink``, in input order; returns how it ran. ``workers``: decoding tasks at a time
    (:func:`decoding_tasks`)."""
    import ray
    import ray.data

    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # rows (and parts) in input order
    context.enable_progress_bars = False  # tome's bar counts the rows written
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    cpus = int(ray.cluster_resources().get("CPU", 0))
    actors = actors or max(1, nodes)
    tasks = decoding_tasks(workers, cpus)
    data = ray.data.from_arrow(_blocks(items, batch))
    if kind == "image":
        data = data.map_batches(
            decode_batch,
            fn_kwargs={"size": model.img_size, "crop_pct": model.crop_pct},
            batch_size=batch,
            batch_format="numpy",
            num_cpus=0.5,  # not the actors' 1: Ray would fuse decoding into the actors
            concurrency=tasks,
        )
    data = data.map_batches(
        _Embedder,
        # The object ref inside a list: Ray resolves refs given as arguments, not inside them.
        fn_constructor_kwargs={"model": [ray.put(model)], "kind": kind, "batch": batch, "threads": threads},
        batch_size=batch,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=1,
    )
    with shipped_by_value():  # the decoding tasks get decode_batch without importing tome
        for out in data.iter_batches(batch_size=None, batch_format="numpy"):
            stats.decode_s += float(np.sum(out["decode_s"]))
            stats.model_s += float(np.sum(out["model_s"]))
            good = []
            for i, (key, error) in enumerate(zip(out["key"], out["error"], strict=True)):
                if error:
                    sink.skip(str(key), str(error))
                else:
                    good.append(i)
            if good:
                sink.add([str(out["key"][i]) for i in good], out["embedding"][good])
    decoding = f", {tasks} decoding task(s) at a time" if kind == "image" else ""
    return f"Ray ({nodes} node(s), {cpus} CPUs), {actors} actor(s){decoding}"


def decoding_tasks(workers: int | None, cpus: int) -> int:
    """How many decoding tasks Ray may run at a time: ``workers`` (``--workers``), else one per
    4 CPUs of the cluster, at least one. Decoding is 9-16% of the default model's work (the
    table in docs/embed.md), so a quarter of the CPUs keeps the actors fed; Ray's own default (a task
    per free half CPU) starts a worker process for each, and on 2 CPUs those processes slowed
    the actor's start (``python benchmarks/embed.py --settings 16:-0.75 --ray-workers 1,2,4``,
    400 photos, medians of 3 interleaved rounds: 29.3 s / 30.0 s / 30.1 s end to end with 1 / 2 /
    4 tasks at a time; Ray's default runs 2 here).

    >>> decoding_tasks(None, 2), decoding_tasks(None, 64), decoding_tasks(3, 64)
    (1, 16, 3)
    """
    return workers or max(1, cpus // 4)
