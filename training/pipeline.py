"""The training pipeline: decide, fit, export, evaluate and report, from one typed config.

``graft-train fit`` turns its flags into a :class:`FitConfig` and calls :func:`run`;
the demo builds configs directly. One run:

1. checks every setting that can be wrong before the slow image scan;
2. reads the training and validation images;
3. decides the scenario (the flag, or ``auto``'s linear probes) and builds the
   backbone under the chosen strategy and precision;
4. trains the plan's phases (training.fit);
5. exports the next version with its lineage (graft.contract's schema);
6. evaluates that version through its SavedModel, as the server will run it;
7. writes the run report.

Under ``multiworker`` every worker runs all of it; only the chief's export lands
in the repository, and only the chief evaluates and reports.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path

from graft import contract
from training import (
    bases,
    cluster,
    data,
    distributed,
    evaluate,
    export,
    fit,
    phases,
    preflight,
    probe,
    reference,
    report,
    scenarios,
    trunk,
)
from training.errors import UsageError

# Probes need a few images per class, not the whole set: this caps their cost.
PROBE_IMAGES_PER_CLASS = 100
# Warmup records replay a few real validation images, one per class at most.
WARMUP_IMAGES = 4


@dataclasses.dataclass(frozen=True)
class FitConfig:
    """Everything one training run needs; the fields are ``graft-train fit``'s flags.

    ``image_size`` None means the base's own size; ``val_split`` applies only
    without ``val_data``; ``run_dir`` None means ``runs/<model_name>-<UTC time>``;
    ``head_lr`` None means the head's own rate (scenarios.HEAD_LEARNING_RATES);
    ``like`` (a model or version directory) joins that version's frozen trunk
    (training.reference: its base, weights, cut, size and scenario).
    Values that are wrong whatever the data (a negative epoch count, an unknown
    head or strategy) raise ValueError here; the base, scenario, weights and
    model name are checked by :func:`run` before it reads any image.
    """

    data: str | os.PathLike
    repo: str | os.PathLike
    model_name: str
    val_data: str | os.PathLike | None = None
    val_split: float = 0.2
    image_size: int | None = None
    augment: bool = True
    augment_copies: int = 0
    base: str = "vgg16"
    weights: str = "imagenet"
    scenario: str = "auto"
    head: str = "gap"
    cut_layer: str | None = None
    freeze_first: int = 0
    small_threshold: int | None = None
    head_epochs: int = 100
    finetune_epochs: int = 10
    batch_size: int = 32
    head_lr: float | None = None
    finetune_lr: float = 1e-4
    patience: int = 5
    head_patience: int = 20
    seed: int = 0
    strategy: str = "default"
    mixed_precision: bool = False
    log_dir: str | os.PathLike | None = None
    run_dir: str | os.PathLike | None = None
    like: str | os.PathLike | None = None

    def __post_init__(self):
        positive = {"head_epochs": self.head_epochs, "finetune_epochs": self.finetune_epochs,
                    "batch_size": self.batch_size, "patience": self.patience,
                    "head_patience": self.head_patience, "image_size": self.image_size,
                    "small_threshold": self.small_threshold}
        for name, value in positive.items():
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive integer, not {value}")
        for name, value in {"augment_copies": self.augment_copies, "freeze_first": self.freeze_first}.items():
            if value < 0:
                raise ValueError(f"{name} must be >= 0, not {value}")
        for name, value in {"head_lr": self.head_lr, "finetune_lr": self.finetune_lr}.items():
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive, not {value}")
        if not 0.0 < self.val_split < 1.0:
            raise ValueError(f"val_split must be between 0 and 1 (exclusive), not {self.val_split}")
        if self.head not in phases.HEAD_KINDS:
            raise ValueError(f"unknown head {self.head!r}; expected one of {', '.join(phases.HEAD_KINDS)}")
        if self.strategy not in fit.STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; expected one of {', '.join(fit.STRATEGIES)}")


def run(config: FitConfig) -> str | None:
    """Train, export the next version of ``config.model_name``, evaluate it and write the report.

    Prints its decisions and progress. Returns the exported version's path;
    None on a multi-worker run's non-chief workers, which neither export nor
    report. Raises training.errors.UsageError (a ValueError) naming the flag
    for bad settings or data, before any image is read when they can be known
    then.
    """
    like = reference.read_reference(config.like) if config.like else None
    if like is not None:
        # The reference decides base, weights, cut, size and scenario; the version itself, not a moving label.
        config = dataclasses.replace(config, like=str(like.path), **like.settings_for(config))
        _say(f"like: {like.describe()}")
    spec, image_size, source = _check(config)
    train_set, val_set, skipped = _load_sets(config)
    options = phases.FitOptions(
        image_size=image_size, batch_size=config.batch_size, seed=config.seed, augment=config.augment,
        augment_copies=config.augment_copies, patience=config.patience, head_patience=config.head_patience,
        log_dir=None if config.log_dir is None else os.fspath(config.log_dir), strategy=config.strategy)

    # The backbone's variables must be created under the strategy and precision that train them.
    with fit.precision_policy(config.mixed_precision), fit.strategy_scope(config.strategy):
        plan, backbone = _decide_plan(config, spec, source, image_size, train_set, val_set)
        if like is not None:
            # Before training: a trunk that would not join the reference's group is refused now.
            like.check_trunk(trunk.declaration(backbone, plan, (image_size, image_size, 3)))
        _print_decisions(spec, image_size, backbone, plan, options)
        result = fit.train(plan, backbone, train_set, val_set, options)

    lineage = training_lineage(config, spec, image_size, backbone, plan, result, train_set, val_set, skipped)
    declared = contract.trunk_of(lineage)
    _say(f"trunk: {declared['fingerprint']} (frozen: versions with this fingerprint run the same trunk)"
         if declared else "trunk: trained, so this version declares none")
    if declared and len(declared["segments"]) > 1:
        cuts = ", ".join(str(segment["cut_layer"]) for segment in declared["segments"][:-1])
        _say(f"trunk segments: {len(declared['segments'])}, ending at {cuts} and the trunk's end (versions on "
             "these weights cut at one of them share the segments up to there)")
    evaluations = []

    def report_into_version(staged: Path) -> None:
        evaluations.append(_version_report(config, staged, lineage, result, val_set, skipped))

    path = _export(config, result, train_set, val_set, image_size, lineage, report_into_version,
                   shared=(backbone.model, result.head, trunk.segments(backbone)) if declared else None)
    if path is None:
        _say(f"not the chief: the chief exports, evaluates and reports "
             f"(weights digest {result.metrics['distribution']['weights_digest']})")
        return None
    _report(config, path, lineage, result, evaluations[-1], skipped)
    return path


def training_lineage(config: FitConfig, spec, image_size: int, backbone, plan, result, train_set, val_set,
                     skipped) -> dict:
    """The lineage of a trained model: base, weights, decisions, hyper-parameters, metrics and data.

    Built through graft.contract's schema; export adds what only it knows
    (class names, signatures, package versions, time). A model whose trunk never
    trained declares that trunk (training.trunk), so that versions on the same
    trunk can be told apart from the rest.
    """
    declared = trunk.declaration(backbone, plan, (image_size, image_size, 3))
    return contract.new_lineage(
        **({"trunk": declared} if declared is not None else {}),
        base=spec.name,
        preprocess=spec.preprocess_mode,
        weights={**backbone.source.describe(), "report": backbone.weights_report.describe()},
        scenario=plan.describe(),
        decision=scenarios.decision_record(plan),
        frozen_layers={run.name: run.frozen_trunk_layers for run in result.phases},
        bn_frozen=[layer.name for layer in bases.bn_layers(backbone.trunk)],
        hyper_parameters={
            "image_size": image_size, "batch_size": config.batch_size, "head": config.head,
            "head_epochs": config.head_epochs, "finetune_epochs": config.finetune_epochs,
            # The rate the head trained at: the flag, or the head's own default.
            "head_lr": plan.phases[0].learning_rate, "finetune_lr": config.finetune_lr,
            "freeze_first": config.freeze_first,
            "cut_layer": plan.cut_layer, "seed": config.seed, "augment": config.augment,
            "augment_copies": config.augment_copies, "patience": config.patience,
            "head_patience": config.head_patience,
            "val_split": None if config.val_data else config.val_split, "strategy": config.strategy,
            "mixed_precision": config.mixed_precision, "like": None if config.like is None else str(config.like),
        },
        metrics=result.metrics,
        dataset={
            "root": train_set.root, "fingerprint": train_set.fingerprint(),
            "val_root": val_set.root, "val_fingerprint": val_set.fingerprint(),
            "class_counts": train_set.per_class_counts(), "val_count": len(val_set),
            "skipped": len(skipped),
        },
    )


# -- the steps ----------------------------------------------------------------------------

def _say(text: str = "") -> None:
    print(text, flush=True)


def _check(config: FitConfig):
    """(base spec, image size, weights source), or the UsageError the user would otherwise wait for.

    training.preflight checks every setting and file without TensorFlow; only
    ``--cut-layer`` needs the architecture, built here without weights.
    """
    checked = preflight.check_fit(config)
    # Not under multiworker: building a network runs TensorFlow ops, and MultiWorkerMirroredStrategy
    # must come first; build_backbone refuses an unknown cut layer the same way there.
    if config.cut_layer and config.strategy != "multiworker":
        bases.check_cut_layer(checked.spec, checked.image_size, config.cut_layer)
    return checked.spec, checked.image_size, checked.weights.digested()


def _load_sets(config: FitConfig):
    """(train, validation, skipped files): a separate validation folder, or a seeded split."""
    images = _scan("--data", config.data)
    _say(f"data: {images.root}: {len(images)} images in {len(images.class_names)} classes "
         f"({', '.join(f'{k} {v}' for k, v in images.per_class_counts().items())})")
    skipped = list(images.skipped)
    if config.val_data:
        val = _scan("--val-data", config.val_data)
        if val.class_names != images.class_names:
            raise UsageError("--val-data", f"classes {val.class_names} differ from --data classes "
                                           f"{images.class_names}")
        skipped += val.skipped
        train = images
        _say(f"validation: {val.root}: {len(val)} images")
    else:
        train, val = data.split_image_set(images, config.val_split, config.seed)
        _say(f"split: {len(train)} train / {len(val)} validation (val-split {config.val_split}, seed {config.seed})")
    if skipped:
        _say(f"skipped {len(skipped)} unreadable file(s):")
        for path, reason in skipped[:20]:
            _say(f"  {path}: {reason}")
        if len(skipped) > 20:
            _say(f"  ... and {len(skipped) - 20} more (all listed in report.json)")
    return train, val, skipped


def _scan(flag: str, root):
    """The image set of one folder; a folder the scan refuses is named by its flag."""
    try:
        return data.scan_image_folder(root)
    except UsageError as exc:
        raise exc.naming(flag) from None


def _decide_plan(config: FitConfig, spec, source, image_size: int, train, val):
    """(FreezePlan, backbone): the scenario from the config, or from ``auto``'s probes; the evidence is in the plan."""
    choice = scenarios.parse_scenario(config.scenario)
    cut, backbone = config.cut_layer, None
    if choice == "auto":
        choice, cut, evidence, backbone = _probe_scenario(config, spec, source, image_size, train, val)
    else:
        evidence = {"chosen_by": "user", "flag": config.scenario}
    plan = scenarios.plan_for(
        choice, spec, cut_layer=cut, freeze_first=config.freeze_first, head=config.head,
        head_epochs=config.head_epochs, finetune_epochs=config.finetune_epochs,
        head_lr=config.head_lr, finetune_lr=config.finetune_lr, evidence=evidence)
    if backbone is None:
        backbone = bases.build_backbone(spec, image_size, source, cut_layer=plan.cut_layer)
    return plan, backbone


