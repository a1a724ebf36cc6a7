"""Reading a REST request body within ``--max_request_bytes``, shared by the /v1 and /v2 routes.

The limit applies to the decompressed body, so a small gzip bomb is refused as
surely as a large plain body. A body that outgrows the limit is refused while it
arrives, before it is held whole.
"""

from __future__ import annotations

import zlib

from starlette.requests import Request

from serving.errors import InvalidArgument, PayloadTooLarge

# Bodies up to this size are decoded on the event loop (an image as JSON floats fits
# well within it, and its parse is short); larger ones in a worker thread, so one huge
# body cannot stall every other client for the seconds its parse takes.
DECODE_ON_LOOP_BYTES = 1 << 20

# Content-Encoding -> zlib window bits. HTTP's "deflate" is the zlib format, as tritonclient sends it.
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


async def read_body(request: Request, limit: int, encodings: tuple[str, ...] = ("gzip", "deflate")) -> bytes:
    """``request``'s body, decompressed, at most ``limit`` bytes after decompression.

    ``encodings`` are the Content-Encodings accepted besides identity (TF Serving's
    /v1 takes gzip only; the V2 routes also take deflate, which tritonclient sends).
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"Request body of {declared} bytes exceeds the limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"Request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    raw = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    return decompress(raw, request.headers.get("content-encoding", ""), limit, encodings)


def decompress(raw: bytes, encoding: str, limit: int, encodings: tuple[str, ...]) -> bytes:
    """``raw`` decoded by its Content-Encoding (one of ``encodings``), at most ``limit`` bytes."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return raw
    if encoding not in encodings or encoding not in _WBITS:
        raise InvalidArgument(f"Unsupported Content-Encoding: {encoding}")
    inflater = zlib.decompressobj(wbits=_WBITS[encoding])
    try:
        out = inflater.decompress(raw, limit + 1)
    except zlib.error as exc:
        raise InvalidArgument(f"Request body is not valid {encoding}: {exc}") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise PayloadTooLarge(f"Decompressed request body exceeds the limit of {limit} bytes")
    if not inflater.eof:
        raise InvalidArgument(f"Request body is truncated {encoding}")
    return out
