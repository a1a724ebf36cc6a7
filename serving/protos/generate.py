"""Generate the Python protobuf and gRPC modules of ``protos/`` into ``serving/protos/``.

Run ``python -m serving.protos.generate`` (``make protos``) after editing any
``.proto`` file under ``protos/``; the generated modules are committed, and
``tests/serving/test_protos.py`` fails when they are stale.

Every ``protos/<dir>/<name>.proto`` becomes ``serving/protos/<dir>/<name>_pb2.py``
(+ ``.pyi``), plus ``<name>_pb2_grpc.py`` when the file declares a service.
protoc writes imports relative to the proto root (``from graft import x_pb2``);
they are rewritten to ``from serving.protos.graft import x_pb2`` so the modules
work as part of the installed ``serving`` package without touching ``sys.path``.
The descriptor file names stay ``graft/x.proto``, as ``import`` lines in the
``.proto`` files expect.

Modules of the directories in ``PRIVATE_POOL_DIRS`` register their descriptors
in a descriptor pool of their own instead of protobuf's default pool. The V2
protocol's package ``inference`` is also defined by tritonclient (and Triton's
other Python packages) in the default pool; two files defining one
fully-qualified name there make the second import fail, in whichever order they
come. With a private pool both load into one process. Such a file may not import
other ``.proto`` files (its pool would lack them); the generator refuses it.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import sys
import tempfile
from pathlib import Path

PACKAGE = "serving.protos"
OUT_DIR = Path(__file__).resolve().parent
PROTO_ROOT = OUT_DIR.parents[1] / "protos"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
# Proto directories whose modules use a private descriptor pool (see the module docstring).
PRIVATE_POOL_DIRS = ("inference",)
_DEFAULT_POOL_CALL = "_descriptor_pool.Default().AddSerializedFile("
_PRIVATE_POOL_CALL = "_descriptor_pool.DescriptorPool().AddSerializedFile("
_INIT_TEXT = '"""Generated from protos/{rel}/ by serving.protos.generate; do not edit."""\n'


def proto_files(proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Every ``.proto`` under ``proto_root``, relative to it, in a stable order."""
    return sorted(p.relative_to(proto_root) for p in proto_root.rglob("*.proto"))


def _protoc(args: list[str]) -> None:
    # A child process: grpc_tools' protoc crashes (SIGSEGV) inside a process that
    # has already loaded TensorFlow, whose own protobuf library clashes with it.
    proc = subprocess.run([sys.executable, "-m", "grpc_tools.protoc", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"protoc failed ({proc.returncode}): {' '.join(args)}\n{proc.stderr}")


def _well_known_include() -> str:
    # Locate the package without importing it (importing loads protoc's native library).
    spec = importlib.util.find_spec("grpc_tools")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("grpc_tools is needed to generate protos: pip install grpcio-tools")
    return str(Path(spec.origin).resolve().parent / "_proto")


def _files_with_services(descriptor_set: Path) -> list[str]:
    from google.protobuf import descriptor_pb2

    fds = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set.read_bytes())
    for f in fds.file:
        if _uses_private_pool(f.name) and f.dependency:
            raise ValueError(f"{f.name} imports {list(f.dependency)}, which its private descriptor pool lacks")
    return [f.name for f in fds.file if f.service]


def _uses_private_pool(rel: str) -> bool:
    return rel.split("/", 1)[0] in PRIVATE_POOL_DIRS and "/" in rel


def _use_private_pool(text: str) -> str:
    if text.count(_DEFAULT_POOL_CALL) != 1:
        raise RuntimeError("protoc's output no longer registers its descriptor the expected way")
    return text.replace(_DEFAULT_POOL_CALL, _PRIVATE_POOL_CALL)


def _rewrite_imports(text: str, tops: set[str], top_modules: set[str], package: str) -> str:
    """Point protoc's root-relative imports of project protos at ``package``."""
    if tops:
        alt = "|".join(sorted(map(re.escape, tops)))
        text = re.sub(rf"^from ({alt})((?:\.\w+)*) import ", rf"from {package}.\1\2 import ", text, flags=re.M)
        # The module name recorded on message classes (used by pickle and repr).
        text = re.sub(
            rf"(BuildTopDescriptorsAndMessages\(DESCRIPTOR, ')(({alt})(?:\.\w+)*')",
            rf"\1{package}.\2",
            text,
        )
    if top_modules:
        alt = "|".join(sorted(map(re.escape, top_modules)))
        text = re.sub(rf"^import ({alt}) as ", rf"from {package} import \1 as ", text, flags=re.M)
        text = re.sub(rf"(BuildTopDescriptorsAndMessages\(DESCRIPTOR, ')(({alt})')", rf"\1{package}.\2", text)
    return text


def _remove_generated(out_dir: Path) -> None:
    for path in out_dir.rglob("*"):
        if path.is_file() and path.name.endswith(GENERATED_SUFFIXES):
            path.unlink()


def generate(out_dir: Path = OUT_DIR, proto_root: Path = PROTO_ROOT, package: str = PACKAGE) -> list[Path]:
    """Compile every proto under ``proto_root`` into ``out_dir`` as modules of ``package``.

    Generated files left from protos that no longer exist are removed. Returns
    the files written (modules and the ``__init__.py`` of each sub-package),
    sorted.
    """
    out_dir = Path(out_dir)
    proto_root = Path(proto_root)
    files = [p.as_posix() for p in proto_files(proto_root)]
    if not files:
        raise FileNotFoundError(f"no .proto files under {proto_root}")
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_generated(out_dir)
    includes = ["-I", str(proto_root), "-I", _well_known_include()]
    with tempfile.TemporaryDirectory() as tmp:
        descriptor_set = Path(tmp) / "all.pb"
        _protoc([*includes, f"--python_out={out_dir}", f"--pyi_out={out_dir}",
                 f"--descriptor_set_out={descriptor_set}", *files])
        services = _files_with_services(descriptor_set)
    if services:
        _protoc([*includes, f"--grpc_python_out={out_dir}", *services])

    tops = {f.split("/", 1)[0] for f in files if "/" in f}
    top_modules = {f[: -len(".proto")] + "_pb2" for f in files if "/" not in f}
    written: list[Path] = []
    for rel in files:
        stem = out_dir / rel[: -len(".proto")]
        for suffix in GENERATED_SUFFIXES:
            path = stem.parent / (stem.name + suffix)
            if path.exists():
                text = _rewrite_imports(path.read_text(), tops, top_modules, package)
                if suffix == "_pb2.py" and _uses_private_pool(rel):
                    text = _use_private_pool(text)
                path.write_text(text)
                written.append(path)
        # Sub-packages need an __init__.py so setuptools' find_packages ships them.
        parent = stem.parent
        while parent != out_dir:
            init = parent / "__init__.py"
            init.write_text(_INIT_TEXT.format(rel=parent.relative_to(out_dir).as_posix()))
            if init not in written:
                written.append(init)
            parent = parent.parent
    return sorted(written)


def main(argv: list[str] | None = None) -> int:
    """Command line: regenerate the committed modules (or into ``--out``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output directory (default: serving/protos)")
    parser.add_argument("--protos", type=Path, default=PROTO_ROOT, help="proto root (default: protos/)")
    args = parser.parse_args(argv)
    for path in generate(args.out, args.protos):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
