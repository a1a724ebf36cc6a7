"""The serving image's entrypoint (docker/serve-entrypoint.sh) and health check, without a Docker engine.

The script runs under POSIX sh exactly as the image's ENTRYPOINT runs it: first
with a stand-in graft-serve that prints the command line it was given (checked
against graft-serve's real parser), then with the real graft-serve serving a
model from ``$MODEL_BASE_PATH/$MODEL_NAME``, with the image's HEALTHCHECK
(``python -m serving.runtime.probe``) asking it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from serving.runtime import probe
from serving.runtime.main import config_from_args
from tests import models
from tests.deploy import (
    ROOT,
    dockerfile_stages,
    parser_for,
    run_entrypoint_script,
    stage_env,
)
from tests.ports import free_port

SCRIPT = ROOT / "docker" / "serve-entrypoint.sh"
IMAGE_ENV = {k: v for k, v in stage_env(dockerfile_stages()["serving"]).items() if k != "PATH"}


def _run(args: list[str], **env: str) -> tuple[list[str], str]:
    program, argv, stderr = run_entrypoint_script(SCRIPT, args, {**IMAGE_ENV, **env})
    assert program == "graft-serve"
    return argv, stderr


def _config(argv: list[str]):
    return config_from_args(parser_for("graft-serve").parse_args(argv))


def test_the_script_is_posix_sh_and_executable():
    text = SCRIPT.read_text()
    assert text.startswith("#!/bin/sh\n")
    assert os.access(SCRIPT, os.X_OK), "the image COPYs it --chmod=0755; keep it executable in git too"
    assert "[[" not in text and "local " not in text and "function " not in text   # no bashisms


def test_model_name_serves_from_models_as_tensorflow_serving_does():
    # docker run -e MODEL_NAME=pets -v .../pets:/models/pets graft-serving
    argv, _ = _run([], MODEL_NAME="pets")
    assert argv == ["--host=0.0.0.0", "--port=8500", "--rest_api_port=8501", "--model_name=pets",
                    "--model_base_path=/models/pets"]
    config = _config(argv)
    assert (config.model_name, config.model_base_path, config.port, config.rest_api_port, config.host) == (
        "pets", "/models/pets", 8500, 8501, "0.0.0.0")


def test_defaults_and_model_base_path():
    assert _config(_run([])[0]).model_base_path == "/models/model"   # tensorflow/serving's defaults
    argv, _ = _run([], MODEL_NAME="pets", MODEL_BASE_PATH="/srv/repo")
    assert _config(argv).model_base_path == "/srv/repo/pets"
    # Without the image's ENV (an entrypoint run elsewhere) the script has the same defaults.
    _, argv, _ = run_entrypoint_script(SCRIPT, [], {})
    assert _config(argv).model_base_path == "/models/model"


def test_arguments_after_the_image_are_appended_and_the_last_one_wins(tmp_path):
    argv, _ = _run(["--rest_api_port", "9000", "--enable_batching", "--xla_cpu_compilation_enabled=false",
                    "--model_config_file=/etc/graft/models.config", "--log_level", "a b"], MODEL_NAME="pets")
    assert argv[5:] == ["--rest_api_port", "9000", "--enable_batching", "--xla_cpu_compilation_enabled=false",
                        "--model_config_file=/etc/graft/models.config", "--log_level", "a b"]
    config = _config(argv)
    assert config.rest_api_port == 9000 and config.enable_batching is True
    assert config.model_config_file == "/etc/graft/models.config"   # it names the models, as in TF Serving
    assert config.log_level == "a b"                                 # one argument, spaces kept


@pytest.mark.parametrize("args, url, port", [
    ([], "http://127.0.0.1:8501/healthz", 8501),
    (["--rest_api_port=9000"], "http://127.0.0.1:9000/healthz", 9000),
    (["--rest_api_port", "9001", "--host", "10.1.2.3"], "http://10.1.2.3:9001/healthz", 9001),
    (["--rest_api_port=9002", "--rest_tls_cert=c.pem", "--rest_tls_key=k.pem"], "https://127.0.0.1:9002/healthz", 9002),
    (["--rest_api_port=0", "--port=7000"], None, 7000),   # REST off: the gRPC port
])
def test_the_health_check_follows_the_command_line_the_script_wrote(args, url, port, tmp_path):
    args_file = tmp_path / "graft-serve.args"
    argv, _ = _run(args, GRAFT_SERVE_ARGS_FILE=str(args_file))
    assert probe.read_args(args_file) == argv
    where = probe.target(probe.read_args(args_file))
    assert (where.url, where.port) == (url, port)


def test_no_args_file_means_the_images_defaults(tmp_path):
    assert probe.target(probe.read_args(tmp_path / "none")).url == "http://127.0.0.1:8501/healthz"


def test_an_unwritable_args_file_is_not_fatal(tmp_path):
    argv, stderr = _run([], GRAFT_SERVE_ARGS_FILE=str(tmp_path / "missing-dir" / "args"))
    assert argv[3] == "--model_name=model"
    assert "cannot write" in stderr and "8501" in stderr


def _wait_available(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    # The status answers 200 while the version still loads, too: wait for AVAILABLE.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200 and b'"AVAILABLE"' in answer.read():
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise TimeoutError(log.read_text())


def _probe(args_file: Path) -> int:
    env = {**os.environ, "GRAFT_SERVE_ARGS_FILE": str(args_file)}
    return subprocess.run([sys.executable, "-m", "serving.runtime.probe"], env=env, capture_output=True,
                          timeout=60, check=False).returncode


def test_the_entrypoint_serves_model_name_from_model_base_path_with_a_working_health_check(
        tmp_path, two_input_savedmodel):
    # docker run -e MODEL_NAME=two -v .../two:/models/two graft-serving --rest_api_port=P (REST moved)
    models.install_version(two_input_savedmodel, tmp_path / "models" / "two", 1)
    rest = free_port()
    args_file = tmp_path / "graft-serve.args"
    env = {**os.environ, **IMAGE_ENV, "MODEL_NAME": "two", "MODEL_BASE_PATH": str(tmp_path / "models"),
           "GRAFT_SERVE_ARGS_FILE": str(args_file),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["/bin/sh", str(SCRIPT), "--host=127.0.0.1", "--port=0", f"--rest_api_port={rest}"],
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_available(f"http://127.0.0.1:{rest}/v1/models/two", proc, log)
        assert _probe(args_file) == 0
        # The script became graft-serve (exec): the signal tini forwards reaches it, and it drains.
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "model two version 1: AVAILABLE" in log.read_text()
    assert _probe(args_file) == 1
