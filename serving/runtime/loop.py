"""Event loops for the protocol adapters: which kind to make, and how blocking calls leave them.

Both servers run on an asyncio loop of their own thread: gRPC under ``grpc.aio``,
REST under uvicorn. A request that waits for its batch costs no thread there,
and a finished batch wakes its requests with one call into the loop.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any, Callable

EVENT_LOOPS = ("auto", "uvloop", "asyncio")


def new_event_loop(kind: str = "auto", flag: str = "--grpc_event_loop") -> asyncio.AbstractEventLoop:
    """A fresh event loop of ``kind``: "uvloop", "asyncio", or "auto" (uvloop when installed).

    uvloop's loop costs less per call than asyncio's: on 2 cores, gRPC Predict at
    C=32 used 6% less server CPU per image (docs/benchmarks.md). Raises
    ``ValueError`` naming ``flag`` for an unknown kind, or "uvloop" where it is not
    installed (it has no Windows build).
    """
    if kind not in EVENT_LOOPS:
        raise ValueError(f"{flag} must be one of {', '.join(EVENT_LOOPS)}, got {kind!r}")
    if kind != "asyncio":
        try:
            # uvloop is optional (absent on Windows): asyncio's loop is the fallback.
            import uvloop
        except ImportError:
            if kind == "uvloop":
                raise ValueError(f"{flag} uvloop: uvloop is not installed "
                                 "(pip install uvloop; not available on Windows)") from None
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def loop_kind(loop: asyncio.AbstractEventLoop) -> str:
    """"uvloop" or "asyncio": the kind of ``loop``, as the startup logs name it."""
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


async def run_blocking(function: Callable, *args: Any) -> Any:
    """Run a blocking service call in the loop's worker threads (its default executor), not on the loop."""
    return await asyncio.get_running_loop().run_in_executor(None, functools.partial(function, *args))
