"""TLS contexts whose files are re-read when they change (cert-manager, SPIFFE rotation).

``ReloadingTls`` is a server context: certificate and key, and optionally the CA bundle client
certificates are verified against. ``ClientTls`` is a client context: the CAs a server is
trusted by, and optionally the client certificate presented to it.

A server listens with one ``SSLContext`` for its whole life, yet a replaced CA bundle must
also *drop* the CAs it no longer holds, which loading into a live context cannot do. So the
listener's context (``ReloadingTls.context``) builds no connection itself: each handshake
is set up by the context built from the files as they were at the last successful reload.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path
from typing import Any

from runtime.configload import ConfigError
from runtime.filewatch import FileWatch

log = logging.getLogger("zonegate.tls")


class _Delegating(ssl.SSLContext):
    """The listener's context: every connection is set up by ``current`` (asyncio and uvloop
    both set up server connections through ``wrap_bio``)."""

    current: ssl.SSLContext

    def wrap_bio(self, *args: Any, **kwargs: Any) -> ssl.SSLObject:
        return self.current.wrap_bio(*args, **kwargs)


def server_context(cert_file: Path, key_file: Path, client_ca_file: Path | None) -> ssl.SSLContext:
    """A TLS 1.2+ server context; with ``client_ca_file``, client certificates are requested
    (optional: clients with other credentials still connect) and, when sent, verified."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    if client_ca_file is not None:
        context.load_verify_locations(cafile=str(client_ca_file))
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


class ReloadingTls:
    """A server SSLContext whose certificate, key and client CA bundle follow their files."""

    def __init__(
        self,
        cert_file: Path,
        key_file: Path,
        *,
        client_ca_file: Path | None = None,
        what: str = "tls_cert_file/tls_key_file",
    ) -> None:
        self.cert_file, self.key_file, self.client_ca_file = cert_file, key_file, client_ca_file
        self.context: ssl.SSLContext = _Delegating(ssl.PROTOCOL_TLS_SERVER)
        self._watch = FileWatch(cert_file, key_file, client_ca_file)
        self.loaded = False
        try:
            self.reload()
        except (OSError, ssl.SSLError) as e:
            files = ", ".join(str(p) for p in self._watch.paths if p is not None)
            raise ConfigError([f"{what}: cannot load {files}: {_reason(e)}"]) from e

    def reload(self) -> bool:
        """Load the files when they changed; True when new files are in use."""
        return self._watch.reload(self._load) is not None

    def _load(self) -> bool:
        # Built whole before it is used: a half-rotated pair (new certificate, old key) raises
        # here and the context in use keeps serving.
        fresh = server_context(self.cert_file, self.key_file, self.client_ca_file)
        assert isinstance(self.context, _Delegating)
        self.context.current = fresh
        self.loaded = True
        return True

    def try_reload(self) -> None:
        """Reload, logging instead of raising: the old certificate keeps serving meanwhile."""
        try:
            if self.reload():
                log.info("certificate loaded", extra={"cert_file": str(self.cert_file)})
        except (OSError, ssl.SSLError) as e:
            log.warning("certificate not reloaded, keeping the old one: %s", _reason(e))


class ClientTls:
    """A client SSLContext trusting ``ca_file`` (None: the system CAs) and, when given,
    presenting the certificate in ``cert_file`` with ``key_file``; ``current()`` re-reads the
    pair when the files changed and keeps the previous one if the new files do not load."""

    def __init__(
        self, ca_file: Path | None, cert_file: Path | None = None, key_file: Path | None = None
    ) -> None:
        self.context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        self.cert_file, self.key_file = cert_file, key_file
        self._watch = FileWatch(cert_file, key_file)
        if cert_file is not None and key_file is not None:
            self._watch.load(self._load)

    def _load(self) -> None:
        assert self.cert_file is not None and self.key_file is not None
        # the pair is checked on a scratch context first: the live one keeps a working pair
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(self.cert_file, self.key_file)
        self.context.load_cert_chain(self.cert_file, self.key_file)
        log.info("client certificate loaded", extra={"cert_file": str(self.cert_file)})

    def current(self) -> ssl.SSLContext:
        """The context, with the client certificate files re-read if they changed."""
        if self.cert_file is not None and self.key_file is not None and self._watch.changed():
            try:
                self._watch.load(self._load)
            except (OSError, ssl.SSLError) as e:
                log.warning("client certificate not reloaded, keeping the old one: %s", _reason(e))
        return self.context


def _reason(e: OSError | ssl.SSLError) -> str:
    """What went wrong, in words: OpenSSL's reason when it gives one."""
    if isinstance(e, ssl.SSLError):
        if not e.reason or e.reason == "PEM lib":  # OpenSSL says no more than that
            return "not a PEM certificate (chain) with its PEM private key"
        return e.reason.replace("_", " ").lower()
    return e.strerror or str(e)


def check_pair(cert_file: Path, key_file: Path) -> str | None:
    """Why a certificate and key cannot be used together (None: they can)."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as e:
        return _reason(e)
    return None


def check_ca_bundle(ca_file: Path) -> str | None:
    """Why a CA bundle cannot be used (None: it can)."""
    try:
        ssl.create_default_context(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as e:
        return _reason(e)
    return None
