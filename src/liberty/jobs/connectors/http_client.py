"""HTTP APIs through `httpx.AsyncClient`, which runs natively under trio.

The secret headers live in the client; the child only names a path.  So a
path must stay relative to `base_url`: an absolute URL would send those
headers to a host of the plugin's choosing.  Redirects are not followed for
the same reason.  Errors are re-created without their `request` attribute,
which carries the headers, before they can travel to the child.
"""

from __future__ import annotations

import ssl
from typing import Any

import httpx

from .config import HttpConfig

HTTP_VERBS = ("get", "post", "put", "patch", "delete")
REQUEST_OPTIONS = ("params", "json", "headers", "content", "data")


class HttpBackend:
    kind = "http"

    def __init__(self, config: HttpConfig) -> None:
        self.config = config
        self.name = config.name
        self.client: httpx.AsyncClient | None = None

    async def open(self) -> None:
        cfg = self.config
        verify: bool | ssl.SSLContext = cfg.verify if isinstance(cfg.verify, bool) else ssl.create_default_context(cafile=cfg.verify)
        self.client = httpx.AsyncClient(
            base_url=cfg.base_url,
            headers=dict(cfg.headers),
            timeout=cfg.timeout_seconds,
            verify=verify,
            follow_redirects=False,
        )

    async def aclose(self) -> None:
        if self.client is not None:
            await self.client.aclose()

    async def request(self, method: str, path: str, options: dict[str, Any]) -> dict[str, Any]:
        assert self.client is not None
        url = self._relative(path)
        unknown = sorted(set(options) - set(REQUEST_OPTIONS))
        if unknown:
            raise TypeError(
                f"connector '{self.name}': unexpected keyword argument(s) {', '.join(unknown)}; "
                f"accepted: {', '.join(REQUEST_OPTIONS)}"
            )
        cap = self.config.max_response_bytes
        try:
            async with self.client.stream(method.upper(), url, **options) as response:
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > cap:
                        raise ValueError(
                            f"connector '{self.name}': {method.upper()} {url.path} returned more than {cap // 1024} KiB; "
                            "request less (paging, filters) or raise max_response_kb in connectors.toml"
                        )
                return {
                    "status_code": response.status_code,
                    "headers": dict(response.headers),
                    "text": bytes(body).decode(response.encoding or "utf-8", errors="replace"),
                }
        except httpx.HTTPError as exc:
            raise _without_request(exc, f"connector '{self.name}': {method.upper()} {url.path}: {exc}") from None

    def _relative(self, path: Any) -> httpx.URL:
        if not isinstance(path, str):
            raise TypeError(f"connector '{self.name}': path must be a string, got {type(path).__name__}")
        try:
            url = httpx.URL(path)
        except httpx.InvalidURL as exc:
            raise ValueError(f"connector '{self.name}': invalid path {path!r}: {exc}") from None
        if url.scheme or url.host or path.startswith("//"):
            raise ValueError(
                f"connector '{self.name}': {path!r} is not a path relative to {self.config.base_url}; "
                "a connector only talks to its own base_url"
            )
        return url


def _without_request(exc: httpx.HTTPError, message: str) -> Exception:
    try:
        return type(exc)(message)
    except Exception:
        return ConnectionError(message)
