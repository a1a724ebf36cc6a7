"""The console's settings: one frozen value, built by the command line or by a test."""

from __future__ import annotations

import dataclasses
from pathlib import Path

DEFAULT_PORT = 8502
# A serve URL that does not answer within this many seconds shows as down; the page still renders.
DEFAULT_SERVE_TIMEOUT_S = 2.0
# How long a form's CSRF token stays valid: an operator may read a page for a while before acting.
CSRF_MAX_AGE_S = 3600


@dataclasses.dataclass(frozen=True)
class ConsoleConfig:
    """What one console serves.

    ``repo``: the folder holding the models' base paths (``<repo>/<model>/<version>``).
    ``serve_urls``: graft-serve REST endpoints read for live state.
    ``auth_token_file``: graft-serve's token file; without it the console is read-only.
    ``eval_data``: held-out image folders (one per class) that the promote action's gate
    evaluates on; without it only rollback is offered.
    ``report_dir``: a folder of ``graft-train promote --report`` JSON files to show.
    ``secret_key``: signs the session cookie that holds the CSRF token; random per process when empty.
    """

    repo: Path
    serve_urls: tuple[str, ...] = ()
    auth_token_file: Path | None = None
    eval_data: Path | None = None
    report_dir: Path | None = None
    serve_timeout_s: float = DEFAULT_SERVE_TIMEOUT_S
    secret_key: bytes = b""
    lock_timeout_s: float = 30.0

    def __post_init__(self):
        object.__setattr__(self, "repo", Path(self.repo))
        object.__setattr__(self, "serve_urls", tuple(url.rstrip("/") for url in self.serve_urls))
        for url in self.serve_urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"--serve_url {url!r} must start with http:// or https://")
        if not self.serve_timeout_s > 0:
            raise ValueError(f"serve_timeout_s must be positive, got {self.serve_timeout_s}")
