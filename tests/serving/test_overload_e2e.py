"""Overload end to end: a full batch queue and deadlines that pass in the queue, through a real server.

A real graft-serve (in this process, real gRPC and HTTP on 127.0.0.1) serves the
two-input model with batching:

- ``max_enqueued_batches`` 1 and ``num_batch_threads`` 1;
- ``max_batch_size`` 4 and a long ``batch_timeout_micros`` (2 s), so a batch of
  fewer than 4 rows stays open, *queued*, for 2 s, while a batch of 4 rows is
  full and runs at once.

That makes overload deterministic, with no busy model and no race: a 1-row and
a 2-row request share the one open batch (3 rows); a further 2-row request does
not fit in it and needs a second batch, which the queue has no room for. It must
be refused at once (UNAVAILABLE / HTTP 503, Retry-After), while the 3 queued
rows still run, 2 s after the first arrived, each caller getting its own rows.

A request whose deadline (gRPC timeout, or ``--rest_api_timeout_in_ms``) is
shorter than the batch timeout must be answered DEADLINE_EXCEEDED (HTTP 504) at
its deadline, whether its caller awaits the batch on an event loop (gRPC and
REST Predict) or blocks a worker thread on it (REST Classify), and be withdrawn
from its batch, so it never runs: a 4-row request sent afterwards fills the
very same batch on its own (had the expired row stayed, 4 more rows would not
fit and the queue, being full, would refuse them) and the batch metrics show
exactly those 4 rows run.

Every test waits on the server's own state (it polls the queue depth gauge on
/metrics), never on fixed sleeps, and leaves the queue empty for the next one.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import requests
import tensorflow as tf
from prometheus_client.parser import text_string_to_metric_families
from tensorflow_serving.apis import predict_pb2

from tests import models
from tests.serving.server import Client, serving

MODEL = "two"
MAX_BATCH = 4
BATCH_TIMEOUT_S = 2.0
BATCHING = f"""
max_batch_size {{ value: {MAX_BATCH} }}
batch_timeout_micros {{ value: {int(BATCH_TIMEOUT_S * 1e6)} }}
max_enqueued_batches {{ value: 1 }}
num_batch_threads {{ value: 1 }}
"""
# Deadlines: long enough to reach the server and be queued, far shorter than the batch timeout.
GRPC_TIMEOUT_S = 0.3
REST_TIMEOUT_MS = 300
# "At once": a refusal, or a full batch, must come back well within the batch timeout.
PROMPT_S = BATCH_TIMEOUT_S / 2
BATCH_LABELS = {"model": MODEL, "version": "1", "signature": "serving_default"}


def _settings(root, **extra) -> dict:
    params = root / "batching.txt"
    params.write_text(BATCHING)
    return {"model_name": MODEL, "model_base_path": str(root / MODEL), "enable_batching": True,
            "batching_parameters_file": str(params), **extra}


@pytest.fixture(scope="module")
def client(tmp_path_factory, two_input_savedmodel):
    root = tmp_path_factory.mktemp("overload")
    models.install_version(two_input_savedmodel, root / MODEL, 1)
    with serving(**_settings(root)) as (_, client):
        yield client


@pytest.fixture(scope="module")
def short_rest_deadline_client(tmp_path_factory, two_input_savedmodel):
    root = tmp_path_factory.mktemp("overload_rest_deadline")
    models.install_version(two_input_savedmodel, root / MODEL, 1)
    with serving(**_settings(root, rest_api_timeout_in_ms=REST_TIMEOUT_MS)) as (_, client):
        yield client


# ---------------------------------------------------------------- requests


def _inputs(rows: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """Distinct rows, and tags of distinct lengths, so no request can pass with another's answer."""
    x = np.random.default_rng(seed).uniform(-5, 5, (rows, 3)).astype(np.float32)
    tags = ["t" * (seed * 10 + i + 1) for i in range(rows)]
    return x, tags


