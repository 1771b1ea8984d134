"""``--strategy``: the ``tf.distribute`` strategy a training job runs under, and each worker's share.

``multi_worker`` is ``MultiWorkerMirroredStrategy`` over the cluster in ``TF_CONFIG`` (as
tf.distribute reads it). Every worker runs the same command; :func:`worker_of` says which
one this process is (the chief writes the outputs) and :func:`plan_input` how it reads
its share of a split: by file where there are at least as many files as workers, by data
otherwise, with every worker padded to the same number of steps.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Any

from kogpt2.dataset import ShardSet
from kogpt2.tf_setup import import_tf

tf = import_tf()
log = logging.getLogger(__name__)

DISTRIBUTION_STRATEGIES = ("auto", "mirrored", "default", "multi_worker")


def make_strategy(name: str = "auto") -> Any:
    """A ``tf.distribute`` strategy: ``auto`` mirrors over several GPUs, else the default one.

    ``mirrored`` mirrors over all visible GPUs, or over all logical CPU devices when there
    is no GPU (tests split the CPU into two logical devices). ``multi_worker`` reads the
    cluster from ``TF_CONFIG``; create it before any other TensorFlow work in the process.
    One instance of each is shared per process: two would clash in their collective-op keys.
    """
    if name not in DISTRIBUTION_STRATEGIES:
        raise ValueError(f"--strategy {name!r}: must be one of {', '.join(DISTRIBUTION_STRATEGIES)}")
    if name == "multi_worker":
        return _multi_worker()
    gpus = tf.config.list_logical_devices("GPU")
    if name == "default" or (name == "auto" and len(gpus) < 2):
        return tf.distribute.get_strategy()
    devices = gpus or tf.config.list_logical_devices("CPU")
    return _mirrored(tuple(d.name for d in devices))


@functools.cache
def _mirrored(devices: tuple[str, ...]) -> Any:
    return tf.distribute.MirroredStrategy(devices=list(devices))


@functools.cache
def _multi_worker() -> Any:
    raw = os.environ.get("TF_CONFIG", "")
    try:
        cluster = json.loads(raw)["cluster"] if raw else None
    except (ValueError, KeyError, TypeError):
        raise ValueError(
            f"--strategy multi_worker: TF_CONFIG is not valid JSON with a 'cluster': {raw[:200]!r}"
        ) from None
    if not cluster:
        raise ValueError(
            "--strategy multi_worker: TF_CONFIG is not set; every worker needs it "
            '({"cluster": {"worker": ["host1:port", "host2:port"]}, "task": {"type": "worker", "index": N}}), '
            "as Vertex AI and the Kubeflow TFJob operator set it"
        )
    return tf.distribute.MultiWorkerMirroredStrategy()


@dataclass(frozen=True)
class Worker:
    """This process in its cluster.

    Attributes:
        count: workers in the cluster (1 without ``TF_CONFIG``).
        index: this worker, 0-based (a ``chief`` task first, then ``worker`` tasks).
        chief: whether this worker writes the outputs.
        replicas: replicas on this worker (devices).
    """

    count: int
    index: int
    chief: bool
    replicas: int


def worker_of(strategy: Any) -> Worker:
    """Which worker this process is (chief: ``chief`` task, else ``worker`` 0)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    task_type = getattr(resolver, "task_type", None)
    if resolver is None or not task_type:
        return Worker(1, 0, True, int(strategy.num_replicas_in_sync))
    spec = resolver.cluster_spec().as_dict()
    chiefs = len(spec.get("chief", []))
    count = chiefs + len(spec.get("worker", []))
    task_id = int(resolver.task_id or 0)
    index = task_id if task_type == "chief" else chiefs + task_id
    chief = task_type == "chief" or (task_type == "worker" and task_id == 0 and not chiefs)
    return Worker(count, index, chief, max(1, int(strategy.num_replicas_in_sync) // max(1, count)))


@dataclass(frozen=True)
class InputPlan:
    """How one worker reads a split: per-replica batch, sharding, steps per pass (all workers alike)."""

    per_replica_batch: int
    shard_by: str
    steps: int
    batches_per_worker: int


def _count_records(path: str) -> int:
    ds = tf.data.TFRecordDataset(path, compression_type="GZIP")
    return int(ds.reduce(tf.constant(0, tf.int64), lambda n, _: n + 1).numpy())


def plan_input(
    shards: ShardSet, split: str, global_batch: int, worker: Worker, *, flag: str = "--batch-size"
) -> InputPlan:
    """Share ``split`` among the workers: by file when there are at least as many files as workers
    (the examples per file are counted, so every worker runs the same number of steps), else by
    data. Stated in the log.

    Raises:
        ValueError: the global batch is not a multiple of the replicas.
    """
    replicas = worker.count * worker.replicas
    if global_batch % replicas:
        raise ValueError(f"{flag} {global_batch}: must be a multiple of the {replicas} replicas of the cluster")
    per_replica = global_batch // replicas
    files = shards.files(split)
    n = shards.num_examples(split)
    if worker.count > 1 and len(files) >= worker.count:
        shard_by = "file"
        sizes = [sum(_count_records(f) for f in files[i :: worker.count]) for i in range(worker.count)]
    else:
        shard_by = "data"
        sizes = [len(range(i, n, worker.count)) for i in range(worker.count)]
    batches = max(math.ceil(size / per_replica) for size in sizes)
    steps = math.ceil(batches / worker.replicas)
    if worker.count > 1:
        log.info(
            "%s: worker %d of %d reads its share by %s (%d files, %d examples; shares %s), %d steps of %d x %d",
            split, worker.index, worker.count, shard_by, len(files), n, sizes, steps, replicas, per_replica,
        )  # fmt: skip
    return InputPlan(per_replica, shard_by, steps, steps * worker.replicas)
