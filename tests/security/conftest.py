"""Fixtures for the security tests: a model repository, bearer tokens, a throwaway PKI, a server runner."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2

from serving.runtime.server import GraftServer
from serving.runtime.settings import ServerConfig
from tests import models
from tests.security.certs import Pki, make_pki
from tests.ports import free_port

MODEL = "two"
X = np.array([[1.0, 2.0, 3.0], [0.5, -1.0, 4.0]], dtype=np.float32)
TAGS = np.array([b"ab", b"cde"])
READY_TIMEOUT_S = 90.0


@pytest.fixture(scope="package")
def repo(tmp_path_factory, two_input_savedmodel) -> Path:
    """A model repository holding ``two/1`` (the two-input module); tests must not change it."""
    root = tmp_path_factory.mktemp("security-models")
    models.install_version(two_input_savedmodel, root / MODEL, 1)
    return root


@pytest.fixture(scope="package")
def tokens(tmp_path_factory) -> tuple[str, str, Path]:
    """Two accepted tokens and the token file holding both (with a comment and a blank line)."""
    first, second = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    path = tmp_path_factory.mktemp("auth") / "tokens"
    path.write_text(f"# graft-serve bearer tokens\n{first}\n\n{second}\n")
    return first, second, path


@pytest.fixture(scope="package")
def pki(tmp_path_factory) -> Pki:
    """A CA, a server certificate for localhost/127.0.0.1, a trusted client and a rogue client."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@contextmanager
def running(repo: Path, **settings) -> Iterator[GraftServer]:
    """graft-serve in this process on 127.0.0.1 with ``settings``, its model AVAILABLE, until the block ends."""
    server = GraftServer(ServerConfig(host="127.0.0.1", port=0, rest_api_port=free_port(), model_name=MODEL,
                                      model_base_path=str(repo / MODEL), **settings))
    server.start()
    try:
        server.manager.wait_until_available(MODEL, timeout=READY_TIMEOUT_S)
        # The REST thread may still be entering its loop; the port is bound already.
        time.sleep(0.05)
        yield server
    finally:
        server.drain_and_stop()


def predict_request() -> predict_pb2.PredictRequest:
    """A gRPC Predict for the two-input model over ``X`` and ``TAGS``."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = MODEL
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(X))
    request.inputs["tag"].CopyFrom(tf.make_tensor_proto(TAGS))
    return request


def predict_body() -> dict:
    """The same Predict as REST row-format JSON."""
    return {"instances": [{"x": row.tolist(), "tag": tag.decode()} for row, tag in zip(X, TAGS)]}


def expected_y() -> np.ndarray:
    """The model's ``y`` for ``X`` (computed in numpy)."""
    return models.two_input_expected(X)
