"""Where authorization server metadata lives (RFC 8414 §3.1, OpenID Connect Discovery §4).

The one builder of well-known URLs, for both sides: the trusted-issuer fetcher, the sidecar's
discovery of a remote token endpoint, and the documents the server publishes.
"""

from __future__ import annotations

from urllib.parse import urlsplit

OPENID_CONFIGURATION = "openid-configuration"
OAUTH_AUTHORIZATION_SERVER = "oauth-authorization-server"


def well_known_url(issuer: str, suffix: str = OPENID_CONFIGURATION) -> str:
    """The metadata URL of ``issuer``.

    OpenID Connect appends ``/.well-known/openid-configuration`` to the issuer; RFC 8414 §3.1
    inserts ``/.well-known/oauth-authorization-server`` between the host and any path.
    """
    if suffix == OPENID_CONFIGURATION:
        return f"{issuer.rstrip('/')}/.well-known/{suffix}"
    parts = urlsplit(issuer)
    return f"{parts.scheme}://{parts.netloc}/.well-known/{suffix}{parts.path.rstrip('/')}"


def openid_configuration_url(issuer: str) -> str:
    """OpenID Connect Discovery 1.0 §4: the issuer's configuration document."""
    return well_known_url(issuer, OPENID_CONFIGURATION)


def metadata_urls(issuer: str) -> list[str]:
    """Where to look for an authorization server's metadata, RFC 8414's form first."""
    return [well_known_url(issuer, OAUTH_AUTHORIZATION_SERVER), openid_configuration_url(issuer)]
