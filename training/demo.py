"""``graft-train demo``: the whole product on real pretrained weights and real data.

1. Writes scikit-learn's digits (1797 real 8x8 scans) as class-folder PNGs,
   upscaled to RGB, split by a fixed seed into train (small and larger pools),
   validation and a held-out test set.
2. ``graft-train fit --base vgg16 --weights hed --scenario auto`` on the small
   pool, exported as version 1 and promoted to ``stable`` (sanity check), then a
   table of held-out accuracy: the pretrained trunk at the cut ``auto`` chose,
   the same architecture with random weights, and a small CNN from scratch.
3. A second candidate trained on the larger pool goes through the promotion
   gate, which moves ``stable`` to version 2.
4. graft-serve runs on the repository; one REST request (base64 PNGs to
   ``predict_images``) and one gRPC Predict go to ``labels/stable`` and their
   answers are printed next to the true digits (a self-check: both protocols
   must agree and be served by the stable version).
5. A few lines of /metrics and copy-paste client examples.
6. Keeps serving until Ctrl-C, unless ``DEMO_SERVE=0`` or ``--no-serve``.

Only the training sidecar runs in this process; the server is a separate
graft-serve process, as in production.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import keras
import numpy as np
import tensorflow as tf
from PIL import Image
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from graft import contract
from serving.runtime.process import ServeProcess
from training import bases, data, fit, phases, pipeline, probe, promote, scenarios

MARKER = ".graft-demo"
MODEL_NAME = "digits"
SERVE_ENV = "DEMO_SERVE"
READY_TIMEOUT_S = 180.0
# (float32 [N,H,W,3] in 0..255, int32 [N]), as training.data.load_arrays returns them.
Arrays = tuple


def _say(text: str = "") -> None:
    print(text, flush=True)


def _step(number: int, title: str) -> None:
    _say()
    _say(f"=== {number}. {title} ===")


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Everything one demo run needs; the fields are ``graft-train demo``'s flags.

    ``workdir`` is cleared on each run (only when an earlier demo made it).
    ``serve`` None lets the ``DEMO_SERVE`` environment variable decide whether
    graft-serve keeps running after the self-check (default: it does).
    """

    workdir: str | os.PathLike = "demo-work"
    images_per_class: int = 10
    candidate_images_per_class: int = 50
    val_per_class: int = 10
    test_per_class: int = 0
    image_size: int = 64
    cnn_epochs: int = 200
    min_delta: float = 0.0
    seed: int = 0
    host: str = "127.0.0.1"
    grpc_port: int = 8500
    rest_port: int = 8501
    serve: bool | None = None


@dataclasses.dataclass(frozen=True)
class DigitsSplit:
    """Where the demo's image folders are and how many images each holds."""

    small: Path       # train pool for version 1
    large: Path       # train pool for the second candidate
    val: Path
    test: Path
    counts: dict


def digit_image(pixels: np.ndarray, image_size: int) -> Image.Image:
    """One sklearn digit (8x8, 0..16 ink levels) as a grey RGB image, upscaled smoothly to ``image_size``."""
    grey = (np.asarray(pixels) * (255.0 / 16.0)).astype(np.uint8)
    return Image.fromarray(grey).resize((image_size, image_size), Image.BILINEAR).convert("RGB")


