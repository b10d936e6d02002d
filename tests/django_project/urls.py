from django.urls import path

from . import views

urlpatterns = [
    path("track", views.track),
    path("async-track", views.async_track),
    path("stream", views.stream),
    path("async-stream", views.async_stream),
    path("boom", views.boom),
    path("cached", views.cached),
    path("healthz", views.healthz),
    path("who", views.who),
    path("file", views.file),
    path("logout", views.logout),
]
