"""The authz listener: Envoy ext_authz (HTTP service) and nginx ``auth_request`` ask here.

A check request carries the original method, ``<path_prefix><original path and query>``, the
original ``Host`` and ``Authorization``. It is matched to a route exactly as the proxy matches
a call (``sidecar.routes``, the same refusals of escapes), and the token comes from the same
decision (``Proxy.token_for``: cache, single flight, refusals). Allowed: ``200``, no body,
``Authorization: Bearer <zone token>`` and ``x-envoy-auth-headers-to-remove`` naming what the
proxy would have dropped (or, with ``authz.unsafe_headers: refuse``, for nginx, which cannot
remove them, a 403 naming them). Denied: the proxy's own answer (``sidecar.refusals``); no
route is 403, never an open door.
"""

from __future__ import annotations

import time

from aiohttp import web

from sidecar.proxy import Call, Proxy
from sidecar.refusals import ProxyError

HEADERS_TO_REMOVE = "x-envoy-auth-headers-to-remove"
ALLOWED = "allowed"


def original_target(raw_path: str, path_prefix: str) -> str | None:
    """The original request target inside a check's path, or None when the prefix is absent."""
    if raw_path == path_prefix:
        return "/"
    rest = raw_path[len(path_prefix) :]
    if not raw_path.startswith(path_prefix) or not rest.startswith(("/", "?")):
        return None
    return rest if rest.startswith("/") else "/" + rest


async def check(proxy: Proxy, request: web.BaseRequest) -> web.Response:
    """Answer one check request with the proxy in force when it arrived."""
    call = Call()
    try:
        response = await _allow(proxy, request, call)
        outcome = ALLOWED
    except ProxyError as e:
        response, outcome = e.response(), e.error
    proxy.metrics.observe_authz(call.route, outcome)
    if proxy.authz_access is not None:
        proxy.authz_access.write(
            {
                "method": request.method,
                "route": call.route,
                "status": response.status,
                "outcome": outcome,
                "duration": round(time.monotonic() - call.started, 6),
                "subject": call.subject,
            }
        )
    return response


async def _allow(proxy: Proxy, request: web.BaseRequest, call: Call) -> web.Response:
    target = original_target(request.raw_path, proxy.config.authz.path_prefix)
    if target is None:
        raise ProxyError(403, "access_denied", "not a check request: the path_prefix is missing")
    host = request.headers.get("Host")
    decision = await proxy.decide(request.headers, host, target, call, forwarding=False)
    headers = {}
    if decision.token is not None:
        headers["Authorization"] = f"Bearer {decision.token}"
    if decision.unsafe and proxy.config.authz.unsafe_headers == "refuse":
        raise ProxyError(
            403,
            "access_denied",
            f"the call carries headers the sidecar drops and this proxy cannot remove: "
            f"{', '.join(decision.unsafe)} (a copy of the token, or a spoofable identity header)",
        )
    if decision.unsafe:
        headers[HEADERS_TO_REMOVE] = ",".join(decision.unsafe)
    return web.Response(status=200, headers=headers)
