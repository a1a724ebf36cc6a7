"""Who may act: the bearer token (graft-serve's token file) and a CSRF token on every form.

Without a token file the console is read-only: action forms are not shown and
every POST is refused (403). With one, an action needs one of its tokens, typed
into the form (or sent as ``Authorization: Bearer``), and the form's CSRF token,
which must equal the one kept in the signed session cookie (the synchronizer
token pattern): a page on another site can neither read the form's token nor
set the cookie, so it cannot make a signed-in browser act.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Mapping

from graft.tokens import matches

CSRF_FIELD = "csrf_token"
TOKEN_FIELD = "token"
SESSION_KEY = "csrf"


class Refused(PermissionError):
    """An action the console does not perform: read-only, no token, a wrong token or a bad CSRF token."""


def csrf_token(session: dict) -> str:
    """The session's CSRF token, created on first use."""
    token = session.get(SESSION_KEY)
    if not isinstance(token, str) or not token:
        token = secrets.token_urlsafe(32)
        session[SESSION_KEY] = token
    return token


def check_csrf(session: Mapping, form: Mapping) -> None:
    """Refused unless the form carries the session's CSRF token."""
    expected = session.get(SESSION_KEY)
    presented = form.get(CSRF_FIELD, "")
    if not isinstance(expected, str) or not expected or not isinstance(presented, str) or not presented:
        raise Refused("missing CSRF token: reload the page and submit its form again")
    if not hmac.compare_digest(expected.encode(), presented.encode()):
        raise Refused("invalid CSRF token: reload the page and submit its form again")


def bearer(form: Mapping, authorization: str | None) -> str:
    """The token an action presents: the form's field, else an ``Authorization: Bearer`` header."""
    typed = form.get(TOKEN_FIELD, "")
    if isinstance(typed, str) and typed.strip():
        return typed.strip()
    scheme, _, value = (authorization or "").strip().partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""


def check_action(tokens: tuple[str, ...], session: Mapping, form: Mapping, authorization: str | None) -> None:
    """Refused unless the console takes actions, the bearer token is one of ``tokens`` and the CSRF token matches."""
    if not tokens:
        raise Refused("this console is read-only: start it with --auth_token_file to allow actions")
    presented = bearer(form, authorization)
    if not presented:
        raise Refused("this action needs the bearer token")
    if not matches(presented, tokens):
        raise Refused("invalid bearer token")
    check_csrf(session, form)
