"""Benchmark: held-out accuracy and fit time of graft-train fit's defaults against its alternatives.

Data: scikit-learn's real digits (1,797 8x8 scans) as 64x64 RGB PNG class
folders. Per seed, one permutation per class gives the training pools (the
first N images, so a smaller pool is part of a larger one), then 10
validation images, then the held-out rest (1,197 images with the default
50-image largest pool), shared by every size of that seed.

Rows, each trained by ``training.pipeline.run`` as ``graft-train fit`` runs
it (defaults only: base vgg16, ``--weights hed``, ``--image-size 64``), its
exported SavedModel scored on the held-out images:

- ``auto``: ``--scenario auto``; ``seed``: the same with ``--head seed``;
- ``1``, ``3:<cut>`` for each block end but the last, ``2`` and ``4``: the
  fixed scenarios (``2`` and ``4`` fine-tune the whole trunk: slow on a CPU,
  so only when asked for with ``--rows``);
- ``probe``: the ridge probe alone, at the cut auto chose, on the same
  training images (closed form; its time is one forward pass);
- ``random``: auto's scenario and cut with ``--weights none``;
- ``cnn``: training.demo's small CNN from scratch.

``--dataset animals`` runs the same rows on a second real image set, Animal-MNIST
(10,000 28x28 silhouettes of ten animals; the ``animal-mnist`` wheel of
``graft[bench]`` carries them), with 120 held-out images per class, into its own
work directory and its own docs/benchmarks.md section. The targets that are
digits figures (accuracy at 10 and 50 per class, fit time) are checked on digits
only; auto against the probe and the best fixed choice is checked on both.

Every result is one JSON line in ``--results``; a rerun skips what is there,
so a long benchmark can run in pieces (``--sizes``, ``--seeds``, ``--rows``).
The table covers every result in the file and goes to docs/benchmarks.md
(``--out``, its own section).

    .venv/bin/python bench/transfer.py [--sizes 5,10,20,50] [--seeds 0,1,2]
        [--rows auto,1,3:block4_pool,probe,random,cnn] [--results FILE] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from PIL import Image

from graft import contract
from training import bases, data, demo, evaluate, pipeline, probe

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (bench/common.py)

ROOT = Path(__file__).resolve().parents[1]

BASE = "vgg16"
WEIGHTS = "hed"
FIXED = ("1", "2", "4")
DEFAULT_ROWS = ("auto", "1", "3:block1_pool", "3:block2_pool", "3:block3_pool", "3:block4_pool",
                "probe", "random", "cnn")
# The targets (docs/benchmarks.md prints each with its measurement).
TARGET_AT = {10: 0.935, 50: 0.980}
AUTO_WITHIN = 0.005
FIT_TIME_BASELINE_S = 43.0


def parse_args(argv=None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="5,10,20,50", help="training images per class (comma-separated)")
    p.add_argument("--seeds", default="0,1,2", help="data split and training seeds (comma-separated)")
    p.add_argument("--rows", default=",".join(DEFAULT_ROWS),
                   help="rows to run: auto, seed, 1, 2, 4, 3:<block end>, probe, random, cnn (comma-separated)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--val-per-class", type=int, default=10)
    p.add_argument("--cnn-epochs", type=int, default=200)
    p.add_argument("--dataset", choices=sorted(DATASETS), default="digits",
                   help="digits (scikit-learn's), or animals (Animal-MNIST, from graft[bench]): a second table")
    p.add_argument("--workdir", default=None,
                   help="data, repositories and run logs (kept, reused per seed; default "
                        "TMPDIR/graft-bench-transfer, with -animals for the second set)")
    p.add_argument("--results", default=None, help="JSON lines of results (default WORKDIR/results.jsonl)")
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"), help="markdown file ('' = none)")
    p.add_argument("--table-only", action="store_true", help="run nothing; rewrite the table from --results")
    args = p.parse_args(argv)
    if args.workdir is None:
        suffix = "" if args.dataset == "digits" else f"-{args.dataset}"
        args.workdir = str(Path(tempfile.gettempdir()) / f"graft-bench-transfer{suffix}")
    return args


# -- data --------------------------------------------------------------------------------------

# Each data set: its description for the table, the heading of its docs/benchmarks.md section,
# and the held-out images kept per class (0: every image left after training and validation).
DATASETS = {
    "digits": ("scikit-learn digits (1,797 8x8 scans)", "bench/transfer.py", 0),
    "animals": ("Animal-MNIST (10,000 28x28 animal silhouettes, the animal-mnist wheel)",
                "bench/transfer.py: Animal-MNIST", 120),
}


def load_images(dataset: str) -> tuple[list[Image.Image] | np.ndarray, np.ndarray, callable]:
    """The data set's grey images, their labels, and how one becomes an RGB image of a given size."""
    if dataset == "digits":
        # Optional (graft[demo]): scikit-learn ships the digits.
        from sklearn.datasets import load_digits

        digits = load_digits()
        return digits.images, digits.target, demo.digit_image
    # Optional (graft[bench]): the wheel carries the images; its loader reads them from there.
    from animal_mnist.dataset_Loader import load_animal_mnist_dataset

    images, labels = load_animal_mnist_dataset()

    def to_rgb(pixels: np.ndarray, image_size: int) -> Image.Image:
        grey = Image.fromarray(np.asarray(pixels, dtype=np.uint8))
        return grey.resize((image_size, image_size), Image.BILINEAR).convert("RGB")
    return images, np.asarray(labels), to_rgb


