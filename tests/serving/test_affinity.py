"""--tensorflow_cpus: how the CPUs are split, and the refusals that name the flag.

The pinning of a real graft-serve process's threads is checked in test_perf_wiring,
whose server runs with the flag.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from serving.runtime.affinity import split_cpus
from serving.runtime.main import main
from tests.ports import free_port


def test_tensorflow_gets_the_last_cpus_and_the_other_threads_the_rest():
    split = split_cpus(1, {0, 1})
    assert (split.tensorflow, split.others) == ({1}, {0})
    # A container's cpuset need not start at 0 nor be contiguous.
    split = split_cpus(2, {7, 3, 12, 5})
    assert (split.tensorflow, split.others) == ({7, 12}, {3, 5})


def test_the_default_is_this_process_cpus():
    allowed = os.sched_getaffinity(0)
    if len(allowed) < 2:
        pytest.skip("needs two CPUs")
    split = split_cpus(1)
    assert split.tensorflow | split.others == allowed and len(split.tensorflow) == 1


@pytest.mark.parametrize("count, message", [
    (2, "--tensorflow_cpus 2 leaves no CPU for the request threads: this process may run on 2 CPU(s) (0,1)"),
    (5, "--tensorflow_cpus 5 leaves no CPU"),
    (0, "--tensorflow_cpus must be at least 1, got 0"),
    (-1, "--tensorflow_cpus must be at least 1, got -1"),
])
def test_a_split_that_leaves_a_side_empty_is_refused(count, message):
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        split_cpus(count, {0, 1})


def test_graft_serve_refuses_all_cpus_for_tensorflow_and_exits_1(tmp_path, caplog):
    cpus = len(os.sched_getaffinity(0))
    assert main(["--model_base_path", str(tmp_path), "--port", "0", "--rest_api_port", str(free_port()),
                 "--host", "127.0.0.1", "--tensorflow_cpus", str(cpus)]) == 1
    assert f"--tensorflow_cpus {cpus} leaves no CPU for the request threads" in caplog.text


# pin_threads pins the whole calling process: run it in a child, never in pytest's own.
_PIN_CHILD = """
import json, os, threading
from serving.runtime.affinity import pin_threads, split_cpus
if {refuse}:
    def refuse(*args):
        raise PermissionError(1, "Operation not permitted")
    os.sched_setscheduler = refuse    # a sandbox whose seccomp profile refuses the call
before = threading.Thread(target=threading.Event().wait, args=(30,), daemon=True)
before.start()
pinned = pin_threads(split_cpus(1))
seen = []
later = threading.Thread(target=lambda: seen.append((sorted(os.sched_getaffinity(0)), os.sched_getscheduler(0))))
later.start(); later.join()
print(json.dumps({{"pinned": list(pinned), "main": [sorted(os.sched_getaffinity(0)), os.sched_getscheduler(0)],
                  "before": [sorted(os.sched_getaffinity(before.native_id)), os.sched_getscheduler(before.native_id)],
                  "later": list(seen[0])}}))
"""


def _pin_in_child(refuse: bool) -> tuple[dict, str]:
    out = subprocess.run([sys.executable, "-c", _PIN_CHILD.format(refuse=refuse)], capture_output=True,
                         text=True, timeout=60, check=True, cwd=Path(__file__).resolve().parents[2])
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_pinned_request_threads_run_sched_batch_and_threads_started_later_inherit_it():
    others = sorted(os.sched_getaffinity(0))[:-1]
    result, log = _pin_in_child(refuse=False)
    assert "refused" not in log
    # No TensorFlow in the child: every thread is a request-side thread.
    assert result["pinned"] == [0, result["pinned"][1], True] and result["pinned"][1] >= 2
    for thread in ("main", "before", "later"):
        assert result[thread] == [others, os.SCHED_BATCH], (thread, result)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_a_refused_policy_still_pins_the_threads():
    others = sorted(os.sched_getaffinity(0))[:-1]
    result, log = _pin_in_child(refuse=True)
    assert result["pinned"][2] is False
    assert "threads pinned, but the SCHED_BATCH policy was refused" in log
    for thread in ("main", "before", "later"):
        assert result[thread] == [others, os.SCHED_OTHER], (thread, result)
