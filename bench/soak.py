"""Benchmark: 20 hot swaps under load; reports failed requests (target 0) and the server's RSS growth.

A child graft-serve (127.0.0.1, batching on, the same bounded queue and flags
as bench/overload.py) serves a model under the default policy, latest 1. While
closed-loop REST clients keep predicting, the script publishes a new version
``--swaps`` times the way the exporter does (copy into a hidden temp dir, one
rename) and waits each time until the new version is AVAILABLE and the old
one has ended. Every request must come back 200 with predictions: anything
else is a failed request, counted by kind. RSS is read from /proc after each
swap. The figures are printed and written to this script's section of
docs/benchmarks.md. Exit code 1 when a request failed or a swap did not finish.

    .venv/bin/python bench/soak.py [--swaps 20] [--clients 4]

Bounded: each swap waits at most ``--swap-timeout`` seconds; the load stops with the swaps.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from common import ServerProcess, free_port, percentile, render_report, replace_section
from overload import (DOCS, MODEL, Outcome, RestClient, RssSampler, kinds_text, build_model, mib,
                      publish_version, request_body, rss_bytes, server_flags)

POLL_SECONDS = 0.2


def model_states(port: int) -> dict[int, str]:
    """{version: state} from GET /v1/models/<model>."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", f"/v1/models/{MODEL}")
        body = json.loads(conn.getresponse().read())
    finally:
        conn.close()
    return {int(s["version"]): s["state"] for s in body.get("model_version_status", [])}


def wait_swapped(port: int, new: int, old: int, timeout: float) -> bool:
    """Wait until ``new`` is AVAILABLE and ``old`` has ENDed (policy latest 1); False on timeout."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        states = model_states(port)
        if states.get(new) == "AVAILABLE" and states.get(old, "END") == "END":
            return True
        time.sleep(0.05)
    return False


class Load:
    """Closed-loop REST clients running on threads until :meth:`stop`; every outcome is kept."""

    def __init__(self, port: int, body: bytes, clients: int):
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(port, body), daemon=True)
                         for _ in range(clients)]

    def _run(self, port: int, body: bytes) -> None:
        client = RestClient(port, body)
        while not self._stop.is_set():
            due = time.monotonic()
            result, latency = client.post()
            if result == "200" and b'"predictions"' not in client.last_body:
                result = "200 without predictions"
            self.outcomes.append(Outcome(due, 0.0, latency, result))
        client.close()

    def start(self) -> "Load":
        """Start the clients."""
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        """Stop the clients after their current request."""
        self._stop.set()
        for t in self._threads:
            t.join(60)


def main(argv: list[str] | None = None) -> int:
    """Run the swaps under load, print and record the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--swaps", type=int, default=20, help="hot swaps to perform (default 20)")
    parser.add_argument("--clients", type=int, default=4, help="closed-loop REST clients (default 4)")
    parser.add_argument("--swap-timeout", type=float, default=60.0, help="longest wait for one swap (s)")
    parser.add_argument("--no-docs", action="store_true", help="do not write docs/benchmarks.md")
    args = parser.parse_args(argv)
    body = request_body()

    with tempfile.TemporaryDirectory(prefix="graft-soak-") as tmp:
        workdir = Path(tmp)
        base = workdir / "repo" / MODEL
        build_model(workdir / "savedmodel")
        publish_version(workdir / "savedmodel", base, 1)
        flags = server_flags(workdir)
        server = ServerProcess(
            ["--model_name", MODEL, "--model_base_path", str(base),
             "--file_system_poll_wait_seconds", str(POLL_SECONDS), *flags],
            workdir / "server.log", free_port(), free_port(), sys.executable)
        swap_seconds: list[float] = []
        rss_after: list[int] = []
        try:
            server.wait_ready()
            warm = Load(server.rest_port, body, args.clients).start()
            time.sleep(3.0)   # first batches trace and allocate; not part of the soak
            warm.stop()
            rss_start = rss_bytes(server.proc.pid)
            sampler = RssSampler(server.proc.pid).start()
            load = Load(server.rest_port, body, args.clients).start()
            start = time.monotonic()
            for version in range(2, args.swaps + 2):
                began = time.monotonic()
                publish_version(workdir / "savedmodel", base, version)
                if not wait_swapped(server.rest_port, version, version - 1, args.swap_timeout):
                    print(f"swap to version {version} did not finish in {args.swap_timeout:.0f} s: "
                          f"{model_states(server.rest_port)}", flush=True)
                    break
                swap_seconds.append(time.monotonic() - began)
                rss_after.append(rss_bytes(server.proc.pid))
                print(f"swap {len(swap_seconds):2d}: version {version} in {swap_seconds[-1]:.2f} s, "
                      f"RSS {mib(rss_after[-1])}", flush=True)
            time.sleep(1.0)   # requests in flight across the last swap finish
            load.stop()
            wall = time.monotonic() - start
            sampler.stop()
            final_states = model_states(server.rest_port)
        finally:
            exit_code = server.stop()

    figures = _figures(args, flags, tmp, load.outcomes, wall, swap_seconds, rss_start, rss_after, sampler,
                       final_states, exit_code)
    print(figures["text"])
    if not args.no_docs:
        replace_section(DOCS, "bench/soak.py", figures["markdown"])
        print(f"recorded in {DOCS}")
    return 0 if figures["met"] else 1


