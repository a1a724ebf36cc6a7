"""The reference of ``graft-train fit --like``: another model's version whose trunk the new model joins.

A version that declares its frozen trunk (graft.contract's ``trunk``) names the
base, the weights source and their sha256, the cut, the input size and the
frozen-trunk scenario it was trained with. ``--like`` reads them from its
lineage and fits the new model on the same trunk, so the new export gets the
same fingerprint and a server runs one trunk for both. No TensorFlow here: a
reference that cannot be joined is refused before any image is read.

``MODEL_DIR`` alone means the version its ``stable`` label points at when its
labels.json has one (the version in production), else its latest complete
version. ``MODEL_DIR/VERSION`` (any directory holding a saved_model.pb) is that
version.

Refused, each as a UsageError naming ``--like``: a reference that is not there
or has no lineage, one whose trunk trained (no declaration), one trained on
random weights (nothing reproduces them), one whose weights file is gone or
changed since (its sha256 differs from the lineage's), and a flag that says
otherwise (``--base``, ``--weights``, ``--image-size``, ``--cut-layer`` set to
another value than the reference's, or a ``--scenario`` that trains the trunk).
A flag left at its default takes the reference's value. After the backbone is
built, :meth:`Reference.check_trunk` compares the recomputed fingerprint, so a
trunk that would differ for any other reason (another Keras reading the same
file differently, say) is refused too, before training.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from graft import contract
from training import catalog, scenarios, sources
from training import repo as model_repo
from training.errors import UsageError

FLAG = "--like"
# The fit settings --like decides, with graft-train fit's defaults: a setting left at
# its default takes the reference's value, any other value must agree with it.
LIKE_DEFAULTS: Mapping[str, Any] = {"base": "vgg16", "weights": "imagenet", "image_size": None,
                                    "cut_layer": None, "scenario": "auto"}
# The label a bare model directory follows: the version in production.
FOLLOWED_LABEL = "stable"
FROZEN_SCENARIOS = (1, 3)


@dataclass(frozen=True)
class Reference:
    """A version whose trunk can be joined: where it is, how it was chosen, and its trunk's settings."""

    path: Path
    chosen: str  # "version", "label stable" or "latest"
    trunk: dict
    base: str
    weights: sources.WeightsSource
    scenario: int
    cut_layer: str | None
    image_size: int

    def describe(self) -> str:
        """``/repo/pets/3 (label stable): base vgg16, weights hed, scenario 3, cut block4_pool, 64 px``."""
        return (f"{self.path} ({self.chosen}): base {self.base}, weights {self.weights.kind}"
                f"{'' if self.weights.kind != 'file' else ' ' + str(self.weights.path)}, scenario {self.scenario}, "
                f"cut {self.cut_layer or 'none'}, {self.image_size} px, trunk "
                f"{contract.short_fingerprint(self.trunk['fingerprint'])}")

    def weights_flag(self) -> str:
        """The ``--weights`` value that names the reference's weights source."""
        return str(self.weights.path) if self.weights.kind == "file" else self.weights.kind

    def settings_for(self, settings: Any) -> dict[str, Any]:
        """The fit settings (``LIKE_DEFAULTS``' names) that join this trunk, given the user's ``settings``.

        ``settings`` is graft-train fit's parsed flags or a training.pipeline.FitConfig.
        Checks that the reference's weights are still the ones it was trained on
        (hashing the file). UsageError naming ``--like`` for a flag that disagrees
        or weights that changed.
        """
        wanted = {"base": self.base, "weights": self.weights_flag(), "image_size": self.image_size,
                  "cut_layer": self.cut_layer}
        for name, value in wanted.items():
            given = getattr(settings, name)
            if given != LIKE_DEFAULTS[name] and not _same(name, given, value):
                flag = "--" + name.replace("_", "-")
                raise UsageError(FLAG, f"{flag} {given} contradicts the reference {self.path}, whose trunk has "
                                       f"{flag} {value}; leave {flag} out to join its trunk")
        scenario = settings.scenario
        choice = scenarios.parse_scenario(scenario)
        if choice not in ("auto", *FROZEN_SCENARIOS):
            raise UsageError(FLAG, f"--scenario {scenario} trains the trunk, so the new model could not share "
                                   f"the trunk of {self.path}; use --scenario 1 or 3, or leave it out")
        self.check_weights()
        return {**wanted, "scenario": str(self.scenario if choice == "auto" else choice)}

    def check_weights(self) -> None:
        """UsageError naming ``--like`` unless the reference's weights are where they were, with the same bytes."""
        spec = catalog.get_base(self.base)
        try:
            located = sources.resolve_weights(self.weights_flag(), spec)
        except UsageError as exc:
            raise UsageError(FLAG, f"the weights {self.path} was trained on cannot be used: {exc.message}") from None
        if located.sha256 != self.weights.sha256:
            raise UsageError(FLAG, f"the weights file {located.path} changed since {self.path} was trained on it "
                                   f"(sha256 {located.sha256[:12]}, the lineage says "
                                   f"{(self.weights.sha256 or 'none')[:12]}), so its trunk cannot be rebuilt")

    def check_trunk(self, declared: Mapping | None) -> None:
        """UsageError naming ``--like`` unless the new model's trunk declaration has the reference's fingerprint."""
        if declared is None:
            raise UsageError(FLAG, f"the new model's trunk trains, so it cannot join the trunk of {self.path}")
        if declared["fingerprint"] != self.trunk["fingerprint"]:
            raise UsageError(FLAG, f"the trunk rebuilt from {self.path}'s settings has fingerprint "
                                   f"{contract.short_fingerprint(declared['fingerprint'])}, not the reference's "
                                   f"{contract.short_fingerprint(self.trunk['fingerprint'])}: its weights or "
                                   "the way they load changed since it was trained")


