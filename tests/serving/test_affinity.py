"""--tensorflow_cpus: how the CPUs are split, and the refusals that name the flag.

The pinning of a real graft-serve process's threads is checked in test_perf_wiring,
whose server runs with the flag.
"""

from __future__ import annotations

import os

import pytest

from serving.affinity import split_cpus
from serving.main import main
from tests.serving.server import free_port


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