def _probe_scenario(config: FitConfig, spec, source, image_size: int, train, val):
    """``auto``: (scenario, cut layer, evidence, the probing backbone when training can reuse it)."""
    threshold = config.small_threshold or scenarios.SMALL_THRESHOLD
    backbone = bases.build_backbone(spec, image_size, source)
    x, y = data.load_arrays(data.sample_per_class(train, PROBE_IMAGES_PER_CLASS, config.seed), image_size)
    vx, vy = data.load_arrays(data.sample_per_class(val, PROBE_IMAGES_PER_CLASS, config.seed), image_size)
    _say(f"auto: linear probes at {', '.join(spec.block_ends)} on {len(x)} train / {len(vx)} validation images")
    scores = probe.score_blocks(backbone, x, y, vx, vy, spec.block_ends, seed=config.seed,
                                batch_size=config.batch_size)
    decision = scenarios.decide_auto(train.per_class_counts(), {name: s.accuracy for name, s in scores.items()},
                                     spec.block_ends, small_threshold=threshold)
    cut = config.cut_layer or decision.cut_layer
    evidence = {"chosen_by": "auto", **decision.evidence,
                "probes": {name: score.describe() for name, score in scores.items()}}
    # The probing backbone is the training one when nothing is cut away.
    return decision.scenario, cut, evidence, (backbone if cut is None else None)


