"""Helpers shared by the deployment tests: render kustomizations, read the Dockerfile,
find every graft-serve / graft-train command line the images and manifests run, and
check it against the real argument parsers. An image whose entrypoint is a script
(the serving image's ``docker/serve-entrypoint.sh``) is resolved by running that
script with a stand-in program that prints the command line it was given.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import io
import json
import re
import shlex
import shutil
import subprocess
import tempfile
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
DOCKERFILE = ROOT / "Dockerfile"

# Everything the tests render, relative to k8s/.
KUSTOMIZATIONS = ("overlays/cpu", "overlays/gpu", "jobs/train", "jobs/multiworker", "examples")

# The programs the images ship, and the module holding each one's parser.
PROGRAMS = {"graft-serve": "serving.runtime.main", "graft-train": "training.cli", "graft-console": "console.main"}

# Image repository name (as in the manifests) -> Dockerfile target.
IMAGE_TARGETS = {"graft-serving": "serving", "graft-training": "training", "graft-console": "console"}


def kubectl() -> str:
    """Path of kubectl; fails (not skips) when it is missing, since CI's image has it."""
    path = shutil.which("kubectl")
    if path is None:
        pytest.fail("kubectl (with its built-in kustomize) is not on PATH; the deployment tests need it "
                    "to render k8s/ (install kubectl >= 1.27)")
    return path


@functools.lru_cache(maxsize=None)
def _render_text(relative: str) -> str:
    result = subprocess.run([kubectl(), "kustomize", str(K8S / relative)],
                            capture_output=True, text=True, timeout=60, check=False)
    if result.returncode != 0:
        pytest.fail(f"kubectl kustomize k8s/{relative} failed:\n{result.stderr}")
    return result.stdout


def render(relative: str) -> list[dict]:
    """The objects ``kubectl kustomize k8s/<relative>`` renders (a fresh copy each call)."""
    return [obj for obj in yaml.safe_load_all(_render_text(relative)) if obj]


def render_all() -> list[dict]:
    """Every object of every kustomization under test (the overlays share names)."""
    return [obj for relative in KUSTOMIZATIONS for obj in render(relative)]


def all_invocations(stages: dict[str, Stage]) -> list[Invocation]:
    """Graft command lines of every kustomization, each resolved with the cpu stack as context."""
    context = render("overlays/cpu")
    found = []
    for relative in KUSTOMIZATIONS:
        for invocation in manifest_invocations(render(relative), stages, context):
            invocation.where = f"k8s/{relative}: {invocation.where}"
            found.append(invocation)
    return found


def find(objects: list[dict], kind: str, name: str | None = None) -> list[dict]:
    """Objects of ``kind`` (and ``name``, when given)."""
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    """The single object of ``kind`` (and ``name``); fails unless there is exactly one."""
    found = find(objects, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_spec(obj: dict) -> dict | None:
    """The pod spec inside a workload object, or None for other kinds."""
    spec = obj.get("spec", {})
    if obj["kind"] == "CronJob":
        return spec["jobTemplate"]["spec"]["template"]["spec"]
    if obj["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
        return spec["template"]["spec"]
    if obj["kind"] == "TFJob":
        return next(iter(spec["tfReplicaSpecs"].values()))["template"]["spec"]
    return None


def container(obj: dict, name: str) -> dict:
    """The container called ``name`` in a workload object."""
    matches = [c for c in pod_spec(obj)["containers"] if c["name"] == name]
    assert len(matches) == 1, f"{obj['kind']}/{obj['metadata']['name']} has no single container {name!r}"
    return matches[0]


# -- Dockerfile ---------------------------------------------------------------------------

@dataclass
class Instruction:
    """One Dockerfile instruction: its keyword, raw argument text and line number."""

    keyword: str
    value: str
    line: int


@dataclass
class Stage:
    """One build stage: the FROM image, its name and its instructions."""

    base: str
    name: str | None
    instructions: list[Instruction]

    def last(self, keyword: str) -> Instruction | None:
        """The stage's last instruction with ``keyword`` (the one that takes effect)."""
        found = [i for i in self.instructions if i.keyword == keyword]
        return found[-1] if found else None


def dockerfile_instructions(text: str) -> list[Instruction]:
    """Instructions in order, continuation lines joined and comments dropped."""
    result: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction are dropped by Docker too
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1])
            continue
        pending.append(stripped)
        joined = " ".join(part.strip() for part in pending if part.strip())
        keyword, _, value = joined.partition(" ")
        result.append(Instruction(keyword.upper(), value.strip(), start))
        pending = []
    return result