def _figures(args, flags, tmp, outcomes, wall, swap_seconds, rss_start, rss_after, sampler, final_states,
             exit_code) -> dict:
    kinds = Counter(o.result for o in outcomes)
    failures = {k: v for k, v in kinds.items() if k != "200"}
    failed = sum(failures.values())
    ok = [o.latency_ms for o in outcomes if o.result == "200"]
    peak = max((rss for _, rss in sampler.samples), default=0)
    growth_first = (rss_after[-1] - rss_after[0]) / rss_after[0] if len(rss_after) > 1 else float("nan")
    slope = (rss_after[-1] - rss_after[0]) / (len(rss_after) - 1) if len(rss_after) > 1 else float("nan")
    every = max(1, len(rss_after) // 10)
    trail = ", ".join(f"{i + 1}: {rss / 2**20:.0f}" for i, rss in enumerate(rss_after)
                      if i % every == 0 or i == len(rss_after) - 1)
    served = sorted(v for v, s in final_states.items() if s == "AVAILABLE")
    swaps_done = len(swap_seconds)
    met = failed == 0 and swaps_done == args.swaps
    rows = [
        ("hot swaps completed", f"{swaps_done} of {args.swaps} (version now served: {served})"),
        ("swap time (publish -> new AVAILABLE, old END): p50 / max",
         f"{percentile(swap_seconds, 50):.2f} / {max(swap_seconds, default=float('nan')):.2f} s"),
        ("requests under load", f"{len(outcomes)} in {wall:.0f} s ({len(outcomes) / wall:.0f} req/s, "
                                f"{args.clients} closed-loop clients)"),
        ("failed requests", f"{failed}" + (f" ({kinds_text(failures)})" if failed else "")),
        ("latency of successes p50 / p99", f"{percentile(ok, 50):.1f} / {percentile(ok, 99):.1f} ms"),
        ("server RSS before the soak (after warm-up)", mib(rss_start)),
        ("server RSS after swap 1 / after the last", f"{mib(rss_after[0]) if rss_after else 'n/a'} / "
                                                     f"{mib(rss_after[-1]) if rss_after else 'n/a'} "
                                                     f"({growth_first:+.1%}, {slope / 2**20:+.1f} MiB per swap)"),
        ("server RSS peak during the soak", mib(peak)),
        ("server RSS after swap N (MiB)", trail or "n/a"),
        ("SIGTERM exit code", str(exit_code)),
        ("machine load average (1 min) at the end", f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs "
                                                    "(other work on the machine included)"),
    ]
    targets = [("0 failed requests", str(failed), "met" if failed == 0 else "NOT met")]
    shown_flags = " ".join("<file>" if f.startswith(tmp) else f for f in flags)
    setup = (f"Model as in bench/overload.py; each version a fresh copy of the same SavedModel, published "
             f"by copy + rename; policy latest 1; --file_system_poll_wait_seconds {POLL_SECONDS}; flags "
             f"`{shown_flags}`. Load: {args.clients} closed-loop REST clients (one row per request) in the "
             f"benchmark process, on the same {os.cpu_count()} CPUs as the server.")
    text, markdown = render_report(
        f".venv/bin/python bench/soak.py --swaps {args.swaps} --clients {args.clients}", setup, rows, targets)
    return {"text": text, "markdown": markdown, "met": met}


if __name__ == "__main__":
    sys.exit(main())
