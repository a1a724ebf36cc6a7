"""serving.buffers: aligned host buffers, and which arrays TensorFlow may share."""

from __future__ import annotations

import numpy as np
import pytest

from serving.buffers import TENSOR_ALIGNMENT, aligned_empty, is_shareable


@pytest.mark.parametrize("shape, dtype", [((32, 96, 96, 3), np.float32), ((3,), np.int64), ((5, 7), np.uint8),
                                          ((0, 4), np.float32), ((1, 1, 1), np.float16)])
def test_aligned_empty_has_the_shape_dtype_and_alignment(shape, dtype):
    for _ in range(5):  # whatever offset numpy's allocator hands out
        array = aligned_empty(shape, dtype)
        assert array.shape == shape and array.dtype == np.dtype(dtype)
        assert array.flags.c_contiguous and array.flags.writeable
        assert array.size == 0 or array.ctypes.data % TENSOR_ALIGNMENT == 0
        array[...] = 1  # the whole extent is usable memory
        assert array.sum() == array.size


def test_object_arrays_are_plain_ones():
    array = aligned_empty((3,), object)
    assert array.dtype == object and array.shape == (3,)
    array[:] = [b"a", b"bc", b""]
    assert not is_shareable(array)


def test_is_shareable_needs_alignment_contiguity_a_numeric_dtype_and_writeability():
    aligned = aligned_empty((4, 8), np.float32)
    assert is_shareable(aligned)
    # numpy's own allocation of a large array sits 16 bytes past a page boundary: not aligned.
    raw = np.empty(8 * 1024 * 1024 + 16, np.uint8)
    offset = next(i for i in range(1, TENSOR_ALIGNMENT) if (raw.ctypes.data + i) % TENSOR_ALIGNMENT)
    assert not is_shareable(raw[offset:offset + 4096])
    assert not is_shareable(aligned[:, ::2])  # not contiguous
    assert not is_shareable(aligned_empty((0, 8), np.float32))  # empty
    assert not is_shareable(aligned_empty((4,), np.bool_))  # no DLPack import in TensorFlow
    assert not is_shareable(np.array([b"a", b"b"], dtype=object))
    frozen = aligned_empty((4, 8), np.float32)
    frozen.flags.writeable = False  # e.g. np.frombuffer over a request's bytes
    assert not is_shareable(frozen)
