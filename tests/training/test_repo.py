"""Tests for training.repo: version numbering, atomic publish, labels.json."""

from __future__ import annotations

import json
import os
import threading

import pytest

from graft import contract
from training import repo


def _make_version(model_dir, name):
    path = model_dir / name
    path.mkdir(parents=True)
    (path / "saved_model.pb").write_bytes(b"x")


def test_next_version_starts_at_one_and_ignores_non_versions(tmp_path):
    model = tmp_path / "m"
    assert repo.next_version(model) == 1  # absent directory
    model.mkdir()
    assert repo.next_version(model) == 1
    for name in ("1", "4", ".tmp-abc", "latest", "+9", "\u0663"):
        _make_version(model, name)
    (model / "12").write_text("a file, not a version")
    assert repo.list_versions(model) == [1, 4]
    assert repo.next_version(model) == 5
    # The server reads "007" as version 7: numbering must not hand out 7 again.
    _make_version(model, "007")
    assert repo.list_versions(model) == [1, 4, 7]
    assert repo.next_version(model) == 8


def test_model_dir_rejects_unsafe_names(tmp_path):
    assert repo.model_dir(tmp_path, "flowers") == tmp_path / "flowers"
    for bad in ("", ".", "..", "a/b", ".hidden"):
        with pytest.raises(ValueError):
            repo.model_dir(tmp_path, bad)


def test_staging_is_hidden_until_published(tmp_path):
    model = tmp_path / "m"
    _make_version(model, "1")
    with repo.staging_dir(model) as tmp:
        assert tmp.parent == model and tmp.name.startswith(".")
        (tmp / "saved_model.pb").write_bytes(b"y")
        # While the version is being written, nothing new is visible as a version.
        assert repo.list_versions(model) == [1]
        version, path = repo.publish_dir(tmp, model)
    assert (version, path) == (2, model / "2")
    assert (path / "saved_model.pb").read_bytes() == b"y"
    assert sorted(p.name for p in model.iterdir() if not p.name.startswith(".graft")) == ["1", "2"]
    umask = os.umask(0)
    os.umask(umask)
    # mkdtemp's private 0700 must not survive: another user (the server) reads versions.
    assert os.stat(path).st_mode & 0o777 == 0o777 & ~umask


def test_failed_build_leaves_no_debris(tmp_path):
    model = tmp_path / "m"
    with pytest.raises(RuntimeError):
        with repo.staging_dir(model) as tmp:
            (tmp / "partial").write_bytes(b"half")
            raise RuntimeError("export failed")
    assert [p.name for p in model.iterdir()] == []
    assert repo.next_version(model) == 1


def test_explicit_version_that_exists_is_refused(tmp_path):
    model = tmp_path / "m"
    (model / "3").mkdir(parents=True)  # empty: os.rename alone would replace it
    with repo.staging_dir(model) as tmp:
        with pytest.raises(FileExistsError):
            repo.publish_dir(tmp, model, version=3)
    assert list((model / "3").iterdir()) == []


def test_staging_outside_model_dir_is_refused(tmp_path):
    other = tmp_path / "other"
    with repo.staging_dir(other) as tmp:
        with pytest.raises(ValueError):
            repo.publish_dir(tmp, tmp_path / "m")


def test_concurrent_publishers_get_distinct_versions(tmp_path):
    model = tmp_path / "m"
    results, errors = [], []

    def publish(i):
        try:
            with repo.staging_dir(model) as tmp:
                (tmp / "id").write_text(str(i))
                results.append(repo.publish_dir(tmp, model)[0])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(results) == list(range(1, 9))
    assert repo.list_versions(model) == list(range(1, 9))
    assert sorted(int((model / str(v) / "id").read_text()) for v in results) == list(range(8))


def test_labels_round_trip_and_validation(tmp_path):
    model = tmp_path / "m"
    assert contract.read_labels(model) is None  # no file: no labels
    repo.write_labels(model, {"stable": 3, "canary": 4})
    assert json.loads((model / "labels.json").read_text()) == {"canary": 4, "stable": 3}
    assert contract.read_labels(model) == {"stable": 3, "canary": 4}
    for bad in ({"stable": -1}, {"stable": "3"}, {"": 1}, {"x": True}):
        with pytest.raises(ValueError):
            repo.write_labels(model, bad)
    assert contract.read_labels(model) == {"stable": 3, "canary": 4}
    (model / "labels.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="labels.json"):
        contract.read_labels(model)
    (model / "labels.json").write_text("{broken")
    with pytest.raises(ValueError, match="not valid JSON"):
        contract.read_labels(model)


def test_labels_readers_never_see_a_partial_file(tmp_path):
    model = tmp_path / "m"
    repo.write_labels(model, {"stable": 1})
    stop = threading.Event()
    seen, failures = set(), []

    def reader():
        while not stop.is_set():
            try:
                seen.add(contract.read_labels(model)["stable"])
            except Exception as exc:
                failures.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    # Big payloads make a non-atomic write observable as truncated JSON.
    extra = {f"label-{i}": i + 1 for i in range(2000)}
    for version in range(1, 60):
        repo.write_labels(model, {"stable": version, **extra})
    stop.set()
    thread.join()
    assert not failures
    assert seen and max(seen) <= 59
    assert not [p for p in model.iterdir() if p.name.startswith(contract.TEMP_PREFIX)]
