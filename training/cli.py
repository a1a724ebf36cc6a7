"""graft-train: fine-tune a pretrained CNN from an image folder and export a servable version.

Subcommands are registered in one place, :func:`commands`: each is a
:class:`Command` (name, help, add_arguments, run). A new subcommand is an
``add_<name>_arguments`` and a ``run_<name>`` in training.subcommands, and one
line here. Heavy imports (TensorFlow) happen inside the run functions, so
``graft-train --help`` stays instant.

A user's mistake (argparse's own refusals, and every training.errors.UsageError
the run functions raise) is one line on stderr and exit status 2; any other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable, Sequence

from training import subcommands
from training.errors import UsageError

EXIT_USAGE = 2


class Parser(argparse.ArgumentParser):
    """argparse, with its refusals in one line (``graft-train fit: error: argument --base: ...``), exit 2.

    argparse prints the whole usage first; for a subcommand with thirty flags
    that buries the line that matters. ``--help`` still shows it.
    """

    def error(self, message: str):
        """Print ``<prog>: error: <message>`` on stderr and exit 2."""
        self.exit(EXIT_USAGE, f"{self.prog}: error: {' '.join(message.split())}\n")


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
    parser = Parser(
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
    except UsageError as exc:
        print(f"graft-train {args.command}: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("graft-train: interrupted", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
