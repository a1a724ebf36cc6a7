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
import os
import sys
from collections.abc import Callable, Sequence

from training import subcommands

# Errors a user can cause (bad paths, bad values): reported in one line, exit 2.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
EXIT_USAGE = 2


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


def run_fit(args: argparse.Namespace) -> int:
    """``graft-train fit``: decide, train, export the next version, evaluate it, write the report."""
    # Heavy (TensorFlow): imported when a fit runs, so that --help stays instant.
    from training import pipeline

    # Every FitConfig field is the flag of the same name.
    config = pipeline.FitConfig(**{field.name: getattr(args, field.name)
                                   for field in dataclasses.fields(pipeline.FitConfig)})
    pipeline.run(config)
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
    from training import demo  # light: no TensorFlow at import

    return [
        Command("fit", "fine-tune a base on an image folder and export the next version",
                add_fit_arguments, run_fit),
        Command("evaluate", "accuracy and per-class precision/recall of an exported version",
                add_evaluate_arguments, run_evaluate),
        Command("promote", "gate a candidate against the labelled version and move the label (exit 0/1/2)",
                subcommands.add_promote_arguments, subcommands.run_promote),
        Command("rollback", "move a label back to its previous version from the history",
                subcommands.add_rollback_arguments, subcommands.run_rollback),
        Command("labels", "show a model's labels, versions and label history",
                subcommands.add_labels_arguments, subcommands.run_labels),
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