def dockerfile_stages(path: Path = DOCKERFILE) -> dict[str, Stage]:
    """Stages by name (unnamed stages by their index)."""
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for instruction in dockerfile_instructions(path.read_text()):
        if instruction.keyword == "FROM":
            words = [w for w in instruction.value.split() if not w.startswith("--")]
            name = words[2] if len(words) >= 3 and words[1].lower() == "as" else None
            current = Stage(words[0], name, [])
            stages[name or str(len(stages))] = current
        elif current is not None:
            current.instructions.append(instruction)
    return stages


def stage_env(stage: Stage) -> dict[str, str]:
    """The variables the stage's own ENV instructions set, as written (``$PATH`` not expanded)."""
    env: dict[str, str] = {}
    for instruction in stage.instructions:
        if instruction.keyword == "ENV":
            for word in shlex.split(instruction.value):
                key, _, value = word.partition("=")
                env[key] = value
    return env


def copied_file(stage: Stage, path: str) -> Path | None:
    """The build-context file that a COPY of ``stage`` puts at ``path`` (None when none does)."""
    for instruction in stage.instructions:
        if instruction.keyword == "COPY" and "--from" not in instruction.value:
            words = [w for w in instruction.value.split() if not w.startswith("--")]
            if words[-1] == path:
                return ROOT / words[0]
    return None


# Stands in for graft-serve and graft-train: prints its own name and arguments, NUL-separated.
_STAND_IN = '#!/bin/sh\nprintf \'%s\\0\' "$(basename "$0")" "$@"\n'


def run_entrypoint_script(script: Path, args: list[str], env: Mapping[str, str]) -> tuple[str, list[str], str]:
    """Run an image's entrypoint script under POSIX sh with stand-ins for the programs on PATH.

    Returns the program it ran, the arguments it gave it, and what the script wrote to stderr.
    The script's ``$GRAFT_SERVE_ARGS_FILE`` goes to a temporary directory unless ``env`` names one.
    """
    with tempfile.TemporaryDirectory() as stand_ins:
        for program in PROGRAMS:
            path = Path(stand_ins) / program
            path.write_text(_STAND_IN)
            path.chmod(0o755)
        environment = {"GRAFT_SERVE_ARGS_FILE": f"{stand_ins}/graft-serve.args", **env,
                       "PATH": f"{stand_ins}:/usr/bin:/bin"}
        result = subprocess.run(["/bin/sh", str(script), *args], env=environment, capture_output=True,
                                timeout=30, check=False)
    assert result.returncode == 0, f"{script} failed: {result.stderr.decode()}"
    program, *argv = [part.decode() for part in result.stdout.split(b"\0")[:-1]]
    return program, argv, result.stderr.decode()


def image_command(stage: Stage, args: list[str] | None, env: Mapping[str, str]) -> list[str]:
    """The command a container of ``stage`` runs with ``args`` (None: the image's CMD) and ``env``.

    An entrypoint script copied into the image is run (``run_entrypoint_script``) with
    the image's ENV under ``env``: the result is the Graft program's own command line.
    """
    entrypoint = exec_form(stage.last("ENTRYPOINT")) or []
    argv = args if args is not None else exec_form(stage.last("CMD")) or []
    script = copied_file(stage, entrypoint[-1]) if entrypoint else None
    if script is None:
        return entrypoint + argv
    program, arguments, _ = run_entrypoint_script(script, argv, {**stage_env(stage), **env})
    return [*entrypoint[:-1], program, *arguments]


