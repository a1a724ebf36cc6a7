"""Host buffers that TensorFlow can take as they are, without a copy.

TensorFlow's CPU kernels require tensor memory aligned to 64 bytes (Eigen's
``EIGEN_MAX_ALIGN_BYTES``), and ``tf.constant`` copies every numpy array it is
given. numpy aligns large arrays to 16 bytes only, and for a merged batch of
images that copy costs the batch thread time while the model's core waits for
it (docs/benchmarks.md, seventh pass). The batcher therefore
merges a batch into a buffer from :func:`aligned_empty`, and
``serving.servable`` hands such an array to TensorFlow through DLPack, which
shares its memory (docs/benchmarks.md, seventh pass).

No TensorFlow import here: the batcher uses this module.
"""

from __future__ import annotations

import math

import numpy as np

# Eigen's EIGEN_MAX_ALIGN_BYTES on x86-64 builds with AVX-512; TensorFlow aborts the
# process (Check failed: IsAligned()) when a kernel meets a tensor aligned less.
TENSOR_ALIGNMENT = 64

# dtypes that DLPack carries and TensorFlow imports from it.
SHAREABLE_DTYPES = frozenset(np.dtype(t) for t in (
    np.float16, np.float32, np.float64,
    np.int8, np.int16, np.int32, np.int64,
    np.uint8, np.uint16, np.uint32, np.uint64,
))


def aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on a ``TENSOR_ALIGNMENT`` boundary.

    Empty and object arrays are plain ``np.empty`` ones.
    """
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes == 0 or dtype.hasobject:
        # Nothing to align; and object arrays (tf.string's bytes) cannot live in a raw
        # byte buffer. Neither is ever shared (is_shareable).
        return np.empty(shape, dtype)
    raw = np.empty(nbytes + TENSOR_ALIGNMENT, dtype=np.uint8)
    start = -raw.ctypes.data % TENSOR_ALIGNMENT
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def is_shareable(array: np.ndarray) -> bool:
    """Whether TensorFlow may use ``array``'s memory in place.

    It must be aligned, C-contiguous, non-empty, of a dtype DLPack carries, and
    writeable (numpy exports no read-only array through the DLPack version
    TensorFlow reads). The caller must not change the array while TensorFlow
    still uses it; the batcher's merged buffers are never written after the merge.
    """
    return (array.dtype in SHAREABLE_DTYPES and array.size > 0 and array.flags.c_contiguous
            and array.flags.writeable and array.ctypes.data % TENSOR_ALIGNMENT == 0)