def write_digits(root: str | os.PathLike, *, image_size: int = 64, small_per_class: int = 10,
                 large_per_class: int = 50, val_per_class: int = 10, test_per_class: int = 0,
                 seed: int = 0) -> DigitsSplit:
    """Write sklearn's digits as RGB PNG class folders under ``root``, split by ``seed``.

    Per class, a seeded permutation gives the first ``large_per_class`` images to
    the large train pool (its first ``small_per_class`` form the small pool), the
    next ``val_per_class`` to validation and the rest (at most ``test_per_class``
    when it is positive) to the held-out test set.
    """
    # Optional (graft[demo]): scikit-learn ships the digits.
    from sklearn.datasets import load_digits

    if not 1 <= small_per_class < large_per_class:
        raise ValueError(f"need 1 <= images per class ({small_per_class}) < candidate images per class "
                         f"({large_per_class})")
    digits = load_digits()
    rng = np.random.default_rng(seed)
    root = Path(root)
    split = DigitsSplit(root / f"train-{small_per_class}", root / f"train-{large_per_class}",
                        root / "val", root / "test", {})
    counts = {"small": 0, "large": 0, "val": 0, "test": 0}
    for digit in range(10):
        members = rng.permutation(np.flatnonzero(digits.target == digit))
        if len(members) < large_per_class + val_per_class + 1:
            raise ValueError(f"digit {digit} has only {len(members)} images: lower the per-class counts")
        rest = members[large_per_class + val_per_class:]
        if test_per_class > 0:
            rest = rest[:test_per_class]
        parts = [("large", members[:large_per_class]), ("small", members[:small_per_class]),
                 ("val", members[large_per_class:large_per_class + val_per_class]), ("test", rest)]
        for part, indices in parts:
            folder = getattr(split, part) / str(digit)
            folder.mkdir(parents=True, exist_ok=True)
            for index in indices:
                digit_image(digits.images[index], image_size).save(folder / f"{index:04d}.png")
            counts[part] += len(indices)
    return dataclasses.replace(split, counts=counts)


# -- training ---------------------------------------------------------------------------

def _fit(train_dir: Path, val_dir: Path, repo: Path, run_dir: Path, config: DemoConfig) -> Path:
    """Run the training pipeline as ``graft-train fit`` would, with its defaults; return the version directory.

    No tuning flags on purpose: the demo shows what a user who trusts the
    defaults gets.
    """
    fit_config = pipeline.FitConfig(
        data=train_dir, val_data=val_dir, base="vgg16", weights="hed", scenario="auto",
        image_size=config.image_size, seed=config.seed, repo=repo, model_name=MODEL_NAME, run_dir=run_dir)
    _say(f"$ graft-train fit --data {train_dir} --val-data {val_dir} --base vgg16 --weights hed --scenario auto "
         f"--image-size {fit_config.image_size} --seed {fit_config.seed} "
         f"--repo {repo} --model-name {MODEL_NAME} --run-dir {run_dir}")
    return Path(pipeline.run(fit_config))


