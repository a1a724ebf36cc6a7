"""Tests for training.repo: version numbering, atomic publish, labels.json, candidates and the label history."""

from __future__ import annotations

import json
import os
import threading

import pytest
from filelock import Timeout

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


# -- versions, candidates, publishing an export ------------------------------------------------

def _version(model, number, complete=True):
    path = model / str(number)
    path.mkdir(parents=True)
    if complete:
        (path / contract.SAVED_MODEL_FILE).write_bytes(b"")
    return path


def test_complete_versions_and_version_path(tmp_path):
    model = tmp_path / "m"
    _version(model, 1)
    _version(model, 2, complete=False)  # a directory the server cannot load yet
    _version(model, 3)
    assert repo.complete_versions(model) == [1, 3]
    assert repo.version_path(model, 3) == model / "3"
    with pytest.raises(repo.RepositoryError, match=r"version 2 of model 'm' does not exist .*present: 1, 3"):
        repo.version_path(model, 2)


def test_resolve_candidate_by_number_own_directory_or_export(tmp_path):
    model = tmp_path / "m"
    _version(model, 4)
    export_dir = tmp_path / "export"
    export_dir.mkdir()
    (export_dir / contract.SAVED_MODEL_FILE).write_bytes(b"")
    assert repo.resolve_candidate(model, 4) == (4, model / "4")
    assert repo.resolve_candidate(model, "4") == (4, model / "4")
    assert repo.resolve_candidate(model, model / "4") == (4, (model / "4").resolve())
    assert repo.resolve_candidate(model, export_dir) == (None, export_dir.resolve())
    with pytest.raises(repo.RepositoryError, match="neither a version number nor a directory"):
        repo.resolve_candidate(model, tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(repo.RepositoryError, match="not a SavedModel"):
        repo.resolve_candidate(model, tmp_path / "empty")
    with pytest.raises(repo.RepositoryError, match="version 5"):
        repo.resolve_candidate(model, 5)


def test_publish_export_copies_hidden_then_renames(tmp_path):
    model = tmp_path / "m"
    _version(model, 1)
    source = tmp_path / "export"
    (source / "variables").mkdir(parents=True)
    (source / contract.SAVED_MODEL_FILE).write_bytes(b"pb")
    (source / "variables" / "v").write_bytes(b"weights")
    seen = []

    def staged():
        # The copy is complete but not visible as a version yet.
        seen.append((repo.list_versions(model), sorted(p.name for p in model.iterdir()
                                                       if p.name.startswith(contract.TEMP_PREFIX))))

    assert repo.publish_export(model, source, on_staged=staged) == 2
    [(versions, staging)] = seen
    assert versions == [1] and len(staging) == 1
    assert (model / "2" / "variables" / "v").read_bytes() == b"weights"
    assert not [p for p in model.iterdir() if p.name.startswith(contract.TEMP_PREFIX)]


def test_describe_model_lists_labels_versions_and_history(tmp_path):
    model = tmp_path / "m"
    _version(model, 1)
    repo.write_labels(model, {"stable": 1, "canary": 2})
    repo.record_label_move(model, action="promote", label="stable", old=None, new=1, stack=[1])
    listing = repo.describe_model(tmp_path, "m")
    assert listing["labels"] == {"stable": 1, "canary": 2} and listing["versions"] == [1]
    assert listing["dangling"] == {"canary": 2}
    assert [(e["action"], e["to"]) for e in listing["history"]] == [("promote", 1)]
    with pytest.raises(repo.RepositoryError, match="does not exist"):
        repo.describe_model(tmp_path, "absent")


# -- the label history ---------------------------------------------------------------------------

def test_history_lines_round_trip_and_torn_lines_are_skipped(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    assert repo.read_history(model) == []
    first = repo.record_label_move(model, action="promote", label="stable", old=None, new=1, stack=[1],
                                   metric="accuracy")
    assert first["metric"] == "accuracy" and first["time"].endswith("+00:00")
    with open(contract.history_path(model), "a") as handle:
        handle.write('{"torn": ')
    repo.record_label_move(model, action="promote", label="stable", old=1, new=2,
                           stack=list(range(1, repo.MAX_STACK + 10)))
    history = repo.read_history(model)
    assert [e["to"] for e in history] == [1, 2]
    assert len(history[1]["stack"]) == repo.MAX_STACK and history[1]["stack"][-1] == repo.MAX_STACK + 9
    assert repo.label_stack(history, "stable") == history[1]["stack"]
    assert repo.label_stack(history, "canary") == []


def test_reconcile_pushes_an_unrecorded_promotion_and_cuts_back_a_rollback(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    repo.record_label_move(model, action="promote", label="stable", old=None, new=1, stack=[1])
    repo.record_label_move(model, action="promote", label="stable", old=1, new=2, stack=[1, 2])
    assert repo.reconcile(model, {"stable": 2}) == []
    [pushed] = repo.reconcile(model, {"stable": 3})
    assert (pushed["action"], pushed["from"], pushed["to"], pushed["stack"]) == ("recovered", 2, 3, [1, 2, 3])
    [cut] = repo.reconcile(model, {"stable": 1})
    assert (cut["from"], cut["to"], cut["stack"]) == (3, 1, [1])
    [dropped] = repo.reconcile(model, {})
    assert (dropped["to"], dropped["stack"]) == (None, [])


def test_label_lock_waits_for_the_holder_and_says_so(tmp_path):
    model = tmp_path / "m"
    said = []
    with repo.label_lock(model, -1, said.append):
        with pytest.raises(Timeout):
            with repo.label_lock(model, 0.2, said.append):
                pass
    assert len(said) == 1 and "waiting for another promotion or rollback of 'm'" in said[0]
    with repo.label_lock(model, 0.2, said.append):
        pass
    assert len(said) == 1
