"""A real repository for the console's tests: two versions trained by training.pipeline, both promoted.

Tiny fits (32 px, random VGG16 weights cut at block2_pool, one head epoch) so that
the lineage, the report inside each version and the label history are the
product's own. Built once per session; tests that move labels work on a copy.
"""

from __future__ import annotations

import contextlib
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import waitress

from console.app import create_app
from console.config import ConsoleConfig
from tests.training.test_fit import write_image_folder
from training import cli, pipeline

MODEL = "shapes"
TOKEN = "console-test-token-0123456789"
SIZE = 32


def _fit(data: Path, repo: Path, run_dir: Path, seed: int) -> str:
    config = pipeline.FitConfig(data=data, repo=repo, model_name=MODEL, base="vgg16", weights="none",
                                scenario="1", cut_layer="block2_pool", image_size=SIZE, head_epochs=1,
                                batch_size=8, seed=seed, run_dir=run_dir)
    return pipeline.run(config)


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> dict:
    """{"repo", "eval_data", "report_dir", "token_file"}: versions 1 and 2, stable on 2 after two promotions."""
    root = tmp_path_factory.mktemp("console")
    repo, reports = root / "repo", root / "reports"
    reports.mkdir()
    eval_data = Path(write_image_folder(root / "heldout", per_class=6, seed=9))
    _fit(Path(write_image_folder(root / "data1", per_class=8, seed=5)), repo, root / "run1", seed=1)
    _fit(Path(write_image_folder(root / "data2", per_class=10, seed=6)), repo, root / "run2", seed=2)
    for candidate in ("1", "2"):
        # The CLI's own promote, with its --report file, as an operator would run it; -1 admits any result.
        code = cli.main(["promote", "--repo", str(repo), "--model-name", MODEL, "--candidate", candidate,
                         "--eval-data", str(eval_data), "--min-delta", "-1", "--report",
                         str(reports / f"promote-{candidate}.json")])
        assert code == 0, f"promoting version {candidate} failed"
    token_file = root / "tokens"
    token_file.write_text(f"# the console's tests\n{TOKEN}\n")
    return {"repo": repo, "eval_data": eval_data, "report_dir": reports, "token_file": token_file}


def copy_repo(trained: dict, target: Path) -> Path:
    """A private copy of the trained repository, for tests that move labels."""
    shutil.copytree(trained["repo"], target, symlinks=True)
    return target


def make_app(trained: dict, repo: Path | None = None, *, actions: bool = True, serve_urls=(), eval_data=True):
    """A console app over ``repo`` (default: the shared one) with the test token file when ``actions``."""
    app = create_app(ConsoleConfig(
        repo=repo or trained["repo"], serve_urls=tuple(serve_urls),
        auth_token_file=trained["token_file"] if actions else None,
        eval_data=trained["eval_data"] if eval_data else None, report_dir=trained["report_dir"],
        serve_timeout_s=1.0))
    app.testing = True
    return app


@contextlib.contextmanager
def console_server(app) -> Iterator[str]:
    """Serve ``app`` with waitress (what graft-console runs) on 127.0.0.1; yields its base URL."""
    sockets: dict = {}
    server = waitress.create_server(app, map=sockets, host="127.0.0.1", port=0, threads=4)
    thread = threading.Thread(target=server.run, name="graft-console-test", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.effective_port}"
    finally:
        server.close()
        # The serving loop runs while any socket is in its map, and a browser keeps its
        # connections alive: close them too, or the join waits out its timeout.
        for channel in list(sockets.values()):
            channel.close()
        thread.join(timeout=10)
        assert not thread.is_alive(), "the console's serving loop did not stop"
