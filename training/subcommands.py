"""The subcommands' argparse glue: each ``add_<name>_arguments`` declares flags, ``run_<name>`` runs them.

training.cli registers them. The work itself lives elsewhere: training.pipeline
(fit), training.evaluate, training.promote (promote, rollback), training.repo
(labels) and training.demo; the run functions turn parsed flags into those
modules' arguments and their results into output and an exit code. Modules that
import TensorFlow are imported inside the run functions, so that
``graft-train --help`` stays instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Mapping
from pathlib import Path

from training import catalog, preflight, promote, reference, report, scenarios
from training import repo as model_repo
from training import shadow as live
from training.errors import UsageError


# -- fit, evaluate -------------------------------------------------------------------------

def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, not {text}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number (0..65535), not {text}")
    return value


def _key(text: str) -> str:
    # Choices are matched trimmed and in lower case, as the catalog and parse_scenario match them.
    return text.strip().lower()


# Every --scenario value: auto, the numbers and their aliases (training.scenarios).
SCENARIO_CHOICES = ("auto", *scenarios.SCENARIO_ALIASES)


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), not {text}")
    return value


def add_fit_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``graft-train fit``."""
    data = parser.add_argument_group("data")
    data.add_argument("--data", required=True, metavar="DIR", help="class-per-folder image directory")
    val = data.add_mutually_exclusive_group()
    val.add_argument("--val-data", metavar="DIR", help="separate validation directory (same classes)")
    val.add_argument("--val-split", type=_fraction, default=0.2, metavar="F",
                     help="fraction of --data held out for validation, stratified, by --seed (default 0.2)")
    data.add_argument("--image-size", type=_positive_int, metavar="N",
                      help="square input size in pixels (default: the base's own, e.g. 224)")
    data.add_argument("--no-augment", dest="augment", action="store_false",
                      help="switch off the article's augmentation of the training split")
    data.add_argument("--augment-copies", type=_non_negative_int, default=0, metavar="K",
                      help="augmented passes cached beside the plain one when the trunk is frozen (default 0)")

    model = parser.add_argument_group("model")
    model.add_argument("--base", type=_key, choices=tuple(catalog.BASES), default="vgg16", metavar="NAME",
                       help="vgg16, vgg19, resnet50, mobilenet_v2, mobilenet_v3_small, mobilenet_v3_large, "
                            "efficientnet_b0 or inception_v3 (default vgg16)")
    model.add_argument("--weights", default="imagenet", metavar="SRC",
                       help="imagenet (from the Keras cache only), hed, none, or a .keras/.weights.h5/.h5 file")
    model.add_argument("--scenario", type=_key, choices=SCENARIO_CHOICES, default="auto", metavar="S",
                       help="auto, 1|feature-extraction, 2|fine-tune, 3|early-features, 4|full (default auto)")
    model.add_argument("--head", choices=("gap", "seed"), default="gap",
                       help="gap: pooling+dropout+softmax; seed: the article's Flatten+2xDense(1024) head")
    model.add_argument("--cut-layer", metavar="NAME", help="cut the trunk after this layer")
    model.add_argument("--freeze-first", type=_non_negative_int, default=0, metavar="N",
                       help="keep the first N trunk layers frozen while fine-tuning (the article: 5)")
    model.add_argument("--small-threshold", type=_positive_int, default=None, metavar="N",
                       help="auto: fewer images per class (median) than this is 'small' (default 100)")
    model.add_argument("--like", metavar="MODEL_DIR",
                       help="join the frozen trunk of MODEL_DIR's stable version (else its latest) or of "
                            "MODEL_DIR/VERSION: its base, weights, cut, image size and scenario")

    train = parser.add_argument_group("training")
    train.add_argument("--head-epochs", type=_positive_int, default=100, metavar="N",
                       help="most epochs of the head phase (default 100: cheap on cached features; "
                            "early stopping ends it, see --head-patience)")
    train.add_argument("--finetune-epochs", type=_positive_int, default=10, metavar="N",
                       help="most epochs of the phase that trains the trunk, scenarios 2 and 4 (default 10)")
    train.add_argument("--batch-size", type=_positive_int, default=32, metavar="N", help="(default 32)")
    train.add_argument("--head-lr", type=_positive_float, default=None, metavar="LR",
                       help="Adam (default: 1e-3 for the gap head, 1e-4 for the seed head)")
    train.add_argument("--finetune-lr", type=_positive_float, default=1e-4, metavar="LR",
                       help="SGD with momentum 0.9 (default 1e-4, as the article)")
    train.add_argument("--patience", type=_positive_int, default=5, metavar="N",
                       help="early stopping patience in epochs of the phases that train the trunk (default 5)")
    train.add_argument("--head-patience", type=_positive_int, default=20, metavar="N",
                       help="early stopping patience of the head phase (default 20: on small data its "
                            "validation accuracy stalls for many epochs before it climbs)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--strategy", choices=("default", "mirrored", "multiworker"), default="default",
                       help="mirrored: every GPU of this host (tf.distribute.MirroredStrategy); "
                            "multiworker: the workers in TF_CONFIG (MultiWorkerMirroredStrategy; "
                            "--batch-size is the global batch; only the chief exports)")
    train.add_argument("--mixed-precision", action="store_true", help="mixed_float16 (GPUs)")

    out = parser.add_argument_group("output")
    out.add_argument("--repo", required=True, metavar="DIR", help="model repository root")
    out.add_argument("--model-name", required=True, metavar="NAME")
    out.add_argument("--log-dir", metavar="DIR", help="TensorBoard log directory (one subfolder per phase)")
    out.add_argument("--run-dir", metavar="DIR",
                     help="report directory (default runs/<model-name>-<UTC time>)")


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``graft-train evaluate``."""
    parser.add_argument("--model", required=True, metavar="PATH", help="an exported version directory")
    parser.add_argument("--data", required=True, metavar="DIR", help="class-per-folder image directory")
    parser.add_argument("--report-dir", metavar="DIR", help="write report.json and the confusion matrix here")
    parser.add_argument("--signature", choices=("serving_default", "predict_images", "classify"),
                        default="serving_default", help="which exported signature to evaluate")
    parser.add_argument("--batch-size", type=_positive_int, default=32, metavar="N", help="(default 32)")


def _say(text: str = "") -> None:
    print(text, flush=True)


def run_fit(args: argparse.Namespace) -> int:
    """``graft-train fit``: decide, train, export the next version, evaluate it, write the report."""
    if args.like:
        # --like decides the base, weights, cut, size and scenario, so they are checked as it sets them.
        vars(args).update(reference.read_reference(args.like).settings_for(args))
    # Every flag and file, before TensorFlow loads: a wrong one is refused in a fraction of a second.
    preflight.check_fit(args)
    # Heavy (TensorFlow): imported once the flags are known to be good, so that --help stays instant.
    from training import pipeline

    # Every FitConfig field is the flag of the same name.
    config = pipeline.FitConfig(**{field.name: getattr(args, field.name)
                                   for field in dataclasses.fields(pipeline.FitConfig)})
    pipeline.run(config)
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    """``graft-train evaluate``: score an exported version on a labelled folder."""
    preflight.check_evaluate(args.model, args.data, args.signature, args.report_dir)
    # Heavy (TensorFlow): imported once the flags are known to be good, so that --help stays instant.
    from training import data, evaluate

    try:
        images = data.scan_image_folder(args.data)
    except UsageError as exc:  # the scan found a class without a readable image
        raise exc.naming("--data") from None
    if images.skipped:
        _say(f"skipped {len(images.skipped)} unreadable file(s)")
    evaluation = evaluate.evaluate_savedmodel(args.model, images, signature=args.signature,
                                              batch_size=args.batch_size)
    _say(f"model: {args.model} (signature {args.signature})")
    _say(report.format_evaluation(evaluation))
    if args.report_dir:
        summary = {"command": "evaluate", "model": str(args.model), "data": images.root,
                   "data_fingerprint": images.fingerprint(),
                   "skipped_files": [{"path": p, "reason": r} for p, r in images.skipped]}
        files = report.write_eval_report(args.report_dir, evaluation, summary=summary)
        _say(f"report: {files['report']}")
    return 0


# -- promote, rollback, labels -------------------------------------------------------------

def _write_report(path: str | None, data: Mapping) -> str | None:
    """Write the JSON report to ``path``; returns an error message instead of raising."""
    if not path:
        return None
    try:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    except OSError as exc:
        return f"cannot write the report to {path}: {exc}"
    return None


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _finish_command(result: dict, report_file: str | None) -> int:
    problem = _write_report(report_file, result)
    print(json.dumps(result, indent=2, sort_keys=True), flush=True)
    _stderr(promote.format_report(result) if "candidate" in result else f"{result['decision']}: {result['reason']}")
    if problem:
        _stderr(problem)
        return promote.EXIT_ERROR
    return int(result["exit_code"])


def add_promote_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``graft-train promote``."""
    parser.add_argument("--repo", required=True, metavar="DIR", help="model repository root")
    parser.add_argument("--model-name", required=True, metavar="NAME")
    parser.add_argument("--candidate", required=True, metavar="VERSION|EXPORT_DIR",
                        help="a version number of the model, or an exported SavedModel directory "
                             "(published as the next version when promoted)")
    parser.add_argument("--eval-data", required=True, metavar="DIR",
                        help="held-out class-per-folder images both versions are scored on")
    parser.add_argument("--label", default="stable", help="the label to move (default stable; e.g. canary)")
    parser.add_argument("--metric", choices=promote.METRICS, default="accuracy", help="gate metric (default accuracy)")
    parser.add_argument("--min-delta", type=float, default=0.0, metavar="D",
                        help="candidate minus current metric must be >= D (default 0.0; negative tolerates a loss)")
    parser.add_argument("--max-p99-ms", type=float, default=None, metavar="MS",
                        help="reject when the candidate's in-process single-image p99 latency exceeds MS")
    parser.add_argument("--allow-signature-change", action="store_true",
                        help="accept a candidate whose signatures or classes differ from the current version")
    parser.add_argument("--signature", choices=promote.EVAL_SIGNATURES, default="serving_default",
                        help="exported signature used for evaluation and latency (default serving_default)")
    parser.add_argument("--batch-size", type=int, default=32, metavar="N")
    parser.add_argument("--latency-runs", type=int, default=100, metavar="N",
                        help="timed single-image calls for --max-p99-ms (default 100)")
    parser.add_argument("--lock-timeout", type=float, default=-1.0, metavar="S",
                        help="seconds to wait for a concurrent promotion (default: wait)")
    parser.add_argument("--report", metavar="FILE", help="also write the JSON report here")
    shadow = parser.add_argument_group(
        "live comparison", "with --shadow-url, the candidate must also be the server's canary and pass on the "
        "traffic graft-serve --shadow_fraction mirrored to it (GET /v1/models/NAME/shadow)")
    shadow.add_argument("--shadow-url", metavar="URL", help="graft-serve's REST address, e.g. http://host:8501")
    shadow.add_argument("--min-agreement", type=float, metavar="X",
                        help="least top-1 agreement of canary with stable on mirrored requests (0..1)")
    shadow.add_argument("--min-shadow-requests", type=int, metavar="N",
                        help="least compared requests; fewer is a rejection (exit 1)")
    shadow.add_argument("--max-js", type=float, metavar="X",
                        help="largest Jensen-Shannon divergence of the two predicted-class histograms (bits, 0..1)")
    shadow.add_argument("--shadow-wait", type=float, default=0.0, metavar="S",
                        help="wait up to S seconds for --min-shadow-requests compared requests (default 0: read once)")


