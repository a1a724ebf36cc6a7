"""uv.lock: every package pinned with hashes, this venv installed from it, and the
uv that the Makefile and the Dockerfile bootstrap is the one the lock pins.
"""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from collections import defaultdict

from tests.deploy import DOCKERFILE, ROOT

LOCK = ROOT / "uv.lock"


def canonicalize_name(name: str) -> str:
    """The PEP 503 normal form of a distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _lock() -> dict:
    return tomllib.loads(LOCK.read_text())


def _locked_versions() -> dict[str, set[str]]:
    versions = defaultdict(set)
    for package in _lock()["package"]:
        versions[canonicalize_name(package["name"])].add(package["version"])
    return versions


def test_every_registry_package_is_pinned_with_hashes():
    packages = [p for p in _lock()["package"] if "registry" in p.get("source", {})]
    assert len(packages) > 50, "the lock holds the whole dependency tree, not only direct dependencies"
    for package in packages:
        files = package.get("wheels", []) + ([package["sdist"]] if "sdist" in package else [])
        assert files, f"{package['name']} {package['version']}: no file locked"
        for file in files:
            assert re.fullmatch(r"sha256:[0-9a-f]{64}", file.get("hash", "")), (package["name"], file)


def test_the_lock_covers_linux_x86_64_and_every_python_pyproject_allows():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    lock = _lock()
    assert lock["requires-python"].replace(" ", "") == project["project"]["requires-python"]
    assert project["tool"]["uv"]["environments"] == ["sys_platform == 'linux' and platform_machine == 'x86_64'"]
    tensorflow = next(p for p in lock["package"] if p["name"] == "tensorflow")
    tags = {re.search(r"-(cp3\d+)-", w["url"]).group(1) for w in tensorflow["wheels"]}
    low, high = re.fullmatch(r">=3\.(\d+),\s*<3\.(\d+)", lock["requires-python"]).groups()
    assert tags == {f"cp3{minor}" for minor in range(int(low), int(high))}, (
        "requires-python admits a Python that TensorFlow has no wheel for, or the reverse")


def test_this_environment_was_installed_from_the_lock():
    locked = _locked_versions()
    checked = 0
    for dist in importlib.metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"])
        if name in locked and name != "graft":
            assert dist.version in locked[name], f"{name} {dist.version} installed, the lock pins {locked[name]}"
            checked += 1
    assert checked > 50


def test_makefile_and_dockerfile_bootstrap_the_locked_uv():
    locked_uv = _locked_versions()["uv"]
    makefile = re.search(r"^UV_VERSION := (\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    dockerfile = re.search(r"^ARG UV_VERSION=(\S+)$", DOCKERFILE.read_text(), re.M).group(1)
    assert {makefile} == {dockerfile} == locked_uv


def test_each_image_installs_the_locked_requirements_with_hashes():
    text = DOCKERFILE.read_text()
    assert "COPY pyproject.toml README.md uv.lock ./" in text
    assert text.count("uv export --frozen") == 2
    for image in ("serving", "training"):
        assert f"--require-hashes --no-deps -r /wheels/{image}.txt" in text, image
