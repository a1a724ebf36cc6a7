"""Benchmark: graft-serve throughput and latency against the in-process ceiling, in one run.

One run:

1. exports a benchmark model (MobileNetV3Small 96x96, random weights, through
   graft's own exporter) unless ``--model-dir`` names a model base path;
2. measures the in-process ceiling: the exported ``serving_default`` signature
   called directly at batch 1, 8, 32 and 64, in fresh processes, once with
   TensorFlow's default threads and once with the servers' (``--threads``);
   and graft's own call (``Servable.run``, the frozen graph) with the servers'
   threads, the stricter reference reported beside it;
3. starts graft-serve processes on 127.0.0.1, one with batching on (the
   parameters file below, tuned for a small CPU) and a naive baseline with
   batching off, then drives each with gRPC Predict, REST JSON floats (TF Serving's
   ``/v1 :predict`` and V2's ``/v2/models/{m}/infer``, the same image as flat
   ``data``) and REST ``{"b64"}`` JPEG at concurrency 1, 8 and 32, one image per request, for a
   fixed duration each (the servers alternate, so all see the same machine
   load); a third, batched server with a short GIL switch interval
   (``--python_switch_interval_micros``, see ``--switch-interval-micros``)
   is driven with gRPC only; all of them run with ``--tensorflow_cpus 1``
   (the model's thread on a core of its own, the request threads under
   SCHED_BATCH on the other) except one more batched server,
   driven like the first, that shows what the pinning adds; one more batched
   server with ``--freeze_graph=false`` shows what freezing the graph adds;
4. prints images/s, p50/p99 latency, errors, each figure's ratio to the
   in-process batch-32 ceiling, and the CPU seconds the load generator and the
   server used; writes the table to docs/benchmarks.md (``--out``).

Random weights: MobileNetV3Small with ``weights=None`` answers (almost) the same
for every input (REFERENCE.md). That does not change its cost, and this script
measures cost only; correctness under batching is tested in tests/serving.

The load generator shares the machine with the server: h2load (gRPC) and wrk
(REST) are used when installed (``apt-get install nghttp2-client wrk``), else a
multi-process Python client; its CPU time is reported next to every figure.

    .venv/bin/python bench/serve.py [--duration 8] [--model-dir DIR] [--client auto|python]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (bench/common.py, importable by the spawned client processes too)

ROOT = Path(__file__).resolve().parent.parent
SECTION = "bench/serve.py"
PROTOCOLS = ("grpc", "rest_json", "rest_v2_json", "rest_b64")
PROTOCOL_NAMES = {"grpc": "gRPC Predict", "rest_json": "REST JSON floats", "rest_v2_json": "REST V2 JSON floats",
                  "rest_b64": "REST b64 JPEG"}
MODEL_NAME = "bench"
# Each REST load's path, and the protocol label its requests carry in graft_requests_total.
REST_PATHS = {"rest_json": f"/v1/models/{MODEL_NAME}:predict", "rest_b64": f"/v1/models/{MODEL_NAME}:predict",
              "rest_v2_json": f"/v2/models/{MODEL_NAME}/infer"}
METRIC_PROTOCOLS = {"grpc": "grpc", "rest_json": "rest", "rest_b64": "rest", "rest_v2_json": "rest_v2"}
NUM_CLASSES = 10
CEILING_BATCHES = (1, 8, 32, 64)
CEILING_MAX_CALLS = 5000
# How the ceiling calls the model: the reference, the restored signature on a
# ready tensor; and graft's own call (Servable.run: the frozen graph, --freeze_graph).
CEILING_CALLS = ("signature", "graft")

# Tuned for a 2-core CPU. Timeout 0 (TF Serving's CPU advice): a batch runs as soon
# as the batch thread is free, so batches grow with load and a lone request never
# waits. One batch thread on one TensorFlow thread (SERVED_THREADS): the model keeps
# one core and the Python request handling gets the other. Room for every
# in-flight request of the heaviest load, so the queue never refuses one.
CPU_BATCHING = """\
max_batch_size { value: 32 }
batch_timeout_micros { value: 0 }
max_enqueued_batches { value: 64 }
num_batch_threads { value: 1 }
"""

# TensorFlow threads of both served configurations (intra-op, inter-op). On this
# 2-core machine a small CNN runs 2-3x faster per image on one thread than spread
# over two (docs/benchmarks.md measures both); 0 means TensorFlow's default.
SERVED_THREADS = (1, 1)
DEFAULT_THREADS = (0, 0)

# (label, load, figure, target): the targets on the 2-core CPU.
TARGETS = (
    ("gRPC at C=32", "grpc", 0.85),
    ("REST b64 JPEG at C=32", "rest_b64", 0.70),
    ("REST JSON floats at C=32", "rest_json", 0.30),
)
ADDED_LATENCY_TARGET_MS = 1.5

# A third server, gRPC only: the batched one with a short GIL switch interval, so the
# batch thread gets the GIL back quickly from the busy event loop (serving/main.py).
TUNED_SWITCH_INTERVAL_US = 20

# graft-serve --tensorflow_cpus: the model's compute thread (one intra-op thread,
# SERVED_THREADS) on a core of its own, the request threads on the other (under
# SCHED_BATCH, so that they do not preempt each other on wake-up). A batched
# server without it is driven in the same run ("batching, unpinned"), for comparison.
TENSORFLOW_CPUS = 1
UNPINNED_MODE = "batching, unpinned"
# The batched, pinned server with --freeze_graph=false: what freezing adds, in the same run.
UNFROZEN_MODE = "batching, unfrozen"


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", default="", help="model base path (<repo>/<name>) to serve instead of exporting one")
    p.add_argument("--base", default="mobilenet_v3_small", help="base to export (default mobilenet_v3_small)")
    p.add_argument("--size", type=int, default=96, help="image size of the exported model (default 96)")
    p.add_argument("--duration", type=float, default=8.0, help="seconds per measured load (default 8)")
    p.add_argument("--warmup", type=float, default=1.5, help="seconds of unrecorded load per server and protocol")
    p.add_argument("--ceiling-seconds", type=float, default=3.0, help="seconds per in-process batch size")
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated client concurrencies")
    p.add_argument("--protocols", default=",".join(PROTOCOLS), help=f"subset of {','.join(PROTOCOLS)}")
    p.add_argument("--client", choices=("auto", "python"), default="auto",
                   help="auto: h2load/wrk when installed, else Python; python: always the Python client")
    p.add_argument("--batching-file", default="", help="BatchingParameters file (default: the CPU tuning above)")
    p.add_argument("--no-baseline", action="store_true", help="skip the batching-off server")
    p.add_argument("--switch-interval-micros", type=int, default=TUNED_SWITCH_INTERVAL_US,
                   help="also drive gRPC on a batched server with --python_switch_interval_micros this "
                        f"(default {TUNED_SWITCH_INTERVAL_US}; 0: skip it)")
    p.add_argument("--tensorflow-cpus", type=int, default=TENSORFLOW_CPUS,
                   help="graft-serve --tensorflow_cpus for the servers (default %(default)s: the model's "
                        "thread gets a core of its own); a batched server without it is driven too, for "
                        "comparison (0: no pinning, no comparison server)")
    p.add_argument("--server-flag", action="append", default=[], help="extra graft-serve flag (repeatable)")
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"), help="markdown file to write ('' = none)")
    p.add_argument("--json", default="", help="also write the raw figures as JSON here")
    p.add_argument("--device", default="", help="device name for the report (default: detected)")
    p.add_argument("--threads", default=",".join(map(str, SERVED_THREADS)),
                   help="intra,inter TensorFlow threads of the served configurations (0: TF's default)")
    # Internal: measure the ceiling in a fresh process (TF threads are fixed at start-up).
    p.add_argument("--ceiling-child", default="", help=argparse.SUPPRESS)
    p.add_argument("--ceiling-call", choices=CEILING_CALLS, default="signature", help=argparse.SUPPRESS)
    return p


# ----------------------------------------------------------------------------- model


def export_model(base: str, size: int, repo: Path) -> Path:
    """Export ``base`` with random weights and a softmax head through graft's exporter."""
    import keras

    from training.bases import build_backbone, get_base
    from training.export import export_version

    backbone = build_backbone(get_base(base), size, "none")
    features = keras.layers.GlobalAveragePooling2D()(backbone.model.output)
    outputs = keras.layers.Dense(NUM_CLASSES, activation="softmax", dtype="float32")(features)
    model = keras.Model(backbone.model.input, outputs)
    export_version(model, [f"class{i}" for i in range(NUM_CLASSES)], repo, MODEL_NAME, image_size=size,
                   lineage={"base": base, "weights": {"kind": "none"}, "purpose": "bench/serve.py"})
    return repo / MODEL_NAME


