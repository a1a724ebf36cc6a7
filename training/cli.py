"""graft-train: fine-tune a pretrained CNN from an image folder and export a servable version.

Subcommands are registered in one place, :func:`commands`: each is a
:class:`Command` (name, help, add_arguments, run). Adding ``promote``,
``rollback``, ``labels`` or ``demo`` means writing those three things in their
own module and adding one line there. Heavy imports (TensorFlow) happen inside
the run functions, so ``graft-train --help`` stays instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

# Errors a user can cause (bad paths, bad values): reported in one line, exit 2.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
EXIT_USAGE = 2
# Probes need a few images per class, not the whole set: this caps their cost.
PROBE_IMAGES_PER_CLASS = 100


@dataclasses.dataclass(frozen=True)
class Command:
    """One subcommand: ``add_arguments(parser)`` declares its flags; ``run(args)`` returns the exit code."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


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
    model.add_argument("--base", default="vgg16", metavar="NAME",
                       help="vgg16, vgg19, resnet50, mobilenet_v2, mobilenet_v3_small, mobilenet_v3_large, "
                            "efficientnet_b0 or inception_v3 (default vgg16)")
    model.add_argument("--weights", default="imagenet", metavar="SRC",
                       help="imagenet (from the Keras cache only), hed, none, or a .keras/.weights.h5/.h5 file")
    model.add_argument("--scenario", default="auto", metavar="S",
                       help="auto, 1|feature-extraction, 2|fine-tune, 3|early-features, 4|full (default auto)")
    model.add_argument("--head", choices=("gap", "seed"), default="gap",
                       help="gap: pooling+dropout+softmax; seed: the article's Flatten+2xDense(1024) head")
    model.add_argument("--cut-layer", metavar="NAME", help="cut the trunk after this layer")
    model.add_argument("--freeze-first", type=_non_negative_int, default=0, metavar="N",
                       help="keep the first N trunk layers frozen while fine-tuning (the article: 5)")
    model.add_argument("--small-threshold", type=_positive_int, default=None, metavar="N",
                       help="auto: fewer images per class (median) than this is 'small' (default 100)")

    train = parser.add_argument_group("training")
    train.add_argument("--head-epochs", type=_positive_int, default=100, metavar="N",
                       help="most epochs of the head phase (default 100: cheap on cached features; "
                            "early stopping ends it, see --head-patience)")
    train.add_argument("--finetune-epochs", type=_positive_int, default=10, metavar="N")
    train.add_argument("--batch-size", type=_positive_int, default=32, metavar="N")
    train.add_argument("--head-lr", type=_positive_float, default=1e-3, metavar="LR", help="Adam (default 1e-3)")
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
    parser.add_argument("--batch-size", type=_positive_int, default=32, metavar="N")


def _say(text: str = "") -> None:
    print(text, flush=True)


def _subset(images, per_class: int, seed: int):
    """At most ``per_class`` images of each class, chosen by ``seed`` (keeps the probes cheap)."""
    import numpy as np

    from training.data import ImageSet

    rng = np.random.default_rng(seed)
    labels = np.asarray(images.labels)
    keep: list[int] = []
    for label in range(len(images.class_names)):
        members = np.flatnonzero(labels == label)
        keep.extend(sorted(rng.permutation(members)[:per_class].tolist()))
    keep.sort()
    return ImageSet(images.root, list(images.class_names), [images.files[i] for i in keep],
                    [images.labels[i] for i in keep], [])


def _load_sets(args):
    from training import data

    images = data.scan_image_folder(args.data)
    _say(f"data: {images.root}: {len(images)} images in {len(images.class_names)} classes "
         f"({', '.join(f'{k} {v}' for k, v in images.per_class_counts().items())})")
    skipped = list(images.skipped)
    if args.val_data:
        val = data.scan_image_folder(args.val_data)
        if val.class_names != images.class_names:
            raise ValueError(f"--val-data classes {val.class_names} differ from --data classes {images.class_names}")
        skipped += val.skipped
        train = images
        _say(f"validation: {val.root}: {len(val)} images")
    else:
        train, val = data.split_image_set(images, args.val_split, args.seed)
        _say(f"split: {len(train)} train / {len(val)} validation (val-split {args.val_split}, seed {args.seed})")
    if skipped:
        _say(f"skipped {len(skipped)} unreadable file(s):")
        for path, reason in skipped[:20]:
            _say(f"  {path}: {reason}")
        if len(skipped) > 20:
            _say(f"  ... and {len(skipped) - 20} more (all listed in report.json)")
    return train, val, skipped