def _check_outputs(y, tag_len, x: np.ndarray, tags: list[str]) -> None:
    np.testing.assert_allclose(np.asarray(y, np.float32), models.two_input_expected(x), atol=1e-5)
    assert list(np.asarray(tag_len)) == [len(t) for t in tags]


def _rest_post(c: Client, x: np.ndarray, tags: list[str]) -> tuple[requests.Response, float]:
    # A fresh connection per call: these run concurrently, in worker threads.
    start = time.monotonic()
    r = requests.post(f"{c.rest}/v1/models/{MODEL}:predict",
                      json={"inputs": {"x": x.tolist(), "tag": tags}}, timeout=30)
    return r, time.monotonic() - start


def _check_rest_ok(response: requests.Response, x: np.ndarray, tags: list[str]) -> None:
    assert response.status_code == 200, response.text
    out = response.json()["outputs"]
    _check_outputs(out["y"], out["tag_len"], x, tags)


def _rest_classify(c: Client, x: np.ndarray) -> tuple[requests.Response, float]:
    start = time.monotonic()
    r = requests.post(f"{c.rest}/v1/models/{MODEL}:classify",
                      json={"signature_name": "classify", "examples": [{"x": row} for row in x.tolist()]},
                      timeout=30)
    return r, time.monotonic() - start


def _check_classify_ok(response: requests.Response, x: np.ndarray) -> None:
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [[label for label, _ in row] for row in results] == [["neg", "pos"]] * len(x)
    y = models.two_input_expected(x)
    e = np.exp(y - y.max(axis=1, keepdims=True))
    np.testing.assert_allclose([[score for _, score in row] for row in results], e / e.sum(1, keepdims=True),
                               atol=1e-5)


def _grpc_request(x: np.ndarray, tags: list[str]) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = MODEL
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(x))
    request.inputs["tag"].CopyFrom(tf.make_tensor_proto(np.array([t.encode() for t in tags], dtype=object)))
    return request


def _check_grpc_ok(response: predict_pb2.PredictResponse, x: np.ndarray, tags: list[str]) -> None:
    _check_outputs(tf.make_ndarray(response.outputs["y"]), tf.make_ndarray(response.outputs["tag_len"]), x, tags)


# ---------------------------------------------------------------- metrics


