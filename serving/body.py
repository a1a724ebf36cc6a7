"""Reading a REST request body within ``--max_request_bytes``, shared by the /v1 and /v2 routes.

The limit applies to the decompressed body, so a small gzip bomb is refused as
surely as a large plain body.
"""

from __future__ import annotations

import zlib

from flask import request

from serving.errors import InvalidArgument, PayloadTooLarge

# Content-Encoding -> zlib window bits. HTTP's "deflate" is the zlib format, as tritonclient sends it.
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def read_body(limit: int, encodings: tuple[str, ...] = ("gzip", "deflate")) -> bytes:
    """The current request's body, decompressed, at most ``limit`` bytes after decompression.

    ``encodings`` are the Content-Encodings accepted besides identity (TF Serving's
    /v1 takes gzip only; the V2 routes also take deflate, which tritonclient sends).
    """
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"Request body of {request.content_length} bytes exceeds the limit of {limit}")
    raw = request.stream.read(limit + 1)
    if len(raw) > limit:
        raise PayloadTooLarge(f"Request body exceeds the limit of {limit} bytes")
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
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