def write_split(root: Path, sizes: list[int], val_per_class: int, image_size: int, seed: int,
                dataset: str = "digits") -> dict[str, Path]:
    """Write (once) train-N for each size, val and test class folders for ``seed``; return their paths."""
    largest = max(sizes)
    test_per_class = DATASETS[dataset][2]
    folders = {**{f"train-{n}": root / f"train-{n}" for n in sizes}, "val": root / "val", "test": root / "test"}
    marker = root / f".complete-{largest}-{val_per_class}-{image_size}"
    if marker.exists() and all(path.exists() for path in folders.values()):
        return folders
    images, labels, to_rgb = load_images(dataset)
    rng = np.random.default_rng(seed)
    for label in sorted(set(labels.tolist())):
        members = rng.permutation(np.flatnonzero(labels == label))
        parts = {f"train-{n}": members[:n] for n in sizes}
        parts["val"] = members[largest:largest + val_per_class]
        rest = members[largest + val_per_class:]
        parts["test"] = rest[:test_per_class] if test_per_class else rest
        for name, indices in parts.items():
            folder = folders[name] / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            for index in indices:
                to_rgb(images[index], image_size).save(folder / f"{index:05d}.png")
    marker.write_text("written\n")
    return folders


# -- rows --------------------------------------------------------------------------------------

def fit_row(row: str, folders: dict, size: int, seed: int, args, work: Path, auto: dict | None) -> dict:
    """Train one pipeline row, score its SavedModel on the held-out images; the result record."""
    scenario, cut, weights, head = "auto", None, WEIGHTS, "gap"
    if row == "seed":
        head = "seed"
    elif row in FIXED:
        scenario = row
    elif row.startswith("3:"):
        scenario, cut = "3", row[2:]
    elif row == "random":
        scenario, cut, weights = str(auto["scenario"]), auto["cut_layer"], "none"
    name = f"n{size}-s{seed}-{row.replace(':', '-')}"
    config = pipeline.FitConfig(
        data=folders[f"train-{size}"], val_data=folders["val"], repo=work / "repo", model_name=name, base=BASE,
        weights=weights, scenario=scenario, cut_layer=cut, head=head, image_size=args.image_size, seed=seed,
        run_dir=work / "runs" / name)
    keras.backend.clear_session()
    log = work / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as handle, contextlib.redirect_stdout(handle):
        started = time.perf_counter()
        path = pipeline.run(config)
        seconds = time.perf_counter() - started
    lineage = contract.read_lineage(path)
    test = data.scan_image_folder(folders["test"])
    held_out = evaluate.evaluate_savedmodel(path, test, batch_size=64).accuracy
    metrics = lineage["metrics"]
    return {"row": row, "size": size, "seed": seed, "accuracy": held_out, "seconds": seconds,
            "val_accuracy": metrics.get("val_accuracy"), "probe_val_accuracy": metrics.get("probe", {}).get(
                "val_accuracy"), "scenario": lineage["scenario"]["scenario"],
            "cut_layer": lineage["scenario"]["cut_layer"], "kept": [p["kept"] for p in metrics["phases"]],
            "decision": lineage.get("decision"), "test_images": len(test), "log": str(log)}


