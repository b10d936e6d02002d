import os

from koala_middleware.django import get_asgi_application  # Django's, plus the flush at shutdown

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "django_project.settings")
application = get_asgi_application()
