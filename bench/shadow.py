"""Benchmark: what shadow evaluation (--shadow_fraction) costs the primary traffic, and whether its agreement is exact.

One run:

1. exports the bench model of bench/serve.py twice (MobileNetV3Small, random
   weights, through graft's exporter): version 1 labelled ``stable``, version 2
   (other random weights) labelled ``canary``;
2. starts one graft-serve per shadow fraction (0, 0.1 and 1.0) on 127.0.0.1, all
   with bench/serve.py's CPU batching parameters and threads;
3. on the fraction-1.0 server, sends ``--agreement-images`` distinct images one by
   one to ``/labels/stable`` over gRPC, waits until every mirrored request is
   accounted for, and compares the reported agreement (agreed rows of compared
   rows) with the same figure computed offline, both versions loaded in this
   process on the same images: the counts must be equal;
4. drives each server with gRPC Predict to ``/labels/stable``, one image per
   request, at each ``--concurrency`` (default 32) for ``--duration`` seconds (the
   servers alternate, so all see the same machine load), and reads the shadow
   route before and after each run for the requests mirrored, compared and
   dropped in it;
5. prints and writes (``--out``, docs/benchmarks.md) the primary throughput and
   p50/p99 of each fraction with their ratios to fraction 0, the mirrored work's
   fate, and the agreement check.

The load generator is bench/common.py's (h2load when installed, else Python
processes), on the same machine as the servers. ``--quick`` is a short end-to-end
check of the script (small images, short runs, nothing written): its figures are
not measurements.

    .venv/bin/python bench/shadow.py [--duration 8] [--concurrency 32] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # bench/common.py
import serve  # bench/serve.py: the bench model, its batching and threads, the gRPC load

ROOT = Path(__file__).resolve().parent.parent
SECTION = "bench/shadow.py"
MODEL = serve.MODEL_NAME
FRACTIONS = (0.0, 0.1, 1.0)
# The targets: primary p99 at 1.0 over p99 at 0 (with CPU headroom), and
# primary throughput at 1.0 over 0 at capacity.
P99_RATIO_TARGET = 1.15
THROUGHPUT_RATIO_TARGET = 0.95
SETTLE_TIMEOUT_S = 120.0


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="mobilenet_v3_small", help="base to export (default mobilenet_v3_small)")
    p.add_argument("--size", type=int, default=96, help="image size of the exported models (default 96)")
    p.add_argument("--duration", type=float, default=8.0, help="seconds per measured load (default 8)")
    p.add_argument("--warmup", type=float, default=1.5, help="seconds of unrecorded load per server")
    p.add_argument("--concurrency", default="32", help="comma-separated gRPC client concurrencies (default 32)")
    p.add_argument("--agreement-images", type=int, default=64,
                   help="distinct images of the agreement check (default 64)")
    p.add_argument("--client", choices=("auto", "python"), default="auto",
                   help="load generator: h2load when installed (auto), or the Python client")
    p.add_argument("--quick", action="store_true",
                   help="a short end-to-end check: 32 px models, 2 s runs, 8 images, nothing written")
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"), help="markdown file to write ('' = none)")
    p.add_argument("--json", default="", help="also write the raw figures as JSON here")
    return p


def grpc_body(input_name: str, image: np.ndarray) -> bytes:
    """A serialised PredictRequest for ``/labels/stable`` carrying one image."""
    from tensorflow_serving.apis import predict_pb2

    from serving.codecs.tensor_proto import numpy_to_tensor_proto

    request = predict_pb2.PredictRequest()
    request.model_spec.name = MODEL
    request.model_spec.version_label = "stable"
    request.inputs[input_name].CopyFrom(numpy_to_tensor_proto(image[None]))
    return request.SerializeToString()


def shadow(server: common.ServerProcess) -> dict:
    """The server's shadow report of the bench model."""
    with urllib.request.urlopen(f"{server.rest}/v1/models/{MODEL}/shadow", timeout=30) as answer:
        return json.loads(answer.read())


def wait_for(server: common.ServerProcess, test, what: str) -> dict:
    """The shadow report once ``test`` accepts it (SystemExit after SETTLE_TIMEOUT_S)."""
    end = time.monotonic() + SETTLE_TIMEOUT_S
    while not test(report := shadow(server)):
        if time.monotonic() > end:
            raise SystemExit(f"{what}: not reached in {SETTLE_TIMEOUT_S:g} s: {report}")
        time.sleep(0.1)
    return report


