"""Who may fetch a served image: one rater's browser session, and only while it shows the image.

Images do not go through Streamlit's `/media/` endpoint (whose URLs anyone holding them may fetch).
The app's script issues a ticket per image and session, a random name that says nothing about the
image, and the page asks for `fz-media/<ticket>`. The ticket is bound to the browser the session
runs in: Streamlit's XSRF cookie, which the browser already holds before the session's websocket
opens (so an image never races a cookie) and sends with every request to the app. The route hands
the bytes out only to a request carrying that same browser's cookie: another rater's browser, or a
request with no cookie at all, gets 404 like an unknown ticket. Tickets are revoked when the
session moves on from an image, and expire after TICKET_SECONDS in any case.

The registry is process-wide: Streamlit runs the app's script in threads of the same process that
serves the route (see asgi.py), and both import this module.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from streamlit.web.server.starlette.starlette_app_utils import decode_xsrf_token_string
from streamlit.web.server.starlette.starlette_server_config import XSRF_COOKIE_NAME

ROUTE = "fz-media"
TICKET_SECONDS = 6 * 3600
RESPONSE_HEADERS = {
    # The browser that was allowed to fetch it may keep it; no proxy may.
    "Cache-Control": f"private, max-age={TICKET_SECONDS}",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


def browser_key(cookie_value: str | None) -> bytes | None:
    """The browser's XSRF token (the cookie is re-masked on every page load; the token under the mask stays)."""
    token, _ = decode_xsrf_token_string(cookie_value or "")
    return token


@dataclass(frozen=True)
class Grant:
    browser: bytes
    body: bytes
    expires: float


class Tickets:
    def __init__(self) -> None:
        self._grants: dict[str, Grant] = {}
        self._lock = threading.Lock()

    def issue(self, browser: bytes, body: bytes) -> str:
        ticket = secrets.token_urlsafe(24)
        now = time.monotonic()
        with self._lock:
            for stale in [t for t, grant in self._grants.items() if grant.expires < now]:
                del self._grants[stale]
            self._grants[ticket] = Grant(browser, body, now + TICKET_SECONDS)
        return ticket

    def revoke(self, tickets: Iterable[str]) -> None:
        with self._lock:
            for ticket in tickets:
                self._grants.pop(ticket, None)

    def body_for(self, ticket: str, browser: bytes | None) -> bytes | None:
        with self._lock:
            grant = self._grants.get(ticket)
        if grant is None or browser is None or grant.expires < time.monotonic():
            return None
        return grant.body if hmac.compare_digest(grant.browser, browser) else None


TICKETS = Tickets()


async def media_response(request: Request) -> Response:
    body = TICKETS.body_for(request.path_params["ticket"], browser_key(request.cookies.get(XSRF_COOKIE_NAME)))
    if body is None:  # unknown, revoked, expired or another browser's: all look the same
        return Response(status_code=404, headers={"Cache-Control": "no-store"})
    return Response(body, media_type="image/jpeg", headers=RESPONSE_HEADERS)


def routes(url_path: str) -> list[Route]:
    prefix = f"/{url_path.strip('/')}" if url_path.strip("/") else ""
    return [Route(f"{prefix}/{ROUTE}/{{ticket}}", media_response, methods=["GET"])]
