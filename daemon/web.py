"""`horse-ledger serve`: a read-only web view of the ledger, its JSON endpoints, and Prometheus `/metrics`.

Stack: the standard library's ThreadingHTTPServer + Jinja2 (autoescaping) — no framework or ASGI server to
deploy for a loopback page of a few read-only views; charts are SVG drawn on the server (no JavaScript).

    horse-ledger serve                       # http://127.0.0.1:8770/  (loopback only by default)
    horse-ledger serve --host 0.0.0.0 --port 9000

Owns the HTTP side: routing `/PATH` to the HTML of a view in daemon/webviews.py and `/api/PATH` to the same
data as JSON, `/metrics`, `/static/style.css`, status codes and headers. Only GET and HEAD are answered
(405 otherwise). Everything from the ledger is escaped by Jinja2; the `show` filter also makes bidi and other
control characters visible (U+202E) so user text cannot reorder what is around it, and a strict
Content-Security-Policy forbids scripts. The store is opened without upgrading the schema: serving never
writes.
"""
from __future__ import annotations

import json
import logging
import re
import socket
import unicodedata
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import click
from jinja2 import Environment, FileSystemLoader
from markupsafe import Markup, escape

from daemon import webviews
from ledger.cli import AppContext
from ledger.config import Settings
from ledger.errors import LedgerError
from ledger.store import Store

log = logging.getLogger("daemon.web")

TEMPLATES = Path(__file__).resolve().parent / "templates"
DEFAULT_PORT = 8770
CSP = ("default-src 'none'; style-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'self'; "
       "frame-ancestors 'none'")
# Characters shown as a visible code instead of acting on the text: bidi controls, other format/control chars.
_INVISIBLE = re.compile(r"[\u0000-\u0008\u000b-\u001f\u007f-\u009f\u200b-\u200f\u202a-\u202e\u2060-\u2069"
                        r"\u061c\ufeff\ufff9-\ufffb]")


def show(value: Any) -> Markup:
    """Jinja filter for user text: escaped, in a <bdi> (isolated direction), control characters made visible."""
    if value is None or value == "":
        return Markup('<span class="none">–</span>')
    text = str(escape(str(value)))
    text = _INVISIBLE.sub(lambda m: f'<span class="ctl" title="{unicodedata.name(m.group(), "control")}">'
                                    f'U+{ord(m.group()):04X}</span>', text)
    return Markup(f"<bdi>{text}</bdi>")


def _num(value: Any, digits: int = 3) -> str:
    return "–" if not isinstance(value, (int, float)) or isinstance(value, bool) else f"{value:.{digits}f}"


def template_env() -> Environment:
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=True,
                      trim_blocks=True, lstrip_blocks=True)
    env.filters.update(show=show, num=_num)
    return env


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "text/html; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


class WebApp:
    """Turns (method, path, query) into a Response; the HTTP server and the tests call `handle`."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings, self.store = settings, store
        self.env = template_env()

    def handle(self, method: str, target: str) -> Response:
        parts = urlsplit(target)
        path, query = parts.path, parse_qs(parts.query, keep_blank_values=False)
        if method not in ("GET", "HEAD"):
            return self._error(405, f"{method} is not allowed: this view is read-only", api=path.startswith("/api/"),
                               headers={"Allow": "GET, HEAD"})
        if path == "/metrics":
            from daemon.metrics_export import render_metrics

            return Response(200, render_metrics(self.store), "text/plain; version=0.0.4; charset=utf-8")
        if path == "/static/style.css":
            return Response(200, (TEMPLATES / "style.css").read_bytes(), "text/css; charset=utf-8",
                            {"Cache-Control": "max-age=300"})
        api = path == "/api" or path.startswith("/api/")
        found = webviews.resolve(path[4:] if api else path)
        if found is None:
            return self._error(404, f"no page at {path}; start from / or /api/", api=api)
        view_fn, args = found
        try:
            view = view_fn(self.settings, self.store, query, *args)
        except webviews.BadRequest as exc:
            return self._error(400, str(exc), api=api)
        except LedgerError as exc:  # an id that does not exist
            return self._error(404, str(exc), api=api)
        if api:
            data = {k: v for k, v in view.data.items() if not k.startswith("_")}
            return Response(200, _json(data), "application/json")
        return Response(200, self._render(view.template, view.data, path=path))

    def _render(self, template: str, data: dict[str, Any], *, path: str) -> bytes:
        context = {"model": self.settings.model, **data, "path": path, "api_path": "/api" + path}
        return self.env.get_template(template).render(**context).encode()

    def _error(self, status: int, message: str, *, api: bool, headers: dict[str, str] | None = None) -> Response:
        if api:
            return Response(status, _json({"error": message, "status": status}), "application/json", headers or {})
        body = self._render("error.html", {"status": status, "message": message}, path="")
        return Response(status, body, headers=headers or {})


def _json(data: Any) -> bytes:
    # ensure_ascii: bidi and other control characters travel as \\u escapes, never raw
    return json.dumps(data, ensure_ascii=True, indent=1, default=str).encode()


def make_server(app: WebApp, host: str, port: int) -> ThreadingHTTPServer:
    """A threading HTTP server (bound, not yet serving) that answers every request with `app`."""

    class Handler(BaseHTTPRequestHandler):
        server_version = "horse-ledger"
        sys_version = ""

        def _answer(self, *, body: bool) -> None:
            try:
                resp = app.handle(self.command, self.path)
            except Exception:  # noqa: BLE001 - one failing request must not stop the server
                log.exception("request %s %s failed", self.command, self.path)
                resp = Response(500, b"internal error; see the server log", "text/plain; charset=utf-8")
            self.send_response(resp.status)
            headers = {"Content-Type": resp.content_type, "Content-Length": str(len(resp.body)),
                       "Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                       "Referrer-Policy": "no-referrer", "Cache-Control": "no-store", **resp.headers}
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            if body:
                self.wfile.write(resp.body)

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            self._answer(body=True)

        def do_HEAD(self) -> None:  # noqa: N802
            self._answer(body=False)

        def _refuse(self) -> None:
            self._answer(body=True)

        do_POST = do_PUT = do_DELETE = do_PATCH = _refuse  # noqa: N815 - answered 405 by WebApp

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
            log.debug("%s " + format, self.address_string(), *args)

    class Server(ThreadingHTTPServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        daemon_threads = True

    return Server((host, port), Handler)


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but loopback exposes the ledger to the network (no login).")
@click.option("--port", type=click.IntRange(0, 65535), default=DEFAULT_PORT, show_default=True,
              help="TCP port (0 = any free port).")
@click.pass_obj
def serve(app: AppContext, host: str, port: int) -> None:
    """Serve a read-only web view of the ledger, its JSON API and /metrics."""
    from migrations import head_revision

    store = app.store(upgrade=False)
    if store.current_revision() != head_revision():
        raise click.ClickException(f"the database {app.settings.db_url.split('@')[-1]} is not at the schema head "
                                   f"({store.current_revision() or 'empty'}); run `horse-ledger db upgrade` first")
    try:
        server = make_server(WebApp(app.settings, store), host, port)
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror or exc}; pass another --port "
                                   "or --host") from None
    bound_host, bound_port = server.server_address[:2]
    if not _is_loopback(host):
        click.echo(f"warning: listening on {host}: anyone who can reach it can read the ledger", err=True)
    click.echo(f"serving the ledger read-only on http://{bound_host}:{bound_port}/ (JSON under /api/, "
               "Prometheus on /metrics); Ctrl-C to stop", err=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