def _shadow_gate(args: argparse.Namespace) -> live.ShadowGate | None:
    """The live half of the gate from the flags; ValueError when they do not go together."""
    given = [flag for flag, value in (("--min-agreement", args.min_agreement),
                                      ("--min-shadow-requests", args.min_shadow_requests),
                                      ("--max-js", args.max_js)) if value is not None]
    if args.shadow_url is None:
        if given:
            raise ValueError(f"{', '.join(given)} {'needs' if len(given) == 1 else 'need'} --shadow-url")
        return None
    missing = [flag for flag, value in (("--min-agreement", args.min_agreement),
                                        ("--min-shadow-requests", args.min_shadow_requests)) if value is None]
    if missing:
        raise ValueError(f"--shadow-url needs {' and '.join(missing)}")
    return live.ShadowGate(args.shadow_url, args.min_agreement, args.min_shadow_requests, args.max_js,
                           args.shadow_wait)


def run_promote(args: argparse.Namespace) -> int:
    """``graft-train promote``: exit 0 promoted, 1 rejected, 2 error; the JSON report on stdout."""
    try:
        gate = promote.Gate(metric=args.metric, min_delta=args.min_delta, max_p99_ms=args.max_p99_ms,
                            allow_signature_change=args.allow_signature_change, signature=args.signature,
                            latency_runs=args.latency_runs, batch_size=args.batch_size,
                            shadow=_shadow_gate(args))
    except ValueError as exc:
        return _finish_command(promote.error_report(args.repo, args.model_name, args.candidate, args.eval_data,
                                                    args.label, str(exc)), args.report)
    result = promote.promote(args.repo, args.model_name, args.candidate, args.eval_data, label=args.label,
                     gate=gate, lock_timeout=args.lock_timeout, progress=_stderr)
    return _finish_command(result, args.report)


