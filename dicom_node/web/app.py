"""The web application: routes, login, CSRF, actions. Starlette + Jinja2; served by `server.py`.

Who may see what:
- `/healthz` and `/login` are open; everything else needs a user of `mcnode user add`.
- A browser logs in with a form and gets a session cookie (Starlette's SessionMiddleware: signed with
  itsdangerous under a key derived from the site key, HttpOnly, SameSite=Strict, Secure over HTTPS,
  expiring after `web.session_hours`). Every page and API also accepts HTTP Basic with the same users.
- An action (POST) from a session must carry the session's CSRF token; one with Basic credentials
  must not come from another site (Origin / Sec-Fetch-Site), since browsers replay cached Basic
  credentials on their own.
- Pages show the patient ID and plan label (re-identified); logs carry user names and job ids only.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from anonymizer.keys import derive_key
from anonymizer.vault import Vault
from dicom_node.errors import JournalError
from dicom_node.intake.jobrecord import JobState
from dicom_node.intake.journal import Job, Journal
from dicom_node.settings import Settings, read_site_key
from dicom_node.web import metrics, views
from dicom_node.web.pictures import cached_dose_png
from dicom_node.web.users import UserStore

LOGGER = logging.getLogger(__name__)
HERE = Path(__file__).resolve().parent
STATES = tuple(s.value for s in JobState)
SESSION_COOKIE = "mcnode_session"
REALM = 'Basic realm="mcnode", charset="UTF-8"'
PAGE_CSP = ("default-src 'self'; img-src 'self' data:; frame-src 'self'; object-src 'none'; "
            "base-uri 'none'; form-action 'self'; frame-ancestors 'self'")

Handler = Callable[[Request], Awaitable[Response]]


@dataclass
class WebContext:
    """What the pages read and the actions act on. pipeline/outbox are None when the node does not compute."""

    settings: Settings
    journal: Journal
    users: UserStore
    identities: views.Identities
    pipeline: Any = None
    outbox: Any = None
    https: bool = False


def session_secret(site_key: bytes) -> str:
    """The cookie-signing key: derived from the site key, so logins survive a restart and nothing new is stored."""
    return derive_key(site_key, b"mcnode web session v1").hex()


def _basic(request: Request) -> tuple[str, str] | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic" or not value:
        return None
    try:
        name, sep, password = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return ("", "")
    return (name, password) if sep else ("", "")


def _wants_html(request: Request) -> bool:
    return request.method == "GET" and "text/html" in request.headers.get("accept", "")


class Site:
    def __init__(self, ctx: WebContext) -> None:
        self.ctx = ctx
        env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(default=True))
        self.templates = Jinja2Templates(env=env)
        self.registry = metrics.registry_for(ctx.settings.node.data_dir)

    # --- who is asking ------------------------------------------------------------------

    async def user(self, request: Request) -> tuple[str | None, str]:
        """(user name or None, how: 'session' | 'basic' | 'none' | 'bad-basic')."""
        creds = _basic(request)
        if creds is not None:
            name, password = creds
            ok = bool(name) and await run_in_threadpool(self.ctx.users.verify, name, password)
            return (name, "basic") if ok else (None, "bad-basic")
        session_user = request.session.get("user")
        if session_user and await run_in_threadpool(self.ctx.users.exists, str(session_user)):
            return str(session_user), "session"
        if session_user:
            request.session.clear()  # the user was removed
        return None, "none"

    def _refuse(self, request: Request, how: str) -> Response:
        if how != "bad-basic" and _wants_html(request):
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse(f"/login?next={quote(target)}", status_code=303)
        return PlainTextResponse("authentication required\n", status_code=401, headers={"WWW-Authenticate": REALM})

    def page(self, handler: Callable[[Request, str], Awaitable[Response]]) -> Handler:
        async def wrapped(request: Request) -> Response:
            name, how = await self.user(request)
            if name is None:
                return self._refuse(request, how)
            request.state.how = how
            return await handler(request, name)

        return wrapped

    def action(self, handler: Callable[[Request, str], Awaitable[Response]]) -> Handler:
        """A POST: authenticated, and CSRF-checked (token for sessions, same origin for Basic)."""
        async def wrapped(request: Request) -> Response:
            name, how = await self.user(request)
            if name is None:
                return self._refuse(request, how)
            if how == "session":
                form = await request.form()
                sent = str(form.get("csrf", "")) or request.headers.get("x-csrf-token", "")
                expected = str(request.session.get("csrf", ""))
                if not expected or not hmac.compare_digest(sent.encode(), expected.encode()):
                    LOGGER.warning("web: %s %s refused for user %s: bad CSRF token", request.method,
                                   request.url.path, name)
                    return PlainTextResponse("bad or missing CSRF token\n", status_code=403)
            elif not self._same_origin(request):
                LOGGER.warning("web: cross-site %s %s with Basic credentials of %s refused", request.method,
                               request.url.path, name)
                return PlainTextResponse("cross-site request refused\n", status_code=403)
            request.state.how = how
            return await handler(request, name)

        return wrapped

    @staticmethod
    def _same_origin(request: Request) -> bool:
        site = request.headers.get("sec-fetch-site")
        if site is not None and site not in ("same-origin", "none"):
            return False
        origin = request.headers.get("origin")
        if origin:
            own = f"{request.url.scheme}://{request.url.netloc}"
            return origin == own
        return True

    def csrf(self, request: Request) -> str:
        token = request.session.get("csrf")
        if not token:
            token = request.session["csrf"] = secrets.token_urlsafe(32)
        return str(token)

    def render(self, request: Request, template: str, status: int = 200, **context: Any) -> Response:
        context.setdefault("user", None)
        context.update(csrf=self.csrf(request), states=STATES)
        response = self.templates.TemplateResponse(request, template, context, status_code=status)
        response.headers["Content-Security-Policy"] = PAGE_CSP
        response.headers["Cache-Control"] = "no-store"
        return response

    # --- open --------------------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        try:
            await run_in_threadpool(self.ctx.journal.list_jobs)
        except JournalError:
            return JSONResponse({"status": "journal unreadable"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def login_form(self, request: Request) -> Response:
        return self.render(request, "login.html", next=_safe_next(request.query_params.get("next")), error=None)

    async def login(self, request: Request) -> Response:
        form = await request.form()
        nxt = _safe_next(str(form.get("next", "")))
        expected = str(request.session.get("csrf", ""))
        if not expected or not hmac.compare_digest(str(form.get("csrf", "")).encode(), expected.encode()):
            return PlainTextResponse("bad or missing CSRF token; reload the login page\n", status_code=403)
        name, password = str(form.get("username", "")), str(form.get("password", ""))
        if not await run_in_threadpool(self.ctx.users.verify, name, password):
            LOGGER.warning("web: failed login for user name %r from %s", name[:64],
                           request.client.host if request.client else "?")
            return self.render(request, "login.html", status=401, next=nxt, error="wrong user name or password")
        request.session.clear()
        request.session.update(user=name, csrf=secrets.token_urlsafe(32))
        LOGGER.info("web: user %s logged in", name)
        return RedirectResponse(nxt, status_code=303)

    # --- pages ---------------------------------------------------------------------------

    def _filters(self, request: Request) -> dict[str, str]:
        q = request.query_params
        state = q.get("state", "")
        return {"state": state if state in STATES else "", "from": q.get("from", ""), "to": q.get("to", "")}

    async def jobs_page(self, request: Request, user: str) -> Response:
        f = self._filters(request)
        rows = await run_in_threadpool(views.job_rows, self.ctx.journal, self.ctx.identities, f["state"] or None,
                                       f["from"], f["to"])
        return self.render(request, "jobs.html", user=user, rows=rows, filters=f,
                           refresh_ms=int(self.ctx.settings.web.refresh_seconds * 1000))

    async def jobs_rows(self, request: Request, user: str) -> Response:
        f = self._filters(request)
        rows = await run_in_threadpool(views.job_rows, self.ctx.journal, self.ctx.identities, f["state"] or None,
                                       f["from"], f["to"])
        return self.render(request, "_rows.html", user=user, rows=rows)

    async def _job(self, request: Request) -> dict[str, Any] | None:
        try:
            return await run_in_threadpool(views.job_detail, self.ctx.settings, self.ctx.journal,
                                           self.ctx.identities, request.path_params["job"])
        except JournalError:
            return None

    def _journal_job(self, job_id: str) -> Job | None:
        """The journal's record of a job (None when there is no such job): for files, not for the page."""
        try:
            return self.ctx.journal.job(job_id)
        except JournalError:
            return None

    def _job_dose(self, request: Request) -> tuple[Job, str] | Response:
        """The job of the request's path and its RT Dose file, or the 404 that says which is missing."""
        job = self._journal_job(request.path_params["job"])
        if job is None:
            return PlainTextResponse("no such job\n", status_code=404)
        dose = job.data.rtdose
        if not dose or not Path(dose).is_file():
            return PlainTextResponse("this job has no RT Dose yet\n", status_code=404)
        return job, dose

    async def job_page(self, request: Request, user: str) -> Response:
        job = await self._job(request)
        if job is None:
            return self.render(request, "missing.html", status=404, user=user)
        return self.render(request, "job.html", user=user, job=job, message=request.query_params.get("done", ""))

    async def dose_png(self, request: Request, user: str) -> Response:
        found = self._job_dose(request)
        if isinstance(found, Response):
            return found
        job, dose = found
        png = await run_in_threadpool(cached_dose_png, self.ctx.settings.node.data_dir / "jobs" / job.id,
                                      list(job.data.ct), dose, job.data.structure_set, job.data.plan or None)
        return FileResponse(png, media_type="image/png", headers={"Cache-Control": "no-store"})

    async def report_file(self, request: Request, user: str) -> Response:
        job_id, kind = request.path_params["job"], request.path_params["kind"]
        job = self._journal_job(job_id)
        if job is None:
            return PlainTextResponse("no such job\n", status_code=404)
        report = job.data.report
        path = None if report is None else (report.pdf if kind == "pdf" else report.html)
        if not path or not Path(path).is_file():
            return PlainTextResponse("this job has no second-check report\n", status_code=404)
        media = "application/pdf" if kind == "pdf" else "text/html; charset=utf-8"
        return FileResponse(path, media_type=media, headers={"Cache-Control": "no-store"})

    async def download_dose(self, request: Request, user: str) -> Response:
        found = self._job_dose(request)
        if isinstance(found, Response):
            return found
        job, dose = found
        LOGGER.info("web: user %s downloaded the RT Dose of job %s", user, job.id)
        return FileResponse(dose, media_type="application/dicom", filename=f"RD_{job.id}.dcm",
                            headers={"Cache-Control": "no-store"})

    # --- API -------------------------------------------------------------------------------

    async def api_jobs(self, request: Request, user: str) -> Response:
        # Exactly `mcnode jobs --json`: both print Journal.list_jobs().
        return JSONResponse(await run_in_threadpool(self.ctx.journal.list_jobs))

    async def metrics(self, request: Request, user: str) -> Response:
        body, content_type = await run_in_threadpool(metrics.exposition, self.registry)
        return Response(body, media_type=content_type)

    # --- actions -------------------------------------------------------------------------

    async def act(self, request: Request, user: str) -> Response:
        job_id, what = request.path_params["job"], request.path_params["action"]
        try:
            message = await run_in_threadpool(self._act, job_id, what, user)
            status = 200
        except JournalError as exc:
            message, status = str(exc), 409
        if "application/json" in request.headers.get("accept", "") or request.state.how == "basic":
            return JSONResponse({"job": job_id, "action": what, "result": message}, status_code=status)
        return RedirectResponse(f"/jobs/{quote(job_id)}?done={quote(message)}", status_code=303)

    def _act(self, job_id: str, what: str, user: str) -> str:
        journal = self.ctx.journal
        job = journal.job(job_id)
        if what == "retry":
            job = journal.retry(job_id)
            LOGGER.info("web: user %s retried job %s (now %s)", user, job.id, job.state)
            if self.ctx.pipeline is not None and job.state in (JobState.READY, JobState.SEALED, JobState.RUNNING):
                self.ctx.pipeline.submit(job)
            return f"retried: the job is {job.state} again"
        if what == "cancel":
            job = journal.cancel(job.id, user)  # as `mcnode cancel`
            LOGGER.info("web: user %s cancelled job %s", user, job.id)
            if self.ctx.pipeline is not None:
                self.ctx.pipeline.cancel(job.id)
            return "cancelled"
        if what == "resend":
            if job.state not in views.CAN_RESEND or not job.data.rtdose:
                raise JournalError(f"job {job.id} is {job.state}: there is no dose to send")
            if self.ctx.outbox is None:
                raise JournalError("this node does not send doses (no outbox)")
            self.ctx.outbox.resend(job)
            LOGGER.info("web: user %s asked to send the RT Dose of job %s again", user, job.id)
            return "the RT Dose is queued for the TPS"
        raise JournalError(f"unknown action {what}")

    async def logout(self, request: Request, user: str) -> Response:
        request.session.clear()
        LOGGER.info("web: user %s logged out", user)
        return RedirectResponse("/login", status_code=303)