def settled(report: dict) -> bool:
    """Every mirrored request is compared, dropped or failed."""
    return report["mirrored"] == report["compared"] + report["dropped"] + report["canary_errors"]


def agreement_check(server: common.ServerProcess, versions: list[Path], input_name: str,
                    images: np.ndarray) -> dict:
    """Send ``images`` one by one through stable, then compare the reported counts with offline ones."""
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    before = wait_for(server, settled, "earlier mirrored work")
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        for image in images:
            stub.Predict(predict_pb2.PredictRequest.FromString(grpc_body(input_name, image)), timeout=60)
    after = wait_for(server, lambda r: settled(r) and r["mirrored"] >= before["mirrored"] + len(images),
                     "the agreement images")
    classes = []
    for version in versions:
        run = tf.saved_model.load(str(version)).signatures["serving_default"]
        scores = run(**{input_name: tf.constant(images)})["scores"].numpy()
        classes.append(np.argmax(scores, axis=1))
    return {"images": len(images), "compared": after["compared"] - before["compared"],
            "dropped": after["dropped"] - before["dropped"], "canary_errors": after["canary_errors"],
            "reported_agreed": after["agreed_rows"] - before["agreed_rows"],
            "reported_rows": after["rows"] - before["rows"],
            "offline_agreed": int(np.count_nonzero(classes[0] == classes[1])), "offline_rows": len(images)}


