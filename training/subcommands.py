"""The subcommands' argparse glue: each ``add_<name>_arguments`` declares flags, ``run_<name>`` runs them.

training.cli registers them. The work itself lives elsewhere: training.pipeline
(fit), training.evaluate, training.promote (promote, rollback), training.repo
(labels) and training.demo; the run functions turn parsed flags into those
modules' arguments and their results into output and an exit code. Modules that
import TensorFlow are imported inside the run functions, so that
``graft-train --help`` stays instant.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path

from training import promote
from training import repo as model_repo


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


def add_promote_arguments(parser) -> None:
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


def run_promote(args) -> int:
    """``graft-train promote``: exit 0 promoted, 1 rejected, 2 error; the JSON report on stdout."""
    try:
        gate = promote.Gate(metric=args.metric, min_delta=args.min_delta, max_p99_ms=args.max_p99_ms,
                            allow_signature_change=args.allow_signature_change, signature=args.signature,
                            latency_runs=args.latency_runs, batch_size=args.batch_size)
    except ValueError as exc:
        return _finish_command(promote.error_report(args.repo, args.model_name, args.candidate, args.eval_data,
                                                    args.label, str(exc)), args.report)
    result = promote.promote(args.repo, args.model_name, args.candidate, args.eval_data, label=args.label,
                     gate=gate, lock_timeout=args.lock_timeout, progress=_stderr)
    return _finish_command(result, args.report)


def add_rollback_arguments(parser) -> None:
    """Flags of ``graft-train rollback``."""
    parser.add_argument("--repo", required=True, metavar="DIR", help="model repository root")
    parser.add_argument("--model-name", required=True, metavar="NAME")
    parser.add_argument("--label", default="stable", help="the label to move back (default stable)")
    parser.add_argument("--lock-timeout", type=float, default=-1.0, metavar="S",
                        help="seconds to wait for a concurrent promotion (default: wait)")
    parser.add_argument("--report", metavar="FILE", help="also write the JSON result here")


def run_rollback(args) -> int:
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


def add_labels_arguments(parser) -> None:
    """Flags of ``graft-train labels``."""
    parser.add_argument("--repo", required=True, metavar="DIR", help="model repository root")
    parser.add_argument("--model-name", required=True, metavar="NAME")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def run_labels(args) -> int:
    """``graft-train labels``: the labels, the versions present and the history."""
    try:
        listing = model_repo.describe_model(args.repo, args.model_name)
    except ValueError as exc:
        _stderr(f"graft-train labels: error: {exc}")
        return promote.EXIT_ERROR
    print(json.dumps(listing, indent=2, sort_keys=True) if args.json else format_labels(listing), flush=True)
    return 0
