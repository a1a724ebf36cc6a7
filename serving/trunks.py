"""Shared trunks: versions that declare the same frozen trunk run it once, as a group.

A version that declares a trunk (``graft.contract.trunk_of``) and carries its parts
(``contract.shared_parts``: its trunk's segments, or its whole trunk, and its head) loads,
with ``--shared_trunks`` on, as a :class:`SharedServable`: its own head SavedModel
plus a reference to its :class:`TrunkGroup`, the one loaded copy of the trunk for
every loaded version with that fingerprint, across models and versions. The
:class:`TrunkRegistry` (one per server, built by ``GraftServer``) is the manager's
loader: it loads a group's trunk with its first member and unloads it with its last.

Running a member's signature S is ``head[S](trunk[SHARED_SIGNATURES[S]](inputs))``.
With batching on, every member's requests for S go through the group's one tagged,
earliest-deadline-first ``Batcher`` of that trunk signature: one trunk run over the
rows of several models, then each head once on its own rows (``TrunkGroup._run_parts``).
A version whose signatures are not all shareable, or whose parts are missing, loads
as a plain ``Servable``.

A group's trunk is a path of segments (prefix sharing): versions cut at different
blocks of the same weights join one group, each running the path to its own cut, so
the blocks they have in common run once per batch and load once.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from graft import contract
from serving.batching import Batcher
from serving.config import BatchingConfig
from serving.errors import Internal, InvalidArgument, NotFound
from serving.servable import Servable, SignatureSpec, tf_signature_defs
from serving.shadow import TRUNK_FEATURES

log = logging.getLogger(__name__)

# The deadline earliest-deadline-first gives a request that has none, when
# --rest_api_timeout_in_ms is 0: TF Serving's default REST timeout.
DEFAULT_EDF_DEADLINE_S = 30.0

# The metrics' label of a run's part: a whole version, a trunk, a head.
PART_MODEL, PART_TRUNK, PART_HEAD = "model", "trunk", "head"


class FeaturesTag(tuple):
    """A member's tag ``(version, signature)`` whose part also gets its trunk features back, under
    ``TRUNK_FEATURES``. Equal to the plain tag, so the part joins the same head run."""

    __slots__ = ()


class FanOutTag(tuple):
    """A fan-out's tag: the ``(member, version signature)`` runs whose heads all answer each of
    its rows. Its part's outputs come back keyed ``(run index, output name)``."""

    __slots__ = ()


