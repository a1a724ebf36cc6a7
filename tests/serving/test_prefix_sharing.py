"""Prefix sharing: trunks of the same weights cut at different blocks run their common segments once.

Tiny exports (``tests.models.export_shared_trunk_version``) of one trunk, conv ->
``tiny_pool`` -> conv: ``deep`` runs it whole (two segments), ``cut`` stops at
``tiny_pool`` (the first segment alone), ``other`` has other weights. ``legacy`` is
``deep``'s trunk exported without segments, as Graft did before. The registry and
the server must give every version its standalone answer, run a shared first
segment once for rows of both cuts, and load and unload segments with their versions.
"""

from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from graft import contract
from serving.config import BatchingConfig
from serving.metrics import ServingMetrics
from serving.servable import Servable
from serving.trunks import TrunkRegistry
from tests.models import export_shared_trunk_version, write_model_config
from tests.serving.server import serving
from tests.serving.test_shared_trunk import CALLS, _grpc_predict, _metrics, _rest_predict, _samples

SIZE = 32
TOL = 1e-4


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefix_repo")
    paths = {
        "deep": export_shared_trunk_version(root, "deep", trunk_seed=1, head_seed=11, size=SIZE),
        "cut": export_shared_trunk_version(root, "cut", trunk_seed=1, head_seed=12, size=SIZE,
                                           cut_layer="tiny_pool", num_classes=4),
        "other": export_shared_trunk_version(root, "other", trunk_seed=2, head_seed=13, size=SIZE,
                                             cut_layer="tiny_pool"),
        "legacy": export_shared_trunk_version(root, "legacy", trunk_seed=1, head_seed=14, size=SIZE,
                                              segments=False),
    }
    return root, {name: str(path) for name, path in paths.items()}


@pytest.fixture(scope="module")
def standalone(repo):
    _, paths = repo
    loaded = {name: Servable.load(name, 1, path) for name, path in paths.items()}
    yield loaded
    for servable in loaded.values():
        servable.unload()


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, (n, SIZE, SIZE, 3)).astype(np.float32)


def _declared(path: str) -> dict:
    return contract.trunk_of(contract.read_lineage(path))


def _assert_answers(member, want: Servable, seed: int) -> None:
    images = _images(3, seed)
    got = member.run("serving_default", {"images": images})["scores"]
    expected = want.run("serving_default", {"images": images})["scores"]
    np.testing.assert_allclose(got, expected, atol=TOL)
    assert np.ptp(expected, axis=0).max() > 1e-3   # a wrong row could not pass by accident


def test_a_deeper_cut_joins_the_shallower_and_loads_only_its_own_segment(repo, standalone):
    _, paths = repo
    registry = TrunkRegistry()
    cut = registry.load("cut", 1, paths["cut"])
    deep = registry.load("deep", 1, paths["deep"])
    other = registry.load("other", 1, paths["other"])
    try:
        groups = registry.groups()
        assert len(groups) == 2
        group = cut.shared_trunk()
        assert deep.shared_trunk() is group and other.shared_trunk() is not group
        assert group.fingerprints() == [s["fingerprint"] for s in _declared(paths["deep"])["segments"]]
        assert group.fingerprints()[0] == _declared(paths["cut"])["fingerprint"]
        assert (cut.depth, deep.depth) == (0, 1)
        assert deep.trunk_info() == {"fingerprint": _declared(paths["deep"])["fingerprint"], "shared": True,
                                     "group_size": 2}
        for seed, (member, name) in enumerate(((cut, "cut"), (deep, "deep"), (other, "other"))):
            _assert_answers(member, standalone[name], seed)
    finally:
        for member in (other, deep, cut):
            member.unload()
    assert registry.groups() == {}


def test_the_deeper_first_gives_the_shallower_its_prefix(repo, standalone):
    _, paths = repo
    registry = TrunkRegistry()
    deep = registry.load("deep", 1, paths["deep"])
    cut = registry.load("cut", 1, paths["cut"])
    try:
        assert cut.shared_trunk() is deep.shared_trunk() and len(registry.groups()) == 1
        assert (deep.depth, cut.depth) == (1, 0)
        _assert_answers(cut, standalone["cut"], 5)
        _assert_answers(deep, standalone["deep"], 6)
    finally:
        cut.unload()
        deep.unload()
    assert registry.groups() == {}