def _describe_phase(phase, plan, options: phases.FitOptions) -> str:
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
            if options.augment_copies:
                where += f" (+{options.augment_copies} augmented copies)"
    epochs = f"{phase.epochs} epoch{'s' if phase.epochs != 1 else ''}"
    return f"{phase.name}: {epochs}, {detail}, {where}"


def _scenario_reason(evidence: Mapping) -> str:
    if evidence.get("chosen_by") != "auto":
        return "chosen by --scenario"
    scores = ", ".join(f"{k} {v:.3f}" for k, v in evidence["probe_scores"].items())
    return (f"auto: {evidence['size']} data (median {evidence['median_images_per_class']:g} images/class, "
            f"threshold {evidence['small_threshold']}), {evidence['similarity']} "
            f"(best probe {evidence['best_block']}; probes: {scores})")


def _print_decisions(spec, image_size: int, backbone, plan, options: phases.FitOptions) -> None:
    source = backbone.source
    weights_report = backbone.weights_report
    _say(f"base: {spec.name} at {image_size}x{image_size} (preprocess '{spec.preprocess_mode}' inside the model)")
    if source is None or source.kind == "none":
        _say("weights: none (random initialisation)")
    else:
        _say(f"weights: {source.kind} {source.path} sha256 {source.sha256[:12]}; {len(weights_report.loaded)} "
             f"layers loaded (by {weights_report.mode}), {len(weights_report.missing_in_model)} not in the file, "
             f"{len(weights_report.unmatched_in_file)} file entries unused")
    for note in weights_report.notes:
        _say(f"  note: {note}")
    _say(f"scenario: {plan.scenario} {plan.name} ({_scenario_reason(plan.evidence)})")
    trunk_layers = len(backbone.trunk.layers)
    _say(f"cut: {plan.cut_layer or 'none (full trunk)'}; trunk has {trunk_layers} layers")
    bn = sum(1 for layer in backbone.trunk.layers if type(layer).__name__ == "BatchNormalization")
    names = [layer.name for layer in backbone.trunk.layers]
    for phase in plan.phases:
        frozen = plan.frozen_trunk_layers(names, phase)
        extra = f" + {bn} BatchNormalization layers always" if phase.train_trunk and bn else ""
        _say(f"frozen in {phase.name}: {len(frozen)} of {trunk_layers} trunk layers{extra}")
    _say("phases:")
    for phase in plan.phases:
        _say(f"  {_describe_phase(phase, plan, options)}")


