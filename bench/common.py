"""Shared parts of the serving benchmarks: load generators, a graft-serve child, result tables.

Imports no TensorFlow, because the Python load generator's worker processes
(started with ``spawn``) import this module, and a TensorFlow import would cost
each of them seconds and hundreds of MB.

Load generators, all one image per request, all bounded by a duration and a
request count, all aimed at 127.0.0.1:

- gRPC: ``h2load`` (Debian nghttp2-client) replaying one recorded Predict
  request over HTTP/2, else the Python client (grpcio, pre-serialised request);
- REST: ``wrk`` (Debian) posting one recorded body, else the Python client
  (``http.client`` with keep-alive).

The Python client runs in several processes with threads in each, so it is not
bound by one GIL; each process reports the CPU time it spent during the
measured window. gRPC failures arrive as HTTP 200 with a non-zero
``grpc-status`` trailer, which h2load counts as success, so every run also
reads the server's own ``graft_requests_total`` by code.
"""

from __future__ import annotations

import http.client
import math
import multiprocessing
import os
import re
import resource
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from serving.runtime.process import ServeProcess

GRPC_PREDICT_PATH = "/tensorflow.serving.PredictionService/Predict"
# A hard cap on requests per run, whatever the duration: loops stay bounded in count too.
MAX_REQUESTS_PER_RUN = 2_000_000
READY_TIMEOUT_S = 180.0


@dataclass
class LoadResult:
    """One measured run: what the client saw, and the CPU time both sides spent."""

    protocol: str
    concurrency: int
    tool: str
    seconds: float
    ok: int
    errors: int
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    client_cpu_s: float = 0.0
    server_cpu_s: float = 0.0
    mean_batch: float | None = None                 # rows per executed batch (batching servers)
    percentiles: dict[float, float] | None = None   # the tool's own distribution (wrk), if no samples

    @property
    def images_per_s(self) -> float:
        """Successful single-image requests per second."""
        return self.ok / self.seconds if self.seconds > 0 else 0.0

    def cpu_ms_per_image(self, which: str) -> float:
        """CPU milliseconds per served image of the ``server`` or the ``client``."""
        used = self.server_cpu_s if which == "server" else self.client_cpu_s
        return used / self.ok * 1000.0 if self.ok else math.nan

    def latency_ms(self, q: float) -> float:
        """The q-th percentile (0..100) of request latency in ms (NaN when unknown)."""
        if self.percentiles is not None:
            return self.percentiles.get(float(q), math.nan)
        return percentile(self.latencies_ms, q)


def percentile(values, q: float) -> float:
    """Nearest-rank percentile of ``values`` (NaN when empty)."""
    data = sorted(values)
    if not data:
        return math.nan
    rank = max(1, math.ceil(q / 100.0 * len(data)))
    return float(data[min(rank, len(data)) - 1])


def children_cpu_s() -> float:
    """User + system CPU seconds of every child process waited for so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a running process (all its threads), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def grpc_frame(message: bytes) -> bytes:
    """One gRPC length-prefixed message (uncompressed), as it travels in an HTTP/2 DATA frame."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


# ----------------------------------------------------------------------- the server