def _decide_scenario(args, spec, source, image_size, train, val):
    """The scenario, cut layer and evidence: from the flag, or from `auto`'s probes."""
    from training import bases, data, probe, scenarios

    choice = scenarios.parse_scenario(args.scenario)
    if choice != "auto":
        return choice, args.cut_layer, {"chosen_by": "user", "flag": args.scenario}, None
    threshold = args.small_threshold or scenarios.SMALL_THRESHOLD
    backbone = bases.build_backbone(spec, image_size, source)
    probe_train = _subset(train, PROBE_IMAGES_PER_CLASS, args.seed)
    probe_val = _subset(val, PROBE_IMAGES_PER_CLASS, args.seed)
    x, y = data.load_arrays(probe_train, image_size)
    vx, vy = data.load_arrays(probe_val, image_size)
    _say(f"auto: linear probes at {', '.join(spec.block_ends)} on {len(x)} train / {len(vx)} validation images")
    scores = probe.probe_blocks(backbone, x, y, vx, vy, spec.block_ends, seed=args.seed,
                                batch_size=args.batch_size)
    decision = scenarios.decide_auto(train.per_class_counts(), scores, spec.block_ends,
                                     small_threshold=threshold)
    evidence = {"chosen_by": "auto", **decision.evidence}
    cut = args.cut_layer or decision.cut_layer
    # The probing backbone is the training one when nothing is cut away.
    return decision.scenario, cut, evidence, (backbone if cut is None else None)


def _describe_phase(phase, plan, run_options) -> str:
    detail = f"{phase.optimizer} lr={phase.learning_rate:g}"
    if phase.optimizer == "sgd" and phase.momentum:
        detail += f" momentum={phase.momentum:g}"
    if phase.train_trunk:
        where = "trunk trains" + (f" except its first {plan.freeze_first} layers" if plan.freeze_first else "")
        where += ", BatchNormalization frozen"
    else:
        where = "trunk frozen"
        if plan.cache_features:
            where += ", head on cached features"
            if run_options.augment_copies:
                where += f" (+{run_options.augment_copies} augmented copies)"
    epochs = f"{phase.epochs} epoch{'s' if phase.epochs != 1 else ''}"
    return f"{phase.name}: {epochs}, {detail}, {where}"


def _print_decisions(spec, image_size, backbone, plan, evidence, options) -> None:
    source = backbone.source
    report = backbone.weights_report
    _say(f"base: {spec.name} at {image_size}x{image_size} (preprocess '{spec.preprocess_mode}' inside the model)")
    if source is None or source.kind == "none":
        _say("weights: none (random initialisation)")
    else:
        _say(f"weights: {source.kind} {source.path} sha256 {source.sha256[:12]}; {len(report.loaded)} layers "
             f"loaded (by {report.mode}), {len(report.missing_in_model)} not in the file, "
             f"{len(report.unmatched_in_file)} file entries unused")
    for note in report.notes:
        _say(f"  note: {note}")
    why = "chosen by --scenario"
    if evidence.get("chosen_by") == "auto":
        scores = ", ".join(f"{k} {v:.3f}" for k, v in evidence["probe_scores"].items())
        why = (f"auto: {evidence['size']} data (median {evidence['median_images_per_class']:g} images/class, "
               f"threshold {evidence['small_threshold']}), {evidence['similarity']} "
               f"(best probe {evidence['best_block']}; probes: {scores})")
    _say(f"scenario: {plan.scenario} {plan.name} ({why})")
    trunk_layers = len(backbone.trunk.layers)
    _say(f"cut: {plan.cut_layer or 'none (full trunk)'}; trunk has {trunk_layers} layers")
    bn = sum(1 for layer in backbone.trunk.layers if type(layer).__name__ == "BatchNormalization")
    for phase in plan.phases:
        names = [layer.name for layer in backbone.trunk.layers]
        frozen = plan.frozen_trunk_layers(names, phase)
        extra = f" + {bn} BatchNormalization layers always" if phase.train_trunk and bn else ""
        _say(f"frozen in {phase.name}: {len(frozen)} of {trunk_layers} trunk layers{extra}")
    _say("phases:")
    for phase in plan.phases:
        _say(f"  {_describe_phase(phase, plan, options)}")


def _default_run_dir(model_name: str) -> Path:
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{model_name}-{stamp}"


