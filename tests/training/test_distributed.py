"""Tests for training.distributed: TF_CONFIG, chief-only writes, and two real workers training together."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.ports import free_ports
from tests.training.conftest import make_image_folder
from training import cli, cluster, distributed

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
WORKER_SCRIPT = HERE / "multiworker_worker.py"
# Both workers share 2 cores with the rest of the suite: generous, but bounded.
WORKERS_TIMEOUT = 240


def tf_config(ports, task_type="worker", index=0, chief_port=None) -> str:
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    if chief_port is not None:
        cluster["chief"] = [f"127.0.0.1:{chief_port}"]
    return json.dumps({"cluster": cluster, "task": {"type": task_type, "index": index}})


# -- TF_CONFIG --------------------------------------------------------------

def test_worker_zero_is_the_chief_when_there_is_no_chief_task():
    first = cluster.parse_tf_config(tf_config([1, 2, 3], index=0))
    third = cluster.parse_tf_config(tf_config([1, 2, 3], index=2))
    assert (first.is_chief, first.position, first.workers) == (True, 0, 3)
    assert (third.is_chief, third.position, third.workers) == (False, 2, 3)
    assert third.describe() == {"type": "worker", "index": 2, "position": 2, "workers": 3, "chief": False}


def test_a_chief_task_is_the_chief_and_counts_first():
    chief = cluster.parse_tf_config(tf_config([1, 2], task_type="chief", index=0, chief_port=9))
    worker = cluster.parse_tf_config(tf_config([1, 2], index=0, chief_port=9))
    assert (chief.is_chief, chief.position, chief.workers) == (True, 0, 3)
    # Worker 0 is not the chief when a chief task exists; it reads the second shard.
    assert (worker.is_chief, worker.position) == (False, 1)


@pytest.mark.parametrize(("text", "message"), [
    (None, "needs the TF_CONFIG"),
    ("", "needs the TF_CONFIG"),
    ("{not json", "not valid JSON"),
    ("[]", "JSON object"),
    ('{"task": {"type": "worker", "index": 0}}', "no 'cluster'"),
    ('{"cluster": {"worker": ["a:1"]}}', "no 'task'"),
    ('{"cluster": {"worker": []}, "task": {"type": "worker", "index": 0}}', "non-empty list"),
    ('{"cluster": {"ps": ["a:1"]}, "task": {"type": "ps", "index": 0}}', "no 'worker'"),
    ('{"cluster": {"worker": ["a:1"], "evaluator": ["b:1"]}, "task": {"type": "evaluator", "index": 0}}',
     "does not train"),
    ('{"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 2}}', "not in the cluster"),
    ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": "0"}}', "must be an integer"),
    ('{"cluster": {"worker": ["a:1"], "chief": ["b:1", "c:1"]}, "task": {"type": "chief", "index": 0}}',
     "2 chiefs"),
])
def test_bad_tf_config_is_a_clear_value_error(text, message):
    with pytest.raises(ValueError, match=message):
        cluster.parse_tf_config(text)


def test_read_task_uses_the_given_environment():
    task = cluster.read_task({"TF_CONFIG": tf_config([5, 6], index=1)})
    assert (task.type, task.index, task.is_chief) == ("worker", 1, False)
    with pytest.raises(ValueError, match="TF_CONFIG"):
        cluster.read_task({})


# -- who writes where ---------------------------------------------------------

def test_only_the_chief_writes_to_the_given_directory(tmp_path):
    chief = cluster.parse_tf_config(tf_config([1, 2], index=0))
    other = cluster.parse_tf_config(tf_config([1, 2], index=1))
    with distributed.write_dir(tmp_path / "ckpt", chief, "graft-ckpt-") as path:
        assert path == tmp_path / "ckpt"
        (path / "a.h5").write_text("x")
    with distributed.write_dir(tmp_path / "ckpt", other, "graft-ckpt-") as scratch:
        assert tmp_path not in scratch.parents and scratch.name.startswith("graft-ckpt-worker-1-")
        (scratch / "a.h5").write_text("y")
    with pytest.raises(RuntimeError), distributed.write_dir(None, chief, "graft-ckpt-") as chief_scratch:
        (chief_scratch / "b.h5").write_text("z")
        raise RuntimeError("a failed phase")
    # The chief's file is kept and untouched; the temporary directories are gone, even after an error.
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["a.h5"]
    assert (tmp_path / "ckpt" / "a.h5").read_text() == "x"
    assert not scratch.exists() and not chief_scratch.exists()


# -- the command line -----------------------------------------------------------

def test_graft_train_fit_accepts_multiworker():
    args = cli.build_parser().parse_args(
        ["fit", "--data", "d", "--repo", "r", "--model-name", "m", "--strategy", "multiworker"])
    assert args.strategy == "multiworker"


def test_multiworker_without_tf_config_exits_2_naming_it(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    data = make_image_folder(tmp_path / "images", {"a": 4, "b": 4}, size=(32, 32))
    code = cli.main(["fit", "--data", data, "--repo", str(tmp_path / "repo"), "--model-name", "m",
                     "--base", "resnet50", "--weights", "none", "--image-size", "32", "--scenario", "1",
                     "--strategy", "multiworker"])
    assert code == 2
    assert "TF_CONFIG" in capsys.readouterr().err
    assert not (tmp_path / "repo" / "m").exists() or not any((tmp_path / "repo" / "m").iterdir())


# -- two real workers -------------------------------------------------------------

def run_workers(commands, envs, logs, timeout=WORKERS_TIMEOUT) -> None:
    """Start one process per command, wait for all; on a failure or the timeout kill the rest and fail."""
    processes = []
    try:
        for command, env, log in zip(commands, envs, logs):
            with open(log, "wb") as handle:
                processes.append(subprocess.Popen(command, env=env, cwd=ROOT, stdout=handle,
                                                  stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in processes):
            failed = [p for p in processes if p.poll() not in (None, 0)]
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait()
    codes = [p.returncode for p in processes]
    if codes != [0] * len(processes):
        tails = "\n".join(f"--- {log} (exit {code}) ---\n" + Path(log).read_text(errors="replace")[-3000:]
                          for log, code in zip(logs, codes))
        pytest.fail(f"workers exited {codes}\n{tails}")


def worker_env(config: str, scratch: Path) -> dict:
    scratch.mkdir()
    env = dict(os.environ, TF_CONFIG=config, TMPDIR=str(scratch), TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return env


@pytest.mark.slow
def test_two_workers_train_in_sync_and_only_the_chief_exports(tmp_path):
    data = make_image_folder(tmp_path / "images", {"a": 12, "b": 12, "c": 12}, size=(32, 32))
    repo, out = tmp_path / "repo", tmp_path / "out"
    out.mkdir()
    ports = free_ports(2)
    commands, envs, logs = [], [], []
    for index in range(2):
        commands.append([sys.executable, str(WORKER_SCRIPT), "--data", data, "--repo", str(repo),
                         "--out", str(out),
                         # Separate on purpose (a real cluster shares one): shows who wrote.
                         "--checkpoint-dir", str(tmp_path / f"ckpt-{index}")])
        envs.append(worker_env(tf_config(ports, index=index), tmp_path / f"scratch-{index}"))
        logs.append(tmp_path / f"worker-{index}.log")
    run_workers(commands, envs, logs)

    reports = [json.loads((out / f"worker-{i}.json").read_text()) for i in range(2)]
    dumps = [dict(np.load(out / f"worker-{i}.npz")) for i in range(2)]
    assert [r["task"]["chief"] for r in reports] == [True, False]

    # The loss decreases: the head on cached features, then the whole run.
    history = reports[0]["history"]
    assert list(history) == ["head", "fine-tune"]
    head_loss = history["head"]["loss"]
    assert len(head_loss) == 4 and head_loss[-1] < 0.8 * head_loss[0], head_loss
    assert history["fine-tune"]["loss"][-1] < head_loss[0]
    # Step results and validation are all-reduced: both workers saw the same numbers.
    assert reports[1]["history"] == history

    # The workers' variables are identical, bit for bit, and so are their predictions.
    after = sorted(k for k in dumps[0] if k.startswith("after/"))
    assert len(after) > 20 and sorted(k for k in dumps[1] if k.startswith("after/")) == after
    for key in after:
        assert np.array_equal(dumps[0][key], dumps[1][key]), key
    np.testing.assert_array_equal(dumps[0]["probe_scores"], dumps[1]["probe_scores"])
    digests = {r["metrics"]["distribution"]["weights_digest"] for r in reports}
    assert len(digests) == 1

    # BN stays frozen in the fine-tune phase; the other trunk layers trained.
    bn = reports[0]["bn_weights"]
    assert any(name.endswith("moving_mean") for name in bn)
    for name in bn:
        np.testing.assert_array_equal(dumps[0][f"before/{name}"], dumps[0][f"after/{name}"], err_msg=name)
    kernels = [k[len("before/"):] for k in dumps[0] if k.startswith("before/") and k.endswith("kernel")]
    assert kernels and all(not np.array_equal(dumps[0][f"before/{k}"], dumps[0][f"after/{k}"]) for k in kernels)

    # Exactly one version, written by the chief; the other worker's export went to a removed temp dir.
    model_dir = repo / "tiny"
    assert sorted(p.name for p in model_dir.iterdir() if not p.name.startswith(".graft-publish")) == ["1"]
    assert reports[0]["export"] == str(model_dir / "1") and reports[1]["export"] is None
    # Checkpoints: the chief's in its directory, none from the other worker.
    assert sorted(p.name for p in (tmp_path / "ckpt-0").iterdir()) == ["00-head.weights.h5",
                                                                      "01-fine-tune.weights.h5"]
    assert not (tmp_path / "ckpt-1").exists() or not any((tmp_path / "ckpt-1").iterdir())
    for index in range(2):
        assert list((tmp_path / f"scratch-{index}").iterdir()) == [], f"worker {index} left temp files"

    # The export holds the trained weights: it scores as the workers' model did.
    import tensorflow as tf

    loaded = tf.saved_model.load(str(model_dir / "1"))
    served = loaded.signatures["serving_default"](images=tf.constant(dumps[0]["probe_images"]))
    np.testing.assert_allclose(served["scores"].numpy(), dumps[0]["probe_scores"], rtol=1e-5, atol=1e-6)
    lineage = json.loads((model_dir / "1" / "assets.extra" / "graft.json").read_text())
    assert lineage["scenario"]["name"] == "fine-tune"


@pytest.mark.slow
def test_graft_train_fit_multiworker_on_two_workers(tmp_path):
    """The command line k8s runs: both workers exit 0, the chief alone exports and reports."""
    data = make_image_folder(tmp_path / "images", {"a": 12, "b": 12, "c": 12}, size=(32, 32))
    repo, run_dir = tmp_path / "repo", tmp_path / "run"
    ports = free_ports(2)
    commands, envs, logs = [], [], []
    for index in range(2):
        commands.append([sys.executable, "-m", "training.cli", "fit", "--data", data, "--repo", str(repo),
                         "--model-name", "m", "--run-dir", str(run_dir), "--base", "resnet50",
                         # Scenario 1: the loop itself is the other test's subject; this one checks the wiring.
                         "--weights", "none", "--image-size", "32", "--scenario", "1",
                         "--cut-layer", "conv2_block3_out", "--head-epochs", "2",
                         "--batch-size", "8", "--no-augment", "--strategy", "multiworker"])
        envs.append(worker_env(tf_config(ports, index=index), tmp_path / f"scratch-{index}"))
        logs.append(tmp_path / f"cli-{index}.log")
    run_workers(commands, envs, logs)

    chief_log, other_log = (Path(log).read_text() for log in logs)
    version = repo / "m" / "1"
    assert sorted(p.name for p in (repo / "m").iterdir() if not p.name.startswith(".graft-publish")) == ["1"]
    assert chief_log.rstrip().splitlines()[-1] == str(version)
    assert (run_dir / "report.json").is_file()
    lineage = json.loads((version / "assets.extra" / "graft.json").read_text())
    distribution = lineage["metrics"]["distribution"]
    assert distribution["workers"] == 2 and distribution["task"]["chief"] is True
    assert lineage["hyper_parameters"]["strategy"] == "multiworker"
    # LP-FT, the default: the head started as the probe on both workers' features, and the
    # exported model is not below it on the all-reduced validation.
    metrics = lineage["metrics"]
    assert metrics["lp_init"] and metrics["probe"]["train_features"] == metrics["train_images"]
    assert metrics["val_accuracy"] >= metrics["probe"]["val_accuracy"] - 1e-9
    assert "validation accuracy: linear probe" in chief_log
    # The other worker trained the same weights and left the export to the chief.
    assert f"not the chief: the chief exports, evaluates and reports (weights digest " \
           f"{distribution['weights_digest']})" in other_log
    assert str(version) not in other_log
    for index in range(2):
        assert list((tmp_path / f"scratch-{index}").iterdir()) == [], f"worker {index} left temp files"
