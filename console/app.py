"""The console's Flask application: ``create_app(config)`` builds one, with its pages and actions.

Pages are server-rendered Jinja templates (autoescaped: lineage and history are
data, never HTML) and work without JavaScript. Model names and versions from a
URL are looked up in the repository's own listing before any path is built
(console.repository). The only writes are rollback and promote, through
training.promote, the code behind ``graft-train rollback`` and ``graft-train
promote``: its file lock, its atomic labels.json and its history line.
"""

from __future__ import annotations

import re
import secrets

from flask import (
    Flask,
    abort,
    current_app,
    render_template,
    request,
    send_file,
    session,
)
from werkzeug.exceptions import HTTPException

from console import guard
from console.config import ConsoleConfig
from console.live import SHADOW_FIELDS, Servers
from console.repository import (
    NotListed,
    Repository,
    diff,
    evaluations_of,
    promote_reports,
)
from graft import contract
from graft.tokens import read_token_file
from training import promote as promotion

# A label name the action forms accept: what fits in graft-serve's /labels/<label> URL and a JSON key.
LABEL_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# No script at all, styles and images from the console itself, no framing, forms back to it only.
CONTENT_SECURITY_POLICY = ("default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
                           "frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
}


def create_app(config: ConsoleConfig) -> Flask:
    """A console over ``config.repo`` and ``config.serve_urls``; reads the token file once, here.

    Raises ValueError when the token file cannot be read or holds no valid token.
    """
    tokens = read_token_file(config.auth_token_file) if config.auth_token_file else ()
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY=config.secret_key or secrets.token_bytes(32),
        SESSION_COOKIE_HTTPONLY=True,
        # Strict: a cross-site form post arrives without the session, so without its CSRF token.
        SESSION_COOKIE_SAMESITE="Strict",
        PERMANENT_SESSION_LIFETIME=3600,
        MAX_CONTENT_LENGTH=64 * 1024,
    )
    app.extensions["graft_console"] = Console(config, tokens)
    _register(app)
    return app


class Console:
    """What the views read: the config, the repository, the servers and the accepted tokens."""

    def __init__(self, config: ConsoleConfig, tokens: tuple[str, ...]):
        self.config = config
        self.tokens = tokens
        self.repository = Repository(config.repo)
        # graft-serve asks for the same token on /v1/models; the first one of the shared file is sent.
        self.servers = Servers(config.serve_urls, timeout_s=config.serve_timeout_s,
                               token=tokens[0] if tokens else None)

    @property
    def actions(self) -> bool:
        """Whether actions are offered (a token file was given)."""
        return bool(self.tokens)

    @property
    def can_promote(self) -> bool:
        """Whether the promote action is offered: actions, and held-out data for its gate."""
        return self.actions and self.config.eval_data is not None


def _console() -> Console:
    """The console of the application handling this request (kept on the app, not in a module global)."""
    return current_app.extensions["graft_console"]


def _register(app: Flask) -> None:
    # "/models//etc" is not found, rather than redirected to a path nobody asked for.
    app.url_map.merge_slashes = False
    app.add_url_rule("/", "index", index)
    app.add_url_rule("/healthz", "healthz", healthz)
    app.add_url_rule("/models/<name>", "model", model)
    app.add_url_rule("/models/<name>/versions/<version>", "version", version)
    app.add_url_rule("/models/<name>/versions/<version>/report/<image>", "report_image", report_image)
    app.add_url_rule("/models/<name>/history", "history", history)
    app.add_url_rule("/models/<name>/rollback", "rollback", rollback, methods=["POST"])
    app.add_url_rule("/models/<name>/promote", "promote", promote, methods=["POST"])
    app.register_error_handler(NotListed, _not_listed)
    app.register_error_handler(guard.Refused, _refused)
    app.register_error_handler(HTTPException, _http_error)
    app.after_request(_security_headers)
    app.context_processor(_template_globals)


def _template_globals() -> dict:
    console = _console()
    return {"actions": console.actions, "can_promote": console.can_promote,
            "csrf_token": lambda: guard.csrf_token(session), "csrf_field": guard.CSRF_FIELD,
            "token_field": guard.TOKEN_FIELD}


def _security_headers(response):
    for header, value in SECURITY_HEADERS.items():
        response.headers.setdefault(header, value)
    if request.endpoint != "report_image":
        # Pages show live state and labels that move: never serve a stale one.
        response.headers.setdefault("Cache-Control", "no-store")
    return response


def _not_listed(error: NotListed):
    return render_template("error.html", code=404, title="Not found", message=str(error)), 404


def _refused(error: guard.Refused):
    return render_template("error.html", code=403, title="Refused", message=str(error)), 403


def _http_error(error: HTTPException):
    return (render_template("error.html", code=error.code, title=error.name, message=error.description),
            error.code)


# -- pages -------------------------------------------------------------------------------

def healthz():
    """Liveness: the process answers (the repository and the servers are the pages' business)."""
    return "ok\n", 200, {"Content-Type": "text/plain; charset=utf-8"}