class TrunkGroup:
    """One loaded trunk and the loaded versions that share it (thread-safe).

    The trunk is a path of segments, each a loaded SavedModel under its fingerprint
    (``contract.trunk_segments``; one segment, the whole trunk, for a version that
    declares none). A member runs the path up to its own depth: versions cut at
    different blocks of the same weights share the segments up to the shallower cut.
    ``fingerprint`` names the group in metrics and logs: its first segment's, or (``key``)
    the fingerprint of the version that started it when that one is taken.
    """

    def __init__(self, path: Sequence[tuple[str, Servable]], *, key: str | None = None,
                 batching: BatchingConfig | None, metrics: Any | None, edf_default_s: float) -> None:
        self.fingerprint = key or path[0][0]
        self.short = contract.short_fingerprint(self.fingerprint)
        self._path: tuple[tuple[str, Servable], ...] = tuple(path)
        self._batching = batching
        self._metrics = metrics
        self._edf_default_s = edf_default_s
        self._lock = threading.Lock()
        self._members: set[SharedServable] = set()
        self._batchers: dict[str, Batcher] = {}
        # Segment runs traced as one, by (signature, first, last), for the path they were built on.
        self._calls: dict[tuple[str, int, int], Any] = {}
        self._closed = False

    @property
    def size(self) -> int:
        """The loaded versions in the group."""
        with self._lock:
            return len(self._members)

    def members(self) -> list[tuple[str, int]]:
        """(model, version) of each member, sorted."""
        with self._lock:
            return sorted((m.name, m.version) for m in self._members)

    def fingerprints(self) -> list[str]:
        """The fingerprints of the loaded segments, first to last."""
        return [fingerprint for fingerprint, _ in self._path]

    def depth_of(self, fingerprint: str) -> int | None:
        """The index of the segment with ``fingerprint`` on the path, if loaded."""
        for depth, (loaded, _) in enumerate(self._path):
            if loaded == fingerprint:
                return depth
        return None

    def extend(self, segments: Sequence[tuple[str, Servable]]) -> None:
        """Add segments after the last (a member deeper than every other joins)."""
        with self._lock:
            self._path = self._path + tuple(segments)
            self._calls.clear()

    def segments(self, depth: int) -> list[tuple[str, Servable]]:
        """The path up to and including ``depth``."""
        return list(self._path[:depth + 1])

    def run_trunk(self, trunk_signature: str, inputs: Mapping[str, np.ndarray], models: int = 1,
                  depth: int = 0) -> np.ndarray:
        """The features at segment ``depth`` for ``inputs`` (one trunk run, timed and counted)."""
        return self._features(trunk_signature, inputs, [(0, None, depth)], models)[(0, depth)]

    def _call(self, trunk_signature: str, first: int, last: int):
        """Segments ``first``..``last`` as one callable: features in (``inputs`` for the first segment) and out."""
        key = (trunk_signature, first, last)
        with self._lock:
            call = self._calls.get(key)
            path = self._path
        if call is not None:
            return call
        signature = trunk_signature if first == 0 else contract.SEGMENT_SIGNATURE
        head, rest = path[first][1], [(servable, contract.SEGMENT_SIGNATURE) for _, servable in path[first + 1:last + 1]]
        composed = head.chain(signature, rest, contract.FEATURES_KEY) if rest else None
        if composed is None:
            def composed(inputs, head=head, rest=rest, signature=signature):
                outputs = head.run(signature, inputs)
                for servable, name in rest:
                    outputs = servable.run(name, {contract.FEATURES_KEY: outputs[contract.FEATURES_KEY]})
                return outputs
        with self._lock:
            if self._path is path:
                self._calls[key] = composed
        return composed

    def _features(self, trunk_signature: str, inputs: Mapping[str, np.ndarray],
                  needs: Sequence[tuple[int, int | None, int]], models: int) -> dict[tuple[int, int], np.ndarray]:
        """Run the path once over ``inputs``, as deep as the deepest need; ``needs`` are (first row,
        end row or None: to the end, depth). Rows go on to a deeper segment only when some need wants
        them there. Returns each need's rows' features at its depth, keyed (first row, depth)."""
        rows_in = len(next(iter(inputs.values()))) if inputs else 0
        needs = [(start, rows_in if end is None else end, depth) for start, end, depth in needs]
        # Runs end at every depth a member of the group has, not only at this batch's: each
        # segment then belongs to one traced run (one copy of its constants), whichever
        # depths a batch mixes.
        deepest = max(depth for _, _, depth in needs)
        with self._lock:
            ends = {member.depth for member in self._members if member.depth <= deepest}
        stops = sorted(ends | {depth for _, _, depth in needs})
        at: dict[int, tuple[np.ndarray | None, np.ndarray]] = {}   # depth -> (rows or None for all, features)
        previous = None
        for depth in stops:
            wanted = [(start, end) for start, end, need in needs if need >= depth]
            if previous is None:
                rows, run_inputs = None, inputs
            else:
                before_rows, before = at[previous]
                rows = np.unique(np.concatenate([np.arange(start, end) for start, end in wanted]))
                if before_rows is None and len(rows) == rows_in or before_rows is not None \
                        and len(rows) == len(before_rows):
                    rows, selected = before_rows, before
                else:
                    selected = before[rows if before_rows is None else np.searchsorted(before_rows, rows)]
                run_inputs = {contract.FEATURES_KEY: selected}
            first = 0 if previous is None else previous + 1
            started = time.perf_counter()
            try:
                outputs = self._call(trunk_signature, first, depth)(run_inputs)
            finally:
                seconds = time.perf_counter() - started
            if self._metrics is not None:
                self._metrics.observe_inference("", "", trunk_signature, seconds, part=PART_TRUNK, trunk=self.short)
                if previous is None:
                    self._metrics.observe_trunk_batch(self.short, trunk_signature, rows_in, models)
            features = outputs.get(contract.FEATURES_KEY)
            if features is None:
                raise Internal(f"trunk {self.short} signature {trunk_signature!r} returned no "
                               f"{contract.FEATURES_KEY!r}")
            at[depth] = (rows, features)
            previous = depth
        result = {}
        for start, end, depth in needs:
            rows, features = at[depth]
            offset = start if rows is None else int(np.searchsorted(rows, start))
            result[(start, depth)] = features[offset:offset + end - start]
        return result

    def batcher(self, trunk_signature: str) -> Batcher | None:
        """The group's batcher of one trunk signature (None with batching off or once closed)."""
        if self._batching is None:
            return None
        with self._lock:
            if self._closed:
                return None
            batcher = self._batchers.get(trunk_signature)
            if batcher is None:
                batcher = self._batchers[trunk_signature] = Batcher(
                    functools.partial(self._run_parts, trunk_signature), self._batching,
                    name=f"trunk-{self.short}/{trunk_signature}", tagged=True,
                    edf_default_s=self._edf_default_s)
            return batcher

    def _run_parts(self, trunk_signature: str, inputs: dict[str, np.ndarray],
                   parts: list[tuple[Any, int]]) -> list[dict]:
        """A tagged batch: one trunk run over every row, then each member's head once on its own rows.

        ``parts`` are (tag, rows) in row order; a tag is ``(member, version signature)``,
        or a :class:`FanOutTag` of several, whose rows every one of its heads answers.
        Padding rows after the parts run through the trunk and go nowhere. Rows of members
        cut deeper go on through the segments past the shallower cuts. A batch of the one
        member of a group runs trunk and head as one composed call.
        """
        runs: dict[Any, list[int]] = {}
        for index, (tag, _) in enumerate(parts):
            for run in (tag if isinstance(tag, FanOutTag) else (tag,)):
                runs.setdefault(run, []).append(index)
        if len(runs) == 1 and not any(isinstance(tag, (FeaturesTag, FanOutTag)) for tag, _ in parts):
            (member, signature), = runs
            started = time.perf_counter()
            outputs = member.run_alone(signature, inputs)
            if outputs is not None:
                if member.executions is not None:
                    member.executions.on_execution(sum(rows for _, rows in parts), 0.0,
                                                   time.perf_counter() - started, 0.0)
                return _split(outputs, [rows for _, rows in parts])
        starts = np.cumsum([0] + [rows for _, rows in parts])
        needs = {(int(starts[i]), int(starts[i + 1]), member.depth)
                 for (member, _), indices in runs.items() for i in indices}
        started = time.perf_counter()
        features = self._features(trunk_signature, inputs, sorted(needs), models=len({run[0] for run in runs}))
        trunk_s = time.perf_counter() - started
        results: list[dict] = [{} for _ in parts]
        for (member, signature), indices in runs.items():
            slices = [features[(int(starts[i]), member.depth)] for i in indices]
            own = slices[0] if len(slices) == 1 else np.concatenate(slices)
            head_started = time.perf_counter()
            outputs = member.run_head(signature, own)
            if member.executions is not None:
                # One execution of this version: its rows, with the trunk run they rode in.
                member.executions.on_execution(len(own), 0.0, trunk_s + time.perf_counter() - head_started, 0.0)
            pos = 0
            for i in indices:
                tag, rows = parts[i]
                mine = {k: v[pos:pos + rows] for k, v in outputs.items()}
                if isinstance(tag, FanOutTag):
                    index = tag.index((member, signature))
                    results[i].update({(index, k): v for k, v in mine.items()})
                else:
                    results[i].update(mine)
                pos += rows
        for i, (tag, _) in enumerate(parts):
            if isinstance(tag, FeaturesTag):
                results[i][TRUNK_FEATURES] = features[(int(starts[i]), tag[0].depth)]
        return results

    def fan_out(self, runs: Sequence[tuple[SharedServable, str]], inputs: Mapping[str, np.ndarray],
                deadline: float | None = None, timing: Any = None) -> list[dict[str, np.ndarray]]:
        """One trunk pass over ``inputs``, then each (member, version signature)'s head on all of it.

        With batching on, the pass goes through the group's batcher like any member's
        request (``deadline`` and ``timing`` as ``Batcher.submit``'s), so concurrent
        fan-outs and single-model requests share trunk runs. Every signature must take
        its features from the same trunk signature (InvalidArgument otherwise: float
        images, image bytes and examples differ).
        """
        trunk_signatures = {contract.SHARED_SIGNATURES.get(signature) for _, signature in runs}
        if len(trunk_signatures) != 1 or None in trunk_signatures:
            raise InvalidArgument(f"a fan-out's signatures must all read the same input through the trunk; "
                                  f"got {sorted(signature for _, signature in runs)}")
        trunk_signature = trunk_signatures.pop()
        batcher = self.batcher(trunk_signature)
        if batcher is not None:
            merged = batcher.submit(inputs, deadline, timing, tag=FanOutTag(runs))
            answers: list[dict[str, np.ndarray]] = [{} for _ in runs]
            for (index, name), value in merged.items():
                answers[index][name] = value
            return answers
        features = self._features(trunk_signature, inputs, sorted({(0, None, m.depth) for m, _ in runs}),
                                  models=len({id(m) for m, _ in runs}))
        return [member.run_head(signature, features[(0, member.depth)]) for member, signature in runs]

    def queued_rows(self) -> int:
        """Rows waiting in the group's batchers, every member's requests together."""
        with self._lock:
            batchers = list(self._batchers.values())
        return sum(batcher.queue_depth() for batcher in batchers)

    def flush(self) -> None:
        """Run what the group's batchers hold without waiting for batch timeouts (draining)."""
        with self._lock:
            batchers = list(self._batchers.values())
        for batcher in batchers:
            batcher.flush()

    def _join(self, member: SharedServable) -> int:
        with self._lock:
            self._members.add(member)
            members = list(self._members)
        if len(members) == 2:
            # Runs split into trunk and heads from now on: the lone member's traced
            # trunk-and-head call (a copy of the trunk's constants) goes.
            for other in members:
                other.forget_composed()
        return len(members)

    def _leave(self, member: SharedServable) -> int:
        with self._lock:
            self._members.discard(member)
            if len(self._members) <= 1:
                # A lone member runs as one composed call: the traced trunk runs go.
                self._calls.clear()
            return len(self._members)

    def trim(self) -> None:
        """Unload the segments past the deepest member's (kept: the first, until the group closes)."""
        with self._lock:
            keep = max((member.depth for member in self._members), default=0) + 1
            dropped, self._path = self._path[keep:], self._path[:keep]
            if dropped:
                self._calls.clear()
        for fingerprint, servable in dropped:
            servable.unload()
            log.info("trunk %s segment %s unloaded: no version runs that deep", self.short,
                     contract.short_fingerprint(fingerprint))

    def close(self) -> None:
        """Close the batchers (their queues drained) and unload the trunk; the group is empty."""
        with self._lock:
            self._closed = True
            batchers = list(self._batchers.values())
            self._batchers.clear()
            path, self._calls = self._path, {}
        for batcher in batchers:
            batcher.close(drain=True)
        for _, servable in path:
            servable.unload()