def _export(config: FitConfig, result, train_set, val_set, image_size: int, lineage: Mapping,
            before_publish: Callable[[Path], None], *, shared=None) -> str | None:
    """The exported version's path; None on a non-chief worker (only the chief's export lands in the repo).

    ``shared`` (the backbone's model, which is everything before the head, and
    the head) is given for a version that declares its frozen trunk: the export
    then carries the two apart too, for shared-trunk serving.
    """
    warmup, _ = data.load_arrays(data.sample_per_class(val_set, 1, config.seed), (image_size, image_size))
    multiworker = config.strategy == "multiworker"
    exporter = distributed.export_version if multiworker else export.export_version
    # Only the chief evaluates: the other workers' exports are scratch copies.
    chief = not multiworker or cluster.read_task().is_chief
    return exporter(result.model, train_set.class_names, config.repo, config.model_name,
                    image_size=image_size, lineage=lineage, warmup_images=warmup[:WARMUP_IMAGES],
                    before_publish=before_publish if chief else None, shared=shared)


def _version_report(config: FitConfig, staged: Path, lineage: Mapping, result, val_set, skipped):
    """Evaluate the staged version and write the run's report inside it; return the evaluation.

    Scored through the SavedModel, as the server will run it, before the rename
    publishes it, so the report (curves, confusion matrix, report.json) travels
    with the version from its first visible moment (graft-console shows it).
    """
    evaluation = evaluate.evaluate_savedmodel(staged, val_set, batch_size=config.batch_size)
    summary = {"command": "fit", **lineage, "skipped_files": [{"path": p, "reason": r} for p, r in skipped]}
    files = report.write_fit_report(contract.report_path(staged), history=result.history, summary=summary,
                                    evaluation=evaluation)
    # The staging directory is renamed away: inside the version, files are named relative to the report.
    written = json.loads(Path(files["report"]).read_text(encoding="utf-8"))
    written["files"] = {kind: Path(name).name for kind, name in written["files"].items()}
    report.write_json(files["report"], written)
    return evaluation


def _report(config: FitConfig, path: str, lineage: Mapping, result, evaluation, skipped) -> None:
    """Write the run report (lineage, curves, confusion matrix) and print the evaluation; the version path last."""
    run_dir = Path(config.run_dir) if config.run_dir else _default_run_dir(config.model_name)
    summary = {"command": "fit", "version_path": path, **lineage,
               "skipped_files": [{"path": p, "reason": r} for p, r in skipped]}
    files = report.write_fit_report(run_dir, history=result.history, summary=summary, evaluation=evaluation)
    _say("validation, through the exported SavedModel:")
    _say(report.format_evaluation(evaluation))
    probed = lineage["metrics"].get("probe", {}).get("val_accuracy")
    if probed is not None:
        # LP-FT's promise, shown: the exported model never scores below the probe it started from.
        _say(f"validation accuracy: linear probe {probed * 100:.1f} %, "
             f"exported model {evaluation.accuracy * 100:.1f} %")
    _say(f"report: {files['report']}")
    _say(path)


def _default_run_dir(model_name: str) -> Path:
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{model_name}-{stamp}"
