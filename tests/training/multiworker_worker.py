"""One worker of the multi-worker test: train a tiny model under TF_CONFIG, export, dump its variables.

Run by tests/training/test_distributed.py as a separate process per worker
(each with its own TF_CONFIG). It follows graft-train fit's multiworker path:
fit.strategy_scope("multiworker") before any other TensorFlow work, the
backbone built inside it, fit.train (which hands over to training.distributed),
then distributed.export_version. Afterwards it writes ``<out>/worker-<position>.npz``
(every variable of the trained model, the trunk's variables as built, and the
model's scores on the validation images) and ``worker-<position>.json`` (history,
metrics, export path, the BatchNormalization variable names).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

SIZE = 32


def main(argv=None) -> int:
    """Train, export and dump; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True)
    parser.add_argument("--repo", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--checkpoint-dir", required=True)
    parser.add_argument("--head-epochs", type=int, default=4)
    parser.add_argument("--finetune-epochs", type=int, default=2)
    args = parser.parse_args(argv)

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import numpy as np

    from training import bases, cluster, data, distributed, fit, phases, scenarios

    task = cluster.read_task()
    images = data.scan_image_folder(args.data)
    train_set, val_set = data.split_image_set(images, 0.25, seed=0)
    spec = bases.get_base("resnet50")
    # Three residual blocks with BatchNormalization: tiny, and the BN rule applies.
    cut = "conv2_block3_out"
    # No dropout: with 27 images its noise would hide the trend the test checks. No LP-FT either:
    # a head that starts as the probe, or a phase handing its start back, would hide the loop's own
    # training (test_graft_train_fit_multiworker_on_two_workers runs LP-FT, the default).
    options = phases.FitOptions(image_size=SIZE, batch_size=8, seed=0, augment=False, patience=10,
                                checkpoint_dir=args.checkpoint_dir, strategy="multiworker", verbose=2,
                                gap_dropout=0.0, lp_init=False)
    keras.utils.set_random_seed(1)
    with fit.strategy_scope("multiworker"):
        backbone = bases.build_backbone(spec, SIZE, "none", cut_layer=cut)
        before = _arrays(backbone.trunk.weights)
        plan = scenarios.plan_for(2, spec, cut_layer=cut, head_epochs=args.head_epochs,
                                  finetune_epochs=args.finetune_epochs, head_lr=1e-3, finetune_lr=1e-4)
        result = fit.train(plan, backbone, train_set, val_set, options)
    path = distributed.export_version(result.model, train_set.class_names, args.repo, "tiny",
                                      image_size=SIZE, lineage={"scenario": plan.describe()})

    probe, _ = data.load_arrays(val_set, SIZE)
    scores = keras.ops.convert_to_numpy(result.model(probe, training=False))
    arrays = {f"after/{k}": v for k, v in _arrays(result.model.weights).items()}
    arrays.update({f"before/{k}": v for k, v in before.items()})
    arrays["probe_images"], arrays["probe_scores"] = probe, scores
    np.savez(os.path.join(args.out, f"worker-{task.position}.npz"), **arrays)
    bn = {f"{layer.name}/{v.name}" for layer in bases.bn_layers(backbone.trunk) for v in layer.weights}
    with open(os.path.join(args.out, f"worker-{task.position}.json"), "w", encoding="utf-8") as handle:
        json.dump({"task": task.describe(), "history": result.history, "metrics": result.metrics,
                   "export": path, "bn_weights": sorted(bn)}, handle, indent=2, default=str)
    return 0


def _arrays(variables) -> dict:
    """Variable values by their layer/name path, as numpy."""
    import keras

    return {v.path: keras.ops.convert_to_numpy(v) for v in variables}


if __name__ == "__main__":
    sys.exit(main())
