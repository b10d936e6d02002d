"""A small FastAPI app that tells Koala who signed up, who logged in and what they did.

    python examples/fastapi_app/app.py          # a scripted tour, then serve on 127.0.0.1:8001
    python examples/fastapi_app/app.py --tour   # only the tour
    KOALA_PUBLIC_KEY=pk_... python examples/fastapi_app/app.py   # send for real

Without ``KOALA_PUBLIC_KEY`` the client runs in dry-run mode: nothing leaves the machine,
each batch it would send is logged (logger ``koala_middleware``, INFO) and the last ones are
shown on the page. Users and sessions live in memory; this is a demo, not an auth system.
It needs only FastAPI (and uvicorn to serve): forms are read without python-multipart.
"""

from __future__ import annotations

import html
import logging
import os
import secrets
import sys
import warnings
from dataclasses import dataclass
from typing import Annotated
from urllib.parse import parse_qsl

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse

from koala_middleware import KoalaClient, Tracker, current_tracker, pixel_snippet
from koala_middleware.fastapi import KoalaASGIMiddleware, KoalaTracker

# Koala's browser pixel, served by this app itself under /_k (docs/pixel.md), so ad blockers
# that know Koala's domains do not stop it. KOALA_PIXEL_API_URL / KOALA_PIXEL_CDN_URL point it
# at other upstreams (the browser test's stand-ins); by default, Koala's.
PIXEL: dict[str, str] = {"pixel_path": "/_k"}
PIXEL.update(
    {
        o: os.environ[f"KOALA_{o.upper()}"]
        for o in ("pixel_api_url", "pixel_cdn_url")
        if os.environ.get(f"KOALA_{o.upper()}")
    }
)
FREE_MAIL = {"gmail.com", "outlook.com", "yahoo.com", "hotmail.com", "icloud.com", "proton.me"}
SESSION_COOKIE = "session"


@dataclass
class User:
    name: str
    email: str
    domain: str  # the company's domain, "" for free-mail addresses


def company_domain(email: str) -> str:
    domain = email.rpartition("@")[2].lower()
    return "" if domain in FREE_MAIL else domain


def record_upgrade(user: User, plan: str, seats: int) -> None:
    """Business code far from the request: ``current_tracker()`` finds the visitor's tracker,
    here from a plain ``def`` handler that FastAPI runs in its thread pool."""
    koala = current_tracker()
    if koala is None:  # called outside a request (a script, a job): nothing to record
        return
    koala.track("Upgraded Plan", {"plan": plan, "seats": seats})
    if user.domain:  # account traits: what the company now has
        account = koala.account(user.domain, {"plan": plan, "seats": seats})
        account.track("Plan Changed", {"plan": plan})


class Accounts:
    """The demo's users and sessions, in memory (one per app)."""

    def __init__(self) -> None:
        self.users: dict[str, User] = {}  # email -> user
        self.sessions: dict[str, str] = {}  # session token -> email

    def sign_in(self, email: str) -> str:
        token = secrets.token_urlsafe(16)
        self.sessions[token] = email
        return token


async def form_fields(request: Request) -> dict[str, str]:
    """The posted form (application/x-www-form-urlencoded), first value of each field."""
    body = (await request.body()).decode("utf-8", "replace")
    fields: dict[str, str] = {}
    for name, value in parse_qsl(body, max_num_fields=20):
        fields.setdefault(name, value.strip())
    return fields


async def accounts(request: Request) -> Accounts:
    return request.app.state.accounts  # type: ignore[no-any-return]


async def signed_in(request: Request, known: Annotated[Accounts, Depends(accounts)]) -> User | None:
    return known.users.get(known.sessions.get(request.cookies.get(SESSION_COOKIE, ""), ""))


async def require_user(user: Annotated[User | None, Depends(signed_in)]) -> User:
    if user is None:
        raise HTTPException(403, "Log in first.")
    return user


# Dependencies are coroutines: FastAPI runs plain `def` ones in its thread pool.
Form = Annotated[dict[str, str], Depends(form_fields)]
Known = Annotated[Accounts, Depends(accounts)]
CurrentUser = Annotated[User | None, Depends(signed_in)]
SignedInUser = Annotated[User, Depends(require_user)]


