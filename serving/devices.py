"""Device placement: GPU memory settings, the devices versions are placed on, replica routing.

On a machine with GPUs every loaded version is placed on the GPUs (one replica
per GPU, see ``Servable.load``), and each run goes to the least busy replica.
Memory follows TF Serving's flags, applied before TensorFlow touches a GPU:

- by default memory growth is on (TF's own default grabs nearly all of every
  GPU at start, TF Serving's users' complaint #249 / #1929);
- ``--per_process_gpu_memory_fraction`` caps each GPU at that fraction of its
  total memory (one logical device with ``memory_limit``), which TF allocates
  up front, as TF Serving does;
- ``--gpu_memory_limit_mb`` caps each GPU at a fixed size instead.

The choices are pure functions over plain device lists (:func:`plan_gpus`,
:func:`least_busy`) so they are tested without a GPU; :func:`configure_gpus`
applies a plan through ``tf.config``. A CPU-only machine needs no flag: no GPU,
no plan, versions load where TensorFlow puts them (``/CPU:0``).
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

MIB = 1024 * 1024
T = TypeVar("T")


@dataclass(frozen=True)
class GpuOptions:
    """How much GPU memory the process may take (TF Serving's flags; 0 = unset)."""

    memory_growth: bool = True
    memory_fraction: float = 0.0
    memory_limit_mb: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.memory_fraction <= 1.0:
            raise ValueError(f"per_process_gpu_memory_fraction must be in [0, 1], got {self.memory_fraction}")
        if self.memory_limit_mb < 0:
            raise ValueError(f"gpu_memory_limit_mb must not be negative, got {self.memory_limit_mb}")
        if self.memory_fraction and self.memory_limit_mb:
            raise ValueError("give either per_process_gpu_memory_fraction or gpu_memory_limit_mb, not both")

    @property
    def limited(self) -> bool:
        """Whether a per-GPU memory cap was asked for."""
        return bool(self.memory_fraction or self.memory_limit_mb)


@dataclass(frozen=True)
class GpuSetting:
    """What to apply to one physical GPU: a memory cap in MiB, or growth, or neither."""

    index: int
    memory_limit_mb: int | None
    memory_growth: bool

    @property
    def device(self) -> str:
        """The logical device name versions are placed on (``/device:GPU:<index>``)."""
        return f"/device:GPU:{self.index}"


def memory_limit_mb(total_bytes: int | None, options: GpuOptions) -> int | None:
    """The cap for one GPU in MiB (None: no cap). ValueError when a fraction needs an unknown total."""
    if options.memory_limit_mb:
        return options.memory_limit_mb
    if not options.memory_fraction:
        return None
    if not total_bytes:
        raise ValueError("cannot read the GPU's total memory to apply per_process_gpu_memory_fraction; "
                         "give --gpu_memory_limit_mb instead")
    return max(1, int(total_bytes * options.memory_fraction) // MIB)


def plan_gpus(totals: Sequence[int | None], options: GpuOptions) -> list[GpuSetting]:
    """One setting per GPU, given each GPU's total memory in bytes (None when unknown)."""
    settings = []
    for index, total in enumerate(totals):
        limit = memory_limit_mb(total, options)
        # TF refuses memory growth on a GPU split into logical devices; a cap wins.
        settings.append(GpuSetting(index, limit, options.memory_growth and limit is None))
    return settings


def cuda_total_memory(index: int) -> int | None:
    """Total memory of CUDA device ``index`` in bytes, from the driver (None if unavailable).

    Uses the driver API (``cuDeviceTotalMem``), which creates no CUDA context, so
    TensorFlow's GPU setup is unaffected; its ordinals follow CUDA_VISIBLE_DEVICES
    as TensorFlow's GPU indices do. No extra dependency: libcuda ships with the driver.
    """
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    device = ctypes.c_int()
    total = ctypes.c_size_t()
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGet(ctypes.byref(device), index) != 0:
        return None
    if cuda.cuDeviceTotalMem_v2(ctypes.byref(total), device) != 0:
        return None
    return int(total.value)


def configure_gpus(options: GpuOptions, *,
                   total_memory: Callable[[int], int | None] = cuda_total_memory) -> list[str]:
    """Apply ``options`` to every visible GPU; return the devices to place versions on ([] on CPU).

    Must run before TensorFlow initialises its devices (before any op or model
    load). If it is too late, memory growth is skipped with a warning, but an
    explicit cap raises RuntimeError.
    """
    # TensorFlow (heavy): the pure planning functions above stay testable without it.
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return []
    totals = [total_memory(i) if options.memory_fraction else None for i in range(len(gpus))]
    settings = plan_gpus(totals, options)
    for gpu, setting in zip(gpus, settings):
        try:
            if setting.memory_limit_mb is not None:
                tf.config.set_logical_device_configuration(
                    gpu, [tf.config.LogicalDeviceConfiguration(memory_limit=setting.memory_limit_mb)])
            elif setting.memory_growth:
                tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError as exc:
            if setting.memory_limit_mb is not None:
                raise RuntimeError(f"cannot cap GPU memory: {exc}") from exc
            log.warning("GPU memory growth not applied (TensorFlow already initialised): %s", exc)
        log.info("GPU %d: %s", setting.index,
                 f"memory capped at {setting.memory_limit_mb} MiB" if setting.memory_limit_mb is not None
                 else "memory growth on" if setting.memory_growth else "TensorFlow's default allocation")
    return [s.device for s in settings]


def memory_label(device: str) -> str:
    """``/device:GPU:0`` -> ``GPU:0``, the form ``get_memory_info`` and the metric label use."""
    parts = device.split(":")
    return ":".join(parts[-2:]) if len(parts) >= 2 else device


def memory_in_use(devices: Sequence[str], get_memory_info: Callable[[str], Mapping[str, int]]) -> dict[str, int]:
    """Bytes in use per device, from a ``tf.config.experimental.get_memory_info``-like reader.

    A device the reader cannot report on (not initialised yet, or a CPU) is left out.
    """
    result = {}
    for device in devices:
        label = memory_label(device)
        try:
            result[label] = int(get_memory_info(label)["current"])
        except (ValueError, RuntimeError, KeyError):
            continue
    return result


def memory_reader(devices: Sequence[str]) -> Callable[[], dict[str, int]]:
    """The ``graft_device_memory_bytes`` reader for ServingMetrics: TensorFlow's view of ``devices``."""
    devices = tuple(devices)

    def read() -> dict[str, int]:
        if not devices:
            return {}
        # TensorFlow (heavy): a CPU-only server never needs it here.
        import tensorflow as tf

        return memory_in_use(devices, tf.config.experimental.get_memory_info)

    return read


def least_busy(in_flight: Sequence[int], last: int = -1) -> int:
    """Index of the replica with the fewest runs in flight; ties go to the first after ``last``.

    Rotating the ties spreads light traffic over every replica instead of always
    the first one.
    """
    if not in_flight:
        raise ValueError("no replicas")
    n = len(in_flight)
    order = [(last + 1 + k) % n for k in range(n)]
    return min(order, key=lambda i: in_flight[i])


class ReplicaPool(Generic[T]):
    """Replicas of one version (one per device) and the runs each has in flight."""

    def __init__(self, replicas: Sequence[T]):
        if not replicas:
            raise ValueError("a replica pool needs at least one replica")
        self.replicas: tuple[T, ...] = tuple(replicas)
        self._in_flight = [0] * len(self.replicas)
        self._last = -1
        self._lock = threading.Lock()

    @contextmanager
    def acquire(self) -> Iterator[T]:
        """Hold the least busy replica for one run (a batch, or one unbatched request)."""
        if len(self.replicas) == 1:
            # Nothing to choose: skip the lock on the hot path.
            yield self.replicas[0]
            return
        with self._lock:
            index = least_busy(self._in_flight, self._last)
            self._in_flight[index] += 1
            self._last = index
        try:
            yield self.replicas[index]
        finally:
            with self._lock:
                self._in_flight[index] -= 1

    def in_flight(self) -> list[int]:
        """Runs in flight per replica, in replica order."""
        with self._lock:
            return list(self._in_flight)
