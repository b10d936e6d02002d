"""A real Django project for the tests: ``DJANGO_SETTINGS_MODULE=django_project.settings``."""
