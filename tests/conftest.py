"""Session-wide test setup: quiet TensorFlow, build the shared test models once."""

from __future__ import annotations

import os

# Set before TensorFlow is first imported (tests.models imports it below).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tests import models  # noqa: E402


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
def cnn_and_two_repo(tmp_path_factory, tiny_cnn_savedmodel, two_input_savedmodel):
    """A factory of fresh repositories holding ``cnn/1`` (the tiny CNN) and ``two/1``.

    ``cnn_and_two_repo(name, stable=True)`` returns the new repository's
    models.config, which names both models and, with ``stable``, labels
    ``two/1`` as ``stable``. Each call makes its own copy, so module fixtures
    may change theirs freely.
    """
    def make(name: str, *, stable: bool = True) -> Path:
        root = tmp_path_factory.mktemp(name)
        models.install_version(tiny_cnn_savedmodel, root / "cnn", 1)
        models.install_version(two_input_savedmodel, root / "two", 1)
        labels = {"two": 'version_labels { key: "stable" value: 1 }'} if stable else {}
        return models.write_model_config(root / "models.config", {"cnn": root / "cnn", "two": root / "two"}, labels)

    return make


@pytest.fixture(scope="session")
def two_input_savedmodel(tmp_path_factory) -> Path:
    """Path of the two-input tf.Module SavedModel (see ``models.export_two_input_module``).

    Shared by the session: copy it before changing anything inside.
    """
    path = tmp_path_factory.mktemp("two_input") / "savedmodel"
    models.export_two_input_module(path)
    return path


def pytest_terminal_summary(terminalreporter):
    """Always print the skip count, zero included: a skip must name an outside reason (see -ra above)."""
    skipped = terminalreporter.stats.get("skipped", [])
    terminalreporter.write_sep("-", f"{len(skipped)} skipped")