def add_rollback_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``graft-train rollback``."""
    parser.add_argument("--repo", required=True, metavar="DIR", help="model repository root")
    parser.add_argument("--model-name", required=True, metavar="NAME")
    parser.add_argument("--label", default="stable", help="the label to move back (default stable)")
    parser.add_argument("--lock-timeout", type=float, default=-1.0, metavar="S",
                        help="seconds to wait for a concurrent promotion (default: wait)")
    parser.add_argument("--report", metavar="FILE", help="also write the JSON result here")


def run_rollback(args: argparse.Namespace) -> int:
    """``graft-train rollback``: exit 0 when the label moved back, 2 otherwise."""
    result = promote.rollback(args.repo, args.model_name, label=args.label, lock_timeout=args.lock_timeout,
                      progress=_stderr)
    return _finish_command(result, args.report)


def format_labels(listing: Mapping) -> str:
    """Plain text for ``graft-train labels``: labels, versions, then the history lines."""
    lines = [f"model {listing['model_name']}: versions {', '.join(map(str, listing['versions'])) or 'none'}"]
    if listing["labels"]:
        for name, version in sorted(listing["labels"].items()):
            note = "  (version missing!)" if name in listing["dangling"] else ""
            lines.append(f"  {name:<10} -> {version}{note}")
    else:
        lines.append("  no labels")
    lines.append(f"history ({len(listing['history'])} entries):")
    for entry in listing["history"]:
        lines.append(f"  {entry.get('time', '?')}  {entry.get('action', '?'):<9} {entry['label']:<10} "
                     f"{entry.get('from')} -> {entry.get('to')}")
    return "\n".join(lines)


def add_labels_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``graft-train labels``."""
    parser.add_argument("--repo", required=True, metavar="DIR", help="model repository root")
    parser.add_argument("--model-name", required=True, metavar="NAME")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def run_labels(args: argparse.Namespace) -> int:
    """``graft-train labels``: the labels, the versions present and the history."""
    try:
        listing = model_repo.describe_model(args.repo, args.model_name)
    except ValueError as exc:
        _stderr(f"graft-train labels: error: {exc}")
        return promote.EXIT_ERROR
    print(json.dumps(listing, indent=2, sort_keys=True) if args.json else format_labels(listing), flush=True)
    return 0