def _safe_next(target: str | None) -> str:
    """Only a path on this site (no scheme, no host, no '//'), else the jobs page."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/jobs"
    parts = urlsplit(target)
    return target if not parts.scheme and not parts.netloc else "/jobs"


async def _security_headers(request: Request, call_next: Any) -> Response:
    response: Response = await call_next(request)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("X-Frame-Options", "SAMEORIGIN")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    return response


def build_context(settings: Settings, journal: Journal, pipeline: Any = None, outbox: Any = None,
                  https: bool = False) -> WebContext:
    vault = Vault(settings.node.data_dir / "vault", read_site_key(settings))
    return WebContext(settings=settings, journal=journal, users=UserStore.in_dir(settings.node.data_dir),
                      identities=views.Identities(vault, journal), pipeline=pipeline, outbox=outbox, https=https)


def create_app(ctx: WebContext) -> Starlette:
    from starlette.middleware.base import BaseHTTPMiddleware

    site = Site(ctx)
    routes = [
        Route("/healthz", site.healthz),
        Route("/login", site.login_form, methods=["GET"]),
        Route("/login", site.login, methods=["POST"]),
        Route("/logout", site.action(site.logout), methods=["POST"]),
        Route("/", site.page(lambda request, user: _redirect_jobs())),
        Route("/jobs", site.page(site.jobs_page)),
        Route("/jobs/rows", site.page(site.jobs_rows)),
        Route("/jobs/{job}", site.page(site.job_page)),
        Route("/jobs/{job}/dose.png", site.page(site.dose_png)),
        Route("/jobs/{job}/report.{kind:str}", site.page(site.report_file)),
        Route("/jobs/{job}/rtdose", site.page(site.download_dose)),
        Route("/jobs/{job}/{action:str}", site.action(site.act), methods=["POST"]),
        Route("/api/jobs", site.page(site.api_jobs)),
        Route("/metrics", site.page(site.metrics)),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    middleware = [
        Middleware(SessionMiddleware, secret_key=session_secret(read_site_key(ctx.settings)),
                   session_cookie=SESSION_COOKIE, max_age=int(ctx.settings.web.session_hours * 3600),
                   same_site="strict", https_only=ctx.https),
        Middleware(BaseHTTPMiddleware, dispatch=_security_headers),
    ]
    app = Starlette(routes=routes, middleware=middleware)
    app.state.site = site
    return app


async def _redirect_jobs() -> Response:
    return RedirectResponse("/jobs", status_code=303)
