"""Benchmark: what shadow evaluation (--shadow_fraction) costs the primary traffic, and whether its agreement is exact.

Two pairs of versions, each with version 1 labelled ``stable`` and version 2 ``canary``:

- the bench pair, for throughput and latency only: bench/serve.py's bench model
  (MobileNetV3Small, random weights, through graft's exporter) exported twice.
  With random weights its pooled features are almost zero, so it gives the same
  answer to every image: good enough for load, useless for checking agreement;
- the digits pair, for the agreement check and the shared-trunk case: two
  scenario-1 fits on one random trunk (bench/shared_trunk.py's training on
  sklearn's digits, each head on its own subset), versions 1 and 2 of one model.
  Their answers change with the image, and they differ on some images.

One run:

1. trains the digits pair and classifies ``--agreement-images`` distinct digits
   images (upscaled as in training) with both versions loaded in this process, one
   image at a time. It stops (SystemExit) when stable's class is the same for every
   image or the two versions agree on every image, because an agreement check on
   such a pair could not fail;
2. starts one graft-serve per shadow fraction (0, 0.1 and 1.0) with the bench pair,
   on 127.0.0.1, all with bench/serve.py's CPU batching parameters and threads;
3. drives each of them with gRPC Predict to ``/labels/stable``, one image per
   request, at each ``--concurrency`` (default 32) for ``--duration`` seconds,
   ``--rounds`` times (default 3; the servers alternate, so all see the same
   machine load, and the tables give each server's medians), and reads the shadow
   route before and after each run for the requests mirrored, compared and
   dropped in it;
4. the shared-trunk case: three servers with the digits pair: fraction 0, fraction
   1.0 with ``--shared_trunks`` (a mirrored request runs only the canary's head,
   on stable's trunk features) and fraction 1.0 without it;
5. the agreement check, on each fraction-1.0 server of step 4 before any load:
   sends the images of step 1 one by one to ``/labels/stable`` over gRPC, waits
   until every mirrored request is accounted for, and compares the reported
   figures (agreed rows of compared rows, each side's class histogram and the
   Jensen-Shannon divergence between them) with the offline figures of step 1.
   They must be equal;
6. drives the three servers of step 4 with step 3's load (``--no-shared`` skips
   this: then only the two fraction-1.0 servers start, for the check);
7. prints and writes (``--out``, docs/benchmarks.md) the primary throughput and
   p50/p99 of each server with their ratios to fraction 0, the mirrored work's
   fate (compared, of which head only, dropped), and the agreement check.

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
# The shared-trunk case's servers: (name, extra graft-serve flags).
SHARED_SERVERS = ("0, shared trunks", "1.0, shared trunks", "1.0, --shared_trunks=false")
SHARED_FLAGS = (["--shadow_fraction", "0"], ["--shadow_fraction", "1.0"],
                ["--shadow_fraction", "1.0", "--shared_trunks=false"])


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="mobilenet_v3_small", help="base to export (default mobilenet_v3_small)")
    p.add_argument("--size", type=int, default=96, help="image size of the exported models (default 96)")
    p.add_argument("--duration", type=float, default=8.0, help="seconds per measured load (default 8)")
    p.add_argument("--warmup", type=float, default=1.5, help="seconds of unrecorded load per server")
    p.add_argument("--rounds", type=int, default=3,
                   help="measured runs per server, alternating; the tables give their medians (default 3)")
    p.add_argument("--concurrency", default="32", help="comma-separated gRPC client concurrencies (default 32)")
    p.add_argument("--agreement-images", type=int, default=64,
                   help="distinct digits images of the agreement check (default 64)")
    p.add_argument("--client", choices=("auto", "python"), default="auto",
                   help="load generator: h2load when installed (auto), or the Python client")
    p.add_argument("--shared-base", default="mobilenet_v2",
                   help="base of the digits pair (agreement check, shared-trunk case; default mobilenet_v2)")
    p.add_argument("--shared-size", type=int, default=96, help="image size of the digits pair (default 96)")
    p.add_argument("--no-shared", action="store_true", help="skip the shared-trunk case's load (its fraction-1.0 servers still run the agreement check)")
    p.add_argument("--quick", action="store_true",
                   help="a short end-to-end check: 32 px models, 2 s runs, 8 images, nothing written")
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"), help="markdown file to write ('' = none)")
    p.add_argument("--json", default="", help="also write the raw figures as JSON here")
    return p


def grpc_body(input_name: str, image: np.ndarray, model: str = MODEL) -> bytes:
    """A serialised PredictRequest for ``/labels/stable`` carrying one image."""
    from tensorflow_serving.apis import predict_pb2

    from serving.codecs.tensor_proto import numpy_to_tensor_proto

    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.version_label = "stable"
    request.inputs[input_name].CopyFrom(numpy_to_tensor_proto(image[None]))
    return request.SerializeToString()


def shadow(server: common.ServerProcess, model: str = MODEL) -> dict:
    """The server's shadow report of ``model``."""
    with urllib.request.urlopen(f"{server.rest}/v1/models/{model}/shadow", timeout=30) as answer:
        return json.loads(answer.read())