def test_segments_unload_with_the_last_version_that_runs_that_deep(repo, standalone):
    _, paths = repo
    registry = TrunkRegistry()
    cut = registry.load("cut", 1, paths["cut"])
    deep = registry.load("deep", 1, paths["deep"])
    group = cut.shared_trunk()
    deep.unload()
    assert group.fingerprints() == [_declared(paths["cut"])["fingerprint"]]
    _assert_answers(cut, standalone["cut"], 7)
    deep = registry.load("deep", 1, paths["deep"])
    assert deep.shared_trunk() is group and len(group.fingerprints()) == 2
    cut.unload()
    # The deeper version still needs the first segment: the path stays whole.
    assert len(group.fingerprints()) == 2 and registry.groups() == {group.fingerprint: group}
    _assert_answers(deep, standalone["deep"], 8)
    deep.unload()
    assert registry.groups() == {}


def test_a_version_exported_without_segments_shares_with_its_equal_cut(repo, standalone):
    _, paths = repo
    registry = TrunkRegistry()
    legacy = registry.load("legacy", 1, paths["legacy"])
    deep = registry.load("deep", 1, paths["deep"])
    cut = registry.load("cut", 1, paths["cut"])
    try:
        # deep's last segment is legacy's whole trunk; cut's prefix is not loaded anywhere.
        assert deep.shared_trunk() is legacy.shared_trunk() and (legacy.depth, deep.depth) == (0, 0)
        assert cut.shared_trunk() is not legacy.shared_trunk() and len(registry.groups()) == 2
        for seed, (member, name) in enumerate(((legacy, "legacy"), (deep, "deep"), (cut, "cut"))):
            _assert_answers(member, standalone[name], 10 + seed)
    finally:
        for member in (cut, deep, legacy):
            member.unload()


def test_a_version_that_branches_off_a_loaded_path_starts_a_group_of_its_own(repo, standalone, tmp_path):
    _, paths = repo
    # The same first segment, then a second one with another fingerprint (another weights file's).
    branch = tmp_path / "branch" / "1"
    shutil.copytree(paths["deep"], branch)
    lineage = contract.read_lineage(branch)
    trunk = lineage["trunk"]
    trunk["fingerprint"] = trunk["segments"][-1]["fingerprint"] = "f" * 64
    contract.lineage_path(branch).write_text(json.dumps(lineage), encoding="utf-8")
    registry = TrunkRegistry()
    deep = registry.load("deep", 1, paths["deep"])
    forked = registry.load("branch", 1, str(branch))
    try:
        group = forked.shared_trunk()
        assert group is not deep.shared_trunk() and group.fingerprint == "f" * 64
        assert group.fingerprints() == [deep.shared_trunk().fingerprint, "f" * 64]
        _assert_answers(forked, standalone["deep"], 20)
        # A version of the shared first segment alone joins one of the two, starting none.
        cut = registry.load("cut", 1, paths["cut"])
        assert cut.shared_trunk() in (group, deep.shared_trunk()) and len(registry.groups()) == 2
        _assert_answers(cut, standalone["cut"], 21)
        cut.unload()
    finally:
        forked.unload()
        deep.unload()
    assert registry.groups() == {}


def test_a_mixed_batch_runs_each_segment_once_and_answers_each_row_right(repo, standalone):
    _, paths = repo
    metrics_registry = CollectorRegistry()
    registry = TrunkRegistry(batching=BatchingConfig(max_batch_size=16, batch_timeout_micros=200_000),
                             metrics=ServingMetrics(metrics_registry))
    cut = registry.load("cut", 1, paths["cut"])
    deep = registry.load("deep", 1, paths["deep"])
    group = cut.shared_trunk()
    images = {"cut": _images(2, 30), "deep": _images(3, 31)}
    got: dict[str, np.ndarray] = {}
    failures: list[BaseException] = []
    start = threading.Barrier(2)

    def one(member, name):
        try:
            start.wait(30)
            got[name] = member.member_batcher("serving_default").submit({"images": images[name]})["scores"]
        except BaseException as exc:  # reported below
            failures.append(exc)

    threads = [threading.Thread(target=one, args=pair) for pair in ((cut, "cut"), (deep, "deep"))]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not failures, failures
        for name, scores in got.items():
            want = standalone[name].run("serving_default", {"images": images[name]})["scores"]
            np.testing.assert_allclose(scores, want, atol=TOL)
        labels = {"trunk": group.short, "signature": "images"}
        # One batch: all five rows through the first segment in one run, and one run of the second.
        assert metrics_registry.get_sample_value("graft_trunk_batch_size_count", labels) == 1
        assert metrics_registry.get_sample_value("graft_trunk_batch_size_sum", labels) == 5
        assert metrics_registry.get_sample_value("graft_trunk_batch_models_sum", labels) == 2
        trunk_runs = metrics_registry.get_sample_value(
            "graft_inference_seconds_count", {"model": "", "version": "", "signature": "images", "part": "trunk",
                                              "trunk": group.short})
        assert trunk_runs == 2
    finally:
        deep.unload()
        cut.unload()