def _served(servers: list[dict], name: str) -> list[dict]:
    """Per server: up or down, this model's versions with their states, labels, rates."""
    rows = []
    for state in servers:
        entry = state["models"].get(name)
        rows.append({
            "url": state["url"], "up": state["up"], "error": state["error"], "listed": entry is not None,
            "versions": [(status.get("version"), status.get("state"))
                         for status in (entry or {}).get("model_version_status", [])],
            "labels": (entry or {}).get("labels", {}),
            "counts": state["counts"].get(name), "rates": state["rates"].get(name),
        })
    return rows


def index():
    """The models: labels, versions, and what each server serves with its request and error rates."""
    console = _console()
    servers = console.servers.read_all()
    models = []
    for name in console.repository.model_names():
        labels, problem = console.repository.labels(name)
        models.append({"name": name, "labels": labels, "labels_problem": problem,
                       "versions": console.repository.versions(name), "served": _served(servers, name)})
    return render_template("index.html", models=models, servers=servers)


def model(name: str):
    """One model: labels, versions with their training summary, live state, shadow figures, actions."""
    console = _console()
    repository = console.repository
    labels, problem = repository.labels(name)
    versions = []
    for number in sorted(repository.versions(name), reverse=True):
        lineage, lineage_problem = repository.lineage(name, number)
        versions.append({"number": number, "labels": sorted(k for k, v in labels.items() if v == number),
                         "summary": contract.training_summary(lineage) if lineage else None,
                         "problem": lineage_problem})
    servers = console.servers.read_all()
    shadows = []
    for state in servers:
        shadow = console.servers.shadow(state["url"], name) if state["up"] else None
        shadows.append({"url": state["url"], "shadow": shadow})
    return render_template("model.html", name=name, labels=labels, labels_problem=problem, versions=versions,
                           served=_served(servers, name), shadows=shadows, shadow_fields=SHADOW_FIELDS,
                           history=list(reversed(repository.history(name)[-5:])))


def version(name: str, version: str):
    """One version: lineage, signatures, the run's report with its images, held-out evaluations."""
    repository = _console().repository
    directory = repository.version_dir(name, version)
    number = int(directory.name)
    lineage, lineage_problem = repository.lineage(name, number)
    signatures, signatures_problem = repository.signatures(name, number)
    report, images = repository.report(name, number)
    labels, _ = repository.labels(name)
    evaluations = evaluations_of(promote_reports(_console().config.report_dir, name), number)
    moves = [entry for entry in repository.history(name) if number in (entry.get("from"), entry.get("to"))]
    return render_template("version.html", name=name, number=number, lineage=lineage,
                           lineage_problem=lineage_problem, signatures=signatures,
                           signatures_problem=signatures_problem, report=report, images=images,
                           class_names=repository.class_names(name, number),
                           labels=sorted(k for k, v in labels.items() if v == number),
                           evaluations=evaluations, moves=moves)


def report_image(name: str, version: str, image: str):
    """A report PNG carried by the version (only the names console.repository lists)."""
    path = _console().repository.report_image(name, version, image)
    return send_file(path, mimetype="image/png", max_age=300)


def history(name: str):
    """Labels and the label history as a table; ``?a=V&b=W`` adds the two versions' lineage side by side."""
    repository = _console().repository
    labels, problem = repository.labels(name)
    entries = list(reversed(repository.history(name)))
    versions = repository.versions(name)
    left, right = request.args.get("a"), request.args.get("b")
    comparison = None
    if left is None and right is None and len(versions) >= 2:
        left, right = str(versions[-2]), str(versions[-1])
    if left is not None and right is not None:
        a, _ = repository.lineage(name, left)
        b, _ = repository.lineage(name, right)
        comparison = {"a": int(left), "b": int(right), "rows": diff(a, b)}
    return render_template("history.html", name=name, labels=labels, labels_problem=problem, entries=entries,
                           versions=versions, comparison=comparison)


# -- actions -----------------------------------------------------------------------------

def _label_from_form() -> str:
    label = request.form.get("label", "")
    if not LABEL_PATTERN.fullmatch(label):
        abort(400, description="a label is 1 to 64 letters, digits, '_', '.' or '-', starting with a letter or digit")
    return label


def _guard_action(name: str) -> Console:
    console = _console()
    guard.check_action(console.tokens, session, request.form, request.headers.get("Authorization"))
    console.repository.model_dir(name)  # NotListed (404) before anything is locked or written
    return console


def rollback(name: str):
    """Move a label back to its previous version: training.promote.rollback, lock and atomic write included."""
    console = _guard_action(name)
    label = _label_from_form()
    result = promotion.rollback(console.config.repo, name, label=label, lock_timeout=console.config.lock_timeout_s)
    status = 200 if result["decision"] == "rolled_back" else 409
    return render_template("result.html", name=name, action="rollback", result=result), status


def promote(name: str):
    """Gate a version against the one under a label and move the label if it passes (training.promote)."""
    console = _guard_action(name)
    if not console.can_promote:
        raise guard.Refused("promotion needs held-out data: start the console with --eval_data")
    label = _label_from_form()
    number = console.repository.version_dir(name, request.form.get("version", "")).name
    result = promotion.promote(console.config.repo, name, int(number), console.config.eval_data, label=label,
                               gate=promotion.Gate(), lock_timeout=console.config.lock_timeout_s)
    status = 409 if result["decision"] == "error" else 200
    return render_template("result.html", name=name, action="promote", result=result), status
