"""graft-console's command line: its flags, their errors, and the script serving under waitress."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from console.main import build_parser, config_from_args, main
from tests.console.conftest import MODEL
from tests.ports import free_port


def test_flags_become_the_config(trained):
    args = build_parser().parse_args(["--repo", str(trained["repo"]), "--serve_url", "http://a:8501/",
                                      "--serve_url", "http://b:8501", "--auth_token_file", str(trained["token_file"]),
                                      "--eval_data", str(trained["eval_data"])])
    config = config_from_args(args)
    assert config.serve_urls == ("http://a:8501", "http://b:8501")
    assert config.auth_token_file == str(trained["token_file"]) and config.repo == trained["repo"]


@pytest.mark.parametrize("flags, message", [
    (["--repo", "/nonexistent/repo"], "--repo /nonexistent/repo: not a directory"),
    (["--serve_url", "graft:8501"], "must start with http:// or https://"),
    (["--auth_token_file", "/nonexistent/tokens"], "--auth_token_file /nonexistent/tokens: cannot read it"),
    (["--eval_data", "/nonexistent/eval"], "--eval_data /nonexistent/eval: not a directory"),
])
def test_bad_flags_exit_2_naming_the_flag(trained, capsys, flags, message):
    argv = flags if flags[0] == "--repo" else ["--repo", str(trained["repo"]), *flags]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_the_script_serves_the_console(trained, tmp_path):
    port = free_port()
    log = tmp_path / "console.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "console.main", "--repo", str(trained["repo"]),
                                    "--host", "127.0.0.1", "--port", str(port)], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                answer = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
                break
            except requests.ConnectionError:
                assert process.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
        assert answer.status_code == 200
        page = requests.get(f"http://127.0.0.1:{port}/models/{MODEL}", timeout=10)
        assert page.status_code == 200 and "read-only" in page.text
        assert page.headers["Server"] == "graft-console"
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert "read-only" in log.read_text()


def test_the_readme_command_line_names_only_real_flags():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = next(b for b in re.findall(r"```sh\n(.*?)```", readme, re.DOTALL) if "graft-console --repo" in b)
    shown = set(re.findall(r"--[a-z_]+", block))
    known = {option for action in build_parser()._actions for option in action.option_strings}
    assert shown and shown <= known, shown - known
    assert {"--repo", "--serve_url", "--host", "--port", "--auth_token_file"} <= shown
