"""A server TLS context whose certificate and key follow their files (cert-manager rotation)."""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

from runtime.configload import ConfigError
from runtime.filewatch import FileWatch

log = logging.getLogger("zonegate.tls")


class ReloadingTls:
    """A server SSLContext whose certificate and key follow their files."""

    def __init__(
        self, cert_file: Path, key_file: Path, *, what: str = "tls_cert_file/tls_key_file"
    ) -> None:
        self.cert_file, self.key_file = cert_file, key_file
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._watch = FileWatch(cert_file, key_file)
        self.loaded = False
        try:
            self.reload()
        except (OSError, ssl.SSLError) as e:
            raise ConfigError([f"{what}: cannot load {cert_file} and {key_file}: {e}"]) from e

    def reload(self) -> bool:
        """Load the files when they changed; True when a new certificate is in use."""
        return self._watch.reload(self._load) is not None

    def _load(self) -> bool:
        # Check the pair on a scratch context first: a half-rotated pair must not break the
        # live one, whose certificate would otherwise no longer match its key.
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(self.cert_file, self.key_file)
        self.context.load_cert_chain(self.cert_file, self.key_file)
        self.loaded = True
        return True

    def try_reload(self) -> None:
        """Reload, logging instead of raising: the old certificate keeps serving meanwhile."""
        try:
            if self.reload():
                log.info("certificate loaded", extra={"cert_file": str(self.cert_file)})
        except (OSError, ssl.SSLError) as e:
            log.warning("certificate not reloaded, keeping the old one: %s", e)