def probe_rows(folders: dict, size: int, seed: int, args, work: Path, auto: dict) -> list[dict]:
    """The ridge probe on the training images at every block end (the one at auto's cut is the ``probe`` row)."""
    spec = bases.get_base(BASE)
    keras.backend.clear_session()
    backbone = bases.build_backbone(spec, args.image_size, WEIGHTS)
    model = probe.block_features_model(backbone, spec.block_ends)
    cache = work / f"test-features-s{seed}.npz"
    started = time.perf_counter()
    x, y = data.load_arrays(data.scan_image_folder(folders[f"train-{size}"]), args.image_size)
    train = model.predict(x, batch_size=64, verbose=0)
    seconds = time.perf_counter() - started
    if cache.exists():
        stored = np.load(cache)
        test, test_y = [stored[name] for name in spec.block_ends], stored["labels"]
    else:
        tx, test_y = data.load_arrays(data.scan_image_folder(folders["test"]), args.image_size)
        test = model.predict(tx, batch_size=64, verbose=0)
        np.savez(cache, labels=test_y, **dict(zip(spec.block_ends, test)))
    cut = auto["cut_layer"] or spec.block_ends[-1]
    records = []
    for name, features, held in zip(spec.block_ends, train, test):
        fitted = probe.fit_ridge(features, y, 10)
        accuracy = float(np.mean(fitted.predict(held) == test_y))
        records.append({"row": f"probe@{name}", "size": size, "seed": seed, "accuracy": accuracy,
                        "seconds": None, "test_images": len(test_y)})
        if name == cut:
            records.append({"row": "probe", "size": size, "seed": seed, "accuracy": accuracy, "seconds": seconds,
                            "cut_layer": cut, "test_images": len(test_y)})
    return records


def cnn_row(folders: dict, size: int, seed: int, args) -> dict:
    """training.demo's small CNN from scratch on the same images."""
    keras.backend.clear_session()
    arrays = {part: data.load_arrays(data.scan_image_folder(folders[key]), args.image_size)
              for part, key in (("train", f"train-{size}"), ("val", "val"), ("test", "test"))}
    started = time.perf_counter()
    accuracy = demo.scratch_cnn_accuracy(arrays["train"], arrays["val"], arrays["test"],
                                         image_size=args.image_size, epochs=args.cnn_epochs, seed=seed)
    return {"row": "cnn", "size": size, "seed": seed, "accuracy": accuracy,
            "seconds": time.perf_counter() - started, "test_images": len(arrays["test"][1])}


# -- results -----------------------------------------------------------------------------------

