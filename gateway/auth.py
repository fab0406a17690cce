"""API keys: which key a request presents, checked against the configured ones.

One check for every endpoint that needs a key (`/v1/listen`, `/v1/jobs`, `GET
/v1/jobs/<id>`), so that they accept the same credentials the same way: an
`Authorization: Bearer <key>` header, else the `access_token` query parameter (browsers
cannot set headers on a WebSocket); the header wins when both are given.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from websockets.datastructures import Headers

from shared.errors import Unauthorized


def listed(presented: str, api_keys: Iterable[str]) -> bool:
    """Whether `presented` is one of `api_keys` (compared in constant time)."""
    return any(hmac.compare_digest(presented.encode(), k.encode()) for k in api_keys)


def authenticate(
    api_keys: tuple[str, ...], headers: Headers | None, access_token: str | None
) -> str | None:
    """The API key the request presents, once checked; None when the gateway has no keys
    (no authentication). Raises `Unauthorized` (4401, HTTP 401) when it is missing or not
    one of `api_keys`."""
    if not api_keys:
        return None
    presented = access_token
    header = headers.get("Authorization") if headers is not None else None
    if header is not None:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value:
            presented = value.strip()
    if presented is None:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>' or access_token")
    if not listed(presented, api_keys):
        raise Unauthorized("invalid API key")
    return presented