class SharedServable(Servable):
    """A version loaded as its head alone, running its signatures through its group's trunk.

    Its signature defs (for metadata and validation) are the version's own, read from
    its ``saved_model.pb``; ``run`` keeps ``Servable.run``'s contract.
    """

    def __init__(self, name: str, version: int, path: str, signature_defs: Mapping, head: Servable,
                 group: TrunkGroup, lineage: dict | None, metrics: Any | None, release, depth: int = 0) -> None:
        # Servable's own __init__ builds replicas from loaded graphs: a shared version has none.
        self.name = name
        self.version = version
        self.path = path
        self.devices = head.devices
        self.device = head.device
        self._signature_defs = dict(signature_defs)
        self.signatures = {k: SignatureSpec.from_signature_def(k, v) for k, v in sorted(self._signature_defs.items())}
        self._lineage = lineage
        self._pool = None
        self.head = head
        self.group: TrunkGroup | None = group
        # The last segment of the group's path this version runs (its cut).
        self.depth = depth
        # This version's statistics (an ExecutionObserver), given by the service with its batcher.
        self.executions = None
        self._metrics = metrics
        self._release = release
        # Trunk-then-head calls traced as one, per signature, built the first time the
        # version runs as its group's only member (None: they do not compose).
        self._composed: dict[str, Any] = {}
        self._compose_lock = threading.Lock()

    def run(self, signature_name: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one signature: the group's trunk, then this version's head (errors as ``Servable.run``)."""
        group = self.group
        if group is None or signature_name not in self.signatures:
            raise NotFound(f'Serving signature name: "{signature_name}" not found in signature def')
        outputs = self.run_alone(signature_name, inputs)
        if outputs is not None:
            return outputs
        features = group.run_trunk(contract.SHARED_SIGNATURES[signature_name], inputs, depth=self.depth)
        return self.run_head(signature_name, features)

    def run_alone(self, signature_name: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray] | None:
        """While this version is its group's only member: trunk and head as one composed call
        (``Servable.then``), timed as a whole run (part "model") under the trunk's label. None
        when the group has other members or the two cannot be composed: run them in turn."""
        group = self.group
        if group is None or group.size != 1:
            return None
        composed = self._composed_call(group, signature_name)
        if composed is None:
            return None
        rows = len(next(iter(inputs.values()))) if inputs else 0
        started = time.perf_counter()
        try:
            return composed(inputs)
        finally:
            seconds = time.perf_counter() - started
            if self._metrics is not None:
                self._metrics.observe_inference(self.name, self.version, signature_name, seconds,
                                                part=PART_MODEL, trunk=group.short)
                self._metrics.observe_trunk_batch(group.short, contract.SHARED_SIGNATURES[signature_name], rows, 1)

    def _composed_call(self, group: TrunkGroup, signature_name: str):
        with self._compose_lock:
            if signature_name not in self._composed:
                (_, first), *rest = group.segments(self.depth)
                self._composed[signature_name] = first.chain(
                    contract.SHARED_SIGNATURES[signature_name],
                    [*((servable, contract.SEGMENT_SIGNATURE) for _, servable in rest), (self.head, signature_name)],
                    contract.FEATURES_KEY)
            return self._composed[signature_name]

    def forget_composed(self) -> None:
        """Drop the traced trunk-and-head calls (the group has other members now)."""
        with self._compose_lock:
            self._composed.clear()

    def run_with_features(self, signature_name: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``run``, with the trunk features it computed under ``TRUNK_FEATURES`` beside the outputs."""
        group = self.group
        if group is None or signature_name not in self.signatures:
            raise NotFound(f'Serving signature name: "{signature_name}" not found in signature def')
        features = group.run_trunk(contract.SHARED_SIGNATURES[signature_name], inputs, depth=self.depth)
        return {**self.run_head(signature_name, features), TRUNK_FEATURES: features}

    def run_head(self, signature_name: str, features: np.ndarray) -> dict[str, np.ndarray]:
        """Run this version's head of ``signature_name`` on trunk features (timed as a head run)."""
        started = time.perf_counter()
        try:
            return self.head.run(signature_name, {contract.FEATURES_KEY: features})
        finally:
            if self._metrics is not None and self.group is not None:
                self._metrics.observe_inference(self.name, self.version, signature_name,
                                                time.perf_counter() - started, part=PART_HEAD,
                                                trunk=self.group.short)

    def member_batcher(self, signature_name: str, features: bool = False, executions=None):
        """The group's batcher for ``signature_name``, bound to this version (None: run directly);
        with ``features``, each answer also carries its trunk features (``TRUNK_FEATURES``).
        ``executions`` (this version's statistics) hears each run of its rows."""
        if executions is not None:
            self.executions = executions
        group = self.group
        trunk_signature = contract.SHARED_SIGNATURES.get(signature_name)
        if group is None or trunk_signature is None:
            return None
        batcher = group.batcher(trunk_signature)
        tag = FeaturesTag((self, signature_name)) if features else (self, signature_name)
        return None if batcher is None else MemberBatcher(batcher, tag)

    def shared_trunk(self) -> TrunkGroup | None:
        """The version's trunk group (None once unloaded)."""
        return self.group

    def trunk_info(self) -> dict | None:
        """The declared trunk, shared, with the loaded versions sharing it."""
        group = self.group
        if group is None:
            return super().trunk_info()
        return {"fingerprint": contract.trunk_of(self._lineage)["fingerprint"], "shared": True,
                "group_size": group.size}

    def variable_devices(self) -> dict[str | None, list[str]]:
        """The head's variable placement (the trunk's is the group's)."""
        return self.head.variable_devices()

    def in_flight(self) -> list[int]:
        """The head's runs in flight per replica."""
        return self.head.in_flight()

    def unload(self) -> None:
        """Drop the head and leave the group (its last member unloads the trunk)."""
        group, self.group = self.group, None
        with self._compose_lock:
            self._composed.clear()
        self.head.unload()
        if group is not None:
            self._release(group, self)

    def __repr__(self) -> str:
        return f"SharedServable({self.name!r}, {self.version}, {self.path!r})"

    # Members are set elements keyed by identity, as Servable is.
    __hash__ = object.__hash__
    __eq__ = object.__eq__


def _split(outputs: Mapping[str, np.ndarray], sizes: Sequence[int]) -> list[dict[str, np.ndarray]]:
    """Outputs of a batch cut into its parts' rows, in order (padding rows after them dropped)."""
    parts, pos = [], 0
    for rows in sizes:
        parts.append({k: v[pos:pos + rows] for k, v in outputs.items()})
        pos += rows
    return parts


class MemberBatcher:
    """A group batcher seen from one member signature: ``submit`` as ``Batcher``'s, tagged with it."""

    def __init__(self, batcher: Batcher, tag: tuple[SharedServable, str]) -> None:
        self._batcher = batcher
        self._tag = tag

    def submit(self, inputs, deadline=None, timing=None):
        """``Batcher.submit`` with this member's tag."""
        return self._batcher.submit(inputs, deadline, timing, tag=self._tag)

    async def submit_async(self, inputs, deadline=None, timing=None):
        """``Batcher.submit_async`` with this member's tag."""
        return await self._batcher.submit_async(inputs, deadline, timing, tag=self._tag)

    def flush(self) -> None:
        """The group batcher's ``flush``."""
        self._batcher.flush()

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Nothing: the group owns its batcher and closes it with its last member."""


class TrunkRegistry:
    """The trunk groups of one server, refcounted by their loaded members; the manager's loader.

    ``devices`` and ``freeze`` are those a plain version loads with (``--freeze_graph``);
    ``batching`` is the server's batching (None: off); ``metrics`` a ``ServingMetrics``
    or None; ``edf_default_s`` the deadline a request without one gets for ordering.
    """

    def __init__(self, devices: Sequence[str] = (), *, freeze: bool = True, batching: BatchingConfig | None = None,
                 metrics: Any | None = None, edf_default_s: float = DEFAULT_EDF_DEADLINE_S) -> None:
        self._device = tuple(devices) or None
        self._freeze = freeze
        self._batching = batching
        self._metrics = metrics
        self._edf_default_s = edf_default_s
        self._lock = threading.Lock()
        self._groups: dict[str, TrunkGroup] = {}

    def load(self, name: str, version: int, path: str | os.PathLike) -> Servable:
        """Load a version: shared when it declares a trunk, carries its parts and every signature can share."""
        path = os.fspath(path)
        plan = self._shared_plan(path)
        if plan is None:
            return Servable.load(name, version, path, device=self._device, freeze=self._freeze)
        signature_defs, segments, head_path, lineage = plan
        group, depth = self._acquire(segments)
        try:
            head = Servable.load(name, version, head_path, device=self._device, freeze=self._freeze)
        except BaseException:
            self._release_empty(group)
            raise
        member = SharedServable(name, version, path, signature_defs, head, group, lineage, self._metrics,
                                self._release, depth=depth)
        self._report(group, group._join(member))
        log.info("model %s version %d joins trunk %s at segment %d of %d (%d loaded)", name, version, group.short,
                 depth + 1, len(group.fingerprints()), group.size)
        return member

    def _shared_plan(self, path: str):
        """What a shared load needs, or None (logged) when the version must load standalone."""
        parts = contract.shared_parts(path)
        if parts is None:
            return None
        segments, head_path = parts
        try:
            lineage = contract.read_lineage(path)
            signature_defs = tf_signature_defs(path)
            trunk_sigs = set(tf_signature_defs(segments[0][1]))
            head_sigs = set(tf_signature_defs(head_path))
            later = [set(tf_signature_defs(p)) for _, p in segments[1:]]
        except ValueError as exc:
            log.warning("%s loads standalone: its shared parts cannot be read: %s", path, exc)
            return None
        unshareable = sorted(s for s in signature_defs if s not in contract.SHARED_SIGNATURES
                             or s not in head_sigs or contract.SHARED_SIGNATURES[s] not in trunk_sigs)
        if unshareable or not signature_defs or any(contract.SEGMENT_SIGNATURE not in sigs for sigs in later):
            log.info("%s loads standalone: signature(s) %s cannot share its trunk", path,
                     unshareable or [contract.SEGMENT_SIGNATURE])
            return None
        return signature_defs, [(f, os.fspath(p)) for f, p in segments], head_path, lineage

    def _load_segment(self, fingerprint: str, path: str) -> Servable:
        short = contract.short_fingerprint(fingerprint)
        return Servable.load(f"trunk-{short}", 0, path, device=self._device, freeze=self._freeze)

    def _acquire(self, segments: list[tuple[str, str]]) -> tuple[TrunkGroup, int]:
        """The group a version's trunk joins, and its depth there.

        The deepest of the version's segments already loaded in some group decides: the
        version joins there, adding its deeper segments after the group's last. When
        that segment is not the group's last (the version branches off another path),
        or none is loaded, the version starts a group of its own.
        """
        # Loads run on the manager's one loader thread, so no two loads race for a group.
        with self._lock:
            groups = list(self._groups.values())
        for index in reversed(range(len(segments))):
            found = [(group, depth) for group in groups
                     if (depth := group.depth_of(segments[index][0])) is not None]
            rest = segments[index + 1:]
            if found and not rest:
                return found[0]
            for group, depth in found:
                if depth == len(group.fingerprints()) - 1:
                    group.extend(self._load_all(rest))
                    return group, depth + len(rest)
            if found:
                # The paths part: a group of its own, named by the version's own fingerprint,
                # which no group holds (its first segments' names the other group).
                return self._new_group(segments, key=segments[-1][0]), len(segments) - 1
        return self._new_group(segments), len(segments) - 1

    def _load_all(self, segments: list[tuple[str, str]]) -> list[tuple[str, Servable]]:
        loaded: list[tuple[str, Servable]] = []
        try:
            for fingerprint, path in segments:
                loaded.append((fingerprint, self._load_segment(fingerprint, path)))
        except BaseException:
            for _, servable in loaded:
                servable.unload()
            raise
        return loaded

    def _new_group(self, segments: list[tuple[str, str]], key: str | None = None) -> TrunkGroup:
        group = TrunkGroup(self._load_all(segments), key=key, batching=self._batching, metrics=self._metrics,
                           edf_default_s=self._edf_default_s)
        with self._lock:
            self._groups[group.fingerprint] = group
        log.info("trunk %s loaded from %s (%d segment(s))", group.short, os.path.dirname(segments[0][1]),
                 len(segments))
        return group

    def _release(self, group: TrunkGroup, member: SharedServable) -> None:
        self._report(group, group._leave(member))
        self._release_empty(group)

    def _release_empty(self, group: TrunkGroup) -> None:
        with self._lock:
            if group.size or self._groups.get(group.fingerprint) is not group:
                empty = False
            else:
                del self._groups[group.fingerprint]
                empty = True
        if not empty:
            group.trim()
            return
        group.close()
        log.info("trunk %s unloaded: its last version left", group.short)
        self._report(group, 0)

    def _report(self, group: TrunkGroup, size: int) -> None:
        if self._metrics is not None:
            self._metrics.set_trunk_group_size(group.short, size)

    def groups(self) -> dict[str, TrunkGroup]:
        """The loaded groups by fingerprint (a snapshot)."""
        with self._lock:
            return dict(self._groups)

    def group_of(self, fingerprint: str) -> TrunkGroup | None:
        """The loaded group of ``fingerprint``, if any."""
        with self._lock:
            return self._groups.get(fingerprint)

    def queued_rows(self) -> int:
        """Rows waiting in every group's batchers (the service's ``busy`` counts them with its own)."""
        return sum(group.queued_rows() for group in self.groups().values())

    def flush(self) -> None:
        """Flush every group's batchers (the server is draining)."""
        for group in self.groups().values():
            group.flush()
