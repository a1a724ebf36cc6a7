"""--grpc_event_loop: which loop the gRPC server runs on, and the refusals that name the flag.

A real server on each loop is driven in test_grpc_deadline (batched Predict and
its deadlines run on that loop); every other gRPC test runs on the default.
"""

from __future__ import annotations

import asyncio
import sys

import pytest

from serving.runtime.loop import new_event_loop
from serving.runtime.main import build_parser
import uvloop


def _is_asyncios_own(loop: asyncio.AbstractEventLoop) -> bool:
    # asyncio's loops derive from BaseEventLoop; uvloop's Loop does not.
    return isinstance(loop, asyncio.BaseEventLoop)


@pytest.mark.parametrize("kind, expected", [("auto", "uvloop"), ("uvloop", "uvloop"), ("asyncio", "asyncio")])
def test_each_kind_makes_its_loop_and_auto_prefers_uvloop(kind, expected):
    loop = new_event_loop(kind)
    try:
        assert isinstance(loop, uvloop.Loop) == (expected == "uvloop")
        assert _is_asyncios_own(loop) == (expected == "asyncio")
        assert loop.run_until_complete(asyncio.sleep(0, result=42)) == 42
    finally:
        loop.close()


def test_auto_falls_back_to_asyncio_without_uvloop_and_uvloop_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "uvloop", None)   # import uvloop now raises ImportError
    loop = new_event_loop("auto")
    try:
        assert _is_asyncios_own(loop)
    finally:
        loop.close()
    with pytest.raises(ValueError, match="^--grpc_event_loop uvloop: uvloop is not installed"):
        new_event_loop("uvloop")


def test_unknown_kind_is_refused_by_the_function_and_the_flag():
    with pytest.raises(ValueError, match="^--grpc_event_loop must be one of auto, uvloop, asyncio, got 'trio'"):
        new_event_loop("trio")
    parser = build_parser()
    assert parser.parse_args(["--model_base_path", "/m"]).grpc_event_loop == "auto"
    with pytest.raises(SystemExit):
        parser.parse_args(["--model_base_path", "/m", "--grpc_event_loop", "trio"])
