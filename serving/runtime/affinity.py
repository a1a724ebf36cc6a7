"""CPU affinity: TensorFlow's compute threads on CPUs of their own, every other thread on the rest.

On a small CPU node the model's compute thread shares the cores with the request
threads (the REST and gRPC event loops, worker threads) and the kernel moves
it between them and time-slices it whenever more threads are runnable than there
are cores. ``--tensorflow_cpus N`` gives TensorFlow's threads the last N CPUs this
process may run on and everything else the remaining ones, so neither side
preempts the other (docs/benchmarks.md has the measured gain).

The other threads also move to the ``SCHED_BATCH`` policy (TensorFlow's stay
``SCHED_OTHER``). On their shared CPUs a thread that wakes, such as the batch
thread when the model returns or a gRPC poller with a new call, would otherwise
preempt the running one, and the running one usually holds the GIL that the
woken one needs next. Under ``SCHED_BATCH`` a woken thread waits for the
running one to block or use up its slice, which cuts involuntary context
switches and server CPU per image (docs/benchmarks.md). Any process may move its own threads to this policy; it
needs no privilege.

Linux only (threads are found in ``/proc/self/task`` and pinned one by one with
``sched_setaffinity``, which takes a thread id there). TensorFlow names its pool
threads ``tf_*``; they exist once its runtime has started, so :func:`pin_threads`
runs after that, and threads started later inherit the mask of the thread that
starts them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

log = logging.getLogger(__name__)

TASKS = Path("/proc/self/task")
# Thread names (comm) of TensorFlow's runtime threads: tf_Compute (the op pools),
# tf_graph_runner, and the tf_-prefixed threads of its other pools.
TENSORFLOW_THREAD_PREFIX = "tf_"


@dataclass(frozen=True)
class CpuSplit:
    """Which CPUs TensorFlow's threads get and which every other thread gets."""

    tensorflow: frozenset[int]
    others: frozenset[int]


def split_cpus(count: int, allowed: set[int] | frozenset[int] | None = None) -> CpuSplit:
    """Reserve the last ``count`` of the ``allowed`` CPUs (default: this process's) for TensorFlow.

    Raises ``ValueError`` naming the flag when that leaves no CPU for the other
    threads, or on a platform without per-thread affinity.
    """
    if not hasattr(os, "sched_getaffinity") or not TASKS.is_dir():
        raise ValueError("--tensorflow_cpus needs Linux (sched_setaffinity and /proc/self/task)")
    cpus = sorted(allowed if allowed is not None else os.sched_getaffinity(0))
    if count < 1:
        raise ValueError(f"--tensorflow_cpus must be at least 1, got {count}")
    if count >= len(cpus):
        raise ValueError(f"--tensorflow_cpus {count} leaves no CPU for the request threads: "
                         f"this process may run on {len(cpus)} CPU(s) ({_cpu_list(cpus)})")
    return CpuSplit(tensorflow=frozenset(cpus[-count:]), others=frozenset(cpus[:-count]))


class Pinned(NamedTuple):
    """What :func:`pin_threads` did: threads pinned on each side, and whether SCHED_BATCH took."""

    tensorflow: int
    others: int
    sched_batch: bool


def pin_threads(split: CpuSplit) -> Pinned:
    """Pin every thread of this process by its name; returns what it pinned.

    TensorFlow's threads go to ``split.tensorflow`` under ``SCHED_OTHER``, the
    others to ``split.others`` under ``SCHED_BATCH``. That includes the calling
    thread, so the threads it starts afterwards inherit its CPUs and policy.
    The policy is best effort: where a sandbox refuses it, the threads are
    pinned all the same and a warning says so.
    """
    pinned = {True: 0, False: 0}
    refused: OSError | None = None
    for task in TASKS.iterdir():
        try:
            name = (task / "comm").read_text().strip()
            is_tensorflow = name.startswith(TENSORFLOW_THREAD_PREFIX)
            tid = int(task.name)
            os.sched_setaffinity(tid, split.tensorflow if is_tensorflow else split.others)
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread ended meanwhile
        pinned[is_tensorflow] += 1
        if refused is None:
            try:
                os.sched_setscheduler(tid, os.SCHED_OTHER if is_tensorflow else os.SCHED_BATCH,
                                      os.sched_param(0))
            except ProcessLookupError:
                pass  # the thread ended meanwhile
            except PermissionError as exc:
                refused = exc
    if refused is not None:
        log.warning("--tensorflow_cpus: threads pinned, but the SCHED_BATCH policy was refused (%s); "
                    "woken request threads may preempt the one holding the GIL", refused)
    return Pinned(pinned[True], pinned[False], refused is None)


def start_runtime_and_pin(split: CpuSplit) -> None:
    """Start TensorFlow's runtime (its thread pools), then pin every thread of the process."""
    # TensorFlow (heavy): split_cpus and the pinning stay testable without it.
    import tensorflow as tf

    # The eager context creates its thread pools on the first op; pinning before
    # that would leave them on the caller's CPUs.
    tf.constant(0)
    pinned = pin_threads(split)
    if pinned.tensorflow == 0:
        log.warning("--tensorflow_cpus: found no TensorFlow thread (named %s*) to pin", TENSORFLOW_THREAD_PREFIX)
    log.info("TensorFlow threads (%d) on CPUs %s; the other threads (%d, and those started later) on CPUs %s%s",
             pinned.tensorflow, _cpu_list(split.tensorflow), pinned.others, _cpu_list(split.others),
             ", under SCHED_BATCH" if pinned.sched_batch else "")


def _cpu_list(cpus) -> str:
    return ",".join(str(c) for c in sorted(cpus))