def report_text(args, device: str, runs: dict, check: dict, tool: str, loads: tuple[float, float]) -> str:
    """The markdown section."""
    lines = [(f"Run {time.strftime('%Y-%m-%d %H:%M')} on {device}: `bench/shadow.py --duration {args.duration:g} "
             f"--concurrency {args.concurrency}{' --quick' if args.quick else ''}`; {args.base} {args.size}x{args.size} "
             f"(random weights) as stable and canary, CPU batching of bench/serve.py, one image per gRPC "
             f"Predict to /labels/stable, load generator {tool} on the same machine; 1-min load average "
             f"{loads[0]:.1f} before, {loads[1]:.1f} after."), "",
             "| C | --shadow_fraction | img/s | x off | p50 ms | p99 ms | p99 x off | mirrored | compared | dropped |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (c, fraction), run in sorted(runs.items()):
        off = runs[(c, 0.0)]
        lines.append(f"| {c} | {fraction:g} | {run['images_per_s']:.0f} | "
                     f"{run['images_per_s'] / off['images_per_s']:.2f} | {run['p50_ms']:.2f} | {run['p99_ms']:.2f} | "
                     f"{run['p99_ms'] / off['p99_ms']:.2f} | {run['mirrored']} | {run['compared']} | "
                     f"{run['dropped']} |")
    exact = check["reported_agreed"] == check["offline_agreed"] and check["reported_rows"] == check["offline_rows"]
    lines += ["", (f"Agreement check ({check['images']} distinct images, fraction 1.0, sent one at a time): reported "
              f"{check['reported_agreed']} agreeing of {check['reported_rows']} compared rows, offline "
              f"{check['offline_agreed']} of {check['offline_rows']}: {'equal' if exact else 'NOT equal'} "
              f"({check['dropped']} dropped, {check['canary_errors']} canary errors).")]
    top = max(int(c) for c in args.concurrency.split(","))
    full, off = runs.get((top, 1.0)), runs.get((top, 0.0))
    if full and off:
        p99 = full["p99_ms"] / off["p99_ms"]
        rate = full["images_per_s"] / off["images_per_s"]
        lines += ["", "| target | measured | |", "|---|---|---|",
                  (f"| primary p99 at 1.0 <= {P99_RATIO_TARGET}x off (with CPU headroom) | {p99:.2f}x at C={top} | "
                   f"{'met' if p99 <= P99_RATIO_TARGET else 'missed'} |"),
                  (f"| primary throughput at 1.0 >= {THROUGHPUT_RATIO_TARGET}x off at capacity | {rate:.2f}x at "
                   f"C={top}, {full['dropped']} of {full['mirrored']} mirrored dropped | "
                   f"{'met' if rate >= THROUGHPUT_RATIO_TARGET else 'missed'} |"),
                  (f"| reported agreement = offline, exactly | {check['reported_agreed']}/{check['reported_rows']} "
                   f"vs {check['offline_agreed']}/{check['offline_rows']} | {'met' if exact else 'missed'} |")]
    return "\n".join(lines)


def main(argv=None) -> int:
    """Run the benchmark; returns 0 (targets are reported, not enforced), 1 when the agreement is not exact."""
    args = build_parser().parse_args(argv)
    if args.quick:
        args.size, args.duration, args.warmup, args.agreement_images, args.out = 32, 2.0, 0.5, 8, ""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, str(ROOT))
    concurrencies = [int(c) for c in args.concurrency.split(",") if c]
    tools = common.native_tools() if args.client == "auto" else {"h2load": None, "wrk": None}
    loadavg0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="graft-bench-shadow-") as tmp:
        work = Path(tmp)
        from serving.devices import GpuOptions, configure_gpus

        configure_gpus(GpuOptions())  # memory growth, as the servers have, before this process touches a GPU
        base_path = serve.export_model(args.base, args.size, work / "repo")
        serve.export_model(args.base, args.size, work / "repo")   # version 2: other random weights
        (base_path / "labels.json").write_text(json.dumps({"stable": 1, "canary": 2}))
        versions = [base_path / "1", base_path / "2"]
        input_name, height, width = serve.image_input(versions[0])
        bodies = {"grpc": grpc_body(input_name, serve.sample_image(height, width))}
        rng = np.random.default_rng(0)
        images = rng.uniform(0, 255, (args.agreement_images, height, width, 3)).astype(np.float32)

        params = work / "batching.txt"
        params.write_text(serve.CPU_BATCHING)
        flags = ["--model_name", MODEL, "--model_base_path", str(base_path), "--file_system_poll_wait_seconds", "0",
                 "--batching_parameters_file", str(params), *serve.thread_flags(serve.SERVED_THREADS)]
        servers: dict[float, common.ServerProcess] = {}
        runs: dict[tuple[int, float], dict] = {}
        tool = "python"
        try:
            ports = iter(common.free_ports(2 * len(FRACTIONS)))
            for fraction in FRACTIONS:
                servers[fraction] = common.ServerProcess(
                    [*flags, "--shadow_fraction", str(fraction)], work / f"server-{fraction}.log",
                    next(ports), next(ports), sys.executable)
            for server in servers.values():
                server.wait_ready()
                wait_for(server, lambda r: (r["stable"], r["canary"]) == (1, 2), "labels stable=1, canary=2")
            check = agreement_check(servers[1.0], versions, input_name, images)
            print("agreement check:", check, flush=True)
            for c in concurrencies:
                for server in servers.values():
                    serve.run_load(server, "grpc", c, args.warmup, bodies, tools, work)
                for fraction, server in servers.items():
                    before = wait_for(server, settled, "mirrored work before the run")
                    r = serve.run_load(server, "grpc", c, args.duration, bodies, tools, work)
                    after = wait_for(server, settled, "mirrored work after the run")
                    tool = r.tool
                    runs[(c, fraction)] = {
                        "images_per_s": r.images_per_s, "p50_ms": r.latency_ms(50), "p99_ms": r.latency_ms(99),
                        "errors": r.errors, **{k: after[k] - before[k] for k in ("mirrored", "compared", "dropped")}}
                    print(f"C={c:<3d} fraction {fraction:<4g} {r.images_per_s:8.0f} img/s  p50 {r.latency_ms(50):7.2f} "
                          f"ms  p99 {r.latency_ms(99):7.2f} ms  errors {r.errors}  mirrored "
                          f"{runs[(c, fraction)]['mirrored']} compared {runs[(c, fraction)]['compared']} dropped "
                          f"{runs[(c, fraction)]['dropped']}  [{r.tool}]", flush=True)
        finally:
            for fraction, server in servers.items():
                code = server.stop()
                if code != 0:
                    print(f"server {fraction} exited with {code}:\n{server.log()[-3000:]}", file=sys.stderr)
    text = report_text(args, serve.device_name(), runs, check, tool, (loadavg0, os.getloadavg()[0]))
    print()
    print(text)
    if args.out:
        common.replace_section(Path(args.out), SECTION, text)
        print(f"wrote {args.out}")
    if args.json:
        Path(args.json).write_text(json.dumps({"agreement": check, "runs": [
            {"concurrency": c, "fraction": f, **run} for (c, f), run in sorted(runs.items())]}, indent=2))
    exact = check["reported_agreed"] == check["offline_agreed"] and check["reported_rows"] == check["offline_rows"]
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
