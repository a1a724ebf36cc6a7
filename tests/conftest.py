"""Session-wide test setup: quiet TensorFlow, build the shared test models once."""

from __future__ import annotations

import os

# Set before TensorFlow is first imported (tests.models imports it below).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import socket  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tests import models  # noqa: E402


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def free_port() -> int:
    """One free TCP port on 127.0.0.1."""
    return _free_port()


@pytest.fixture
def free_port_factory():
    """A callable returning a fresh free TCP port on 127.0.0.1 at each call."""
    return _free_port


@pytest.fixture(scope="session")
def _tiny_cnn(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_cnn") / "savedmodel"
    model = models.export_tiny_cnn(path, size=32, num_classes=3, seed=0)
    # Guard against a degenerate model: a test comparing outputs must be able to fail.
    batch = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    out = model.predict(batch, verbose=0)
    assert np.abs(out[0] - out[1]).max() > 1e-3, "tiny CNN outputs do not vary with input"
    return path, model


@pytest.fixture(scope="session")
def tiny_cnn_savedmodel(_tiny_cnn) -> Path:
    """Path of the tiny CNN SavedModel (input ``images`` [N,32,32,3], output ``output_0`` [N,3]).

    Shared by the session: copy it (``models.install_version`` or shutil.copytree)
    before changing anything inside.
    """
    return _tiny_cnn[0]


@pytest.fixture(scope="session")
def tiny_cnn_keras(_tiny_cnn):
    """The Keras model exported as ``tiny_cnn_savedmodel`` (for expected outputs)."""
    return _tiny_cnn[1]


@pytest.fixture(scope="session")
def two_input_savedmodel(tmp_path_factory) -> Path:
    """Path of the two-input tf.Module SavedModel (see ``models.export_two_input_module``).

    Shared by the session: copy it before changing anything inside.
    """
    path = tmp_path_factory.mktemp("two_input") / "savedmodel"
    models.export_two_input_module(path)
    return path
