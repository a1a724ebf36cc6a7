"""graft-train: fine-tune a pretrained CNN from an image folder and export a servable version.

Subcommands are registered in one place, :func:`commands`: each is a
:class:`Command` (name, help, add_arguments, run). A new subcommand is an
``add_<name>_arguments`` and a ``run_<name>`` in training.subcommands, and one
line here. Heavy imports (TensorFlow) happen inside the run functions, so
``graft-train --help`` stays instant.
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


def commands() -> list[Command]:
    """Every subcommand, in help order: the one place where subcommands are registered."""
    return [
        Command("fit", "fine-tune a base on an image folder and export the next version",
                subcommands.add_fit_arguments, subcommands.run_fit),
        Command("evaluate", "accuracy and per-class precision/recall of an exported version",
                subcommands.add_evaluate_arguments, subcommands.run_evaluate),
        Command("promote", "gate a candidate against the labelled version and move the label (exit 0/1/2)",
                subcommands.add_promote_arguments, subcommands.run_promote),
        Command("rollback", "move a label back to its previous version from the history",
                subcommands.add_rollback_arguments, subcommands.run_rollback),
        Command("labels", "show a model's labels, versions and label history",
                subcommands.add_labels_arguments, subcommands.run_labels),
        Command("demo", "digits on real pretrained weights: train, compare, promote, serve, self-check",
                subcommands.add_demo_arguments, subcommands.run_demo),
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