def small_cnn(image_size: int, num_classes: int, seed: int):
    """A small CNN trained from scratch: the baseline a pretrained trunk has to beat."""
    inputs = keras.Input((image_size, image_size, 3), name="images")
    x = keras.layers.Rescaling(1.0 / 255.0)(inputs)
    # Mild geometric jitter (active in training only); flips would turn digits into other digits.
    x = keras.layers.RandomTranslation(0.1, 0.1, fill_mode="constant", seed=seed)(x)
    x = keras.layers.RandomRotation(0.05, fill_mode="constant", seed=seed + 1)(x)
    x = keras.layers.RandomZoom(0.1, fill_mode="constant", seed=seed + 2)(x)
    for filters in (32, 64, 128):
        x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.3, seed=seed)(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax")(x)
    return keras.Model(inputs, outputs, name="small_cnn")


def scratch_cnn_accuracy(train: Arrays, val: Arrays, test: Arrays, *, image_size: int, epochs: int,
                         seed: int) -> float:
    """Held-out accuracy of :func:`small_cnn` trained on ``train`` (best epoch by validation accuracy)."""
    keras.utils.set_random_seed(seed)
    model = small_cnn(image_size, int(train[1].max()) + 1, seed)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    # Tiny data learns slowly from scratch: a long patience, the best epoch restored.
    stop = keras.callbacks.EarlyStopping(monitor="val_accuracy", mode="max", patience=max(10, epochs // 4),
                                         restore_best_weights=True)
    model.fit(*train, batch_size=16, validation_data=val, epochs=epochs, callbacks=[stop], verbose=0)
    return float(model.evaluate(*test, batch_size=64, verbose=0)[1])


def probe_accuracy(backbone, layer: str, train: Arrays, test: Arrays) -> float:
    """Held-out accuracy of a ridge probe on ``backbone``'s pooled features at ``layer`` (the measure the table's probe column uses)."""
    return probe.probe_blocks(backbone, *train, *test, [layer])[layer]


def baselines(lineage: dict, train_set, val_set, arrays: dict[str, Arrays], *, seed: int,
              cnn_epochs: int) -> list[tuple[str, float | None, float | None]]:
    """(name, trained accuracy, linear-probe accuracy) on the held-out set, pretrained row excluded.

    The random-weight row reruns version 1's recipe (scenario, cut, head, phases,
    learning rates) with ``--weights none``.
    """
    spec = bases.get_base(lineage["base"])
    hp = lineage["hyper_parameters"]
    decided = lineage["scenario"]
    plan = scenarios.plan_for(decided["scenario"], spec, cut_layer=decided["cut_layer"],
                              freeze_first=hp["freeze_first"], head=hp["head"], head_epochs=hp["head_epochs"],
                              finetune_epochs=hp["finetune_epochs"], head_lr=hp["head_lr"],
                              finetune_lr=hp["finetune_lr"])
    backbone = bases.build_backbone(spec, hp["image_size"], "none", cut_layer=plan.cut_layer)
    options = phases.FitOptions(image_size=hp["image_size"], batch_size=hp["batch_size"], seed=seed,
                                augment=hp["augment"], augment_copies=hp["augment_copies"],
                                patience=hp["patience"], head_patience=hp["head_patience"], verbose=0)
    layer = plan.cut_layer or spec.block_ends[-1]
    random_probe = probe_accuracy(backbone, layer, arrays["train"], arrays["test"])
    result = fit.train(plan, backbone, train_set, val_set, options)
    test_x, test_y = arrays["test"]
    scores = result.model.predict(test_x, batch_size=64, verbose=0)
    random_trained = float(np.mean(scores.argmax(axis=1) == test_y))
    scratch = scratch_cnn_accuracy(arrays["train"], arrays["val"], arrays["test"],
                                   image_size=hp["image_size"], epochs=cnn_epochs, seed=seed)
    return [("same architecture, random weights", random_trained, random_probe),
            ("small CNN from scratch", scratch, None)]


def accuracy_table(rows: list[tuple[str, float | None, float | None]], test_count: int, per_class: int) -> str:
    """The side-by-side table: trained model and linear probe accuracy per row, in percent."""
    def cell(value):
        return f"{value * 100:5.1f} %" if value is not None else "    -  "

    width = max(len(name) for name, _, _ in rows)
    lines = [f"held-out test accuracy ({test_count} images; trained on {per_class} images per class):",
             f"  {'':<{width}}  {'trained':>7}  {'probe*':>7}"]
    lines += [f"  {name:<{width}}  {cell(trained)}  {cell(probed)}" for name, trained, probed in rows]
    lines.append("  * ridge-regression linear probe on the pooled features at the same cut")
    return "\n".join(lines)


def _promote(repo: Path, candidate, eval_data: Path, min_delta: float) -> dict:
    _say(f"$ graft-train promote --repo {repo} --model-name {MODEL_NAME} --candidate {candidate} "
         f"--eval-data {eval_data} --min-delta {min_delta:g}")
    report = promote.promote(repo, MODEL_NAME, candidate, eval_data,
                             gate=promote.Gate(min_delta=min_delta), progress=_say)
    _say(promote.format_report(report))
    if report["decision"] == "error":
        raise RuntimeError(f"promotion failed: {report['reason']}")
    return report


# -- serving ------------------------------------------------------------------------------

class Server(ServeProcess):
    """A graft-serve child process on the demo repository (log in the work dir)."""

    def __init__(self, model_dir: Path, host: str, grpc_port: int, rest_port: int, log_path: Path):
        super().__init__(["--host", host, "--port", str(grpc_port), "--rest_api_port", str(rest_port),
                          "--model_name", MODEL_NAME, "--model_base_path", str(model_dir)], log_path)
        self.host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        self.grpc_port, self.rest_port = grpc_port, rest_port
        self.rest = f"http://{self.host}:{rest_port}"

    def get(self, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
        """GET a path of the REST API: (status, body)."""
        try:
            with urllib.request.urlopen(self.rest + path, timeout=timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def post_json(self, path: str, body: dict, timeout: float = 60.0) -> dict:
        """POST JSON to the REST API and decode the JSON answer (raises on an HTTP error)."""
        request = urllib.request.Request(self.rest + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"POST {path}: HTTP {exc.code}: {exc.read()[:500]!r}") from exc

    def wait_for_label(self, label: str, version: int, timeout: float = READY_TIMEOUT_S) -> None:
        """Wait until ``label`` resolves to an AVAILABLE ``version``."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"graft-serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                status, body = self.get(f"/v1/models/{MODEL_NAME}/labels/{label}", timeout=2)
            except (urllib.error.URLError, OSError):
                status, body = 0, b""
            if status == 200:
                state = json.loads(body)["model_version_status"][0]
                if state["version"] == str(version) and state["state"] == "AVAILABLE":
                    return
            time.sleep(0.25)
        raise RuntimeError(f"label {label!r} did not reach version {version} within {timeout:g} s:\n"
                           f"{self.log_tail()}")


def rest_predict(server: Server, files: list[str]) -> list[dict]:
    """One REST Predict of ``files`` (base64 PNG) to ``predict_images`` on ``labels/stable``."""
    instances = [{"b64": base64.b64encode(Path(f).read_bytes()).decode()} for f in files]
    answer = server.post_json(f"/v1/models/{MODEL_NAME}/labels/stable:predict",
                              {"signature_name": "predict_images", "instances": instances})
    return answer["predictions"]


def grpc_predict(server: Server, files: list[str]) -> tuple[list[str], list[float], int]:
    """One gRPC Predict of ``files`` to ``predict_images`` under label stable: (classes, top scores, version)."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = MODEL_NAME
    request.model_spec.version_label = "stable"
    request.model_spec.signature_name = "predict_images"
    request.inputs["image_bytes"].CopyFrom(
        tf.make_tensor_proto([Path(f).read_bytes() for f in files], dtype=tf.string))
    with grpc.insecure_channel(f"{server.host}:{server.grpc_port}") as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        response = stub.Predict(request, timeout=60)
    names = [name.decode() for name in tf.make_ndarray(response.outputs["class_names"])]
    scores = tf.make_ndarray(response.outputs["scores"])
    return names, [float(v) for v in np.max(scores, axis=1)], int(response.model_spec.version.value)


def self_check(server: Server, files: list[str], stable: int) -> list[str]:
    """Send ``files`` over REST and gRPC to labels/stable, print the answers; return what went wrong."""
    rest_answers = rest_predict(server, files)
    grpc_names, grpc_scores, served = grpc_predict(server, files)
    _say(f"{'image':<10} {'true':>4}  {'REST':>11}  {'gRPC':>11}")
    problems = []
    for path, rest_answer, name, score in zip(files, rest_answers, grpc_names, grpc_scores):
        rest_name = rest_answer["class_names"]
        _say(f"{Path(path).name:<10} {Path(path).parent.name:>4}  {rest_name:>4} "
             f"{max(rest_answer['scores']):6.3f}  {name:>4} {score:6.3f}")
        if rest_name != name:
            problems.append(f"{path}: REST says {rest_name}, gRPC says {name}")
    correct = sum(Path(p).parent.name == n for p, n in zip(files, grpc_names))
    _say(f"served by version {served} (label stable -> {stable}); {correct}/{len(files)} correct")
    if served != stable:
        problems.append(f"gRPC answered from version {served}, not the stable version {stable}")
    return problems


def _examples(server: Server, sample: str) -> str:
    rest = server.rest.replace("127.0.0.1", "localhost")
    return f"""\
copy-paste clients (the server keeps running):
  curl -s {rest}/v1/models/{MODEL_NAME}/labels/stable
  curl -s -X POST {rest}/v1/models/{MODEL_NAME}/labels/stable:predict \\
       -d "{{\\"signature_name\\": \\"predict_images\\", \\"instances\\": [{{\\"b64\\": \\"$(base64 -w0 {sample})\\"}}]}}"
  curl -s {rest}/metrics | grep '^graft_requests_total'

  # Python, gRPC (tensorflow-serving-api):
  import grpc, tensorflow as tf
  from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
  request = predict_pb2.PredictRequest()
  request.model_spec.name = "{MODEL_NAME}"
  request.model_spec.version_label = "stable"
  request.model_spec.signature_name = "predict_images"
  request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto([open("{sample}", "rb").read()]))
  stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel("localhost:{server.grpc_port}"))
  print(tf.make_ndarray(stub.Predict(request).outputs["class_names"]))"""


# -- the flow --------------------------------------------------------------------------------

def _prepare_workdir(workdir: Path) -> None:
    """Create the work dir, or clear what an earlier demo left there (never a foreign directory)."""
    if workdir.exists() and any(workdir.iterdir()) and not (workdir / MARKER).exists():
        raise ValueError(f"{workdir} exists and was not made by graft-train demo; pick another --workdir")
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / MARKER).write_text("made by graft-train demo; rerunning the demo clears this directory\n")
    for name in ("data", "repo", "candidates", "runs", "serve.log"):
        path = workdir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _serve_default() -> bool:
    return os.environ.get(SERVE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def run(config: DemoConfig) -> int:
    """Train, compare, promote, serve, self-check; the exit code: 0 when every step worked."""
    started = time.monotonic()
    serve = _serve_default() if config.serve is None else config.serve
    workdir = Path(config.workdir).resolve()
    _prepare_workdir(workdir)
    repo = workdir / "repo"
    model_dir = repo / MODEL_NAME

    _step(1, "data: scikit-learn digits as PNG class folders")
    split = write_digits(workdir / "data", image_size=config.image_size, small_per_class=config.images_per_class,
                         large_per_class=config.candidate_images_per_class, val_per_class=config.val_per_class,
                         test_per_class=config.test_per_class, seed=config.seed)
    _say(f"{workdir / 'data'}: train {split.counts['small']} ({config.images_per_class}/class), "
         f"candidate train {split.counts['large']} ({config.candidate_images_per_class}/class), "
         f"validation {split.counts['val']}, held-out test {split.counts['test']} "
         f"({config.image_size}x{config.image_size} RGB, seed {config.seed})")

    # The baselines rebuild tf.functions per model on purpose; TF's retracing advice is noise here.
    tf.get_logger().setLevel("ERROR")
    train_small = data.scan_image_folder(split.small)
    val = data.scan_image_folder(split.val)
    test = data.scan_image_folder(split.test)

    _step(2, f"fit version 1: vgg16 + hed weights, scenario auto, {config.images_per_class} images per class")
    version1 = _fit(split.small, split.val, repo, workdir / "runs" / "v1", config)
    lineage = contract.read_lineage(version1)
    evidence = lineage["scenario"]["evidence"]
    probes = ", ".join(f"{k} {v * 100:.1f}%" for k, v in evidence.get("probe_scores", {}).items())
    _say(f"auto decision: scenario {lineage['scenario']['scenario']} ({lineage['scenario']['name']}), "
         f"cut {lineage['scenario']['cut_layer'] or 'none'}; {evidence.get('size')} data, "
         f"{evidence.get('similarity')}; probe evidence: {probes}")
    first = _promote(repo, 1, split.test, config.min_delta)
    _say("baselines on the same images: version 1's recipe on a random-weight trunk, "
         "and a small CNN from scratch...")
    size = (config.image_size, config.image_size)
    arrays = {"train": data.load_arrays(train_small, size), "val": data.load_arrays(val, size),
              "test": data.load_arrays(test, size)}
    cut = lineage["scenario"]["cut_layer"]
    spec = bases.get_base(lineage["base"])
    pretrained_probe = probe_accuracy(bases.build_backbone(spec, config.image_size, "hed", cut_layer=cut),
                                      cut or spec.block_ends[-1], arrays["train"], arrays["test"])
    rows = [(f"vgg16 hed-pretrained trunk, cut at {cut or 'the last block'} (version 1)",
             first["candidate"]["value"], pretrained_probe)]
    rows += baselines(lineage, train_small, val, arrays, seed=config.seed, cnn_epochs=config.cnn_epochs)
    _say(accuracy_table(rows, len(test), config.images_per_class))

    _step(3, f"candidate: {config.candidate_images_per_class} images per class, through the promotion gate")
    candidate = _fit(split.large, split.val, workdir / "candidates", workdir / "runs" / "candidate", config)
    second = _promote(repo, candidate, split.test, config.min_delta)
    labels = contract.read_labels(model_dir) or {}
    _say(f"labels.json: {labels}")
    if "stable" not in labels:
        _say("self-check FAILED: no version passed the promotion gate, so there is nothing stable to serve "
             "(more --images-per-class?)")
        return 1
    stable = labels["stable"]

    _step(4, "graft-serve on the repository: REST and gRPC to labels/stable")
    server = Server(model_dir, config.host, config.grpc_port, config.rest_port, workdir / "serve.log")
    try:
        _say("$ " + " ".join(server.command))
        server.wait_for_label("stable", stable)
        files = _sample_files(test, config.seed)
        problems = self_check(server, files, stable)

        _step(5, "metrics and clients")
        status, body = server.get("/metrics")
        wanted = ("graft_requests_total{", "graft_request_latency_seconds_count", "graft_examples_total",
                  "graft_model_version_state{")
        lines = [line for line in body.decode(errors="replace").splitlines()
                 if line.startswith(wanted) and not line.endswith(" 0.0")]
        _say(f"GET /metrics ({status}), a few lines:")
        for line in lines[:10]:
            _say("  " + line)
        _say(_examples(server, files[0]))
        elapsed = time.monotonic() - started
        if problems:
            for problem in problems:
                _say(f"self-check FAILED: {problem}")
            return 1
        _say(f"self-check passed: training, promotion and serving took {elapsed:.0f} s "
             f"(stable: version {stable}, {second['decision']}: {second['reason']})")

        if not serve:
            _say(f"{SERVE_ENV}=0 / --no-serve: stopping graft-serve")
            return 0
        _step(6, f"serving on REST {server.rest} and gRPC {server.host}:{server.grpc_port}; Ctrl-C stops")
        try:
            code = server.proc.wait()
            _say(f"graft-serve exited with {code}")
            return 0 if code == 0 else 1
        except KeyboardInterrupt:
            _say("stopping graft-serve (draining)...")
            return 0
    finally:
        server.stop()


def _sample_files(images, seed: int, count: int = 5) -> list[str]:
    """``count`` held-out files from different classes, chosen by ``seed``."""
    rng = np.random.default_rng(seed)
    classes = rng.permutation(len(images.class_names))[:count]
    labels = np.asarray(images.labels)
    return [images.files[int(rng.choice(np.flatnonzero(labels == c)))] for c in classes]