def create_app(client: KoalaClient) -> FastAPI:
    app = FastAPI(title="Koala FastAPI example")
    app.add_middleware(KoalaASGIMiddleware, client=client, exclude_paths=["/healthz", "/favicon.ico"], **PIXEL)
    app.state.koala_client = client
    app.state.accounts = Accounts()

    def home_redirect(session: str | None = None) -> RedirectResponse:
        response = RedirectResponse("/", status_code=303)
        if session == "":
            response.delete_cookie(SESSION_COOKIE)
        elif session is not None:
            response.set_cookie(SESSION_COOKIE, session, httponly=True, samesite="lax")
        return response

    def page(koala: Tracker, user: User | None, error: str = "", status: int = 200) -> HTMLResponse:
        return HTMLResponse(render(client, koala, user, error), status)

    @app.get("/", response_class=HTMLResponse)
    async def home(koala: KoalaTracker, user: CurrentUser) -> HTMLResponse:
        return page(koala, user)

    @app.post("/signup")
    async def signup(koala: KoalaTracker, form: Form, known: Known) -> Response:
        name, email = form.get("name", ""), form.get("email", "").lower()
        try:  # form input is the visitor's: a bad email is their mistake, not a crash
            koala.identify(email, {"name": name})
        except (TypeError, ValueError):
            return page(koala, None, "Please enter a valid email address.", 400)
        user = known.users[email] = User(name or email, email, company_domain(email))
        koala.track("Signed Up", {"plan": "trial", "source": "signup form"})
        if user.domain:
            koala.account(user.domain, {"plan": "trial", "signed_up_by": email})
        return home_redirect(known.sign_in(email))

    @app.post("/login")
    async def login(koala: KoalaTracker, form: Form, known: Known) -> Response:
        email = form.get("email", "").lower()
        if email not in known.users:
            return page(koala, None, "No account with that email: sign up first.", 400)
        koala.identify(email)
        koala.track("Logged In")
        return home_redirect(known.sign_in(email))

    @app.post("/logout")
    async def logout(request: Request, known: Known) -> RedirectResponse:
        request.state.koala.track("Logged Out")  # the same tracker, without the dependency
        known.sessions.pop(request.cookies.get(SESSION_COOKIE, ""), None)
        return home_redirect("")

    @app.post("/projects")
    async def create_project(koala: KoalaTracker, user: SignedInUser, form: Form) -> RedirectResponse:
        koala.track("Created Project", {"name": form.get("name", "")[:100]})
        return home_redirect()

    @app.post("/invite")
    async def invite(koala: KoalaTracker, user: SignedInUser, form: Form) -> RedirectResponse:
        invitee_domain = company_domain(form.get("email", ""))
        koala.track("Invited Teammate", {"same_company": bool(invitee_domain) and invitee_domain == user.domain})
        return home_redirect()

    @app.post("/upgrade")
    def upgrade(user: SignedInUser, form: Form) -> RedirectResponse:  # sync: runs in the thread pool
        plan = "enterprise" if form.get("plan") == "enterprise" else "team"
        given = form.get("seats", "")
        seats = max(1, min(1000, int(given))) if given.isascii() and given.isdecimal() else 1
        record_upgrade(user, plan, seats)
        return home_redirect()

    @app.get("/healthz", response_class=PlainTextResponse)
    async def healthz() -> str:
        return "ok"  # excluded: no cookie, and its tracker records nothing

    return app


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Koala FastAPI example</title>
<style>body{{font:15px system-ui;max-width:52rem;margin:2rem auto;padding:0 1rem}}
form{{display:inline-block;margin:.3rem 1rem .3rem 0}}pre{{background:#f4f4f4;padding:.6rem;overflow:auto}}
.error{{color:#b00}}</style></head><body>
<h1>Acme Analytics <small>(a Koala FastAPI example)</small></h1>
<p>Your visitor id (<code>ko_id</code> cookie): <code>{visitor}</code></p>
{error}{forms}
<h2>What Koala receives</h2>
{koala}
{pixel}
</body></html>"""

SIGNED_IN = """<p>Signed in as <b>{name}</b> &lt;{email}&gt;, company {domain}.</p>
<form method="post" action="/projects"><input name="name" placeholder="Project name" required>
  <button>Create project</button></form>
<form method="post" action="/invite"><input name="email" type="email" placeholder="teammate@company.com" required>
  <button>Invite</button></form>
<form method="post" action="/upgrade"><select name="plan"><option>team</option><option>enterprise</option></select>
  <input name="seats" type="number" value="5" min="1" max="1000"> <button>Upgrade plan</button></form>
<form method="post" action="/logout"><button>Log out</button></form>"""

SIGNED_OUT = """<form method="post" action="/signup"><h3>Sign up</h3>
  <input name="name" placeholder="Your name" required> <input name="email" type="email" placeholder="you@company.com" required>
  <button>Sign up</button></form>
<form method="post" action="/login"><h3>Log in</h3>
  <input name="email" type="email" placeholder="you@company.com" required> <button>Log in</button></form>"""


def render(client: KoalaClient, koala: Tracker, user: User | None, error: str) -> str:
    esc = html.escape
    if user is None:
        forms = SIGNED_OUT
    else:
        forms = SIGNED_IN.format(name=esc(user.name), email=esc(user.email), domain=esc(user.domain or "(none)"))
    if client.dry_run:
        shown = [f"<pre>{esc(client.describe(b))}</pre>" for b in reversed(list(client.dry_run_batches)[-5:])]
        koala_part = (
            "<p>Dry-run mode (no <code>KOALA_PUBLIC_KEY</code>): the last batches it would have sent, "
            "newest first (from every visitor of this demo):</p>"
            + ("".join(shown) or "<p>Nothing yet: sign up or do something.</p>")
        )
    else:
        koala_part = f"<p>Sending to {esc(client.api_url)}: {esc(str(client.stats))}</p>"
    return PAGE.format(
        visitor=esc(koala.profile_id or "not tracked"),
        error=f'<p class="error">{esc(error)}</p>' if error else "",
        forms=forms,
        koala=koala_part,
        # Koala's pixel through this app's /_k (without a key, dry run: nothing to load).
        pixel=pixel_snippet(client.public_key, PIXEL["pixel_path"]) if client.public_key else "",
    )


def tour(client: KoalaClient) -> None:
    """Drive the app with Starlette's TestClient and print each batch Koala would receive."""
    with warnings.catch_warnings():  # recent Starlette asks for httpx2 instead of httpx
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient

    # The tour prints batches itself: no INFO lines from the client or from httpx meanwhile.
    quiet = [logging.getLogger(name) for name in ("koala_middleware", "httpx")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.WARNING)
    steps = [
        ("A new visitor opens the home page", "GET", "/", None),
        ("They sign up", "POST", "/signup", {"name": "Ada Lovelace", "email": "ada@acme-robotics.com"}),
        ("They create a project", "POST", "/projects", {"name": "Q3 pipeline"}),
        ("They invite a teammate", "POST", "/invite", {"email": "charles@acme-robotics.com"}),
        (
            "They upgrade the company's plan (account traits, from a sync handler)",
            "POST",
            "/upgrade",
            {"plan": "team", "seats": "12"},
        ),
        ("They log out", "POST", "/logout", None),
        ("They log back in", "POST", "/login", {"email": "ada@acme-robotics.com"}),
    ]
    headers = {"User-Agent": "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) Safari/605.1.15"}
    print("Koala FastAPI example: a scripted tour (dry run, nothing is sent)\n")
    seen = 0
    try:
        # client=: the visitor's address as the server sees it (TestClient's default is not an IP).
        with TestClient(create_app(client), headers=headers, client=("203.0.113.50", 50000)) as browser:
            for number, (title, method, path, form) in enumerate(steps, 1):
                response = browser.request(method, path, data=form, follow_redirects=False)
                print(f"== {number}. {title}")
                new_id = [c.split(";")[0] for c in response.headers.get_list("set-cookie") if c.startswith("ko_id=")]
                line = f"   {method} {path} -> {response.status_code}"
                print(line + (f"; new visitor, Set-Cookie: {new_id[0]}" if new_id else ""))
                batches = list(client.dry_run_batches)[seen:]
                seen += len(batches)
                if not batches:
                    print("   (nothing recorded, so no batch)")
                for batch in batches:
                    print("   " + client.describe(batch).replace("\n", "\n   "))
                print()
    finally:
        for logger, level in zip(quiet, levels, strict=True):
            logger.setLevel(level)
    print(f"{seen} batches in all: each request's records, per person and per account, after its response.\n")


def main(argv: list[str]) -> int:
    # In dry-run mode the tour records with the served app's client, so its batches are on
    # the page; with a key set it uses a dry-run client of its own: the tour never sends.
    tour(client if client.dry_run else KoalaClient(dry_run=True))
    if "--tour" in argv:
        return 0
    try:
        import uvicorn
    except ImportError:
        print("Serving needs uvicorn: pip install uvicorn (or run with --tour)", file=sys.stderr)
        return 1
    port = int(os.environ.get("PORT", "8001"))  # 8001: it can run beside the Flask example (8000)
    mode = "dry run: batches are logged, not sent" if client.dry_run else "sending to Koala"
    print(f"Serving on http://127.0.0.1:{port} ({mode}); Ctrl-C to stop", flush=True)
    # Behind a proxy, add proxy_headers=True, forwarded_allow_ips="<proxy address>": the visitor's
    # address (how Koala matches the company) is then the real one.
    uvicorn.run(app, host="127.0.0.1", port=port)
    return 0


# Show the client's INFO lines (in dry-run mode, each batch it would send), also under `uvicorn app:app`.
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
client = KoalaClient()  # dry run unless KOALA_PUBLIC_KEY is set
app = create_app(client)

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
