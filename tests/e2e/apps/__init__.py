"""WSGI and ASGI apps that the end-to-end tests run under real servers."""