def wait_for(server: common.ServerProcess, test, what: str, model: str = MODEL) -> dict:
    """The shadow report once ``test`` accepts it (SystemExit after SETTLE_TIMEOUT_S)."""
    end = time.monotonic() + SETTLE_TIMEOUT_S
    while not test(report := shadow(server, model)):
        if time.monotonic() > end:
            raise SystemExit(f"{what}: not reached in {SETTLE_TIMEOUT_S:g} s: {report}")
        time.sleep(0.1)
    return report


def settled(report: dict) -> bool:
    """Every mirrored request is compared, dropped or failed."""
    return report["mirrored"] == report["compared"] + report["dropped"] + report["canary_errors"]


def digits_images(count: int, size: int) -> np.ndarray:
    """``count`` distinct sklearn digits (a seeded pick), upscaled as in training: float32 [count, size, size, 3]."""
    # Optional (graft[demo]): scikit-learn ships the digits; training.demo draws them as the fits saw them.
    from sklearn.datasets import load_digits

    from training.demo import digit_image

    digits = load_digits()
    picks = np.random.default_rng(0).choice(len(digits.images), count, replace=False)
    return np.stack([np.asarray(digit_image(digits.images[i], size), dtype=np.float32) for i in picks])


def offline_classes(versions: list[Path], input_name: str, images: np.ndarray) -> list[np.ndarray]:
    """Each version's predicted class of every image, loaded in this process and run one image at a time (as sent)."""
    import tensorflow as tf

    classes = []
    for version in versions:
        run = tf.saved_model.load(str(version)).signatures["serving_default"]
        classes.append(np.array([int(np.argmax(run(**{input_name: tf.constant(image[None])})["scores"].numpy()[0]))
                                 for image in images]))
    return classes


def check_pair(classes: list[np.ndarray]) -> None:
    """SystemExit unless the pair can fail the agreement check: stable's class varies and the versions differ."""
    stable, canary = classes
    if len(set(stable.tolist())) < 2:
        raise SystemExit(f"agreement check: stable predicts class {stable[0]} for all {len(stable)} images, so "
                         "its agreement figures cannot fail: the pair is unfit for the check")
    if np.array_equal(stable, canary):
        raise SystemExit(f"agreement check: stable and canary agree on all {len(stable)} images, so the "
                         "reported agreement cannot differ from the offline one: the pair is unfit for the check")


def histogram(classes: np.ndarray) -> dict[str, int]:
    """Class counts keyed as the shadow route keys them."""
    values, counts = np.unique(classes, return_counts=True)
    return {str(int(v)): int(c) for v, c in zip(values, counts)}


def agreement_check(server: common.ServerProcess, model: str, input_name: str, images: np.ndarray,
                    classes: list[np.ndarray]) -> dict:
    """Send ``images`` one by one through stable of a fresh window; its reported figures against the offline ones."""
    import grpc
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    from serving.shadow import js_divergence

    before = wait_for(server, settled, "earlier mirrored work", model)
    if before["mirrored"]:
        # The window's histograms and divergence must count the check's images only.
        raise SystemExit(f"agreement check: the window of {model} already holds mirrored work: {before}")
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        for image in images:
            stub.Predict(predict_pb2.PredictRequest.FromString(grpc_body(input_name, image, model)), timeout=60)
    after = wait_for(server, lambda r: settled(r) and r["mirrored"] >= len(images), "the agreement images", model)
    offline = {"stable": histogram(classes[0]), "canary": histogram(classes[1])}
    check = {"images": len(images), "compared": after["compared"], "dropped": after["dropped"],
             "canary_errors": after["canary_errors"], "head_only": after["canary_head_only"],
             "reported_agreed": after["agreed_rows"], "reported_rows": after["rows"],
             "offline_agreed": int(np.count_nonzero(classes[0] == classes[1])), "offline_rows": len(images),
             "reported_histogram": after["class_histogram"], "offline_histogram": offline,
             "reported_js": after["js_divergence"], "offline_js": js_divergence(offline["stable"], offline["canary"])}
    check["exact"] = (check["reported_agreed"] == check["offline_agreed"]
                      and check["reported_rows"] == check["offline_rows"]
                      and check["reported_histogram"] == offline and check["reported_js"] == check["offline_js"])
    return check