def run_fit(args: argparse.Namespace) -> int:
    """``graft-train fit``: decide, train, export the next version, evaluate it, write the report."""
    from training import bases, data, evaluate, export, fit, phases, repo, report, scenarios, weights

    # Every flag that can be wrong is checked before the (slow) image scan.
    repo.model_dir(args.repo, args.model_name)
    spec = bases.get_base(args.base)
    scenarios.parse_scenario(args.scenario)
    image_size = args.image_size or spec.default_size
    if image_size < spec.min_size:
        raise ValueError(f"--image-size {image_size} is below {spec.name}'s minimum of {spec.min_size}")
    source = weights.resolve_weights(args.weights, spec)
    train_set, val_set, skipped = _load_sets(args)
    options = phases.FitOptions(
        image_size=image_size, batch_size=args.batch_size, seed=args.seed, augment=args.augment,
        augment_copies=args.augment_copies, patience=args.patience, head_patience=args.head_patience,
        log_dir=args.log_dir, strategy=args.strategy)
    if args.log_dir and not phases.tensorboard_available():
        raise ValueError("--log-dir needs the tensorboard package: pip install tensorboard")

    with fit.precision_policy(args.mixed_precision), fit.strategy_scope(args.strategy):
        scenario, cut, evidence, backbone = _decide_scenario(args, spec, source, image_size, train_set, val_set)
        plan = scenarios.plan_for(
            scenario, spec, cut_layer=cut, freeze_first=args.freeze_first, head=args.head,
            head_epochs=args.head_epochs, finetune_epochs=args.finetune_epochs,
            head_lr=args.head_lr, finetune_lr=args.finetune_lr, evidence=evidence)
        if backbone is None:
            backbone = bases.build_backbone(spec, image_size, source, cut_layer=plan.cut_layer)
        _print_decisions(spec, image_size, backbone, plan, evidence, options)
        result = fit.train(plan, backbone, train_set, val_set, options)

    lineage = {
        "base": spec.name,
        "preprocess": spec.preprocess_mode,
        "weights": {**source.describe(), "report": backbone.weights_report.describe()},
        "scenario": plan.describe(),
        "frozen_layers": {run.name: run.frozen_trunk_layers for run in result.phases},
        "bn_frozen": [layer.name for layer in bases.bn_layers(backbone.trunk)],
        "hyper_parameters": {
            "image_size": image_size, "batch_size": args.batch_size, "head": args.head,
            "head_epochs": args.head_epochs, "finetune_epochs": args.finetune_epochs,
            "head_lr": args.head_lr, "finetune_lr": args.finetune_lr, "freeze_first": args.freeze_first,
            "cut_layer": plan.cut_layer, "seed": args.seed, "augment": args.augment,
            "augment_copies": args.augment_copies, "patience": args.patience,
            "head_patience": args.head_patience,
            "val_split": None if args.val_data else args.val_split, "strategy": args.strategy,
            "mixed_precision": args.mixed_precision,
        },
        "metrics": result.metrics,
        "dataset": {
            "root": train_set.root, "fingerprint": train_set.fingerprint(),
            "val_root": val_set.root, "val_fingerprint": val_set.fingerprint(),
            "class_counts": train_set.per_class_counts(), "val_count": len(val_set),
            "skipped": len(skipped),
        },
    }
    warmup, _ = data.load_arrays(_subset(val_set, 1, args.seed), (image_size, image_size))
    exporter = export.export_version
    if args.strategy == "multiworker":
        from training import distributed

        exporter = distributed.export_version  # the chief's lands in --repo; None elsewhere
    path = exporter(result.model, train_set.class_names, args.repo, args.model_name,
                    image_size=image_size, lineage=lineage, warmup_images=warmup[:4])
    if path is None:
        _say(f"not the chief: the chief exports, evaluates and reports "
             f"(weights digest {result.metrics['distribution']['weights_digest']})")
        return 0
    evaluation = evaluate.evaluate_savedmodel(path, val_set, batch_size=args.batch_size)
    run_dir = Path(args.run_dir) if args.run_dir else _default_run_dir(args.model_name)
    summary = {"command": "fit", "version_path": path, **lineage,
               "skipped_files": [{"path": p, "reason": r} for p, r in skipped]}
    files = report.write_fit_report(run_dir, history=result.history, summary=summary, evaluation=evaluation)
    _say("validation, through the exported SavedModel:")
    _say(report.format_evaluation(evaluation))
    _say(f"report: {files['report']}")
    _say(path)
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    """``graft-train evaluate``: score an exported version on a labelled folder."""
    from training import data, evaluate, report

    images = data.scan_image_folder(args.data)
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


def commands() -> list[Command]:
    """Every subcommand, in help order: the one place where subcommands are registered."""
    from training import demo, promote  # light: no TensorFlow at import

    return [
        Command("fit", "fine-tune a base on an image folder and export the next version",
                add_fit_arguments, run_fit),
        Command("evaluate", "accuracy and per-class precision/recall of an exported version",
                add_evaluate_arguments, run_evaluate),
        Command("promote", "gate a candidate against the labelled version and move the label (exit 0/1/2)",
                promote.add_promote_arguments, promote.run_promote),
        Command("rollback", "move a label back to its previous version from the history",
                promote.add_rollback_arguments, promote.run_rollback),
        Command("labels", "show a model's labels, versions and label history",
                promote.add_labels_arguments, promote.run_labels),
        Command("demo", "digits on real pretrained weights: train, compare, promote, serve, self-check",
                demo.add_demo_arguments, demo.run_demo),
    ]


def build_parser(available: Sequence[Command] | None = None) -> argparse.ArgumentParser:
    """The argparse parser with one subparser per command."""
    parser = argparse.ArgumentParser(
        prog="graft-train",
        description="Fine-tune pretrained image CNNs by the four transfer-learning scenarios "
                    "and export versioned SavedModels for graft-serve.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in available if available is not None else commands():
        child = sub.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(child)
        child.set_defaults(_run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``graft-train`` console script; returns the exit code."""
    # Before TensorFlow is first imported (the run functions import it): hide its C++ chatter.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except USER_ERRORS as exc:
        print(f"graft-train {args.command}: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("graft-train: interrupted", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
