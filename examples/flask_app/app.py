"""A small Flask app that tells Koala who signed up, who logged in and what they did.

    python examples/flask_app/app.py          # a scripted tour, then serve on 127.0.0.1:8000
    python examples/flask_app/app.py --tour   # only the tour
    KOALA_PUBLIC_KEY=pk_... python examples/flask_app/app.py   # send for real

Without ``KOALA_PUBLIC_KEY`` the client runs in dry-run mode: nothing leaves the machine,
each batch it would send is logged (logger ``koala_middleware``, INFO) and the last ones
are shown on the page. Users live in memory; this is a demo, not an auth system.
"""

from __future__ import annotations

import logging
import os
import secrets
import sys

from flask import Flask, redirect, render_template_string, request, session, url_for
from werkzeug.wrappers import Response

from koala_middleware import KoalaClient
from koala_middleware.flask import Koala

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

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Koala Flask example</title>
<style>body{font:15px system-ui;max-width:52rem;margin:2rem auto;padding:0 1rem}
form{display:inline-block;margin:.3rem 1rem .3rem 0}pre{background:#f4f4f4;padding:.6rem;overflow:auto}
.error{color:#b00}</style></head><body>
<h1>Acme Analytics <small>(a Koala example)</small></h1>
<p>Your visitor id (<code>ko_id</code> cookie): <code>{{ request.koala.profile_id or "not tracked" }}</code></p>
{% if error %}<p class="error">{{ error }}</p>{% endif %}
{% if user %}
  <p>Signed in as <b>{{ user.name }}</b> &lt;{{ user.email }}&gt;, company {{ user.domain or "(none)" }}.</p>
  <form method="post" action="{{ url_for('create_project') }}">
    <input name="name" placeholder="Project name" required> <button>Create project</button></form>
  <form method="post" action="{{ url_for('invite') }}">
    <input name="email" type="email" placeholder="teammate@company.com" required> <button>Invite</button></form>
  <form method="post" action="{{ url_for('upgrade') }}">
    <select name="plan"><option>team</option><option>enterprise</option></select>
    <input name="seats" type="number" value="5" min="1" max="1000"> <button>Upgrade plan</button></form>
  <form method="post" action="{{ url_for('logout') }}"><button>Log out</button></form>
{% else %}
  <form method="post" action="{{ url_for('signup') }}"><h3>Sign up</h3>
    <input name="name" placeholder="Your name" required> <input name="email" type="email" placeholder="you@company.com" required>
    <button>Sign up</button></form>
  <form method="post" action="{{ url_for('login') }}"><h3>Log in</h3>
    <input name="email" type="email" placeholder="you@company.com" required> <button>Log in</button></form>
{% endif %}
<h2>What Koala receives</h2>
{% if client.dry_run %}
  <p>Dry-run mode (no <code>KOALA_PUBLIC_KEY</code>): the last batches it would have sent, newest first
  (from every visitor of this demo):</p>
  {% for batch in batches %}<pre>{{ batch }}</pre>{% else %}<p>Nothing yet: sign up or do something.</p>{% endfor %}
{% else %}
  <p>Sending to {{ client.api_url }}: {{ client.stats }}</p>
{% endif %}
{{ koala_pixel() }}
</body></html>"""


def create_app(client: KoalaClient) -> Flask:
    app = Flask(__name__)
    app.secret_key = os.environ.get("SECRET_KEY") or secrets.token_hex(16)
    Koala(app, client=client, exclude_paths=["/static", "/favicon.ico"], **PIXEL)
    users: dict[str, dict[str, str]] = {}  # email -> name, email, company domain

    def page(error: str | None = None, status: int = 200) -> tuple[str, int]:
        batches = [client.describe(b) for b in reversed(list(client.dry_run_batches)[-5:])]
        user = users.get(session.get("email", ""))
        return render_template_string(PAGE, user=user, error=error, client=client, batches=batches), status

    def company_domain(email: str) -> str:
        domain = email.rpartition("@")[2].lower()
        return "" if domain in FREE_MAIL else domain

    @app.get("/")
    def home() -> tuple[str, int]:
        return page()

    @app.post("/signup")
    def signup() -> Response | tuple[str, int]:
        name, email = request.form.get("name", "").strip(), request.form.get("email", "").strip().lower()
        try:  # form input is the visitor's: a bad email is their mistake, not a crash
            request.koala.identify(email, {"name": name})
        except (TypeError, ValueError):
            return page("Please enter a valid email address.", 400)
        domain = company_domain(email)
        users[email] = {"name": name or email, "email": email, "domain": domain}
        session["email"] = email
        request.koala.track("Signed Up", {"plan": "trial", "source": "signup form"})
        if domain:
            request.koala.account(domain, {"plan": "trial", "signed_up_by": email})
        return redirect(url_for("home"))

    @app.post("/login")
    def login() -> Response | tuple[str, int]:
        email = request.form.get("email", "").strip().lower()
        if email not in users:
            return page("No account with that email: sign up first.", 400)
        session["email"] = email
        request.koala.identify(email)
        request.koala.track("Logged In")
        return redirect(url_for("home"))

    @app.post("/logout")
    def logout() -> Response:
        request.koala.track("Logged Out")
        session.clear()
        return redirect(url_for("home"))

    def signed_in() -> dict[str, str] | None:
        user = users.get(session.get("email", ""))
        return user  # Koala already ties this visitor's ko_id to the email (sign-up, login)

    @app.post("/projects")
    def create_project() -> Response | tuple[str, int]:
        if signed_in() is None:
            return page("Log in first.", 403)
        request.koala.track("Created Project", {"name": request.form.get("name", "")[:100]})
        return redirect(url_for("home"))

    @app.post("/invite")
    def invite() -> Response | tuple[str, int]:
        user = signed_in()
        if user is None:
            return page("Log in first.", 403)
        invitee_domain = company_domain(request.form.get("email", "").strip())
        request.koala.track(
            "Invited Teammate", {"same_company": bool(invitee_domain) and invitee_domain == user["domain"]}
        )
        return redirect(url_for("home"))

    @app.post("/upgrade")
    def upgrade() -> Response | tuple[str, int]:
        user = signed_in()
        if user is None:
            return page("Log in first.", 403)
        plan = "enterprise" if request.form.get("plan") == "enterprise" else "team"
        given = request.form.get("seats", "")
        seats = max(1, min(1000, int(given))) if given.isascii() and given.isdecimal() else 1
        request.koala.track("Upgraded Plan", {"plan": plan, "seats": seats})
        if user["domain"]:  # account traits: what the company now has
            account = request.koala.account(user["domain"], {"plan": plan, "seats": seats})
            account.track("Plan Changed", {"plan": plan})
        return redirect(url_for("home"))

    return app


def tour(client: KoalaClient) -> None:
    """Drive the app with Flask's test client and print each batch Koala would receive."""
    quiet = logging.getLogger("koala_middleware")  # the tour prints batches itself
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        _tour(client)
    finally:
        quiet.setLevel(level)


def _tour(client: KoalaClient) -> None:
    browser = create_app(client).test_client()
    headers = {"User-Agent": "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) Safari/605.1.15"}
    steps = [
        ("A new visitor opens the home page", "GET", "/", None),
        ("They sign up", "POST", "/signup", {"name": "Ada Lovelace", "email": "ada@acme-robotics.com"}),
        ("They create a project", "POST", "/projects", {"name": "Q3 pipeline"}),
        ("They invite a teammate", "POST", "/invite", {"email": "charles@acme-robotics.com"}),
        ("They upgrade the company's plan (account traits)", "POST", "/upgrade", {"plan": "team", "seats": "12"}),
        ("They log out", "POST", "/logout", None),
        ("They log back in", "POST", "/login", {"email": "ada@acme-robotics.com"}),
    ]
    print("Koala Flask example: a scripted tour (dry run, nothing is sent)\n")
    seen = 0
    for number, (title, method, path, form) in enumerate(steps, 1):
        # buffered=True closes the response, which is when the middleware hands over.
        response = browser.open(path, method=method, data=form, headers=headers, buffered=True)
        print(f"== {number}. {title}")
        new_id = [c.split(";")[0] for c in response.headers.getlist("Set-Cookie") if c.startswith("ko_id=")]
        print(
            f"   {method} {path} -> {response.status}" + (f"; new visitor, Set-Cookie: {new_id[0]}" if new_id else "")
        )
        batches = list(client.dry_run_batches)[seen:]
        seen += len(batches)
        if not batches:
            print("   (nothing recorded, so no batch)")
        for batch in batches:
            print("   " + client.describe(batch).replace("\n", "\n   "))
        print()
    print(f"{seen} batches in all: each request's records, per person and per account, after its response.\n")


def main(argv: list[str]) -> int:
    # In dry-run mode the tour records with the served app's client, so its batches are on
    # the page; with a key set it uses a dry-run client of its own: the tour never sends.
    tour(client if client.dry_run else KoalaClient(dry_run=True))
    if "--tour" in argv:
        return 0
    port = int(os.environ.get("PORT", "8000"))
    mode = "dry run: batches are logged, not sent" if client.dry_run else "sending to Koala"
    print(f"Serving on http://127.0.0.1:{port} ({mode}); Ctrl-C to stop", flush=True)
    app.run(host="127.0.0.1", port=port)
    return 0


# Show the client's INFO lines (in dry-run mode, each batch it would send), also under gunicorn.
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
client = KoalaClient()  # dry run unless KOALA_PUBLIC_KEY is set
app = create_app(client)

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
