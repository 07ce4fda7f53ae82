"""`character review --run DIR`: a small web app (Starlette + uvicorn, Jinja2 pages, no JavaScript) where a
researcher goes through a run trait by trait and marks what is wrong; the marks go to `<run>/review/`
(character/review/marks.py), which the stages honour on a rerun.

Access: bound to 127.0.0.1 by default. Bound elsewhere, the printed URL carries a random token, and a request
from a non-loopback client without it (query `token=` once, then a cookie) is refused with 403, as is one
from a loopback client that names another host (DNS rebinding). Every form post carries the token whatever
the client (a page elsewhere cannot post marks through the reviewer's browser).
"""
from __future__ import annotations

import getpass
import hmac
import ipaddress
import math
import secrets
import time
from pathlib import Path
from urllib.parse import urlencode

import jinja2
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse
from starlette.routing import Route

from character.core.store import StageOutput
from character.review import marks as review
from character.review.data import PAGE, TRAITS_PAGE, RunView, page_of

COOKIE = "character_review_token"
TEMPLATES = Path(__file__).parent / "templates"


def is_loopback(host: str | None) -> bool:
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


def is_local_name(host_header: str) -> bool:
    """Whether a Host header names this machine through loopback: localhost, 127.x.x.x or [::1], any port."""
    name = host_header.rsplit(":", 1)[0] if not host_header.endswith("]") else host_header
    name = name.strip("[]").lower()
    return name == "localhost" or is_loopback(name)


def _num(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _interval(stat: dict | None, digits: int = 3) -> str:
    """`0.620 [0.410, 0.800]` from an evalstats interval (mean or p, lo, hi)."""
    if not stat:
        return "–"
    centre = stat.get("mean", stat.get("p"))
    if stat.get("lo") is None or (isinstance(stat.get("lo"), float) and math.isnan(stat["lo"])):
        return _num(centre, digits)
    return f"{_num(centre, digits)} [{_num(stat['lo'], digits)}, {_num(stat['hi'], digits)}]"


def _safe_next(target: str | None) -> str:
    """A redirect target on this server only (no open redirect)."""
    return target if target and target.startswith("/") and not target.startswith("//") else "/"


class ReviewPages:
    """The app's state (the run's view, the template environment, the token, the reviewer) and its handlers."""

    def __init__(self, run_dir: str, reviewer: str | None, token: str | None):
        started = time.perf_counter()
        self.view = RunView(run_dir)
        self.load_seconds = time.perf_counter() - started
        self.run_dir, self.token = run_dir, token or secrets.token_urlsafe(16)
        self.reviewer = reviewer or getpass.getuser()
        self.env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                                      undefined=jinja2.StrictUndefined)
        self.env.filters.update(num=_num, interval=_interval)

    def page(self, request: Request, template: str, **context) -> HTMLResponse:
        def link(**changes) -> str:
            params = {**dict(request.query_params), **{k: v for k, v in changes.items()}}
            params = {k: v for k, v in params.items() if v not in ("", None, False) and k != "token"}
            return request.url.path + ("?" + urlencode(params) if params else "")

        html = self.env.get_template(template).render(
            run_dir=self.run_dir, token=self.token, reviewer=self.reviewer, here=link(), link=link,
            marks=self.view.marks, params=request.query_params, **context)
        return HTMLResponse(html)

    async def index(self, request: Request):
        q, verdict = request.query_params.get("q", ""), request.query_params.get("verdict", "")
        rows = self.view.trait_rows(q, verdict)
        shown, number, pages = page_of(rows, _int_param(request, "page"), TRAITS_PAGE)
        return self.page(request, "index.html", traits=shown, total=len(rows), all_traits=len(self.view.traits),
                         page_number=number, pages=pages, q=q, verdict=verdict, load_seconds=self.load_seconds)

    def _trait_rows(self, name: str, p) -> tuple[str, list]:
        """The rows of a trait page's tab (messages, pairs, answers, set_aside) under its filters."""
        tab = p.get("tab", "messages")
        if tab == "pairs":
            return tab, self.view.pairs_of(name, disagree=p.get("disagree") == "1", flagged=p.get("flagged") == "1",
                                           sort=p.get("sort", ""))
        if tab == "answers":
            return tab, self.view.answers_of(name, split=p.get("split", "held_out"), sort=p.get("sort", ""))
        if tab == "set_aside":
            return tab, self.view.set_aside_by_rank(name)
        return "messages", self.view.messages_of(name, split=p.get("split", ""), kind=p.get("kind", ""),
                                                 status=p.get("status", "kept"))

    async def trait(self, request: Request):
        name, view = request.path_params["name"], self.view
        if view.trait(name) is None:
            return PlainTextResponse(f"no trait '{name}' in {self.run_dir}", status_code=404)
        tab, rows = self._trait_rows(name, request.query_params)
        shown, number, pages = page_of(rows, _int_param(request, "page"), PAGE)
        prev_name, next_name = view.neighbours(name)
        counts = {"messages": view.messages.count(name), "pairs": view.pairs.count(name),
                  "answers": len({r["message_id"] for r in view.eval.rows(name)}),
                  "set_aside": view.rank_rejected.count(name)}
        return self.page(request, "trait.html", trait=view.trait(name), tab=tab, rows=shown, total=len(rows),
                         page_number=number, pages=pages, prev_name=prev_name, next_name=next_name,
                         numbers=view.numbers(name), counts=counts, kinds=view.kinds(name),
                         verdict=view.marks.verdicts.get(name), has_pm_scores=bool(view.pm_scores))

    async def message(self, request: Request):
        msg = self.view.message(request.path_params["message_id"])
        if msg is None:
            return PlainTextResponse("no such message in this run", status_code=404)
        return self.page(request, "message.html", m=msg, trait=self.view.trait(msg["trait"]))

    async def posted(self, request: Request):
        form = await request.form()
        if not hmac.compare_digest(str(form.get("token", "")), self.token):
            return None, PlainTextResponse("403: form without this server's token", status_code=403)
        return form, None

    async def set_verdict(self, request: Request):
        form, refused = await self.posted(request)
        if refused:
            return refused
        name = str(form.get("trait", ""))
        if self.view.trait(name) is None or form.get("verdict") not in review.VERDICT_CHOICES:
            return PlainTextResponse("a verdict needs a trait of this run and keep, rework or drop", status_code=400)
        review.save_verdict(self.run_dir, name, str(form["verdict"]), str(form.get("note", "")).strip(), self.reviewer)
        self.view.reload_marks()
        return RedirectResponse(_safe_next(form.get("next")), status_code=303)

    async def set_flag(self, request: Request):
        form, refused = await self.posted(request)
        if refused:
            return refused
        kind, target = str(form.get("kind", "")), str(form.get("target_id", ""))
        if form.get("action") == "clear":
            review.clear_flag(self.run_dir, kind, target, self.reviewer)
        else:
            try:
                review.add_flag(self.run_dir, kind, target, str(form.get("message_id", "")),
                                str(form.get("trait", "")), str(form.get("flag", "")),
                                str(form.get("note", "")).strip(), self.reviewer)
            except ValueError as exc:
                return PlainTextResponse(str(exc), status_code=400)
        self.view.reload_marks()
        return RedirectResponse(_safe_next(form.get("next")), status_code=303)


