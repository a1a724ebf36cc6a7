"""V2 JSON bodies read by serving.codecs.v2.JsonReader: the same requests and the same errors
as the general orjson path, without a Python float per number where it can.

The general path (``decode_request`` without a reader) is the reference: every body is
decoded both ways and the results, or the error messages, must be equal.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serving.codecs import v2
from serving.errors import InvalidArgument
from serving.rest.v2 import decode_request

IMAGE = np.random.default_rng(0).uniform(0, 255, (1, 4, 4, 3)).astype(np.float32)


def _tensor(name="x", datatype="FP32", shape=(2, 3), data=(1, 2.5, -3e-2, 4e3, 5, 6), **extra):
    return {"name": name, "datatype": datatype, "shape": list(shape), "data": data, **extra}


def _body(*tensors, **extra) -> bytes:
    return json.dumps({"inputs": list(tensors), **extra}).encode()


def _decoded(body: bytes, reader):
    try:
        request = decode_request(body, None, "m", "", reader)
    except InvalidArgument as err:
        return ("error", err.message)
    # Bytes, not lists, so that NaN equals NaN.
    inputs = [(t.name, t.datatype, t.array.dtype.str, t.array.shape,
               t.array.tolist() if t.array.dtype.kind == "O" else t.array.tobytes()) for t in request.inputs]
    return (request.id, inputs, [(o.name, dict(o.parameters)) for o in request.outputs], request.parameters)


def _same_both_ways(body: bytes):
    reader = v2.JsonReader()
    fast, general = _decoded(body, reader), _decoded(body, None)
    assert fast == general
    return fast


def _reads_densely(body: bytes) -> bool:
    parsed = v2.JsonReader().parse(body)
    return isinstance(parsed, dict) and any(isinstance(t.get("data"), np.ndarray) for t in parsed["inputs"])


@pytest.mark.parametrize("datatype", ["FP32", "FP64", "FP16"])
def test_flat_float_data_is_read_in_c(datatype):
    body = _body(_tensor("images", datatype, IMAGE.shape, IMAGE.reshape(-1).tolist()), id="r1",
                 outputs=[{"name": "y", "parameters": {"binary_data": False}}],
                 parameters={"signature_name": "serving_default"})
    assert _reads_densely(body)
    _, inputs, outputs, parameters = _same_both_ways(body)
    (name, _, dtype, shape, values), = inputs
    assert (name, shape, np.dtype(dtype)) == ("images", IMAGE.shape, v2.DATATYPES[datatype])
    assert values == IMAGE.astype(v2.DATATYPES[datatype]).tobytes()
    assert outputs == [("y", {"binary_data": False})] and parameters == {"signature_name": "serving_default"}


@pytest.mark.parametrize("body", [
    _body(_tensor(data=IMAGE.reshape(2, -1)[:, :3].tolist())),              # nested data
    _body(_tensor(), _tensor("tag", "BYTES", [2], ["a[0]", "b"])),         # a bracket inside a string
    _body(_tensor(parameters={"mask": [1, 0]})),                           # an array in parameters
    b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [NaN, Infinity]}]}',
    b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1], "data": [2]}]}',
    b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}], "inputs": []}',
])
def test_other_bodies_take_the_general_path(body):
    assert not _reads_densely(body)
    _same_both_ways(body)


@pytest.mark.parametrize("body", [
    _body(_tensor(data=[1, True, 3, 4, 5, 6])),
    _body(_tensor(data=[1, None, 3, 4, 5, 6])),
    _body(_tensor(data=[1, "2", 3, 4, 5, 6])),
    _body(_tensor(data=[1, 2, 3])),
    _body(_tensor(data=[[1, 2, 3], [4, 5]])),
    _body(_tensor(data=[1, [2, 3], 4, 5, 6])),
    _body(_tensor(data=[[1, 2], []])),
    _body(_tensor(data=[])),
    _body(_tensor(shape=[0], data=[])),
    _body(_tensor(datatype="INT32", data=[1, 2, 3, 4, 5, 2 ** 40])),
    _body(_tensor(datatype="FP99")),
    _body(_tensor(shape=[-1, 6])),
    _body(_tensor(data={"b64": "AA=="})),
    b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1e400]}]}',
    b'{"inputs": "x"}',
    b'[1, 2]',
    b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}], "outputs": {"name": "y"}}',
    b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}, 7]}',
    b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": 1}]}',
    b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}',
])
def test_odd_bodies_read_as_the_general_path_reads_them(body):
    # Errors keep the general path's message; what it accepts (true as 1.0, 1e400 as inf) stays accepted.
    _same_both_ways(body)


JSON_NUMBERS = st.one_of(st.integers(-2**53, 2**53), st.floats(allow_nan=False, allow_infinity=False, width=64))
JSON_LEAVES = st.one_of(JSON_NUMBERS, st.booleans(), st.none(), st.text(max_size=3))


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # both paths turn 1e300 into inf
@settings(max_examples=300, deadline=None, derandomize=True)
@given(datatype=st.sampled_from(["FP32", "FP64", "FP16", "INT64", "BYTES"]),
       data=st.one_of(st.lists(JSON_NUMBERS, max_size=12), st.lists(JSON_LEAVES, max_size=6),
                      st.lists(st.lists(JSON_NUMBERS, min_size=1, max_size=3), max_size=4)),
       shape=st.lists(st.integers(0, 12), max_size=2))
def test_any_body_reads_as_the_general_path_reads_it(datatype, data, shape):
    _same_both_ways(_body(_tensor(datatype=datatype, shape=shape, data=data)))