def exec_form(instruction: Instruction | None) -> list[str] | None:
    """The JSON array of an exec-form ENTRYPOINT/CMD, or None (absent or shell form)."""
    if instruction is None:
        return None
    try:
        value = json.loads(instruction.value)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


def console_scripts() -> dict[str, str]:
    """``[project.scripts]`` of pyproject.toml."""
    with open(ROOT / "pyproject.toml", "rb") as handle:
        return tomllib.load(handle)["project"]["scripts"]


# -- command lines ------------------------------------------------------------------------

@dataclass
class Invocation:
    """One run of a Graft program: which, with what arguments, and where it was found."""

    program: str
    argv: list[str]
    where: str


_VAR = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}|\$(\w+)|\$\((\w+)\)")


def substitute(token: str, env: Mapping[str, str]) -> str:
    """Expand ``$VAR``, ``${VAR}``, ``${VAR:-default}`` (shell) and ``$(VAR)`` (Kubernetes).

    Unknown variables without a default stay as written: they are script-local
    values (paths), which every parser takes as plain strings.
    """
    def replace(match: re.Match) -> str:
        name = match.group(1) or match.group(3) or match.group(4)
        if name in env:
            return env[name]
        if match.group(2) is not None:
            return match.group(2)
        return match.group(0)
    return _VAR.sub(replace, token)


def shell_invocations(script: str, env: Mapping[str, str], where: str) -> Iterator[Invocation]:
    """Every simple command in a shell script that runs a Graft program, variables expanded."""
    text = script.replace("\\\n", " ")
    for number, line in enumerate(text.splitlines(), start=1):
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = "#"
        try:
            tokens = list(lexer)
        except ValueError:
            continue  # a quote spanning lines (e.g. inside printf): no Graft command there
        for index, token in enumerate(tokens):
            if Path(token).name not in PROGRAMS:
                continue
            argv = []
            for arg in tokens[index + 1:]:
                if arg and set(arg) <= set("();<>|&"):
                    break
                argv.append(substitute(arg, env))
            yield Invocation(Path(token).name, argv, f"{where} line {number}")


def _config_map(objects: list[dict], name: str) -> dict:
    # The first match wins: callers list the kustomization's own objects before the
    # serving stack's, which Jobs rendered on their own refer to by name.
    for obj in objects:
        if obj["kind"] == "ConfigMap" and obj["metadata"]["name"] == name:
            return obj
    raise AssertionError(f"no ConfigMap {name} is rendered")


def container_env(spec: dict, objects: list[dict]) -> dict[str, str]:
    """A container's environment: envFrom ConfigMaps first, then env (which wins)."""
    env: dict[str, str] = {}
    for source in spec.get("envFrom", []):
        ref = source.get("configMapRef")
        if ref:
            env.update(_config_map(objects, ref["name"]).get("data", {}))
    for item in spec.get("env", []):
        # Downward-API values are only known in the cluster: any string stands in.
        env[item["name"]] = item.get("value", f"<{item['name']} from the cluster>")
    return env


def mounted_file(obj: dict, spec: dict, path: str, objects: list[dict]) -> str | None:
    """Contents of ``path`` when a ConfigMap volume mounted in the container provides it."""
    volumes = {v["name"]: v for v in pod_spec(obj).get("volumes", [])}
    for mount in spec.get("volumeMounts", []):
        prefix = mount["mountPath"].rstrip("/") + "/"
        if not path.startswith(prefix):
            continue
        config_map = volumes[mount["name"]].get("configMap")
        if config_map is None:
            return None
        data = _config_map(objects, config_map["name"]).get("data", {})
        return data.get(path[len(prefix):])
    return None