class ServerProcess(ServeProcess):
    """graft-serve as a child process on 127.0.0.1 with the given extra flags."""

    def __init__(self, flags: list[str], log_path: Path, grpc_port: int, rest_port: int, python: str):
        self.grpc_port = grpc_port
        self.rest_port = rest_port
        super().__init__(["--host", "127.0.0.1", "--port", str(grpc_port), "--rest_api_port", str(rest_port),
                          *flags], log_path, python=python)

    @property
    def rest(self) -> str:
        """The REST base URL."""
        return f"http://127.0.0.1:{self.rest_port}"

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Block until /readyz answers 200; RuntimeError with the log if the process died."""
        super().wait_ready(self.rest, timeout)

    def cpu_s(self) -> float:
        """CPU seconds the server has used so far."""
        return process_cpu_s(self.proc.pid)

    def scrape(self) -> list[tuple[str, dict[str, str], float]]:
        """Every sample of the server's /metrics as (name, labels, value)."""
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(f"{self.rest}/metrics", timeout=10) as response:
            text = response.read().decode()
        return [(s.name, s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples]

    def request_counts(self, samples=None) -> dict[tuple[str, str], float]:
        """graft_requests_total summed by (protocol, code)."""
        counts: dict[tuple[str, str], float] = {}
        for name, labels, value in samples if samples is not None else self.scrape():
            if name == "graft_requests_total":
                key = (labels.get("protocol", ""), labels.get("code", ""))
                counts[key] = counts.get(key, 0.0) + value
        return counts

    @staticmethod
    def failed_between(before: dict[tuple[str, str], float], after: dict[tuple[str, str], float],
                       protocol: str | None = None) -> float:
        """Requests that failed between two ``request_counts`` (of ``protocol``, or of all).

        CANCELLED is no failure: those are calls the load generator abandoned when its
        time ran out (the asyncio gRPC server notices them); the client never counted them.
        """
        return sum(v - before.get(k, 0.0) for k, v in after.items()
                   if (protocol is None or k[0] == protocol) and k[1] not in ("OK", "CANCELLED"))

    @staticmethod
    def batches(samples) -> tuple[float, float]:
        """(batches run, rows in them) so far, from graft_batch_size."""
        count = sum(v for n, _, v in samples if n == "graft_batch_size_count")
        rows = sum(v for n, _, v in samples if n == "graft_batch_size_sum")
        return count, rows


def render_report(command: str, setup: str, rows: list[tuple[str, str]],
                  targets: list[tuple[str, str, str]]) -> tuple[str, str]:
    """(plain text, Markdown) of a benchmark's figures and its targets (name, measured, verdict)."""
    text = "\n".join(f"{k}: {v}" for k, v in rows) + "\n" + "\n".join(
        f"target {n}: {v} ({m})" for n, v, m in targets)
    md = [f"Run {time.strftime('%Y-%m-%d %H:%M')}: `{command}`. {setup}", "",
          "| figure | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], "",
          "| target | measured | |", "|---|---|---|", *[f"| {n} | {v} | {m} |" for n, v, m in targets]]
    return text, "\n".join(md)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports on 127.0.0.1 that were free a moment ago.

    Held open together while chosen: ports picked one after another can repeat.
    """
    import contextlib
    import socket

    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


# ------------------------------------------------------------------ native generators


def native_tools() -> dict[str, str | None]:
    """Paths of h2load and wrk when installed (None otherwise)."""
    return {"h2load": shutil.which("h2load"), "wrk": shutil.which("wrk")}


def h2load_grpc(h2load: str, port: int, message: bytes, concurrency: int, duration: float,
                workdir: Path) -> tuple[float, int, int, list[float]]:
    """Replay one serialised PredictRequest for ``duration`` s; (seconds, ok, failed, latencies in ms)."""
    return h2load_grpc_many(h2load, port, [(GRPC_PREDICT_PATH, message, concurrency)], duration, workdir)


def h2load_grpc_many(h2load: str, port: int, streams: list[tuple[str, bytes, int]], duration: float,
                     workdir: Path) -> tuple[float, int, int, list[float]]:
    """One h2load per ``(gRPC method path, serialised request, clients)``, all at once, for ``duration`` s.

    Each h2load replays its request from its own closed-loop clients (one
    connection and one stream each). Returns (seconds of the longest, ok,
    failed, latencies in ms) over all of them.
    """
    runs = []
    for index, (path, message, clients) in enumerate(streams):
        body = workdir / f"grpc_request-{index}.bin"
        body.write_bytes(grpc_frame(message))
        log_file = workdir / f"h2load-{index}.log"
        log_file.unlink(missing_ok=True)
        command = [h2load, "-c", str(clients), "-m", "1", "-t", "1",
                   "-D", str(max(1, round(duration))), "-d", str(body),
                   "-H", "content-type: application/grpc", "-H", "te: trailers",
                   "--log-file", str(log_file),
                   f"http://127.0.0.1:{port}{path}"]
        runs.append((subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
                     log_file))
    seconds, latencies, ok, failed = 0.0, [], 0, 0
    for proc, log_file in runs:
        out = proc.communicate(timeout=duration + 60)[0]
        finished = re.search(r"finished in ([\d.]+)(m?s)", out)
        if finished is None:
            raise RuntimeError(f"unexpected h2load output:\n{out}")
        seconds = max(seconds, float(finished[1]) / (1000.0 if finished[2] == "ms" else 1.0))
        run_failed = 0
        for line in log_file.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) < 3:
                continue
            if parts[1].startswith("2"):
                ok += 1
                latencies.append(int(parts[2]) / 1000.0)
            else:
                run_failed += 1
        requests_line = re.search(r"requests: .*?(\d+) failed, (\d+) errored, (\d+) timeout", out)
        if requests_line:
            run_failed = max(run_failed, int(requests_line[1]) + int(requests_line[3]))
        failed += run_failed
    return seconds, ok, failed, latencies


_WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = io.open(os.getenv("GRAFT_BENCH_BODY"), "rb")
wrk.body = f:read("*all")
f:close()
"""


def _wrk_time_ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def wrk_post(wrk: str, url: str, body: bytes, concurrency: int, duration: float,
             workdir: Path) -> tuple[float, int, int, dict[float, float]]:
    """POST one JSON body for ``duration`` s; (seconds, ok, failed, {percentile: ms})."""
    body_path = workdir / "rest_body.json"
    body_path.write_bytes(body)
    script = workdir / "post.lua"
    script.write_text(_WRK_SCRIPT)
    command = [wrk, "-t", "1", "-c", str(concurrency), "-d", f"{max(1, round(duration))}s",
               "--timeout", "30s", "--latency", "-s", str(script), url]
    env = dict(os.environ, GRAFT_BENCH_BODY=str(body_path))
    out = subprocess.run(command, capture_output=True, text=True, timeout=duration + 60, env=env).stdout
    total = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", out)
    if total is None:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    seconds = _wrk_time_ms(total[2] + total[3]) / 1000.0
    done = int(total[1])
    failed = 0
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non_2xx:
        failed += int(non_2xx[1])
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if socket_errors:
        failed += sum(int(v) for v in socket_errors.groups())
    percentiles = {float(q): _wrk_time_ms(t) for q, t in re.findall(r"^\s+(\d+)%\s+(\S+)", out, re.M)}
    return seconds, max(0, done - (int(non_2xx[1]) if non_2xx else 0)), failed, percentiles


# ------------------------------------------------------------------ Python generator


def _grpc_thread(channel, body: bytes, deadline: float, limit: int, out: list, errors: list) -> None:
    call = channel.unary_unary(GRPC_PREDICT_PATH)  # bytes in, bytes out: no TF protos needed here
    while time.monotonic() < deadline and len(out) < limit:
        start = time.perf_counter()
        try:
            call(body, timeout=30)
        except Exception:  # counted: any failure is an error of the run
            errors.append(1)
            continue
        out.append((time.perf_counter() - start) * 1000.0)


def _rest_thread(port: int, path: str, body: bytes, deadline: float, limit: int, out: list,
                 errors: list) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": "application/json"}
    while time.monotonic() < deadline and len(out) < limit:
        start = time.perf_counter()
        try:
            conn.request("POST", path, body, headers)
            response = conn.getresponse()
            response.read()
            ok = response.status == 200
        except Exception:
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            ok = False
        if ok:
            out.append((time.perf_counter() - start) * 1000.0)
        else:
            errors.append(1)
    conn.close()


def _client_process(kind: str, port: int, path: str, body: bytes, threads: int, duration: float,
                    limit: int, ready, go, results) -> None:
    """One load-generator process: ``threads`` closed-loop clients for ``duration`` s."""
    channel = None
    if kind == "grpc":
        import grpc

        channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[
            ("grpc.max_receive_message_length", 64 * 1024 * 1024)])
        grpc.channel_ready_future(channel).result(timeout=30)
    ready.release()
    go.wait()
    cpu0 = time.process_time()
    wall0 = time.monotonic()
    deadline = wall0 + duration
    out: list[float] = []
    errors: list[int] = []
    if kind == "grpc":
        workers = [threading.Thread(target=_grpc_thread, args=(channel, body, deadline, limit, out, errors))
                   for _ in range(threads)]
    else:
        workers = [threading.Thread(target=_rest_thread, args=(port, path, body, deadline, limit, out, errors))
                   for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    results.put((time.monotonic() - wall0, out, len(errors), time.process_time() - cpu0))
    if channel is not None:
        channel.close()


def python_load(kind: str, port: int, path: str, body: bytes, concurrency: int, duration: float,
                processes: int | None = None) -> tuple[float, int, int, list[float], float]:
    """Closed-loop Python load: (seconds, ok, failed, latencies ms, client CPU s in the window)."""
    ctx = multiprocessing.get_context("spawn")
    processes = max(1, min(concurrency, processes or os.cpu_count() or 1))
    shares = [concurrency // processes + (1 if i < concurrency % processes else 0) for i in range(processes)]
    ready, go, results = ctx.Semaphore(0), ctx.Event(), ctx.Queue()
    limit = MAX_REQUESTS_PER_RUN // processes
    procs = [ctx.Process(target=_client_process,
                         args=(kind, port, path, body, share, duration, limit, ready, go, results))
             for share in shares]
    for p in procs:
        p.start()
    for _ in procs:
        if not ready.acquire(timeout=60):
            raise RuntimeError("a load-generator process did not start")
    go.set()
    seconds, latencies, failed, cpu = 0.0, [], 0, 0.0
    for _ in procs:
        wall, out, errors, used = results.get(timeout=duration + 120)
        seconds = max(seconds, wall)
        latencies.extend(out)
        failed += errors
        cpu += used
    for p in procs:
        p.join(30)
    return seconds, len(latencies), failed, latencies, cpu


# ------------------------------------------------------------------------- docs


def replace_section(path: Path, heading: str, body: str) -> None:
    """Write ``body`` under ``## heading`` in a markdown file, keeping every other section.

    The part between this script's begin/end markers is replaced; text in the
    section outside the markers (a hand-written analysis) is kept. A missing
    section is appended; a missing file is created with a title.
    """
    begin, end = f"<!-- {heading}: begin (generated) -->", f"<!-- {heading}: end -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n\nEach section is written by the script it names.\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    elif f"\n## {heading}\n" in text:
        head, rest = text.split(f"\n## {heading}\n", 1)
        text = f"{head}\n## {heading}\n\n{block}\n{rest}"
    else:
        text = text.rstrip() + f"\n\n## {heading}\n\n{block}\n"
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=".bench-", suffix=".md")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    # mkstemp makes the file private; a doc is for everyone to read.
    os.chmod(name, 0o644)
    os.replace(name, path)
