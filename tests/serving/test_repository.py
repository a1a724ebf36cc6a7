"""Repository: version scanning, completeness between scans, policies, labels.json."""

from __future__ import annotations

import logging
import os
import shutil

import pytest

from serving.config import VersionPolicy
from graft.contract import parse_labels, read_labels
from serving.repository import Repository, list_version_dirs, select_versions


def make_version(base, name, extra: bytes = b"weights"):
    path = base / str(name)
    (path / "variables").mkdir(parents=True)
    (path / "saved_model.pb").write_bytes(b"graph")
    (path / "variables" / "variables.data-00000-of-00001").write_bytes(extra)
    return path


def test_lists_only_integer_dirs_with_saved_model(tmp_path):
    make_version(tmp_path, 1)
    make_version(tmp_path, 12)
    make_version(tmp_path, ".3")             # hidden staging dir
    make_version(tmp_path, ".tmp-4")
    make_version(tmp_path, "v5")             # not an integer
    make_version(tmp_path, "-6")
    make_version(tmp_path, "7.0")
    (tmp_path / "8").mkdir()                 # no saved_model.pb
    (tmp_path / "9").write_text("a file, not a dir")
    (tmp_path / "labels.json").write_text("{}")
    found = list_version_dirs(tmp_path)
    assert found == {1: str(tmp_path / "1"), 12: str(tmp_path / "12")}


def test_missing_base_path_has_no_versions(tmp_path):
    with pytest.raises(OSError):
        list_version_dirs(tmp_path / "absent")
    repo = Repository(tmp_path / "absent")
    assert repo.scan().versions == {}
    make_version(tmp_path / "absent", 1)      # appears later: picked up as usual
    repo.scan()
    assert set(repo.scan().versions) == {1}


def test_new_version_complete_on_second_unchanged_scan(tmp_path):
    repo = Repository(tmp_path)
    make_version(tmp_path, 1)
    first = repo.scan()
    assert first.versions == {} and first.pending == {1}
    second = repo.scan()
    assert second.versions == {1: str(tmp_path / "1")} and second.pending == frozenset()
    assert repo.scan().versions == {1: str(tmp_path / "1")}   # stays complete


def test_half_written_version_waits_until_stable(tmp_path):
    repo = Repository(tmp_path)
    make_version(tmp_path, 1)
    repo.scan()
    repo.scan()
    # A copy in progress: files appear and grow between scans.
    v2 = make_version(tmp_path, 2, extra=b"part")
    assert repo.scan().pending == {2}
    (v2 / "variables" / "variables.index").write_bytes(b"idx")
    scan = repo.scan()
    assert 2 not in scan.versions and scan.pending == {2}
    with open(v2 / "variables" / "variables.data-00000-of-00001", "ab") as f:
        f.write(b"more")
    scan = repo.scan()
    assert 2 not in scan.versions and scan.pending == {2}
    # Same size, new mtime: still a change.
    data = v2 / "variables" / "variables.index"
    stat = data.stat()
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert 2 not in repo.scan().versions
    scan = repo.scan()
    assert set(scan.versions) == {1, 2} and scan.pending == frozenset()


def test_deleted_and_recreated_version_settles_again(tmp_path):
    repo = Repository(tmp_path)
    make_version(tmp_path, 1)
    repo.scan()
    assert 1 in repo.scan().versions
    shutil.rmtree(tmp_path / "1")
    assert repo.scan().versions == {}
    make_version(tmp_path, 1, extra=b"new weights")
    assert repo.scan().pending == {1}
    assert 1 in repo.scan().versions


@pytest.mark.parametrize("policy, expected", [
    (VersionPolicy(), {9}),
    (VersionPolicy(kind="latest", num_versions=2), {9, 5}),
    (VersionPolicy(kind="latest", num_versions=10), {1, 2, 5, 9}),
    (VersionPolicy(kind="all"), {1, 2, 5, 9}),
    (VersionPolicy(kind="specific", versions=(2, 5, 7)), {2, 5}),
])
def test_select_versions(policy, expected):
    assert select_versions(policy, [1, 9, 2, 5]) == expected


def test_select_versions_empty():
    assert select_versions(VersionPolicy(), []) == set()


def test_labels(tmp_path):
    assert read_labels(tmp_path) is None
    (tmp_path / "labels.json").write_text('{"stable": 3, "canary": 4}')
    assert read_labels(tmp_path) == {"stable": 3, "canary": 4}
    assert Repository(tmp_path).read_labels() == {"stable": 3, "canary": 4}
    (tmp_path / "labels.json").write_text('{"stable": 3,')
    with pytest.raises(ValueError, match="not valid JSON"):
        read_labels(tmp_path)


@pytest.mark.parametrize("text", ['[3]', '{"stable": "3"}', '{"stable": true}', '{"stable": -1}',
                                  '{"": 1}', '{"stable": 1.5}'])
def test_bad_labels_rejected(text):
    with pytest.raises(ValueError):
        parse_labels(text)


def test_problem_says_why_a_base_path_serves_nothing(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="serving.repository")
    base = tmp_path / "m"
    repo = Repository(base)
    repo.scan()
    assert repo.problem == f"cannot list model base path {base}: it does not exist"
    repo.scan()
    base.mkdir()
    repo.scan()
    assert repo.problem.startswith(f"model base path {base} holds no version yet")
    (base / "1").mkdir()
    (base / "1" / "saved_model.pb").write_bytes(b"x")
    repo.scan()
    assert repo.problem == ""
    # One line per change, not one per scan.
    assert [r.levelname for r in caplog.records if r.name == "serving.repository"] == ["WARNING", "WARNING", "INFO"]
