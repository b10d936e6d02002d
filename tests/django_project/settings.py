"""Settings of the test project. ``KOALA_DJANGO_OPTIONS`` (JSON) replaces ``KOALA`` for served
runs; the in-process tests use ``override_settings(KOALA=...)``."""

from __future__ import annotations

import json
import os

SECRET_KEY = "koala-middleware-tests-only"
DEBUG = False
ALLOWED_HOSTS = ["testserver", "127.0.0.1", "localhost", "app.example.com", "www.example.com"]
ROOT_URLCONF = "django_project.urls"
INSTALLED_APPS: list[str] = []
DATABASES: dict[str, object] = {}
USE_TZ = True
SESSION_ENGINE = "django.contrib.sessions.backends.signed_cookies"  # no database needed

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "koala_middleware.django.KoalaMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
]

# Key and URL from KOALA_PUBLIC_KEY / KOALA_API_URL, as for every Koala client.
KOALA = json.loads(os.environ.get("KOALA_DJANGO_OPTIONS") or '{"exclude_paths": ["/healthz"]}')