def _int_param(request: Request, name: str, default: int = 1) -> int:
    try:
        return int(request.query_params.get(name, default))
    except ValueError:
        return default


class TokenGuard(BaseHTTPMiddleware):
    """Refuses a request without the server's token, unless it comes from loopback and names a loopback host;
    a valid `token=` query sets the cookie."""

    def __init__(self, app, token: str):
        super().__init__(app)
        self.token = token

    async def dispatch(self, request, call_next):
        supplied = request.query_params.get("token") or request.cookies.get(COOKIE) or ""
        valid = hmac.compare_digest(supplied, self.token)
        loopback = is_loopback(request.client.host if request.client else None)
        # A loopback client without the token must also name a loopback host: a page served from another
        # name that resolves to 127.0.0.1 (DNS rebinding) cannot read the pages, nor the token in their forms.
        if not valid and not (loopback and is_local_name(request.headers.get("host", ""))):
            return PlainTextResponse("403: this review server needs its token (open the URL it printed)",
                                     status_code=403)
        response = await call_next(request)
        if request.query_params.get("token") and valid:
            response.set_cookie(COOKIE, self.token, httponly=True, samesite="strict")
        return response


def create_app(run_dir: str, reviewer: str | None = None, token: str | None = None) -> Starlette:
    pages = ReviewPages(run_dir, reviewer, token)
    routes = [Route("/", pages.index), Route("/trait/{name}", pages.trait), Route("/message/{message_id}", pages.message),
              Route("/verdict", pages.set_verdict, methods=["POST"]), Route("/flag", pages.set_flag, methods=["POST"])]
    app = Starlette(routes=routes, middleware=[Middleware(TokenGuard, token=pages.token)])
    app.state.token, app.state.view, app.state.load_seconds = pages.token, pages.view, pages.load_seconds
    return app


def serve(run_dir: str, host: str = "127.0.0.1", port: int = 8765, reviewer: str | None = None) -> None:
    import uvicorn

    app = create_app(run_dir, reviewer)
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/" + ("" if is_loopback(host) else f"?token={app.state.token}")
    view = app.state.view
    print(f"review: {len(view.traits)} traits of {run_dir} read in {app.state.load_seconds:.1f}s; marks go to "
          f"{StageOutput(run_dir, review.FOLDER).uri}\nreview: open {url}", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
