"""Live state from graft-serve's REST endpoints: the model list, request counters, shadow figures.

Each serve URL is read on every page view with a short timeout; one that does
not answer is reported as down and the page renders without it. Request and
error rates are the change of graft's request counter between two reads of the
same server (the first read shows totals only); the previous read is kept per
console, in :class:`Servers`, never in a module global.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping

from prometheus_client.parser import text_string_to_metric_families

# graft-serve's request counter (serving/metrics.py); a sample is one model, version, signature, code.
REQUESTS_METRIC = "graft_requests_total"
OK_CODE = "OK"
# Counter families are named without the _total suffix by the parser.
_REQUESTS_FAMILY = REQUESTS_METRIC.removesuffix("_total")
# Shadow figures the model page shows, in order (issue 24's GET /v1/models/{name}/shadow).
SHADOW_FIELDS = ("stable", "canary", "fraction", "mirrored", "compared", "dropped", "canary_errors",
                 "agreement", "js_divergence", "latency_ms", "class_histogram", "since")


def request_counts(metrics_text: str) -> dict[str, dict[str, float]]:
    """model -> {"requests", "errors"} totals from graft-serve's /metrics text (errors: code != OK)."""
    counts: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(metrics_text):
        if family.name != _REQUESTS_FAMILY:
            continue
        for sample in family.samples:
            if sample.name != REQUESTS_METRIC:
                continue
            model = sample.labels.get("model", "")
            row = counts.setdefault(model, {"requests": 0.0, "errors": 0.0})
            row["requests"] += sample.value
            if sample.labels.get("code") != OK_CODE:
                row["errors"] += sample.value
    return counts


def rates(before: Mapping[str, Mapping[str, float]], after: Mapping[str, Mapping[str, float]],
          seconds: float) -> dict[str, dict[str, float]]:
    """model -> {"requests_per_s", "errors_per_s"} between two reads ``seconds`` apart.

    A counter that went down means the server restarted: its new total is the increase.
    """
    result = {}
    for model, now in after.items():
        then = before.get(model, {"requests": 0.0, "errors": 0.0})
        per_s = {}
        for key in ("requests", "errors"):
            increase = now[key] - then.get(key, 0.0)
            per_s[f"{key}_per_s"] = (now[key] if increase < 0 else increase) / seconds
        result[model] = per_s
    return result


class Servers:
    """The graft-serve endpoints one console reads, with each one's previous counter read."""

    def __init__(self, urls: Iterable[str], *, timeout_s: float, token: str | None = None):
        self.urls = tuple(urls)
        self.timeout_s = timeout_s
        self._token = token
        self._previous: dict[str, tuple[float, dict]] = {}
        self._lock = threading.Lock()

    def _get(self, url: str) -> tuple[int, bytes]:
        """(status, body) of a GET; OSError (URLError included) when the server cannot be reached."""
        request = urllib.request.Request(url, headers={"Accept": "application/json, text/plain"})
        if self._token:
            request.add_header("Authorization", f"Bearer {self._token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as answer:
                return answer.status, answer.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def read(self, url: str) -> dict:
        """One server's state: {"url", "up", "error", "models": {name: {...}}, "rates": {...}, "counts": {...}}."""
        state: dict = {"url": url, "up": False, "error": "", "models": {}, "counts": {}, "rates": {}}
        try:
            status, body = self._get(f"{url}/v1/models")
            if status != 200:
                state["error"] = f"GET /v1/models answered HTTP {status}"
                return state
            listing = json.loads(body)
            state["models"] = {entry["name"]: entry for entry in listing.get("models", [])
                               if isinstance(entry, dict) and isinstance(entry.get("name"), str)}
            state["up"] = True
            status, body = self._get(f"{url}/metrics")
        except (OSError, ValueError) as exc:
            state["error"] = f"{type(exc).__name__}: {exc}"
            return state
        if status == 200:
            try:
                counts = request_counts(body.decode("utf-8", "replace"))
            except ValueError as exc:
                state["error"] = f"/metrics is not Prometheus text: {exc}"
                return state
            state["counts"] = counts
            now = time.monotonic()
            with self._lock:
                previous = self._previous.get(url)
                self._previous[url] = (now, counts)
            if previous is not None and now - previous[0] > 0:
                state["rates"] = rates(previous[1], counts, now - previous[0])
        else:
            state["error"] = f"GET /metrics answered HTTP {status}"
        return state

    def read_all(self) -> list[dict]:
        """Every server's state, in the order the URLs were given."""
        return [self.read(url) for url in self.urls]

    def shadow(self, url: str, model: str) -> dict | None:
        """The shadow comparison a server reports for ``model``; None when it has none or cannot answer.

        A server without the route (404), with shadow evaluation off (fraction 0) or without
        both a stable and a canary version has no comparison to show.
        """
        try:
            status, body = self._get(f"{url}/v1/models/{urllib.parse.quote(model, safe='')}/shadow")
            data = json.loads(body) if status == 200 else None
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or not data.get("fraction") or data.get("canary") is None:
            return None
        if data.get("stable") == data.get("canary"):
            return None
        return data