def _scrape(c: Client) -> list:
    text = c.http.get(f"{c.rest}/metrics", timeout=10).text
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def _value(samples: list, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels`` (0 when none)."""
    return sum(s.value for s in samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def _delta(before: list, after: list, name: str, **labels: str) -> float:
    return _value(after, name, **labels) - _value(before, name, **labels)


def _wait_queue_depth(c: Client, rows: int, timeout: float = 5.0) -> None:
    """Wait until the server reports ``rows`` rows waiting in the batch queue.

    Waiting for 3 rows fails (depth 2) where the machine is so slow that the first
    request's batch timed out and ran before the second request arrived.
    """
    end = time.monotonic() + timeout
    while True:
        depth = _value(_scrape(c), "graft_batch_queue_depth", **BATCH_LABELS)
        if depth == rows:
            return
        assert time.monotonic() < end, f"queue depth stayed {depth}, expected {rows}"
        time.sleep(0.005)


def _requests_by_code(before: list, after: list, protocol: str) -> dict[str, float]:
    codes = {s.labels["code"] for s in after if s.name == "graft_requests_total"}
    deltas = {code: _delta(before, after, "graft_requests_total", model=MODEL, protocol=protocol, code=code)
              for code in codes}
    return {code: n for code, n in deltas.items() if n}


def _assert_one_batch_of(before: list, after: list, rows: int, signature: str = "serving_default") -> None:
    """Exactly one batch of ``signature`` ran since ``before``, of exactly ``rows`` real rows."""
    labels = {**BATCH_LABELS, "signature": signature}
    assert _delta(before, after, "graft_batch_size_count", **labels) == 1
    assert _delta(before, after, "graft_batch_size_sum", **labels) == rows
    assert _delta(before, after, "graft_inference_seconds_count", **labels) == 1


def _full_batch_is_served_at_once(c: Client, seed: int, signature: str = "serving_default") -> None:
    """A request of max_batch_size rows fills a batch on its own, so it runs without the batch timeout."""
    x, tags = _inputs(MAX_BATCH, seed)
    if signature == "classify":
        response, seconds = _rest_classify(c, x)
        _check_classify_ok(response, x)
    else:
        response, seconds = _rest_post(c, x, tags)
        _check_rest_ok(response, x, tags)
    assert seconds < PROMPT_S, f"a full batch took {seconds:.2f}s: it waited for company it could not take"


# ---------------------------------------------------------------- full queue


def test_rest_request_finding_the_queue_full_gets_503_at_once_and_accepted_ones_are_served(client):
    before = _scrape(client)
    xa, ta = _inputs(1, 1)
    xb, tb = _inputs(2, 2)
    xc, tc = _inputs(2, 3)
    with ThreadPoolExecutor(2) as pool:
        fa = pool.submit(_rest_post, client, xa, ta)
        _wait_queue_depth(client, 1)      # A opened the one batch the queue may hold
        fb = pool.submit(_rest_post, client, xb, tb)
        _wait_queue_depth(client, 3)      # B joined it: 1 row of room left
        refused, refused_s = _rest_post(client, xc, tc)
        queued_when_refused = not fa.done() and not fb.done()
        (ra, a_s), (rb, b_s) = fa.result(30), fb.result(30)

    assert queued_when_refused, "A and B were answered before C was refused"
    assert refused.status_code == 503, refused.text
    assert refused_s < PROMPT_S, f"the refusal took {refused_s:.2f}s: C waited instead of being refused"
    retry_after = refused.headers.get("Retry-After")
    assert retry_after is not None and retry_after.isdigit() and int(retry_after) >= 1, refused.headers
    error = refused.json()["error"]
    assert "queue" in error and "full" in error, error

    # Nothing accepted was lost: A and B ran, together, after the batch timeout, each with its own rows.
    _check_rest_ok(ra, xa, ta)
    _check_rest_ok(rb, xb, tb)
    assert a_s >= BATCH_TIMEOUT_S * 0.9, f"A answered after {a_s:.2f}s, before its batch could have run"
    after = _scrape(client)
    _assert_one_batch_of(before, after, 3)   # A's and B's rows, not C's
    assert _requests_by_code(before, after, "rest") == {"OK": 2, "UNAVAILABLE": 1}

    # The server keeps serving, and the queue is empty again.
    _full_batch_is_served_at_once(client, 4)
    assert _value(_scrape(client), "graft_batch_queue_depth", **BATCH_LABELS) == 0


def test_grpc_call_finding_the_queue_full_is_unavailable_at_once_with_retry_after(client):
    before = _scrape(client)
    xa, ta = _inputs(1, 11)
    xb, tb = _inputs(2, 12)
    xc, tc = _inputs(2, 13)
    start = time.monotonic()
    fa = client.predict.Predict.future(_grpc_request(xa, ta), timeout=30)
    _wait_queue_depth(client, 1)
    fb = client.predict.Predict.future(_grpc_request(xb, tb), timeout=30)
    _wait_queue_depth(client, 3)
    refused_at = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        client.predict.Predict(_grpc_request(xc, tc), timeout=30)
    refused_s = time.monotonic() - refused_at
    queued_when_refused = not fa.done() and not fb.done()
    # Collected before any assertion, so a failure here leaves no call queued for the next test.
    ra, rb = fa.result(30), fb.result(30)
    waited_s = time.monotonic() - start

    assert queued_when_refused, "A and B were answered before C was refused"
    err = info.value
    assert err.code() == grpc.StatusCode.UNAVAILABLE, err
    assert refused_s < PROMPT_S, f"the refusal took {refused_s:.2f}s"
    assert "queue" in err.details() and "full" in err.details(), err.details()
    retry_after = dict(err.trailing_metadata() or ()).get("retry-after")
    assert retry_after is not None and retry_after.isdigit() and int(retry_after) >= 1, err.trailing_metadata()

    _check_grpc_ok(ra, xa, ta)
    _check_grpc_ok(rb, xb, tb)
    assert waited_s >= BATCH_TIMEOUT_S * 0.9, f"A and B answered after {waited_s:.2f}s, before their batch ran"
    after = _scrape(client)
    _assert_one_batch_of(before, after, 3)
    assert _requests_by_code(before, after, "grpc") == {"OK": 2, "UNAVAILABLE": 1}

    _full_batch_is_served_at_once(client, 14)
    assert _value(_scrape(client), "graft_batch_queue_depth", **BATCH_LABELS) == 0


# ---------------------------------------------------------------- deadlines in the queue


def _assert_expired_in_queue(c: Client, before: list, protocol: str, deadline_s: float,
                             signature: str = "serving_default") -> None:
    """The server answered one request DEADLINE_EXCEEDED at its deadline, and did not run it."""
    labels = {**BATCH_LABELS, "signature": signature}
    after = _scrape(c)
    assert _requests_by_code(before, after, protocol) == {"DEADLINE_EXCEEDED": 1}
    # The server held it for its deadline (queued), then answered: not at once, not at the batch timeout.
    held = _delta(before, after, "graft_request_latency_seconds_sum", model=MODEL, protocol=protocol,
                  code="DEADLINE_EXCEEDED")
    assert deadline_s * 0.6 <= held < PROMPT_S, f"server held the request {held:.3f}s"
    # Nothing ran, and its row is no longer queued.
    assert _delta(before, after, "graft_batch_size_count", **labels) == 0
    assert _delta(before, after, "graft_inference_seconds_count", **labels) == 0
    assert _value(after, "graft_batch_queue_depth", **labels) == 0
    # Its batch (still open, waiting out the batch timeout) takes a full batch's rows on its
    # own: had the expired row stayed in it, these would need a second batch, which a full
    # queue refuses. Exactly these rows run.
    _full_batch_is_served_at_once(c, 21, signature)
    _assert_one_batch_of(after, _scrape(c), MAX_BATCH, signature)


def test_grpc_deadline_passing_in_the_queue_is_deadline_exceeded_and_never_runs(client):
    before = _scrape(client)
    x, tags = _inputs(1, 20)
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        client.predict.Predict(_grpc_request(x, tags), timeout=GRPC_TIMEOUT_S)
    seconds = time.monotonic() - start
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, info.value
    assert seconds < PROMPT_S
    # The server records the request once its handler has finished; give it a moment.
    end = time.monotonic() + PROMPT_S
    while not _requests_by_code(before, _scrape(client), "grpc") and time.monotonic() < end:
        time.sleep(0.01)
    _assert_expired_in_queue(client, before, "grpc", GRPC_TIMEOUT_S)


@pytest.mark.parametrize("signature", [
    "serving_default",  # predict: the batch is awaited on the event loop
    "classify",         # classify: a worker thread blocks on the batch
])
def test_rest_deadline_passing_in_the_queue_is_504_and_never_runs(short_rest_deadline_client, signature):
    c = short_rest_deadline_client
    before = _scrape(c)
    x, tags = _inputs(1, 30)
    if signature == "classify":
        response, seconds = _rest_classify(c, x)
    else:
        response, seconds = _rest_post(c, x, tags)
    assert response.status_code == 504, response.text
    assert "deadline" in response.json()["error"].lower(), response.text
    assert REST_TIMEOUT_MS / 1000 * 0.9 <= seconds < PROMPT_S, f"answered after {seconds:.3f}s"
    _assert_expired_in_queue(c, before, "rest", REST_TIMEOUT_MS / 1000, signature)