def _same(name: str, given: Any, wanted: Any) -> bool:
    if name == "base":
        return catalog.base_key(given) == wanted
    if name == "weights":
        text = str(given).strip()
        keyword = text.lower()
        if keyword in sources.KINDS:
            return keyword == wanted
        return os.path.abspath(os.path.expanduser(text)) == os.path.abspath(wanted)
    return given == wanted


def find_version(text: str | os.PathLike) -> tuple[Path, str]:
    """(version directory, how it was chosen) for ``MODEL_DIR`` or ``MODEL_DIR/VERSION``; UsageError otherwise."""
    path = Path(os.path.abspath(os.path.expanduser(os.fspath(text))))
    if not path.is_dir():
        raise UsageError(FLAG, f"{path} does not exist or is not a directory (--like takes MODEL_DIR or "
                               "MODEL_DIR/VERSION)")
    if (path / contract.SAVED_MODEL_FILE).is_file():
        return path, "version"
    try:
        labels = contract.read_labels(path) or {}
    except ValueError as exc:
        raise UsageError(FLAG, str(exc)) from None
    if FOLLOWED_LABEL in labels:
        try:
            return model_repo.version_path(path, labels[FOLLOWED_LABEL]), f"label {FOLLOWED_LABEL}"
        except model_repo.RepositoryError as exc:
            raise UsageError(FLAG, f"its label {FOLLOWED_LABEL!r} points nowhere: {exc}") from None
    versions = model_repo.complete_versions(path)
    if not versions:
        raise UsageError(FLAG, f"{path} is neither a version (no {contract.SAVED_MODEL_FILE}) nor a model "
                               "directory with versions")
    return path / str(versions[-1]), "latest"


def read_reference(text: str | os.PathLike) -> Reference:
    """The joinable reference named by ``--like``; UsageError naming ``--like`` and why it cannot be joined."""
    path, chosen = find_version(text)
    try:
        lineage = contract.read_lineage(path)
    except ValueError as exc:
        raise UsageError(FLAG, str(exc)) from None
    if lineage is None:
        raise UsageError(FLAG, f"{path} has no lineage ({contract.lineage_path(path).name}), so its trunk is unknown")
    trunk = contract.trunk_of(lineage)
    if trunk is None:
        raise UsageError(FLAG, f"{path} declares no trunk: its trunk was trained (scenario 2 or 4), so no other "
                               "model can share it")
    if trunk["base"] not in catalog.BASES:
        raise UsageError(FLAG, f"{path}'s base {trunk['base']!r} is not one graft-train fit builds")
    weights = lineage.get("weights") or {}
    kind = weights.get("kind")
    if kind == "none":
        raise UsageError(FLAG, f"{path} was trained on random weights (--weights none), which no other fit "
                               "reproduces; only pretrained trunks can be shared")
    if kind not in sources.KINDS or not weights.get("sha256") or (kind == "file" and not weights.get("path")):
        raise UsageError(FLAG, f"{path}'s lineage does not say which weights it was trained on")
    height, width, _ = trunk["input_shape"]
    if height != width:
        raise UsageError(FLAG, f"{path}'s trunk takes {height}x{width} inputs; graft-train fit trains square ones")
    described = lineage.get("scenario")
    scenario = described.get("scenario") if isinstance(described, Mapping) else None
    if scenario not in FROZEN_SCENARIOS:
        scenario = 3 if trunk["cut_layer"] else 1
    return Reference(path=path, chosen=chosen, trunk=trunk, base=trunk["base"],
                     weights=sources.WeightsSource(kind, weights.get("path"), weights["sha256"]),
                     scenario=scenario, cut_layer=trunk["cut_layer"], image_size=height)
