"""A small Django app, in one file, that tells Koala who signed up, who logged in and what they did.

    python examples/django_app/app.py          # a scripted tour, then serve on 127.0.0.1:8002
    python examples/django_app/app.py --tour   # only the tour
    KOALA_PUBLIC_KEY=pk_... python examples/django_app/app.py   # send for real

Without ``KOALA_PUBLIC_KEY`` the client runs in dry-run mode: nothing leaves the machine,
each batch it would send is logged (logger ``koala_middleware``, INFO) and the last ones
are shown on the page. Users live in memory, the session in a signed cookie (no database);
this is a demo, not an auth system. In a real project the settings below are your
``settings.py`` and the views your apps' ``views.py``.
"""

from __future__ import annotations

import logging
import os
import secrets
import sys

import django
from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.wsgi import get_wsgi_application
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template import engines
from django.urls import path

from koala_middleware import KoalaClient, current_tracker

# Show the client's INFO lines (in dry-run mode, each batch it would send), also under gunicorn.
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
client = KoalaClient()  # dry run unless KOALA_PUBLIC_KEY is set

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

settings.configure(
    DEBUG=False,
    SECRET_KEY=os.environ.get("SECRET_KEY") or secrets.token_hex(16),
    ALLOWED_HOSTS=["127.0.0.1", "localhost", "testserver"],
    ROOT_URLCONF=__name__,
    INSTALLED_APPS=["koala_middleware"],  # for {% load koala %}
    SESSION_ENGINE="django.contrib.sessions.backends.signed_cookies",
    TEMPLATES=[{"BACKEND": "django.template.backends.django.DjangoTemplates"}],
    MIDDLEWARE=[
        "django.middleware.security.SecurityMiddleware",
        "koala_middleware.django.KoalaMiddleware",  # after SecurityMiddleware, before the rest
        "django.contrib.sessions.middleware.SessionMiddleware",
        "django.middleware.common.CommonMiddleware",
        "django.middleware.csrf.CsrfViewMiddleware",
    ],
    # Or {"exclude_paths": [...]} alone: a client is then made from KOALA_PUBLIC_KEY.
    KOALA={"client": client, "exclude_paths": ["/static", "/favicon.ico"], **PIXEL},
)
django.setup()


FREE_MAIL = {"gmail.com", "outlook.com", "yahoo.com", "hotmail.com", "icloud.com", "proton.me"}

PAGE = engines["django"].from_string("""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Koala Django example</title>
<style>body{font:15px system-ui;max-width:52rem;margin:2rem auto;padding:0 1rem}
form{display:inline-block;margin:.3rem 1rem .3rem 0}pre{background:#f4f4f4;padding:.6rem;overflow:auto}
.error{color:#b00}</style></head><body>
<h1>Acme Analytics <small>(a Koala example)</small></h1>
<p>Your visitor id (<code>ko_id</code> cookie): <code>{{ koala.profile_id|default:"not tracked" }}</code></p>
{% if error %}<p class="error">{{ error }}</p>{% endif %}
{% if user %}
  <p>Signed in as <b>{{ user.name }}</b> &lt;{{ user.email }}&gt;, company {{ user.domain|default:"(none)" }}.</p>
  <form method="post" action="/projects">{% csrf_token %}
    <input name="name" placeholder="Project name" required> <button>Create project</button></form>
  <form method="post" action="/invite">{% csrf_token %}
    <input name="email" type="email" placeholder="teammate@company.com" required> <button>Invite</button></form>
  <form method="post" action="/upgrade">{% csrf_token %}
    <select name="plan"><option>team</option><option>enterprise</option></select>
    <input name="seats" type="number" value="5" min="1" max="1000"> <button>Upgrade plan</button></form>
  <form method="post" action="/logout">{% csrf_token %}<button>Log out</button></form>
{% else %}
  <form method="post" action="/signup">{% csrf_token %}<h3>Sign up</h3>
    <input name="name" placeholder="Your name" required> <input name="email" type="email" placeholder="you@company.com" required>
    <button>Sign up</button></form>
  <form method="post" action="/login">{% csrf_token %}<h3>Log in</h3>
    <input name="email" type="email" placeholder="you@company.com" required> <button>Log in</button></form>
{% endif %}
<h2>What Koala receives</h2>
{% if client.dry_run %}
  <p>Dry-run mode (no <code>KOALA_PUBLIC_KEY</code>): the last batches it would have sent, newest first
  (from every visitor of this demo):</p>
  {% for batch in batches %}<pre>{{ batch }}</pre>{% empty %}<p>Nothing yet: sign up or do something.</p>{% endfor %}
{% else %}
  <p>Sending to {{ client.api_url }}: {{ client.stats }}</p>
{% endif %}
{% load koala %}{% koala_pixel %}
</body></html>""")

