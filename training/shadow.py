"""The live half of the promotion gate: a running graft-serve's comparison of stable and canary.

graft-serve with ``--shadow_fraction`` mirrors part of the traffic ``stable``
answers to ``canary`` and publishes the comparison at
``GET /v1/models/{name}/shadow`` (serving.shadow). :func:`read` fetches it over
HTTP with the standard library (no client library at run time), waiting up to
``wait_s`` for enough compared requests, and :func:`judge` holds it to a
:class:`ShadowGate`. Too few compared requests is a rejection, not an error: the
traffic did not show the candidate is safe.
"""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

# One HTTP request's timeout, and the pause between reads while waiting for requests.
READ_TIMEOUT_S = 10.0
POLL_S = 2.0


class ShadowUnavailable(Exception):
    """The server could not be read (unreachable, not graft-serve, an error answer): the gate cannot decide."""


@dataclass(frozen=True)
class ShadowGate:
    """What the live comparison must show: ``min_requests`` compared, top-1 agreement of at least
    ``min_agreement``, and (when set) a Jensen-Shannon divergence of at most ``max_js`` (bits)."""

    url: str
    min_agreement: float
    min_requests: int
    max_js: float | None = None
    wait_s: float = 0.0

    def __post_init__(self):
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"--shadow-url must be an http(s) URL such as http://host:8501, got {self.url!r}")
        if not 0.0 <= self.min_agreement <= 1.0:
            raise ValueError(f"--min-agreement must be within 0..1, got {self.min_agreement}")
        if self.min_requests < 1:
            raise ValueError(f"--min-shadow-requests must be at least 1, got {self.min_requests}")
        if self.max_js is not None and not 0.0 <= self.max_js <= 1.0:
            raise ValueError(f"--max-js must be within 0..1 (bits), got {self.max_js}")
        if not (self.wait_s >= 0 and math.isfinite(self.wait_s)):
            raise ValueError(f"--shadow-wait must be a number of seconds >= 0, got {self.wait_s}")


def route(url: str, model: str) -> str:
    """The shadow route of ``model`` on the server at ``url``."""
    return f"{url.rstrip('/')}/v1/models/{urllib.parse.quote(model, safe='')}/shadow"


def fetch(url: str, model: str, timeout: float = READ_TIMEOUT_S) -> dict:
    """One read of the comparison; ShadowUnavailable when there is no usable answer."""
    target = route(url, model)
    try:
        with urllib.request.urlopen(target, timeout=timeout) as answer:
            figures = json.loads(answer.read().decode("utf-8"))
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", "replace")[:200]
        raise ShadowUnavailable(f"{target} answered HTTP {exc.code}: {detail}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise ShadowUnavailable(f"cannot reach {target}: {getattr(exc, 'reason', exc)}") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise ShadowUnavailable(f"{target} did not answer JSON: {exc}") from exc
    if not isinstance(figures, dict) or "compared" not in figures:
        raise ShadowUnavailable(f"{target} did not answer a shadow report")
    return figures


def read(gate: ShadowGate, model: str, candidate: int | None) -> dict:
    """The comparison, read again every POLL_S seconds for up to ``gate.wait_s`` until it shows
    ``gate.min_requests`` compared requests for ``candidate`` as canary (the last read otherwise)."""
    end = time.monotonic() + gate.wait_s
    while True:
        figures = fetch(gate.url, model)
        enough = figures["compared"] >= gate.min_requests and figures.get("canary") == candidate
        if enough or time.monotonic() + POLL_S > end:
            return figures
        time.sleep(POLL_S)


def judge(figures: dict, gate: ShadowGate, candidate: int | None, current: int | None) -> tuple[bool, str]:
    """Whether the live figures pass ``gate`` for ``candidate`` replacing ``current``, and why."""
    canary, stable = figures.get("canary"), figures.get("stable")
    if canary is None or canary != candidate:
        return False, (f"the server's canary is version {canary}, not the candidate {candidate}: "
                       "no live comparison of the candidate")
    if current is not None and stable != current:
        return False, f"the server's stable is version {stable}, not version {current} the label points at"
    compared = figures["compared"]
    if compared < gate.min_requests:
        return False, (f"too few compared requests: {compared} < {gate.min_requests} "
                       f"(mirrored {figures['mirrored']}, dropped {figures['dropped']}, "
                       f"canary errors {figures['canary_errors']})")
    if figures["canary_errors"]:
        return False, f"the canary failed on {figures['canary_errors']} mirrored requests"
    agreement = figures.get("agreement")
    if agreement is None:
        return False, "the live comparison has no top-1 agreement (the outputs are not a classifier's)"
    if agreement < gate.min_agreement:
        return False, f"live agreement {agreement:.4f} is below {gate.min_agreement:g} over {compared} requests"
    verdict = f"live agreement {agreement:.4f} >= {gate.min_agreement:g} over {compared} requests"
    if gate.max_js is not None:
        divergence = figures.get("js_divergence")
        if divergence is None or divergence > gate.max_js:
            return False, f"live class-histogram divergence {divergence} exceeds {gate.max_js:g} bits ({verdict})"
        verdict += f", JS divergence {divergence:.4f} <= {gate.max_js:g}"
    return True, verdict