def load_results(path: Path) -> list[dict]:
    """Every record in the results file (none when it is absent)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_result(path: Path, record: dict) -> None:
    """Append one record (one line, flushed: a killed run keeps what it finished)."""
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def run(args) -> None:
    """Run every requested (size, seed, row) not already in the results file."""
    sizes = [int(v) for v in args.sizes.split(",")]
    seeds = [int(v) for v in args.seeds.split(",")]
    rows = [v.strip() for v in args.rows.split(",") if v.strip()]
    work = Path(args.workdir)
    results = Path(args.results or work / "results.jsonl")
    work.mkdir(parents=True, exist_ok=True)
    tf.get_logger().setLevel("ERROR")
    for seed in seeds:
        # Pools up to the largest size of the whole benchmark, so that held-out sets agree across runs.
        folders = write_split(work / f"data-s{seed}", sorted({*sizes, 50}), args.val_per_class, args.image_size,
                              seed, args.dataset)
        for size in sizes:
            done = {r["row"] for r in load_results(results) if r["size"] == size and r["seed"] == seed}
            auto = next((r for r in load_results(results)
                         if r["row"] == "auto" and r["size"] == size and r["seed"] == seed), None)
            # probe and random follow auto's decision: auto runs first when they are asked for.
            needs_auto = any(row in ("probe", "random") for row in rows if row not in done)
            order = (["auto"] if auto is None and (needs_auto or "auto" in rows) else []) + [
                row for row in rows if row != "auto"]
            for row in order:
                if row in done:
                    continue
                print(f"[{_dt.datetime.now():%H:%M:%S}] size {size} seed {seed}: {row}", flush=True)
                if row == "probe":
                    records = probe_rows(folders, size, seed, args, work, auto)
                elif row == "cnn":
                    records = [cnn_row(folders, size, seed, args)]
                else:
                    records = [fit_row(row, folders, size, seed, args, work, auto)]
                for record in records:
                    append_result(results, record)
                    if record["row"] == "auto":
                        auto = record
                main = records[-1] if row != "probe" else next(r for r in records if r["row"] == "probe")
                shown = f"{main['accuracy'] * 100:.1f} %" + (
                    f" in {main['seconds']:.0f} s" if main.get("seconds") is not None else "")
                print(f"    {row}: {shown}", flush=True)


# -- the table ---------------------------------------------------------------------------------

def _cell(values: list[float], seconds: list[float]) -> str:
    if not values:
        return ""
    mean = statistics.fmean(values) * 100
    sd = statistics.stdev(values) * 100 if len(values) > 1 else math.nan
    spread = f" ± {sd:.1f}" if not math.isnan(sd) else ""
    timing = f" ({statistics.fmean(seconds):.0f} s)" if seconds else ""
    return f"{mean:.1f}{spread}{timing}"


def _row_label(row: str) -> str:
    labels = {"auto": "`auto` (the defaults)", "seed": "`auto --head seed`",
              "1": "scenario 1 (block5_pool, whole trunk)",
              "2": "scenario 2 (fine-tune)", "4": "scenario 4 (full)", "probe": "ridge probe alone (auto's cut)",
              "random": "auto's architecture, random weights", "cnn": "small CNN from scratch"}
    if row.startswith("3:"):
        return f"scenario 3 at {row[2:]}"
    if row.startswith("probe@"):
        return f"probe at {row[6:]}"
    return labels.get(row, row)


def _order(row: str) -> tuple:
    main = ["auto", "seed", "1", "3:block1_pool", "3:block2_pool", "3:block3_pool", "3:block4_pool", "2", "4", "probe",
            "random", "cnn"]
    return (0, main.index(row)) if row in main else (1, row)


def table(records: list[dict], command: str, dataset: str = "digits") -> str:
    """The markdown section: setup, the accuracy table, auto's decisions, the targets."""
    sizes = sorted({r["size"] for r in records})
    rows = sorted({r["row"] for r in records}, key=_order)
    by = {}
    for record in records:
        by.setdefault((record["row"], record["size"]), []).append(record)
    test_images = sorted({r["test_images"] for r in records})
    seeds = sorted({r["seed"] for r in records})
    lines = [
        f"Run {_dt.datetime.now():%Y-%m-%d %H:%M}: `{command}`. Data: {DATASETS[dataset][0]} as "
        f"64x64 RGB PNGs; per seed, 10 validation images per class and a held-out set of "
        f"{', '.join(map(str, test_images))} images shared by every size; seeds {', '.join(map(str, seeds))} "
        f"(the split and the training). Every trained row is `graft-train fit --base {BASE} --weights {WEIGHTS} "
        f"--image-size 64` with its defaults but the scenario (and `--weights none` for the random row), scored "
        f"through its exported SavedModel. Machine: {platform.machine()}, {os.cpu_count()} CPUs shared with "
        "other engineers' test runs, so times move by tens of percent between runs.",
        "",
        "Held-out accuracy in %, mean ± sd over the seeds that ran (fit time: `pipeline.run`, from the image "
        "scan to the evaluated export, without the interpreter's start):",
        "",
        "| row | " + " | ".join(f"{n}/class" for n in sizes) + " | seeds |",
        "|---|" + "---|" * len(sizes) + "---|",
    ]
    for row in rows:
        cells = []
        count = set()
        for n in sizes:
            found = by.get((row, n), [])
            count.add(len(found))
            cells.append(_cell([r["accuracy"] for r in found],
                               [r["seconds"] for r in found if r.get("seconds") is not None]))
        lines.append(f"| {_row_label(row)} | " + " | ".join(cells) + f" | {'/'.join(map(str, sorted(count)))} |")
    decisions = [f"{r['size']}/class seed {r['seed']}: {r['cut_layer'] or 'block5_pool (scenario 1)'}"
                 for r in sorted(records, key=lambda r: (r["size"], r["seed"])) if r["row"] == "auto"]
    if decisions:
        lines += ["", "auto's cut: " + "; ".join(decisions) + "."]
    lines += ["", *targets(by, sizes, dataset)]
    return "\n".join(lines)