users: dict[str, dict[str, str]] = {}  # email -> name, email, company domain


def page(request: HttpRequest, error: str | None = None, status: int = 200) -> HttpResponse:
    koala_client = settings.KOALA["client"]
    batches = [koala_client.describe(b) for b in reversed(list(koala_client.dry_run_batches)[-5:])]
    context = {
        "koala": request.koala,  # type: ignore[attr-defined]
        "user": signed_in(request),
        "error": error,
        "client": koala_client,
        "batches": batches,
    }
    return HttpResponse(PAGE.render(context, request), status=status)


def company_domain(email: str) -> str:
    domain = email.rpartition("@")[2].lower()
    return "" if domain in FREE_MAIL else domain


def signed_in(request: HttpRequest) -> dict[str, str] | None:
    return users.get(request.session.get("email", ""))  # Koala already ties this ko_id to the email


def home(request: HttpRequest) -> HttpResponse:
    return page(request)


def signup(request: HttpRequest) -> HttpResponse:
    name, email = request.POST.get("name", "").strip(), request.POST.get("email", "").strip().lower()
    try:  # form input is the visitor's: a bad email is their mistake, not a crash
        request.koala.identify(email, {"name": name})  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        return page(request, "Please enter a valid email address.", 400)
    domain = company_domain(email)
    users[email] = {"name": name or email, "email": email, "domain": domain}
    request.session["email"] = email
    request.koala.track("Signed Up", {"plan": "trial", "source": "signup form"})  # type: ignore[attr-defined]
    if domain:
        request.koala.account(domain, {"plan": "trial", "signed_up_by": email})  # type: ignore[attr-defined]
    return HttpResponseRedirect("/")


def login(request: HttpRequest) -> HttpResponse:
    email = request.POST.get("email", "").strip().lower()
    if email not in users:
        return page(request, "No account with that email: sign up first.", 400)
    request.session["email"] = email
    request.koala.identify(email)  # type: ignore[attr-defined]
    request.koala.track("Logged In")  # type: ignore[attr-defined]
    return HttpResponseRedirect("/")


def logout(request: HttpRequest) -> HttpResponse:
    request.koala.track("Logged Out")  # type: ignore[attr-defined]
    request.session.flush()
    return HttpResponseRedirect("/")


def create_project(request: HttpRequest) -> HttpResponse:
    if signed_in(request) is None:
        return page(request, "Log in first.", 403)
    request.koala.track("Created Project", {"name": request.POST.get("name", "")[:100]})  # type: ignore[attr-defined]
    return HttpResponseRedirect("/")


def invite(request: HttpRequest) -> HttpResponse:
    user = signed_in(request)
    if user is None:
        return page(request, "Log in first.", 403)
    invitee_domain = company_domain(request.POST.get("email", "").strip())
    same_company = bool(invitee_domain) and invitee_domain == user["domain"]
    request.koala.track("Invited Teammate", {"same_company": same_company})  # type: ignore[attr-defined]
    return HttpResponseRedirect("/")


