"""Where this process stands in a multi-worker cluster: ``TF_CONFIG`` read without TensorFlow.

training.distributed builds MultiWorkerMirroredStrategy from it; graft-train's
argument checks read it too, so that ``--strategy multiworker`` without a
usable ``TF_CONFIG`` is refused before any image is read.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping

from training.errors import UsageError

TF_CONFIG_ENV = "TF_CONFIG"
FLAG = "--strategy"
# The task types that train; "evaluator" (a side job reading checkpoints) and
# "ps" (parameter servers) are other strategies' roles.
TRAINING_TASK_TYPES = ("chief", "worker")


@dataclasses.dataclass(frozen=True)
class Task:
    """This process's place in the ``TF_CONFIG`` cluster.

    ``position`` counts the chief first, then the workers (TensorFlow's input
    pipeline order); ``workers`` is the number of training tasks (chief included).
    """

    type: str
    index: int
    position: int
    workers: int
    cluster: Mapping[str, tuple[str, ...]]

    @property
    def is_chief(self) -> bool:
        """True for the one task that writes checkpoints and the export."""
        return self.type == "chief" or (self.type == "worker" and self.index == 0
                                         and "chief" not in self.cluster)

    def describe(self) -> dict:
        """JSON-ready summary (lineage and logs)."""
        return {"type": self.type, "index": self.index, "position": self.position,
                "workers": self.workers, "chief": self.is_chief}


def parse_tf_config(text: str | None) -> Task:
    """Parse a ``TF_CONFIG`` value into a :class:`Task`; a UsageError naming ``--strategy`` says what is wrong.

    Expects ``{"cluster": {"worker": ["host:port", ...], "chief"?: [...]},
    "task": {"type": "worker", "index": N}}``.
    """
    if not text or not text.strip():
        raise UsageError(FLAG, f"multiworker needs the {TF_CONFIG_ENV} environment variable "
                               '(e.g. {"cluster": {"worker": ["host0:2222", "host1:2222"]}, '
                               '"task": {"type": "worker", "index": 0}})')
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(FLAG, f"{TF_CONFIG_ENV} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise UsageError(FLAG, f"{TF_CONFIG_ENV} must be a JSON object with 'cluster' and 'task'")
    cluster, task = config.get("cluster"), config.get("task")
    if not isinstance(cluster, dict) or not cluster:
        raise UsageError(FLAG, f"{TF_CONFIG_ENV} has no 'cluster' object")
    if not isinstance(task, dict):
        raise UsageError(FLAG, f"{TF_CONFIG_ENV} has no 'task' object")
    jobs: dict[str, tuple[str, ...]] = {}
    for job, addresses in cluster.items():
        if not isinstance(addresses, list) or not addresses or not all(
                isinstance(a, str) and a for a in addresses):
            raise UsageError(FLAG, f"{TF_CONFIG_ENV} cluster.{job} must be a non-empty list of 'host:port' strings")
        jobs[job] = tuple(addresses)
    if len(jobs.get("chief", ())) > 1:
        raise UsageError(FLAG, f"{TF_CONFIG_ENV} lists {len(jobs['chief'])} chiefs; there can be one")
    if not any(job in jobs for job in TRAINING_TASK_TYPES):
        raise UsageError(FLAG, f"{TF_CONFIG_ENV} cluster has no 'worker' (or 'chief') job")
    task_type, index = task.get("type"), task.get("index", 0)
    if task_type not in TRAINING_TASK_TYPES:
        raise UsageError(FLAG, f"{TF_CONFIG_ENV} task type {task_type!r} does not train; "
                               f"expected one of {', '.join(TRAINING_TASK_TYPES)}")
    if isinstance(index, bool) or not isinstance(index, int):
        raise UsageError(FLAG, f"{TF_CONFIG_ENV} task index must be an integer, not {index!r}")
    members = jobs.get(task_type, ())
    if not 0 <= index < len(members):
        raise UsageError(FLAG, f"{TF_CONFIG_ENV} task {task_type}:{index} is not in the cluster "
                               f"({len(members)} {task_type} task(s) listed)")
    chiefs = len(jobs.get("chief", ()))
    position = index if task_type == "chief" else chiefs + index
    return Task(task_type, index, position, chiefs + len(jobs.get("worker", ())), jobs)


def read_task(environ: Mapping[str, str] | None = None) -> Task:
    """This process's :class:`Task`, from ``TF_CONFIG`` in ``environ`` (default: os.environ)."""
    return parse_tf_config((os.environ if environ is None else environ).get(TF_CONFIG_ENV))
