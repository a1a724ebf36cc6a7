"""The bearer-token file that graft-serve (``--auth_token_file``) and graft-console share.

One token per line; blank lines and ``#`` comments are ignored. Several tokens
let a token be rotated without a window in which clients are refused. Kept free
of gRPC and HTTP so that both servers read the file by the same rules.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Iterable
from pathlib import Path

# RFC 6750's b64token: what fits in an HTTP header and gRPC metadata unchanged.
_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
MIN_TOKEN_CHARS = 16


def parse_tokens(text: str) -> tuple[str, ...]:
    """The tokens in a token file's text: one per line; blank lines and ``#`` comments ignored.

    Raises ``ValueError`` when there is none, or one is shorter than
    ``MIN_TOKEN_CHARS`` or has characters a bearer token cannot carry.
    """
    tokens = []
    for number, line in enumerate(text.splitlines(), 1):
        token = line.strip()
        if not token or token.startswith("#"):
            continue
        if not _TOKEN.fullmatch(token):
            raise ValueError(f"line {number}: a bearer token may hold only letters, digits and -._~+/ "
                             "(then '=' padding)")
        if len(token) < MIN_TOKEN_CHARS:
            raise ValueError(f"line {number}: token shorter than {MIN_TOKEN_CHARS} characters")
        tokens.append(token)
    if not tokens:
        raise ValueError("no token found")
    return tuple(tokens)


def read_token_file(path: str | Path) -> tuple[str, ...]:
    """The tokens in the file at ``path``; ``ValueError`` naming the flag and the file otherwise."""
    try:
        return parse_tokens(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"--auth_token_file {path}: cannot read it: {exc.strerror or exc}") from None
    except ValueError as exc:  # UnicodeDecodeError included
        raise ValueError(f"--auth_token_file {path}: {exc}") from None


def matches(presented: str, tokens: Iterable[str]) -> bool:
    """Whether ``presented`` is one of ``tokens``, compared in constant time against every one.

    No early exit, so the timing says nothing about which token matched or how much of it.
    """
    candidate = presented.encode("utf-8", "replace")
    matched = False
    for token in tokens:
        matched |= hmac.compare_digest(candidate, token.encode("ascii"))
    return matched