async def upgrade(request: HttpRequest) -> HttpResponse:
    """An async view: the middleware runs on the event loop with it under ASGI, and
    ``current_tracker()`` reaches the same tracker from code that has no request at hand."""
    user = await sync_to_async(signed_in)(request)  # sessions may need the database: not on the loop
    if user is None:
        return HttpResponse("Log in first.", status=403)
    plan = "enterprise" if request.POST.get("plan") == "enterprise" else "team"
    given = request.POST.get("seats", "")
    seats = max(1, min(1000, int(given))) if given.isascii() and given.isdecimal() else 1
    record_upgrade(user, plan, seats)
    return HttpResponseRedirect("/")


def record_upgrade(user: dict[str, str], plan: str, seats: int) -> None:
    koala = current_tracker()
    if koala is None:  # called outside a request (a script, a job): nothing to record
        return
    koala.track("Upgraded Plan", {"plan": plan, "seats": seats})
    if user["domain"]:  # account traits: what the company now has
        account = koala.account(user["domain"], {"plan": plan, "seats": seats})
        account.track("Plan Changed", {"plan": plan})


urlpatterns = [
    path("", home),
    path("signup", signup),
    path("login", login),
    path("logout", logout),
    path("projects", create_project),
    path("invite", invite),
    path("upgrade", upgrade),
]


def tour() -> None:
    """Drive the app with Django's test client and print each batch Koala would receive."""
    from django.test import Client, override_settings

    quiet = logging.getLogger("koala_middleware")  # the tour prints batches itself
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    tour_client = KoalaClient(dry_run=True)  # the tour never sends, even with a key set
    try:
        with override_settings(KOALA={"client": tour_client, **PIXEL}):
            _tour(
                Client(
                    HTTP_USER_AGENT="Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) Safari/605.1.15",
                    REMOTE_ADDR="203.0.113.50",
                ),
                tour_client,
            )
    finally:
        quiet.setLevel(level)


def _tour(browser: object, tour_client: KoalaClient) -> None:
    steps = [
        ("A new visitor opens the home page", "get", "/", None),
        ("They sign up", "post", "/signup", {"name": "Ada Lovelace", "email": "ada@acme-robotics.com"}),
        ("They create a project", "post", "/projects", {"name": "Q3 pipeline"}),
        ("They invite a teammate", "post", "/invite", {"email": "charles@acme-robotics.com"}),
        (
            "They upgrade the company's plan (an async view; account traits)",
            "post",
            "/upgrade",
            {"plan": "team", "seats": "12"},
        ),
        ("They log out", "post", "/logout", None),
        ("They log back in", "post", "/login", {"email": "ada@acme-robotics.com"}),
    ]
    print("Koala Django example: a scripted tour (dry run, nothing is sent)\n")
    seen = 0
    for number, (title, method, url, form) in enumerate(steps, 1):
        response = getattr(browser, method)(url, form or {})  # the test client closes it: handed over
        print(f"== {number}. {title}")
        morsel = response.cookies.get("ko_id")
        new_id = f"; new visitor, Set-Cookie: ko_id={morsel.value}" if morsel is not None else ""
        print(f"   {method.upper()} {url} -> {response.status_code}{new_id}")
        batches = list(tour_client.dry_run_batches)[seen:]
        seen += len(batches)
        if not batches:
            print("   (nothing recorded, so no batch)")
        for batch in batches:
            print("   " + tour_client.describe(batch).replace("\n", "\n   "))
        print()
    print(f"{seen} batches in all: each request's records, per person and per account, after its response.\n")


def main(argv: list[str]) -> int:
    tour()
    if "--tour" in argv:
        return 0
    from django.core.management import call_command

    port = os.environ.get("PORT", "8002")
    mode = "dry run: batches are logged, not sent" if client.dry_run else "sending to Koala"
    print(f"Serving on http://127.0.0.1:{port} ({mode}); Ctrl-C to stop", flush=True)
    call_command("runserver", f"127.0.0.1:{port}", use_reloader=False)
    return 0


# gunicorn app:application (WSGI), or for ASGI: koala_middleware.django.get_asgi_application()
application = get_wsgi_application()

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