def latest_version(base_path: Path) -> Path:
    """The highest-numbered version directory of a model base path."""
    versions = [p for p in base_path.iterdir() if p.name.isdigit() and (p / "saved_model.pb").exists()]
    if not versions:
        raise SystemExit(f"no version with saved_model.pb under {base_path}")
    return max(versions, key=lambda p: int(p.name))


def image_input(version: Path) -> tuple[str, int, int]:
    """(input name, height, width) of the version's serving_default image input."""
    from serving.servable import SignatureSpec, tf_signature_defs

    sig = SignatureSpec.from_signature_def("serving_default", tf_signature_defs(version)["serving_default"])
    (name, spec), = sig.inputs.items()
    if spec.shape is None or len(spec.shape) != 4 or spec.shape[1] is None or spec.shape[2] is None:
        raise SystemExit(f"serving_default input {name!r} is not a fixed-size image batch: {spec.shape}")
    return name, spec.shape[1], spec.shape[2]


def sample_image(height: int, width: int) -> np.ndarray:
    """A smooth synthetic RGB picture (compresses like a photo, unlike noise)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack([128 + 100 * np.sin(xx / 7.0), 128 + 100 * np.cos(yy / 9.0),
                    128 + 60 * np.sin((xx + yy) / 11.0)], axis=-1)
    return np.clip(rgb, 0, 255).round().astype(np.float32)


# ------------------------------------------------------------------ in-process ceiling


def measure_ceiling(version: Path, input_name: str, height: int, width: int,
                    seconds: float, call: str = "signature") -> dict[int, dict[str, float]]:
    """images/s and p50 latency of the model called in this process, as ``call`` says.

    ``signature``: the restored ``serving_default`` signature on a ready tensor
    (the issue's ceiling). ``graft``: ``Servable.run``, the call graft-serve's
    batch thread makes, on a merged batch as the batcher builds it (its variables
    frozen into constants, ``--freeze_graph``; outputs to numpy).
    """
    import tensorflow as tf

    rng = np.random.default_rng(0)
    if call == "graft":
        from serving.buffers import aligned_empty
        from serving.servable import Servable

        servable = Servable.load(MODEL_NAME, int(version.name), version)

        def prepare(batch):
            images = aligned_empty((batch, height, width, 3), np.float32)
            images[...] = rng.uniform(0, 255, images.shape)
            return images

        def run(images):
            servable.run("serving_default", {input_name: images})
    else:
        fn = tf.saved_model.load(str(version)).signatures["serving_default"]

        def prepare(batch):
            return tf.constant(rng.uniform(0, 255, (batch, height, width, 3)).astype(np.float32))

        def run(images):
            {k: v.numpy() for k, v in fn(**{input_name: images}).items()}
    result = {}
    for batch in CEILING_BATCHES:
        images = prepare(batch)
        for _ in range(3):
            run(images)
        times = []
        cpu0 = time.process_time()
        end = time.monotonic() + seconds
        while time.monotonic() < end and len(times) < CEILING_MAX_CALLS:
            start = time.perf_counter()
            run(images)
            times.append(time.perf_counter() - start)
        cpu = time.process_time() - cpu0
        result[batch] = {"images_per_s": batch * len(times) / sum(times),
                         "p50_ms": statistics.median(times) * 1000.0,
                         "cpu_ms_per_image": cpu / (batch * len(times)) * 1000.0,
                         "cores": cpu / sum(times)}
    return result


def ceiling_in_child(version: Path, threads: tuple[int, int], seconds: float,
                     call: str = "signature") -> dict[int, dict[str, float]]:
    """``measure_ceiling`` in a fresh Python process whose TensorFlow runs on ``threads`` (intra, inter)."""
    import subprocess

    command = [sys.executable, str(Path(__file__).resolve()), "--ceiling-child", str(version),
               "--threads", ",".join(map(str, threads)), "--ceiling-seconds", str(seconds),
               "--ceiling-call", call]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"ceiling child failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return {int(b): row for b, row in json.loads(done.stdout.strip().splitlines()[-1]).items()}


def ceiling_child(args) -> int:
    """The ``--ceiling-child`` mode: set TF's threads, measure, print one JSON line."""
    import tensorflow as tf

    from serving.devices import GpuOptions, configure_gpus

    configure_gpus(GpuOptions())  # memory growth: the parent and the servers share the GPU
    intra, inter = parse_threads(args.threads)
    tf.config.threading.set_intra_op_parallelism_threads(intra)
    tf.config.threading.set_inter_op_parallelism_threads(inter)
    version = Path(args.ceiling_child)
    input_name, height, width = image_input(version)
    print(json.dumps(measure_ceiling(version, input_name, height, width, args.ceiling_seconds,
                                     args.ceiling_call)))
    return 0


def parse_threads(text: str) -> tuple[int, int]:
    """"intra,inter" -> (intra, inter); 0 is TensorFlow's default."""
    try:
        intra, inter = (int(x) for x in text.split(","))
    except ValueError:
        raise SystemExit(f"--threads wants two integers 'intra,inter', got {text!r}") from None
    return intra, inter


def threads_text(threads: tuple[int, int]) -> str:
    """How a thread setting reads in the report."""
    return "TensorFlow's default threads" if threads == DEFAULT_THREADS else \
        f"intra_op {threads[0] or 'default'}, inter_op {threads[1] or 'default'}"


def thread_flags(threads: tuple[int, int]) -> list[str]:
    """graft-serve flags for ``threads`` (none for TensorFlow's defaults)."""
    intra, inter = threads
    return [*([f"--tensorflow_intra_op_parallelism={intra}"] if intra else []),
            *([f"--tensorflow_inter_op_parallelism={inter}"] if inter else [])]


# ------------------------------------------------------------------------- requests


def make_bodies(input_name: str, height: int, width: int) -> dict[str, bytes]:
    """One request per protocol, each carrying the same single image."""
    from PIL import Image
    from tensorflow_serving.apis import predict_pb2

    from serving.codecs.tensor_proto import numpy_to_tensor_proto

    image = sample_image(height, width)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = MODEL_NAME
    request.inputs[input_name].CopyFrom(numpy_to_tensor_proto(image[None]))
    jpeg = io.BytesIO()
    Image.fromarray(image.astype(np.uint8)).save(jpeg, format="JPEG", quality=90)
    return {
        "grpc": request.SerializeToString(),
        # Raw 0..255 pixels as floats, as a client sends img.astype(float).tolist().
        "rest_json": json.dumps({"instances": image[None].tolist()}).encode(),
        # The same pixels as V2 sends them (tritonclient's JSON form): flat row-major data.
        "rest_v2_json": json.dumps({"inputs": [{"name": input_name, "datatype": "FP32",
                                                "shape": [1, height, width, 3],
                                                "data": image.reshape(-1).tolist()}]}).encode(),
        "rest_b64": json.dumps({"instances": [{"b64": base64.b64encode(jpeg.getvalue()).decode()}]}).encode(),
    }


def check_answers(server: common.ServerProcess, bodies: dict[str, bytes]) -> None:
    """One request per protocol through the real clients; each must return one row of scores."""
    import grpc
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        response = stub.Predict(predict_pb2.PredictRequest.FromString(bodies["grpc"]), timeout=60)
    dims = [d.size for d in response.outputs["scores"].tensor_shape.dim]
    if dims != [1, NUM_CLASSES] and dims[:1] != [1]:
        raise SystemExit(f"unexpected gRPC scores shape {dims}")
    for kind in ("rest_json", "rest_b64", "rest_v2_json"):
        req = urllib.request.Request(f"{server.rest}{REST_PATHS[kind]}", data=bodies[kind],
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as answer:
            answer = json.loads(answer.read())
        if kind == "rest_v2_json":
            shapes = {o["name"]: o["shape"] for o in answer.get("outputs", [])}
            if shapes.get("scores", [None])[0] != 1:
                raise SystemExit(f"unexpected {kind} answer: {str(answer)[:200]}")
            continue
        predictions = answer["predictions"]
        if len(predictions) != 1 or "scores" not in predictions[0]:
            raise SystemExit(f"unexpected {kind} answer: {str(predictions)[:200]}")


# ----------------------------------------------------------------------------- load


def run_load(server: common.ServerProcess, protocol: str, concurrency: int, duration: float,
             bodies: dict[str, bytes], tools: dict[str, str | None], workdir: Path) -> common.LoadResult:
    """Drive one protocol at one concurrency for ``duration`` seconds."""
    grpc_kind = protocol == "grpc"
    path = REST_PATHS.get(protocol, "")
    samples0 = server.scrape()
    server0 = server.cpu_s()
    children0 = common.children_cpu_s()
    native = tools["h2load"] if grpc_kind else tools["wrk"]
    if native:
        if grpc_kind:
            seconds, ok, failed, latencies = common.h2load_grpc(
                native, server.grpc_port, bodies[protocol], concurrency, duration, workdir)
            percentiles = None
        else:
            seconds, ok, failed, percentiles = common.wrk_post(
                native, server.rest + path, bodies[protocol], concurrency, duration, workdir)
            latencies = []
        client_cpu = common.children_cpu_s() - children0
        tool = os.path.basename(native)
    else:
        seconds, ok, failed, latencies, client_cpu = common.python_load(
            "grpc" if grpc_kind else "rest", server.grpc_port if grpc_kind else server.rest_port,
            path, bodies[protocol], concurrency, duration)
        percentiles = None
        tool = "python"
    server_cpu = server.cpu_s() - server0
    samples1 = server.scrape()
    counts0, counts1 = server.request_counts(samples0), server.request_counts(samples1)
    server_errors = server.failed_between(counts0, counts1, METRIC_PROTOCOLS[protocol])
    (batches0, rows0), (batches1, rows1) = server.batches(samples0), server.batches(samples1)
    mean_batch = (rows1 - rows0) / (batches1 - batches0) if batches1 > batches0 else None
    if grpc_kind:
        # h2load sees a gRPC error as an HTTP 200: take the server's count out of the successes.
        ok = max(0, ok - int(server_errors))
    return common.LoadResult(protocol, concurrency, tool, seconds, ok, max(failed, int(server_errors)),
                             latencies, client_cpu, server_cpu, mean_batch, percentiles)


def p(result: common.LoadResult, q: float) -> float:
    """A latency percentile in ms."""
    return result.latency_ms(q)


# --------------------------------------------------------------------------- report


def device_name() -> str:
    """The CPU model and the cores this process may use."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {len(os.sched_getaffinity(0))} cores"


def pin_flags(args) -> list[str]:
    """The servers' --tensorflow_cpus flags; none when off or when it would leave no CPU for the rest."""
    if args.tensorflow_cpus <= 0 or args.tensorflow_cpus >= len(os.sched_getaffinity(0)):
        return []
    return ["--tensorflow_cpus", str(args.tensorflow_cpus)]


def tuned_mode(args) -> str:
    """The report's name of the server run with a short switch interval."""
    return f"batching, switch {args.switch_interval_micros} us"


def cpu_ratio(result: common.LoadResult, ceiling: dict) -> float:
    """Ceiling CPU per image over served CPU per image (server + load generator).

    What the throughput ratio would be on a machine where nothing else runs and
    every side is CPU-bound: it does not move with the shared machine's load.
    """
    served = result.cpu_ms_per_image("server") + result.cpu_ms_per_image("client")
    return ceiling[32]["cpu_ms_per_image"] / served if served > 0 else float("nan")


def report(args, device: str, model_desc: str, ceiling: dict, ceiling_runs: list[tuple[tuple, str, dict]],
           results: dict, batching: str, tools: dict, loadavg: tuple) -> str:
    """The markdown section: setup, ceiling, served figures, targets."""
    ref = ceiling[32]["images_per_s"]
    # graft's own call (the frozen graph): the stricter reference, for comparison.
    graft_ref = max((run[32]["images_per_s"] for _, call, run in ceiling_runs if call == "graft"), default=ref)
    served = parse_threads(args.threads)
    lines = [
        f"Run {time.strftime('%Y-%m-%d %H:%M')} on **{device}**; model: {model_desc}; "
        f"{args.duration:g} s per load, one image per request, closed-loop clients on 127.0.0.1. "
        f"Load average before/after: {loadavg[0]:.2f} / {loadavg[1]:.2f}.",
        "",
        "Load generators: " + ", ".join(
            f"{k} {'installed' if v else 'absent (Python client used)'}" for k, v in tools.items()) + ".",
        "",
        f"All servers run with {threads_text(served)} (`{' '.join(thread_flags(served)) or 'no thread flags'}`)"
        + (f" and `{' '.join(pin_flags(args))}` (TensorFlow's threads on a CPU of their own, "
           f"the others under SCHED_BATCH), except *{UNPINNED_MODE}*, the same batched server without it" if pin_flags(args) else "")
        + ". Batching parameters of the batched servers:",
        "",
        "```",
        batching.strip(),
        "```",
        "",
        "### In-process ceiling",
        "",
        "Measured in a fresh process under each thread setting, before and after the served loads. "
        "*signature*: the restored `serving_default` signature called directly on a ready tensor, the "
        "issue's ceiling; the ratios below divide by its fastest batch-32 run under either thread "
        "setting. *graft*: `Servable.run`, the call graft-serve's batch thread makes (the signature "
        "with its variables frozen into constants, `--freeze_graph`, on an aligned merged batch); "
        "*x graft ceiling* divides by its fastest batch-32 run, the stricter reference.",
        "",
        "| call | threads | run | batch | images/s | p50 latency ms | CPU ms per image | cores busy |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for index, (threads, call, run) in enumerate(ceiling_runs):
        when = "before" if index < len(ceiling_runs) // 2 else "after"
        for batch, row in run.items():
            lines.append(f"| {call} | {threads_text(threads)} | {when} | {batch} | {row['images_per_s']:.0f} | "
                         f"{row['p50_ms']:.2f} | {row['cpu_ms_per_image']:.3f} | {row['cores']:.2f} |")
    lines += ["", f"Reference (signature call, batch 32): **{ref:.0f} images/s**; graft's call, batch 32: "
              f"{graft_ref:.0f} images/s."]
    lines += [
        "",
        "### Served, one image per request",
        "",
        "*x ceiling*: images/s over the in-process batch-32 images/s. *CPU ms/img*: CPU time per "
        "served image of the server and of the load generator. *x ceiling by CPU*: the ceiling's "
        "CPU per image over server + client CPU per image, i.e. the ratio a machine running "
        "nothing else would show when all sides are CPU-bound (it does not move with other "
        "processes' load, the measured ratio does).",
        "",
        "| load | server | C | images/s | x ceiling | x graft ceiling | p50 ms | p99 ms | errors | mean batch "
        "| server CPU ms/img | client CPU ms/img | x ceiling by CPU | client |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for (protocol, mode, c), r in results.items():
        batch = f"{r.mean_batch:.1f}" if r.mean_batch else "-"
        lines.append(
            f"| {PROTOCOL_NAMES[protocol]} | {mode} | {c} | {r.images_per_s:.0f} | {r.images_per_s / ref:.2f} | "
            f"{r.images_per_s / graft_ref:.2f} | "
            f"{p(r, 50):.2f} | {p(r, 99):.2f} | {r.errors} | {batch} | {r.cpu_ms_per_image('server'):.2f} | "
            f"{r.cpu_ms_per_image('client'):.3f} | {cpu_ratio(r, ceiling):.2f} | {r.tool} |")
    # For comparison only: the ceiling as the issue first measured it, on TensorFlow's default threads.
    default_ref = max((run[32]["images_per_s"] for threads, call, run in ceiling_runs
                       if threads == DEFAULT_THREADS and call == "signature"), default=ref)
    lines += ["", "### Targets", "",
              f"*x default-threads ceiling* (for comparison, not the target): images/s over the fastest "
              f"batch-32 run on TensorFlow's default threads ({default_ref:.0f} images/s).", "",
              "*x graft ceiling*: against graft's own in-process call (for the latency rows: the p50 "
              "added over its batch of 1).", "",
              "| target | measured | x graft ceiling | x ceiling by CPU | x default-threads ceiling "
              "| met (measured) |",
              "|---|---:|---:|---:|---:|:---:|"]
    # The fastest in-process batch of 1 of the signature calls (the reference), and of
    # graft's call (the stricter one: what the served request's model run itself costs).
    single = min(run[1]["p50_ms"] for _, call, run in ceiling_runs if call == "signature")
    graft_single = min((run[1]["p50_ms"] for _, call, run in ceiling_runs if call == "graft"), default=single)
    # The tuned server runs gRPC only, so only the gRPC targets find its rows; the
    # unpinned server's rows are there for comparison.
    for mode, prefix in (("batching", ""),
                         (tuned_mode(args), f"(`--python_switch_interval_micros {args.switch_interval_micros}`) "),
                         (UNFROZEN_MODE, "(`--freeze_graph=false`) "),
                         (UNPINNED_MODE, "(without `--tensorflow_cpus`) ")):
        for label, protocol, want in TARGETS:
            r = results.get((protocol, mode, 32))
            if r is None:
                continue
            ratio = r.images_per_s / ref
            lines.append(f"| {prefix}{label} >= {want:.2f}x ceiling | {ratio:.2f}x | "
                         f"{r.images_per_s / graft_ref:.2f}x | {cpu_ratio(r, ceiling):.2f}x | "
                         f"{r.images_per_s / default_ref:.2f}x | {'yes' if ratio >= want else 'NO'} |")
        v1_json, v2_json = results.get(("rest_json", mode, 32)), results.get(("rest_v2_json", mode, 32))
        if v1_json is not None and v2_json is not None:
            # The V2 target: V2 JSON at least as fast as TF Serving's JSON, in the same run.
            ratio = v2_json.images_per_s / v1_json.images_per_s
            lines.append(f"| {prefix}REST V2 JSON floats >= REST JSON floats (TF Serving's /v1) at C=32 | "
                         f"{ratio:.2f}x /v1 ({v2_json.images_per_s:.0f} vs {v1_json.images_per_s:.0f} images/s) | | "
                         f"{cpu_ratio(v2_json, ceiling) / cpu_ratio(v1_json, ceiling):.2f}x /v1 | | "
                         f"{'yes' if ratio >= 1.0 else 'NO'} |")
        r = results.get(("grpc", mode, 1))
        if r is not None:
            added = p(r, 50) - single
            lines.append(f"| {prefix}gRPC C=1 p50 added over in-process batch 1 ({single:.2f} ms; graft's call "
                         f"{graft_single:.2f} ms) <= {ADDED_LATENCY_TARGET_MS} ms | {added:.2f} ms | "
                         f"{p(r, 50) - graft_single:.2f} ms | | | "
                         f"{'yes' if added <= ADDED_LATENCY_TARGET_MS else 'NO'} |")
    r = results.get(("grpc", "baseline", 1))
    if r is not None:
        lines.append(f"| (baseline, batching off) gRPC C=1 p50 added | {p(r, 50) - single:.2f} ms | "
                     f"{p(r, 50) - graft_single:.2f} ms | | | |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    """Run the whole benchmark; returns 0 (targets are reported, not enforced)."""
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, str(ROOT))
    if args.ceiling_child:
        return ceiling_child(args)
    served = parse_threads(args.threads)
    ceiling_settings = [(DEFAULT_THREADS, "signature")] + ([(served, "signature")] if served != DEFAULT_THREADS
                                                           else []) + [(served, "graft")]
    protocols = [s for s in args.protocols.split(",") if s]
    unknown = set(protocols) - set(PROTOCOLS)
    if unknown:
        raise SystemExit(f"unknown protocols {sorted(unknown)}; choose from {PROTOCOLS}")
    concurrencies = [int(c) for c in args.concurrency.split(",") if c]
    tools = common.native_tools() if args.client == "auto" else {"h2load": None, "wrk": None}
    batching = Path(args.batching_file).read_text() if args.batching_file else CPU_BATCHING
    loadavg0 = os.getloadavg()[0]

    with tempfile.TemporaryDirectory(prefix="graft-bench-") as tmp:
        work = Path(tmp)
        t0 = time.monotonic()
        from serving.devices import GpuOptions, configure_gpus

        # Before this process touches a GPU (export, ceiling): memory growth, as the servers
        # have; TensorFlow's default would take the GPU whole and starve the servers.
        configure_gpus(GpuOptions())
        if args.model_dir:
            base_path = Path(args.model_dir).resolve()
            model_desc = f"`{base_path}`"
        else:
            base_path = export_model(args.base, args.size, work / "repo")
            model_desc = f"{args.base} {args.size}x{args.size}, weights=None, {NUM_CLASSES}-class softmax head"
            print(f"exported {base_path} in {time.monotonic() - t0:.1f}s", flush=True)
        version = latest_version(base_path)
        input_name, height, width = image_input(version)
        bodies = make_bodies(input_name, height, width)

        ceiling_runs = []
        for threads, call in ceiling_settings:
            ceiling_runs.append((threads, call, ceiling_in_child(version, threads, args.ceiling_seconds, call)))
            print(f"in-process ceiling, {call} call, {threads_text(threads)}:",
                  {b: round(r["images_per_s"]) for b, r in ceiling_runs[-1][2].items()}, flush=True)

        params = work / "batching.txt"
        params.write_text(batching)
        common_flags = ["--model_name", MODEL_NAME, "--model_base_path", str(base_path),
                        "--file_system_poll_wait_seconds", "0", *thread_flags(served), *args.server_flag]
        # mode -> (its server's flags, the protocols driven against it)
        pin = pin_flags(args)
        modes = {"batching": (["--batching_parameters_file", str(params), *pin], protocols)}
        modes[UNFROZEN_MODE] = (["--batching_parameters_file", str(params), *pin, "--freeze_graph=false"],
                                protocols)
        if pin:
            modes[UNPINNED_MODE] = (["--batching_parameters_file", str(params)], protocols)
        if args.switch_interval_micros and "grpc" in protocols:
            modes[tuned_mode(args)] = (["--batching_parameters_file", str(params), *pin,
                                        "--python_switch_interval_micros", str(args.switch_interval_micros)],
                                       ["grpc"])
        if not args.no_baseline:
            modes["baseline"] = (pin, protocols)
        servers: dict[str, common.ServerProcess] = {}
        results: dict[tuple[str, str, int], common.LoadResult] = {}
        try:
            ports = iter(common.free_ports(2 * len(modes)))
            for mode, (flags, _) in modes.items():
                servers[mode] = common.ServerProcess(
                    [*common_flags, *flags], work / f"server-{mode}.log", next(ports), next(ports), sys.executable)
            for server in servers.values():
                server.wait_ready()
                check_answers(server, bodies)
            for protocol in protocols:
                driven = {mode: server for mode, server in servers.items() if protocol in modes[mode][1]}
                for mode, server in driven.items():
                    run_load(server, protocol, 8, args.warmup, bodies, tools, work)
                for c in concurrencies:
                    for mode, server in driven.items():
                        r = run_load(server, protocol, c, args.duration, bodies, tools, work)
                        results[(protocol, mode, c)] = r
                        print(f"{PROTOCOL_NAMES[protocol]:17s} {mode:20s} C={c:<3d} {r.images_per_s:8.0f} img/s  "
                              f"p50 {p(r, 50):7.2f} ms  p99 {p(r, 99):7.2f} ms  errors {r.errors}  "
                              f"batch {r.mean_batch or 0:4.1f}  CPU ms/img server {r.cpu_ms_per_image('server'):.2f} "
                              f"client {r.cpu_ms_per_image('client'):.3f}  [{r.tool}]", flush=True)
        finally:
            for mode, server in servers.items():
                code = server.stop()
                if code != 0:
                    print(f"{mode} server exited with {code}:\n{server.log()[-3000:]}", file=sys.stderr)

        for threads, call in ceiling_settings:
            ceiling_runs.append((threads, call, ceiling_in_child(version, threads, args.ceiling_seconds, call)))
        # Other processes slow a measurement down, never speed it up: the fastest run is
        # the best estimate of the ceiling, and the strictest reference for the ratios.
        ceiling = max((run for _, call, run in ceiling_runs if call == "signature"),
                      key=lambda run: run[32]["images_per_s"])
        text = report(args, args.device or device_name(), model_desc, ceiling, ceiling_runs, results, batching,
                      tools if args.client == "auto" else {"h2load": None, "wrk": None},
                      (loadavg0, os.getloadavg()[0]))
        print()
        print(text)
        if args.out:
            common.replace_section(Path(args.out), SECTION, text)
            print(f"wrote {args.out}")
        if args.json:
            Path(args.json).write_text(json.dumps({
                "device": args.device or device_name(), "ceiling": ceiling,
                "results": [{"protocol": k[0], "server": k[1], "concurrency": k[2],
                             "images_per_s": r.images_per_s, "ratio": r.images_per_s / ceiling[32]["images_per_s"],
                             "p50_ms": p(r, 50), "p99_ms": p(r, 99), "errors": r.errors, "tool": r.tool,
                             "mean_batch": r.mean_batch, "cpu_ratio": cpu_ratio(r, ceiling),
                             "server_cpu_ms_per_image": r.cpu_ms_per_image("server"),
                             "client_cpu_ms_per_image": r.cpu_ms_per_image("client")}
                            for k, r in results.items()]}, indent=2))
        print(f"total {time.monotonic() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