def image_target(image: str) -> str | None:
    """Dockerfile target of a manifest's image reference (None for foreign images)."""
    name = image.rsplit("/", 1)[-1].split("@")[0].split(":")[0]
    return IMAGE_TARGETS.get(name)


def manifest_invocations(objects: list[dict], stages: dict[str, Stage],
                         context: list[dict] = ()) -> Iterator[Invocation]:
    """Every Graft program run by a container of ``objects``, through the image or a script.

    ``context``: further objects (the serving stack) whose ConfigMaps the workloads may use.
    """
    workloads = objects
    objects = list(objects) + list(context)
    for obj in workloads:
        spec = pod_spec(obj)
        if spec is None:
            continue
        for item in spec.get("initContainers", []) + spec["containers"]:
            where = f"{obj['kind']}/{obj['metadata']['name']} container {item['name']}"
            env = container_env(item, objects)
            if "command" in item:
                argv = [substitute(a, env) for a in item["command"] + item.get("args", [])]
            else:
                target = image_target(item["image"])
                if target is None:
                    continue
                args = item.get("args")
                argv = image_command(stages[target], None if args is None else [substitute(a, env) for a in args],
                                     env)
            for index, arg in enumerate(argv):
                if Path(arg).name in PROGRAMS:
                    yield Invocation(Path(arg).name, argv[index + 1:], where)
                    break
                if Path(arg).name in ("sh", "bash", "dash") and index + 1 < len(argv):
                    script_path = argv[index + 1]
                    script = mounted_file(obj, item, script_path, objects)
                    assert script is not None, f"{where}: {script_path} is not provided by a mounted ConfigMap"
                    yield from shell_invocations(script, env, f"{where} script {script_path}")
                    break


# -- the real parsers ----------------------------------------------------------------------

def parser_for(program: str) -> argparse.ArgumentParser:
    """``build_parser()`` of the program's module."""
    module_name = PROGRAMS[program]
    module = importlib.import_module(module_name)
    build = getattr(module, "build_parser", None)
    assert callable(build), f"{module_name} must expose build_parser() -> argparse.ArgumentParser"
    parser = build()
    assert isinstance(parser, argparse.ArgumentParser), f"{module_name}.build_parser() is not an ArgumentParser"
    return parser


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    # argparse has no public accessor for sub-commands; _actions is stable since Python 2.7.
    for action in parser._actions:  # noqa: SLF001
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            return dict(action.choices)
    return {}


def _option_strings(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}  # noqa: SLF001


def check_invocation(invocation: Invocation) -> argparse.Namespace | None:
    """Parse the invocation with the real parser; fail naming the flag and where it is used.

    Also refuses abbreviated flags, which argparse would otherwise accept: the
    manifests must spell each flag as the program defines it.
    """
    parser = parser_for(invocation.program)
    argv = invocation.argv
    target = parser
    commands = _subparsers(parser)
    if commands and argv and not argv[0].startswith("-"):
        assert argv[0] in commands, (f"{invocation.where}: {invocation.program} has no subcommand "
                                     f"{argv[0]!r} (has: {sorted(commands)})")
        target = commands[argv[0]]
    known = _option_strings(target) | _option_strings(parser)
    for arg in argv:
        if arg.startswith("-") and arg != "-":
            flag = arg.split("=", 1)[0]
            assert flag in known, (f"{invocation.where}: {invocation.program} has no flag {flag} "
                                   f"(known: {sorted(known)})")
    stderr, stdout = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
            return parser.parse_args(argv)
    except SystemExit as exc:
        if exc.code == 0 and ("-h" in argv or "--help" in argv):
            return None
        pytest.fail(f"{invocation.where}: `{invocation.program} {shlex.join(argv)}` is refused by its "
                    f"parser:\n{stderr.getvalue()}")