# -- demo ----------------------------------------------------------------------------------

def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``graft-train demo``."""
    parser.add_argument("--workdir", default="demo-work", metavar="DIR",
                        help="where data, repository, runs and the server log go (default demo-work); "
                             "cleared on each run")
    parser.add_argument("--images-per-class", type=_positive_int, default=10, metavar="N",
                        help="training images per class for version 1 (default 10)")
    parser.add_argument("--candidate-images-per-class", type=_positive_int, default=50, metavar="N",
                        help="training images per class for the second candidate (default 50)")
    parser.add_argument("--val-per-class", type=_positive_int, default=10, metavar="N",
                        help="validation images per class (default 10)")
    parser.add_argument("--test-per-class", type=_non_negative_int, default=0, metavar="N",
                        help="held-out test images per class (default 0: every remaining image)")
    parser.add_argument("--image-size", type=_positive_int, default=64, metavar="N",
                        help="image side in pixels (default 64)")
    parser.add_argument("--cnn-epochs", type=_positive_int, default=200, metavar="N",
                        help="epochs of the from-scratch CNN baseline (default 200, early stopping)")
    parser.add_argument("--min-delta", type=float, default=0.0, metavar="D", help="promotion gate (default 0.0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--host", default="127.0.0.1", help="graft-serve bind address (default 127.0.0.1)")
    parser.add_argument("--grpc-port", type=_port, default=8500, metavar="PORT")
    parser.add_argument("--rest-port", type=_port, default=8501, metavar="PORT")
    parser.add_argument("--serve", action=argparse.BooleanOptionalAction, default=None,
                        help="keep serving after the self-check until Ctrl-C (default: yes, unless DEMO_SERVE=0)")


def run_demo(args: argparse.Namespace) -> int:
    """``graft-train demo``: train, compare, promote, serve, self-check; 0 when every step worked."""
    if args.images_per_class >= args.candidate_images_per_class:
        raise UsageError("--candidate-images-per-class",
                         f"must exceed --images-per-class ({args.images_per_class}): the second candidate "
                         "trains on more images than version 1")
    # Heavy (TensorFlow): imported when the demo runs, so that --help stays instant.
    from training import demo

    # Every DemoConfig field is the flag of the same name.
    return demo.run(demo.DemoConfig(**{field.name: getattr(args, field.name)
                                       for field in dataclasses.fields(demo.DemoConfig)}))