def drive(servers: dict, model: str, bodies: dict, concurrencies: list[int], args, tools, work: Path) -> dict:
    """Each server at each concurrency, ``--rounds`` times with the servers alternating: the medians of
    the primary figures over the rounds (noise on a shared machine moves one run by several
    per cent) and the mirrored work's fate, summed."""
    runs = {}
    for c in concurrencies:
        for server in servers.values():
            serve.run_load(server, "grpc", c, args.warmup, bodies, tools, work)
        rounds: dict = {key: [] for key in servers}
        for index in range(args.rounds):
            for key, server in servers.items():
                before = wait_for(server, settled, "mirrored work before the run", model)
                r = serve.run_load(server, "grpc", c, args.duration, bodies, tools, work)
                after = wait_for(server, settled, "mirrored work after the run", model)
                run = {"images_per_s": r.images_per_s, "p50_ms": r.latency_ms(50), "p99_ms": r.latency_ms(99),
                       "errors": r.errors, "tool": r.tool,
                       **{k: after[k] - before[k] for k in ("mirrored", "compared", "dropped", "canary_head_only")}}
                rounds[key].append(run)
                print(f"{model} C={c:<3d} {key!s:<22} round {index + 1}: {r.images_per_s:8.0f} img/s  "
                      f"p50 {r.latency_ms(50):7.2f} ms  p99 {r.latency_ms(99):7.2f} ms  errors {r.errors}  "
                      f"mirrored {run['mirrored']} compared {run['compared']} (head only {run['canary_head_only']}) "
                      f"dropped {run['dropped']}  [{r.tool}]", flush=True)
        for key, done in rounds.items():
            runs[(c, key)] = {
                **{k: float(np.median([run[k] for run in done])) for k in ("images_per_s", "p50_ms", "p99_ms")},
                **{k: sum(run[k] for run in done)
                   for k in ("errors", "mirrored", "compared", "dropped", "canary_head_only")},
                "tool": done[0]["tool"], "rounds": [run["images_per_s"] for run in done]}
    return runs


def shared_trunk_model(args, work: Path) -> Path:
    """Versions 1 and 2 of one model on one trunk: bench/shared_trunk.py's two scenario-1 fits, the
    second copied in as version 2; labels stable=1, canary=2. Returns the model's base path."""
    import shutil
    import types

    import shared_trunk  # bench/shared_trunk.py: its digits fits on one random trunk

    settings = types.SimpleNamespace(per_class=3 if args.quick else 10, head_epochs=2 if args.quick else 20)
    repo, _ = shared_trunk.train_models(args.shared_base, args.shared_size, "none", 2, settings, work)
    base = repo / "m0"
    shutil.copytree(repo / "m1" / "1", base / "2")
    (base / "labels.json").write_text(json.dumps({"stable": 1, "canary": 2}))
    return base