def targets(by: dict, sizes: list[int], dataset: str = "digits") -> list[str]:
    """The issue's targets, each with what was measured (only where its rows ran); the accuracy and
    fit-time figures are the digits set's, the rules about auto hold on every set."""
    def mean(row, n):
        found = by.get((row, n), [])
        return statistics.fmean(r["accuracy"] for r in found) if found else None

    out = ["| target | measured | met |", "|---|---|---|"]
    for n in sizes:
        auto, probed = mean("auto", n), mean("probe", n)
        if auto is not None and probed is not None:
            out.append(f"| {n}/class: auto ≥ the probe | {auto * 100:.1f} vs {probed * 100:.1f} | "
                       f"{'yes' if auto >= probed else 'NO'} |")
        fixed = {row: mean(row, n) for row in {r for r, m in by if m == n}
                 if row in FIXED or row.startswith("3:")}
        fixed = {row: value for row, value in fixed.items() if value is not None}
        if auto is not None and fixed:
            best_row = max(fixed, key=fixed.get)
            gap = (fixed[best_row] - auto) * 100
            out.append(f"| {n}/class: auto within 0.5 points of the best fixed choice | best {_row_label(best_row)} "
                       f"{fixed[best_row] * 100:.1f}, auto {auto * 100:.1f} ({gap:+.1f}) | "
                       f"{'yes' if gap <= AUTO_WITHIN * 100 else 'NO'} |")
        if dataset != "digits":
            continue
        if n in TARGET_AT and auto is not None:
            out.append(f"| {n}/class: auto ≥ {TARGET_AT[n] * 100:.1f} % | {auto * 100:.1f} | "
                       f"{'yes' if auto >= TARGET_AT[n] else 'NO'} |")
        if n == 10 and by.get(("auto", 10)):
            seconds = statistics.fmean(r["seconds"] for r in by[("auto", 10)])
            out.append(f"| 10/class: auto's fit time within 2x of {FIT_TIME_BASELINE_S:.0f} s | {seconds:.0f} s | "
                       f"{'yes' if seconds <= 2 * FIT_TIME_BASELINE_S else 'NO'} |")
    return out if len(out) > 2 else []


def main(argv=None) -> int:
    """Run what was asked, then print and write the table."""
    args = parse_args(argv)
    if not args.table_only:
        run(args)
    results = Path(args.results or Path(args.workdir) / "results.jsonl")
    records = load_results(results)
    if not records:
        print("no results yet", file=sys.stderr)
        return 1
    command = shlex.join(["bench/transfer.py", *(argv if argv is not None else sys.argv[1:])])
    text = table(records, command, args.dataset)
    print(text)
    if args.out:
        common.replace_section(Path(args.out), DATASETS[args.dataset][1], text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
