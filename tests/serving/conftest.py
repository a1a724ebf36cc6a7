"""Fixtures for serving tests: a model repository laid out as the server reads it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import models

TINY_CNN = "tiny_cnn"
TWO_INPUT = "two_input"


@pytest.fixture
def model_repo(tmp_path, tiny_cnn_savedmodel, two_input_savedmodel) -> Path:
    """A fresh repository root holding ``tiny_cnn/1`` and ``two_input/1``.

    Each test gets its own copy, so it may add, break or delete versions freely.
    """
    root = tmp_path / "models"
    models.install_version(tiny_cnn_savedmodel, root / TINY_CNN, 1)
    models.install_version(two_input_savedmodel, root / TWO_INPUT, 1)
    return root
