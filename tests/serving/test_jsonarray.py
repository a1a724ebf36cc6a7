"""serving.codecs.dense_json: the numeric-array predict body read without per-number Python objects.

The property that matters: whenever the reader answers, its array is exactly what
``np.array(json.loads(body)[key], dtype=float64)`` gives; whenever a body is one
non-empty rectangular numeric array it does answer (else the fast path would be
dead code); and every other body is left to the general path (None).
"""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from serving.codecs.dense_json import DenseReader

SEPARATORS = [(",", ":"), (", ", ": "), (" ,\n ", " :\t"), ("\r\n,", ":\n")]

finite = st.floats(allow_nan=False, allow_infinity=False)
exact_ints = st.integers(min_value=-(2**53), max_value=2**53)
rectangular = hnp.arrays(np.float64, hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=5),
                         elements=finite)
nested = st.recursive(st.one_of(finite, exact_ints),
                      lambda inner: st.lists(inner, min_size=0, max_size=4), max_leaves=30)


def _oracle(value) -> np.ndarray | None:
    try:
        return np.array(value, dtype=np.float64)
    except (ValueError, TypeError):
        return None  # ragged or mixed depth


@settings(max_examples=300, deadline=None)
@given(array=rectangular, key=st.sampled_from(["instances", "inputs"]), separators=st.sampled_from(SEPARATORS),
       signature=st.sampled_from([None, "serving_default", "x]}", "sig_1"]))
def test_every_rectangular_numeric_array_is_read_exactly(array, key, separators, signature):
    body = {key: array.tolist()} if signature is None else {"signature_name": signature, key: array.tolist()}
    dense = DenseReader().read(json.dumps(body, separators=separators).encode())
    assert dense is not None
    assert dense.key == key
    assert dense.values.dtype == np.float64 and dense.values.shape == array.shape
    np.testing.assert_array_equal(dense.values, array)
    assert dense.fields == ({} if signature is None else {"signature_name": signature})


@settings(max_examples=400, deadline=None)
@given(value=nested, separators=st.sampled_from(SEPARATORS))
def test_any_nesting_is_either_read_exactly_or_left_to_the_general_path(value, separators):
    raw = json.dumps({"instances": value}, separators=separators).encode()
    dense = DenseReader().read(raw)
    expected = _oracle(value)
    if dense is not None:
        assert expected is not None
        assert dense.values.shape == expected.shape
        np.testing.assert_array_equal(dense.values, expected)
    elif expected is not None and expected.ndim > 0 and expected.size > 0:
        pytest.fail(f"a rectangular numeric array was not read: {raw[:80]!r}")


@pytest.mark.parametrize("raw", [
    b'{"instances": [[1, 2], [3]]}',  # ragged
    b'{"instances": [[1, 2, 3], [4, 5, 6, 7], [8, 9]]}',  # ragged, count of a rectangle
    b'{"instances": [[1], []]}',  # "[]" and "[1]" share a skeleton
    b'{"instances": [1, [2]]}',
    b'{"instances": [[1, 2]], "inputs": [1]}',  # both keys: the general path names the error
    b'{"output_filter": ["y"], "instances": [1]}',  # a second array
    b'{"instances": [1], "output_filter": ["y"]}',
    b'{"inputs": {"x": [1, 2]}}',  # named inputs
    b'{"instances": [NaN, 1]}',  # TF Serving's NaN: the general path takes it
    b'{"instances": [1e400]}',  # beyond float64
    b'{"instances": [true]}',
    b'{"instances": ["a"]}',
    b'{"instances": [{"b64": "AAAA"}]}',
    b'{"instances": []}',
    b'{"instances": [[[]]]}',
    b'{"instances": 5}',
    b'{"instance": [1, 2]}',
    b'{"instances": [01]}',  # not strict JSON
    b'{"instances": [1, 2]',
    b'{"instances": [1, 2]} x',
    b'[1, 2]',
    b'{"instances": [1], "instances": [2]}',  # duplicate keys
    b'{"signature_name": "a[", "instances": [1]}',
    b'',
])
def test_other_bodies_are_left_to_the_general_path(raw):
    assert DenseReader().read(raw) is None


def test_fields_other_than_the_array_are_parsed():
    raw = b'{"signature_name": "s", "meta": {"a": 1, "b": null}, "flag": true, "inputs": [[1.5, -2e3]]}'
    dense = DenseReader().read(raw)
    assert dense.fields == {"signature_name": "s", "meta": {"a": 1, "b": None}, "flag": True}
    assert dense.as_body().keys() == {"signature_name", "meta", "flag", "inputs"}
    np.testing.assert_array_equal(dense.values, [[1.5, -2000.0]])
    assert dense.raw == raw


def test_the_parser_is_reused_across_failures_and_threads():
    reader = DenseReader()
    good = json.dumps({"instances": np.arange(24.0).reshape(2, 3, 4).tolist()}).encode()
    bad = [b'{"instances": [true]}', b'{"instances": [1e400]}', b'{"instances": [1], "x": 01}']
    failures: list[BaseException] = []

    def work():
        try:
            for _ in range(50):
                for raw in bad:
                    assert reader.read(raw) is None
                dense = reader.read(good)
                assert dense is not None and dense.values.shape == (2, 3, 4)
        except BaseException as exc:  # collected for the main thread
            failures.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not failures


def test_a_body_beyond_the_pooled_size_is_read():
    array = np.random.default_rng(0).uniform(-1, 1, (8, 96, 96, 3))
    raw = json.dumps({"instances": array.tolist()}).encode()
    assert len(raw) > 4 << 20
    dense = DenseReader().read(raw)
    np.testing.assert_array_equal(dense.values, array)