def shared_text(args, runs: dict) -> list[str]:
    """The shared-trunk case's table."""
    lines = ["", (f"Shared trunk: {args.shared_base} {args.shared_size}x{args.shared_size} (random trunk, "
                  "scenario-1 heads on digits), versions 1 (stable) and 2 (canary) of one model on one trunk."), "",
             "| C | server | img/s | x off | p99 ms | p99 x off | mirrored | compared | head only | dropped |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (c, key), run in sorted(runs.items()):
        off = runs[(c, SHARED_SERVERS[0])]
        lines.append(f"| {c} | {key} | {run['images_per_s']:.0f} | {run['images_per_s'] / off['images_per_s']:.2f} | "
                     f"{run['p99_ms']:.2f} | {run['p99_ms'] / off['p99_ms']:.2f} | {run['mirrored']} | "
                     f"{run['compared']} | {run['canary_head_only']} | {run['dropped']} |")
    return lines


def agreement_text(args, checks: dict) -> list[str]:
    """The agreement check's table: reported figures against offline ones, per fraction-1.0 server."""
    first = next(iter(checks.values()))
    lines = ["", (f"Agreement check: {first['images']} distinct digits images, one per gRPC Predict to "
                  f"/labels/stable, on the digits pair ({args.shared_base} {args.shared_size}x{args.shared_size}, "
                  "random trunk, versions 1 and 2 scenario-1 heads on different digits subsets) at fraction 1.0; "
                  "offline: both versions in this process, one image at a time. JS: Jensen-Shannon divergence "
                  "of the two class histograms, in bits."), "",
             ("| server | reported agreeing / compared | offline | reported JS | offline JS | histograms | "
              "head only | dropped | canary errors | |"),
             "|---|---|---|---|---|---|---|---|---|---|"]

    def js(value):
        return "-" if value is None else f"{value:.4f}"

    for key, c in checks.items():
        same = "equal" if c["reported_histogram"] == c["offline_histogram"] else "NOT equal"
        lines.append(f"| {key} | {c['reported_agreed']}/{c['reported_rows']} | {c['offline_agreed']}/"
                     f"{c['offline_rows']} | {js(c['reported_js'])} | {js(c['offline_js'])} | {same} | "
                     f"{c['head_only']} | {c['dropped']} | {c['canary_errors']} | "
                     f"{'equal' if c['exact'] else 'NOT equal'} |")
    return lines


def report_text(args, device: str, runs: dict, checks: dict, tool: str, loads: tuple[float, float],
                shared: dict | None = None) -> str:
    """The markdown section."""
    lines = [(f"Run {time.strftime('%Y-%m-%d %H:%M')} on {device}: `bench/shadow.py --duration {args.duration:g} "
             f"--rounds {args.rounds} --concurrency {args.concurrency}{' --quick' if args.quick else ''}`; "
             f"img/s, p50 and p99 are each server's medians over the {args.rounds} alternating rounds, the mirrored "
             f"work's counts their sums; the bench pair, {args.base} "
             f"{args.size}x{args.size} (random weights), as stable and canary, CPU batching of bench/serve.py, one image per gRPC "
             f"Predict to /labels/stable, load generator {tool} on the same machine; 1-min load average "
             f"{loads[0]:.1f} before, {loads[1]:.1f} after."), "",
             "| C | --shadow_fraction | img/s | x off | p50 ms | p99 ms | p99 x off | mirrored | compared | dropped "
             "| img/s per round |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (c, fraction), run in sorted(runs.items()):
        off = runs[(c, 0.0)]
        lines.append(f"| {c} | {fraction:g} | {run['images_per_s']:.0f} | "
                     f"{run['images_per_s'] / off['images_per_s']:.2f} | {run['p50_ms']:.2f} | {run['p99_ms']:.2f} | "
                     f"{run['p99_ms'] / off['p99_ms']:.2f} | {run['mirrored']} | {run['compared']} | "
                     f"{run['dropped']} | {', '.join(f'{x:.0f}' for x in run.get('rounds', []))} |")
    lines += agreement_text(args, checks)
    exact = all(c["exact"] for c in checks.values())
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
                  ("| reported agreement = offline, exactly (digits pair) | "
                   + "; ".join(f"{k}: {c['reported_agreed']}/{c['reported_rows']} vs {c['offline_agreed']}/"
                               f"{c['offline_rows']}" for k, c in checks.items())
                   + f" | {'met' if exact else 'missed'} |")]
    if shared:
        lines += shared_text(args, shared)
    return "\n".join(lines)


def stop(servers: dict) -> None:
    """Stop every server; print the log of one that did not exit 0."""
    for key, server in servers.items():
        code = server.stop()
        if code != 0:
            print(f"server {key} exited with {code}:\n{server.log()[-3000:]}", file=sys.stderr)


def shared_case(args, base: Path, input_name: str, images: np.ndarray, classes: list[np.ndarray],
                concurrencies: list[int], tools, work: Path) -> tuple[dict, dict | None]:
    """The digits pair's servers: the agreement check on each fraction-1.0 one, then (unless ``--no-shared``)
    the same load on all three. Returns (checks by server, load runs or None)."""
    height, width = images.shape[1:3]
    bodies = {"grpc": grpc_body(input_name, serve.sample_image(height, width), base.name)}
    params = work / "batching.txt"
    flags = ["--model_name", base.name, "--model_base_path", str(base), "--file_system_poll_wait_seconds", "0",
             "--batching_parameters_file", str(params), *serve.thread_flags(serve.SERVED_THREADS)]
    cases = list(zip(SHARED_SERVERS, SHARED_FLAGS))[1 if args.no_shared else 0:]
    servers = {}
    try:
        ports = iter(common.free_ports(2 * len(cases)))
        for key, extra in cases:
            servers[key] = common.ServerProcess([*flags, *extra], work / f"shared-{SHARED_SERVERS.index(key)}.log",
                                                next(ports), next(ports), sys.executable)
        for server in servers.values():
            server.wait_ready()
            wait_for(server, lambda r: (r["stable"], r["canary"]) == (1, 2), "labels stable=1, canary=2", base.name)
        checks = {}
        for key in SHARED_SERVERS[1:]:
            checks[key] = agreement_check(servers[key], base.name, input_name, images, classes)
            print(f"agreement check ({key}):", checks[key], flush=True)
        runs = None if args.no_shared else drive(servers, base.name, bodies, concurrencies, args, tools, work)
        return checks, runs
    finally:
        stop(servers)


def main(argv=None) -> int:
    """Run the benchmark; returns 0 (targets are reported, not enforced), 1 when the agreement is not exact."""
    args = build_parser().parse_args(argv)
    if args.quick:
        args.size, args.duration, args.warmup, args.agreement_images, args.out = 32, 2.0, 0.5, 8, ""
        args.rounds = 1
        args.shared_size = 32
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, str(ROOT))
    concurrencies = [int(c) for c in args.concurrency.split(",") if c]
    tools = common.native_tools() if args.client == "auto" else {"h2load": None, "wrk": None}
    loadavg0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="graft-bench-shadow-") as tmp:
        work = Path(tmp)
        from serving.devices import GpuOptions, configure_gpus

        configure_gpus(GpuOptions())  # memory growth, as the servers have, before this process touches a GPU
        # First the digits pair, and whether it can fail the agreement check at all, before any load.
        pair = shared_trunk_model(args, work)
        pair_input, pair_height, _ = serve.image_input(pair / "1")
        images = digits_images(args.agreement_images, pair_height)
        classes = offline_classes([pair / "1", pair / "2"], pair_input, images)
        check_pair(classes)
        print(f"digits pair offline: stable predicts {len(set(classes[0].tolist()))} classes, the versions agree "
              f"on {int(np.count_nonzero(classes[0] == classes[1]))} of {len(images)} images", flush=True)

        base_path = serve.export_model(args.base, args.size, work / "repo")
        serve.export_model(args.base, args.size, work / "repo")   # version 2: other random weights
        (base_path / "labels.json").write_text(json.dumps({"stable": 1, "canary": 2}))
        input_name, height, width = serve.image_input(base_path / "1")
        bodies = {"grpc": grpc_body(input_name, serve.sample_image(height, width))}

        params = work / "batching.txt"
        params.write_text(serve.CPU_BATCHING)
        flags = ["--model_name", MODEL, "--model_base_path", str(base_path), "--file_system_poll_wait_seconds", "0",
                 "--batching_parameters_file", str(params), *serve.thread_flags(serve.SERVED_THREADS)]
        servers: dict[float, common.ServerProcess] = {}
        try:
            ports = iter(common.free_ports(2 * len(FRACTIONS)))
            for fraction in FRACTIONS:
                servers[fraction] = common.ServerProcess(
                    [*flags, "--shadow_fraction", str(fraction)], work / f"server-{fraction}.log",
                    next(ports), next(ports), sys.executable)
            for server in servers.values():
                server.wait_ready()
                wait_for(server, lambda r: (r["stable"], r["canary"]) == (1, 2), "labels stable=1, canary=2")
            runs = drive(servers, MODEL, bodies, concurrencies, args, tools, work)
            tool = next(iter(runs.values()))["tool"]
        finally:
            stop(servers)
        checks, shared = shared_case(args, pair, pair_input, images, classes, concurrencies, tools, work)
    text = report_text(args, serve.device_name(), runs, checks, tool, (loadavg0, os.getloadavg()[0]), shared)
    print()
    print(text)
    if args.out:
        common.replace_section(Path(args.out), SECTION, text)
        print(f"wrote {args.out}")
    if args.json:
        Path(args.json).write_text(json.dumps({"agreement": checks, "runs": [
            {"concurrency": c, "fraction": f, **run} for (c, f), run in sorted(runs.items())],
            "shared": [{"concurrency": c, "server": k, **run} for (c, k), run in sorted((shared or {}).items())]},
            indent=2))
    return 0 if all(c["exact"] for c in checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