@pytest.fixture(scope="module")
def server(repo):
    root, paths = repo
    config = write_model_config(root / "models.config", {m: root / m for m in ("cut", "deep", "other")})
    params = root / "batching.pbtxt"
    params.write_text("max_batch_size { value: 16 }\nbatch_timeout_micros { value: 30000 }\n"
                      "num_batch_threads { value: 1 }\nmax_enqueued_batches { value: 100 }\n")
    with serving(model_config_file=str(config), batching_parameters_file=str(params)) as running:
        yield running


@pytest.fixture(scope="module")
def server_off(repo):
    root, _ = repo
    with serving(model_config_file=str(root / "models.config"), shared_trunks=False) as running:
        yield running


@pytest.mark.parametrize("protocol", sorted(CALLS))
def test_every_protocol_answers_as_with_sharing_off(server, server_off, protocol):
    call = CALLS[protocol]
    images = _images(3, seed=40 + len(protocol))
    for model in ("cut", "deep", "other"):
        np.testing.assert_allclose(call(*server, model, images), call(*server_off, model, images), atol=TOL)


def test_the_server_groups_both_cuts_and_lists_each_versions_own_trunk(server, repo):
    graft, client = server
    _, paths = repo
    assert sorted(sorted(g.members()) for g in graft.trunks.groups().values()) == \
        [[("cut", 1), ("deep", 1)], [("other", 1)]]
    listing = client.http.get(f"{client.rest}/v1/models", timeout=30).json()
    trunks = {m["name"]: m["model_version_status"][0]["graft"]["trunk"] for m in listing["models"]}
    assert trunks["deep"]["fingerprint"] == _declared(paths["deep"])["fingerprint"]
    assert trunks["cut"]["fingerprint"] == _declared(paths["cut"])["fingerprint"]
    assert trunks["deep"]["group_size"] == trunks["cut"]["group_size"] == 2


def test_concurrent_requests_of_both_cuts_share_first_segment_runs(server, server_off):
    graft, client = server
    group = next(g for g in graft.trunks.groups().values() if g.size == 2)
    labels = {"trunk": group.short, "signature": "images"}
    images = {"cut": _images(2, 50), "deep": _images(2, 51)}
    want = {model: _grpc_predict(server_off[1], model, x) for model, x in images.items()}
    before = _metrics(client)
    rows_before = sum(s.value for s in _samples(before, "graft_trunk_batch_size", "graft_trunk_batch_size_sum",
                                                **labels))
    failures: list[BaseException] = []
    start = threading.Barrier(6)

    def one(model: str) -> None:
        try:
            start.wait(30)
            np.testing.assert_allclose(_grpc_predict(client, model, images[model]), want[model], atol=TOL)
        except BaseException as exc:  # reported below
            failures.append(exc)

    threads = [threading.Thread(target=one, args=(model,)) for model in ("cut", "deep") for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not failures, failures
    after = _metrics(client)
    rows = sum(s.value for s in _samples(after, "graft_trunk_batch_size", "graft_trunk_batch_size_sum", **labels))
    # Every row of both models went through the first segment exactly once.
    assert rows - rows_before == 12
    mixed = [s for s in _samples(after, "graft_trunk_batch_models", "graft_trunk_batch_models_bucket", le="1.0",
                                 **labels)]
    total = [s for s in _samples(after, "graft_trunk_batch_models", "graft_trunk_batch_models_count", **labels)]
    assert sum(s.value for s in mixed) < sum(s.value for s in total)


def test_the_rest_fan_out_spans_both_cuts(server, server_off):
    _, client = server
    images = _images(2, seed=60)
    body = {"models": ["deep", "cut"], "instances": images.tolist()}
    answer = client.http.post(f"{client.rest}/v1/trunks:fanout", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    for result in answer.json()["results"]:
        got = np.array([p["scores"] for p in result["predictions"]], dtype=np.float32)
        np.testing.assert_allclose(got, _rest_predict(server_off[1], result["model"], images), atol=TOL)
