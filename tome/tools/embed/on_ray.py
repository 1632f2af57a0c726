"""``tome embed --ray``: the job of :mod:`tome.tools.embed.job` on a Ray cluster, the workers
writing the file's parts themselves.

The driver splits the items still to do into parts of ``chunk`` rows (a part never spans a
row already written, so the parts of every run keep the input order: :func:`plan_parts`) and
hands them to an actor per node (``--ray-actors``). Each actor (:class:`PartWriter`) holds a copy
of the driver's patched model (pickled: every actor computes exactly what the local job
computes), decodes its part's images in threads beside the model (decoding never waits for a
CPU another stage holds, however the cluster shrinks), embeds them and writes the part to
``OUT.parts/`` itself, whole or absent (:func:`~tome.tools.embed.store.write_part`); it returns
only the part's name, its counts and its timings. The driver never holds a row: it tracks which
parts are written, and at the end streams them into ``OUT`` (in input order, each row once), as
the local job does, so a job started here can be finished there and the other way round.

Faults: an actor whose node is lost is restarted elsewhere by Ray (at most
:data:`MAX_RESTARTS` times), and its parts go to the other actors (a part is tried at most
:data:`MAX_TRIES` times); the summary says how many were retried and on which nodes an actor died (its node lost, or its
process killed there). A
killed driver leaves whole parts: the same command finishes the rest.

``--out`` must be where every node can write: a shared file system mounted at the same path, or
a ``pyarrow.fs`` URI (``s3://bucket/photos.parquet``, ``gs://...``; credentials as pyarrow finds
them on each node). Before any work each actor checks that it sees the parts folder the driver
made and can write to it, and that it can load the model (a missing package is named, with its
node).

.. code-block:: console

    # on the head node (and `ray start --address HEAD:6379` on each worker node)
    ray start --head
    # every node: the same Python packages (pip install 'tome-merging[ray]' and the model's
    # extras) and the images at the same paths (a shared file system)
    tome embed /shared/photos --out /shared/photos.parquet --ray-address auto --threads 8
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence

from tome.tools.embed import place
from tome.tools.embed.inputs import Item
from tome.tools.embed.local import Sink, Stats, run_images, run_texts
from tome.tools.embed.store import Store, write_part
from tome.tools.errors import UserError

__all__ = ["MAX_RESTARTS", "MAX_TRIES", "PartWriter", "plan_parts", "run_ray", "start_ray", "stop_ray"]

MAX_TRIES = 3  # times a part is tried (its actor's node lost) before the job stops
MAX_RESTARTS = 3  # times Ray restarts an actor whose node was lost
RESTART_WAIT_S = 600  # seconds the job waits for a lost actor to start again when none is left
AHEAD = 2  # parts queued at each actor: the next one starts without a round trip to the driver


def plan_parts(items: Sequence[Item], done: set[str], chunk: int, first: int) -> list[tuple[int, list[Item]]]:
    """The items not in ``done``, as numbered parts (from ``first``) of at most ``chunk`` items,
    each a run of consecutive items: a part never spans an item written before, so the parts of
    this run and of earlier runs can be streamed into the file in input order.

    >>> items = [Item(str(i), str(i)) for i in range(7)]
    >>> [(n, [i.key for i in part]) for n, part in plan_parts(items, {"2"}, 3, 5)]
    [(5, ['0', '1']), (6, ['3', '4', '5']), (7, ['6'])]
    """
    parts: list[tuple[int, list[Item]]] = []
    run: list[Item] = []
    for item in [*items, None]:
        if item is not None and item.key not in done and len(run) < chunk:
            run.append(item)
            continue
        if run:
            parts.append((first + len(parts), run))
            run = []
        if item is not None and item.key not in done:
            run.append(item)
    return parts


def _node() -> str:
    import ray

    return f"{ray.util.get_node_ip_address()} (node {ray.get_runtime_context().get_node_id()[:8]})"


def _missing_package(error: BaseException | str) -> str | None:
    """The top-level package a ``No module named 'X.y'`` error names, else None."""
    name = getattr(error, "name", None) if isinstance(error, ModuleNotFoundError) else None
    if name is None:
        found = re.search(r"No module named '([^']+)'", str(error))
        name = found.group(1) if found else None
    return name.split(".")[0] if name else None


class _Quiet:
    def update(self, n: int = 1) -> None:
        pass


class _OnePart:
    """What :class:`~tome.tools.embed.local.Sink` writes to: the one part an actor was given."""

    def __init__(self, writer: PartWriter, number: int) -> None:
        self.writer, self.number = writer, number

    def write(self, keys, embeddings) -> str:
        w = self.writer
        try:
            return write_part(w.fs, w.parts, self.number, keys, embeddings, w.meta, w.local)
        except Exception as error:  # OSError, or an object store's: name where, once
            raise PartWriteError(f"node {_node()}: cannot write {w.parts_shown}: {error}") from None


class PartWriteError(RuntimeError):
    """A worker cannot write the parts folder (the message names the node and the path)."""


class PartWriter:
    """A Ray actor: one copy of the patched model, which embeds parts of the job (decoding their
    images in ``workers`` threads beside the model) and writes each to the parts folder.

    The model comes with :meth:`ready` (not the constructor: Ray would resolve it before
    :meth:`ready` could name a missing package, and an actor restarted on another node gets it
    again from the driver's call)."""

    def __init__(self, kind: str, fs, parts: str, local: bool, parts_shown: str, meta: dict,
                 batch: int, threads: int | None, workers: int | None) -> None:  # fmt: skip
        import torch

        # Ray sets OMP_NUM_THREADS to the actor's CPUs (1); the model wants the node's cores.
        torch.set_num_threads(threads or os.cpu_count() or 1)
        self.kind, self.fs, self.parts, self.local = kind, fs, parts, local
        self.parts_shown, self.meta, self.batch = parts_shown, meta, batch
        self.workers = workers or min(4, os.cpu_count() or 1)
        self.model = None

    def ready(self, model: list) -> dict:
        """Take the model (``[object ref]``: inside a list, so that Ray passes the ref and the
        actor unpickles it here); returns this actor's node, or ``error``: what stops it working
        there (a missing package, a parts folder it does not see or cannot write)."""
        import ray

        node = _node()
        if self.model is None:
            try:
                self.model = ray.get(model[0])
            except Exception as error:  # unpickling the model: ModuleNotFoundError, maybe wrapped
                package = _missing_package(error)
                if package is None:
                    raise
                return {"node": node, "error": f"node {node}: the Python package {package!r} is missing there "
                        "(the model needs it); install the same packages on every node"}  # fmt: skip
        if not place.exists(self.fs, f"{self.parts}/meta.json"):
            return {"node": node, "error": f"node {node}: cannot see {self.parts_shown} (the driver made it): --out "
                    "must be on a file system every node sees at the same path, or a URI (s3://...)"}  # fmt: skip
        probe = place.temporary_name(f"{self.parts}/write-test")
        try:
            place.write_whole(self.fs, probe, b"", self.local)
            place.remove(self.fs, probe)
        except Exception as error:  # OSError, or an object store's
            return {"node": node, "error": f"node {node}: cannot write {self.parts_shown}: {error}"}
        return {"node": node}

    def embed_part(self, number: int, items: list[Item]) -> dict:
        """Embed ``items`` and write them as part ``number``; returns its counts and timings."""
        stats = Stats()
        sink = Sink(_OnePart(self, number), len(items), stats, _Quiet(), None)
        if self.kind == "image":
            run_images(self.model, items, sink, stats, batch=self.batch, workers=self.workers)
        else:
            run_texts(self.model, items, sink, stats, batch=self.batch, chunk=len(items))
        sink.close()
        offset = time.time() - time.perf_counter()  # wall clock: comparable across processes
        return {
            "number": number,
            "rows": stats.embedded,
            "skipped": stats.skipped,
            "decode_s": stats.decode_s,
            "model_s": stats.model_s,
            "wait_s": stats.wait_s,
            "first_row_at": None if stats.first_row_at is None else stats.first_row_at + offset,
            "first_rows": stats.first_rows,
            "last_row_at": None if stats.last_row_at is None else stats.last_row_at + offset,
            "node": _node(),
        }


def start_ray(address: str | None) -> bool:
    """Connect to the Ray at ``address`` (``auto``, ``HOST:6379``, ``ray://HOST:10001``), or
    start a local one when None, unless this process has a Ray already; True when it started
    or connected one here (the caller shuts it down with :func:`stop_ray`)."""
    import ray

    if ray.is_initialized():
        return False
    try:
        # "local": a new Ray for this job even when a cluster runs on this machine (plain
        # ray.init() would join that one); --ray-address joins a cluster.
        ray.init(address=address or "local", include_dashboard=False, logging_level=logging.ERROR)
    except (ConnectionError, ValueError, RuntimeError) as error:
        where = f"--ray-address {address}" if address else "--ray"
        raise UserError(f"{where}: cannot start or reach Ray ({error})".replace("\n", " ")) from None
    return True


def stop_ray() -> None:
    import ray

    ray.shutdown()


class _Driver:
    """The driver's side of one run: which parts are queued, at which actor, written; no rows."""

    def __init__(self, actors: list, box: list, parts: list[tuple[int, list[Item]]], stats: Stats, bar,
                 on_part: Callable[[dict], None]) -> None:  # fmt: skip
        self.actors, self.box = actors, box
        self.queue = deque(parts)
        self.stats, self.bar, self.on_part = stats, bar, on_part
        self.nodes: dict[int, str] = {}  # actor -> its node, while it works
        self.readying: dict = {}  # ref of ready() -> actor
        self.running: dict = {}  # ref of embed_part() -> (actor, part)
        self.load = Counter()
        self.tries = Counter()
        self.started = False

    def run(self) -> None:
        import ray

        for index, actor in enumerate(self.actors):
            self.readying[actor.ready.remote(self.box)] = index
        while self.queue or self.running:
            self._hand_out()
            if not self.running and not self.readying:
                raise RuntimeError("tome embed --ray: every actor is lost; rerun the same command to finish")
            # no actor working: a restart may wait for a CPU forever (a cluster with no room left)
            idle = None if self.running or self.nodes else RESTART_WAIT_S
            done, _ = ray.wait([*self.running, *self.readying], num_returns=1, timeout=idle)
            if not done:
                raise RuntimeError(
                    f"tome embed --ray: no actor could start again in {RESTART_WAIT_S} s (no node with a free "
                    "CPU?); the parts written are kept: rerun the same command to finish"
                )
            for ref in done:
                if ref in self.readying:
                    self._ready(ref, self.readying.pop(ref))
                else:
                    self._finished(ref, *self.running.pop(ref))

    def _hand_out(self) -> None:
        for index in list(self.nodes):
            while self.queue and self.load[index] < AHEAD:
                part = self.queue.popleft()
                ref = self.actors[index].embed_part.remote(*part)
                self.running[ref] = (index, part)
                self.load[index] += 1

    def _ready(self, ref, index: int) -> None:
        import ray

        try:
            found = ray.get(ref)
        except ray.exceptions.RayActorError as error:
            if not self.started:  # the first start failed: a node that cannot run the actor
                raise UserError(_start_error(error)) from None
            return  # a restart that failed for good: the other actors do its parts
        if "error" in found:
            raise UserError(found["error"])
        if not self.started:
            self.stats.ready_cpu = time.process_time()
        self.started = True
        self.nodes[index] = found["node"]

    def _finished(self, ref, index: int, part: tuple[int, list[Item]]) -> None:
        import ray

        self.load[index] -= 1
        try:
            result = ray.get(ref)
        except ray.exceptions.RayActorError:
            self._lost(index, part)
            return
        except ray.exceptions.RayTaskError as error:
            if isinstance(error.cause, PartWriteError):
                raise UserError(str(error.cause)) from None
            raise
        self.on_part(result)
        if self.tries[part[0]]:
            self.stats.recovered_at = time.perf_counter()

    def _lost(self, index: int, part: tuple[int, list[Item]]) -> None:
        """``part``'s actor died (its node lost): the part goes back in the queue, first; the
        actor is asked to start again (Ray restarts it on a node with room, if any)."""
        number = part[0]
        self.tries[number] += 1
        if self.tries[number] >= MAX_TRIES:
            raise RuntimeError(
                f"tome embed --ray: part {number} was lost {MAX_TRIES} times (its actors' nodes died); "
                "the parts written are kept: rerun the same command to finish"
            )
        self.stats.retried += 1
        if self.stats.lost_at is None:
            self.stats.lost_at = time.perf_counter()
        self.queue.appendleft(part)
        node = self.nodes.pop(index, None)
        if node is not None:
            # Named whether or not Ray lists the node as dead yet: Ray notices a lost node only
            # after missed heartbeats (seconds), the actor's death at once; and a worker killed on a
            # live node (out of memory) loses its parts the same way.
            if node not in self.stats.nodes_lost:
                self.stats.nodes_lost.append(node)
            if index not in self.readying.values():
                self.readying[self.actors[index].ready.remote(self.box)] = index


def _start_error(error: Exception) -> str:
    package = _missing_package(error)
    if package is not None:
        return (
            f"tome embed --ray: an actor could not start on a node: the Python package {package!r} is missing "
            "there; install the same packages (tome and the model's) on every node"
        )
    first = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
    return f"tome embed --ray: an actor could not start: {first}"


def run_ray(
    model,
    items: Sequence[Item],
    done: set[str],
    store: Store,
    stats: Stats,
    bar,
    *,
    batch: int,
    chunk: int,
    actors: int | None,
    threads: int | None,
    workers: int | None = None,
    on_chunk: Callable[[int], None] | None = None,
    log: Callable[[str], None] = lambda line: None,
) -> str:
    """Embed the ``items`` not in ``done`` on the Ray this process is connected to
    (:func:`start_ray`): actors write the parts into ``store``'s parts folder; ``stats`` and
    ``bar`` are updated as parts are written. Returns how it ran."""
    import ray

    kind = store.meta["kind"]
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    cpus = int(ray.cluster_resources().get("CPU", 0))
    count = actors or max(1, nodes)
    if count > max(1, cpus):
        log(f"tome: --ray-actors {count}: the cluster has {cpus} CPU(s); {max(1, cpus)} actor(s)")
        count = max(1, cpus)
    parts = plan_parts(items, done, chunk, store.next_part)
    shown = f"{store.out}.parts"
    remote = ray.remote(PartWriter).options(
        num_cpus=1, max_restarts=MAX_RESTARTS, max_task_retries=0, scheduling_strategy="SPREAD"
    )
    box = [ray.put(model)]  # once in the object store, fetched by each actor's node
    args = (kind, store.fs, store.parts, store.local, shown, store.meta, batch, threads, workers)
    pool = [remote.remote(*args) for _ in range(count)]
    offset = time.perf_counter() - time.time()
    firsts: list[tuple[float, int]] = []
    per_node: dict[str, list] = {}  # node -> [first row at, rows of its first batch, last row at, rows]

    def on_part(result: dict) -> None:
        stats.embedded += result["rows"]
        stats.skipped.extend(result["skipped"])
        stats.decode_s += result["decode_s"]
        stats.model_s += result["model_s"]
        stats.wait_s += result["wait_s"]
        if result["first_row_at"] is not None:
            firsts.append((result["first_row_at"] + offset, result["first_rows"]))
            stats.first_row_at, stats.first_rows = min(firsts)
            last = result["last_row_at"] + offset
            stats.last_row_at = max(stats.last_row_at or last, last)
            first = (result["first_row_at"] + offset, result["first_rows"])
            seen = per_node.setdefault(result["node"], [*first, last, 0])
            seen[:2] = min(seen[:2], list(first))
            seen[2] = max(seen[2], last)
            seen[3] += result["rows"]
            stats.steady_rate = sum((n - f) / (b - a) for a, f, b, n in per_node.values() if b > a)
        bar.update(result["rows"] + len(result["skipped"]))
        if on_chunk is not None:
            on_chunk(stats.embedded)

    try:
        _Driver(pool, box, parts, stats, bar, on_part).run()
    finally:
        for actor in pool:
            ray.kill(actor, no_restart=True)
    position = {item.key: i for i, item in enumerate(items)}
    stats.skipped.sort(key=lambda found: position.get(found[0], 0))
    lost = f"; lost {', '.join(stats.nodes_lost)}, {stats.retried} part(s) retried" if stats.retried else ""
    return f"Ray ({nodes} node(s), {cpus} CPUs), {count} actor(s) writing {len(parts)} part(s){lost}"
