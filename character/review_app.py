"""`character review --run DIR`: a small web app (Starlette + uvicorn, Jinja2 pages, no JavaScript) where a
researcher goes through a run trait by trait and marks what is wrong; the marks go to `<run>/review/`
(character/review.py), which the stages honour on a rerun.

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

from character import review
from character.review_data import PAGE, TRAITS_PAGE, RunView, page_of
from character.store import StageOutput

COOKIE = "character_review_token"
TEMPLATES = Path(__file__).parent / "review_templates"


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


def create_app(run_dir: str, reviewer: str | None = None, token: str | None = None):
    import jinja2
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.base import BaseHTTPMiddleware
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse
    from starlette.routing import Route

    started = time.perf_counter()
    view = RunView(run_dir)
    load_seconds = time.perf_counter() - started
    token = token or secrets.token_urlsafe(16)
    reviewer = reviewer or getpass.getuser()
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             undefined=jinja2.StrictUndefined)
    env.filters.update(num=_num, interval=_interval)

    def page(request: Request, template: str, **context) -> HTMLResponse:
        def link(**changes) -> str:
            params = {**dict(request.query_params), **{k: v for k, v in changes.items()}}
            params = {k: v for k, v in params.items() if v not in ("", None, False) and k != "token"}
            return request.url.path + ("?" + urlencode(params) if params else "")

        html = env.get_template(template).render(
            run_dir=run_dir, token=token, reviewer=reviewer, here=link(), link=link, marks=view.marks,
            params=request.query_params, **context)
        return HTMLResponse(html)

    def int_param(request: Request, name: str, default: int = 1) -> int:
        try:
            return int(request.query_params.get(name, default))
        except ValueError:
            return default

    async def index(request: Request):
        q, verdict = request.query_params.get("q", ""), request.query_params.get("verdict", "")
        rows = view.trait_rows(q, verdict)
        shown, number, pages = page_of(rows, int_param(request, "page"), TRAITS_PAGE)
        return page(request, "index.html", traits=shown, total=len(rows), all_traits=len(view.traits),
                    page_number=number, pages=pages, q=q, verdict=verdict, load_seconds=load_seconds)

    async def trait(request: Request):
        name = request.path_params["name"]
        if view.trait(name) is None:
            return PlainTextResponse(f"no trait '{name}' in {run_dir}", status_code=404)
        p = request.query_params
        tab = p.get("tab", "messages")
        if tab == "pairs":
            rows = view.pairs_of(name, disagree=p.get("disagree") == "1", flagged=p.get("flagged") == "1",
                                 sort=p.get("sort", ""))
        elif tab == "answers":
            rows = view.answers_of(name, split=p.get("split", "held_out"), sort=p.get("sort", ""))
        elif tab == "set_aside":
            rows = view.set_aside_by_rank(name)
        else:
            tab = "messages"
            rows = view.messages_of(name, split=p.get("split", ""), kind=p.get("kind", ""),
                                    status=p.get("status", "kept"))
        shown, number, pages = page_of(rows, int_param(request, "page"), PAGE)
        prev_name, next_name = view.neighbours(name)
        counts = {"messages": view.messages.count(name), "pairs": view.pairs.count(name),
                  "answers": len({r["message_id"] for r in view.eval.rows(name)}),
                  "set_aside": view.rank_rejected.count(name)}
        return page(request, "trait.html", trait=view.trait(name), tab=tab, rows=shown, total=len(rows),
                    page_number=number, pages=pages, prev_name=prev_name, next_name=next_name,
                    numbers=view.numbers(name), counts=counts, kinds=view.kinds(name),
                    verdict=view.marks.verdicts.get(name), has_pm_scores=bool(view.pm_scores))

    async def message(request: Request):
        msg = view.message(request.path_params["message_id"])
        if msg is None:
            return PlainTextResponse("no such message in this run", status_code=404)
        return page(request, "message.html", m=msg, trait=view.trait(msg["trait"]))

    async def posted(request: Request):
        form = await request.form()
        if not hmac.compare_digest(str(form.get("token", "")), token):
            return None, PlainTextResponse("403: form without this server's token", status_code=403)
        return form, None

    async def set_verdict(request: Request):
        form, refused = await posted(request)
        if refused:
            return refused
        name = str(form.get("trait", ""))
        if view.trait(name) is None or form.get("verdict") not in review.VERDICT_CHOICES:
            return PlainTextResponse("a verdict needs a trait of this run and keep, rework or drop", status_code=400)
        review.save_verdict(run_dir, name, str(form["verdict"]), str(form.get("note", "")).strip(), reviewer)
        view.reload_marks()
        return RedirectResponse(_safe_next(form.get("next")), status_code=303)

    async def set_flag(request: Request):
        form, refused = await posted(request)
        if refused:
            return refused
        kind, target = str(form.get("kind", "")), str(form.get("target_id", ""))
        if form.get("action") == "clear":
            review.clear_flag(run_dir, kind, target, reviewer)
        else:
            try:
                review.add_flag(run_dir, kind, target, str(form.get("message_id", "")), str(form.get("trait", "")),
                                str(form.get("flag", "")), str(form.get("note", "")).strip(), reviewer)
            except ValueError as exc:
                return PlainTextResponse(str(exc), status_code=400)
        view.reload_marks()
        return RedirectResponse(_safe_next(form.get("next")), status_code=303)

    class TokenGuard(BaseHTTPMiddleware):
        async def dispatch(self, request, call_next):
            supplied = request.query_params.get("token") or request.cookies.get(COOKIE) or ""
            valid = hmac.compare_digest(supplied, token)
            loopback = is_loopback(request.client.host if request.client else None)
            # A loopback client without the token must also name a loopback host: a page served from another
            # name that resolves to 127.0.0.1 (DNS rebinding) cannot read the pages, nor the token in their forms.
            if not valid and not (loopback and is_local_name(request.headers.get("host", ""))):
                return PlainTextResponse("403: this review server needs its token (open the URL it printed)",
                                         status_code=403)
            response = await call_next(request)
            if request.query_params.get("token") and valid:
                response.set_cookie(COOKIE, token, httponly=True, samesite="strict")
            return response

    routes = [Route("/", index), Route("/trait/{name}", trait), Route("/message/{message_id}", message),
              Route("/verdict", set_verdict, methods=["POST"]), Route("/flag", set_flag, methods=["POST"])]
    app = Starlette(routes=routes, middleware=[Middleware(TokenGuard)])
    app.state.token, app.state.view, app.state.load_seconds = token, view, load_seconds
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
