"""The pixel proxy's options, checked once when the middleware is built (no httpx here:
importing the package must stay cheap for apps that never turn the proxy on)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_API_URL", "DEFAULT_CDN_URL", "PixelSettings"]

#: Koala's documented upstreams for a first-party proxy ("Custom proxy setup").
DEFAULT_API_URL = "https://proxy.getkoala.com"
DEFAULT_CDN_URL = "https://cdn.getkoala.com"


@dataclass(frozen=True, slots=True)
class PixelSettings:
    """Where the pixel is served first-party, and the bounds on each proxied request.

    :param path: the first-party prefix, e.g. ``"/_k"``; requests under it never reach the app.
    :param api_url: the API upstream (every path but ``/v1/...``).
    :param cdn_url: the CDN upstream (``/v1/...``: ``sdk.js`` and its chunks).
    :param max_body: the largest request body forwarded (bytes); larger ones get ``413``.
    :param connect_timeout: seconds to connect to an upstream before answering ``502``/``504``.
    :param timeout: seconds for the whole answer (headers and body).
    :param cache_seconds: the cap on how long CDN scripts are kept in memory (the upstream's
        ``max-age`` rules below it); ``0`` turns the cache off.
    """

    path: str
    api_url: str = DEFAULT_API_URL
    cdn_url: str = DEFAULT_CDN_URL
    max_body: int = 1024 * 1024
    connect_timeout: float = 3.0
    timeout: float = 15.0
    cache_seconds: float = 300.0

    def __post_init__(self) -> None:
        path = self.path
        if not isinstance(path, str) or not path.startswith("/") or path.rstrip("/") == "":
            raise ValueError(f"pixel_path must be a path under the site root such as '/_k', got {path!r}")
        path = path.rstrip("/")
        if any(c in path for c in "?#%\\ ") or not path.isascii() or "//" in path:
            raise ValueError(f"pixel_path must be a plain path (letters, digits, '-', '_', '/'), got {path!r}")
        object.__setattr__(self, "path", path)
        for name in ("api_url", "cdn_url"):
            url = getattr(self, name)
            if not isinstance(url, str) or not url.startswith(("http://", "https://")) or "?" in url or "#" in url:
                raise ValueError(f"pixel_{name} must be an http:// or https:// URL without query, got {url!r}")
            object.__setattr__(self, name, url.rstrip("/"))
        if not isinstance(self.max_body, int) or self.max_body < 0:
            raise ValueError(f"pixel_max_body must be a number of bytes >= 0, got {self.max_body!r}")
        for name in ("connect_timeout", "timeout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"pixel_{name} must be a number of seconds > 0, got {value!r}")
        if not isinstance(self.cache_seconds, (int, float)) or self.cache_seconds < 0:
            raise ValueError(f"pixel_cache_seconds must be a number of seconds >= 0, got {self.cache_seconds!r}")

    @property
    def prefix(self) -> str:
        """What a proxied path starts with: the path and its slash."""
        return self.path + "/"
