"""Zone signing keys from PEM files: loaded once at start, re-read when a file changes."""

from __future__ import annotations

import logging
import os
from functools import partial
from pathlib import Path

from exchange.config import ExchangeConfig, ZoneConfig
from exchange.keys import (
    KeyRing,
    PrivateKey,
    ZoneKeys,
    generate_private_key,
    parse_private_key,
    private_key_pem,
    signing_key,
)
from runtime.configload import ConfigError
from runtime.filewatch import FileWatch

log = logging.getLogger("zonegate.keys")


def load_private_key(path: Path) -> PrivateKey:
    """Read a PEM private key; raise ValueError with a readable reason."""
    try:
        pem = path.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from e
    return parse_private_key(pem, str(path))


def write_private_key(key: PrivateKey, path: Path) -> None:
    """Write ``key`` to ``path`` readable by its owner only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file (--force) keeps its old mode otherwise
    with os.fdopen(fd, "wb") as f:
        f.write(private_key_pem(key))


def zone_keys(zone: ZoneConfig) -> ZoneKeys:
    """A zone's keys as its config read them (parse once); a key the config could not read is
    read from its file here, to fail with its reason; no file at all: an ephemeral key."""
    complete = zone.signing_key is not None and (
        zone.next_signing_key_file is None or zone.next_signing_key is not None
    )
    if zone.signing_key is None or not complete:
        return read_zone_keys(zone)
    return ZoneKeys(zone.signing_key, zone.next_signing_key)


def read_zone_keys(zone: ZoneConfig) -> ZoneKeys:
    """A zone's current and next keys from its files; without a file, an ephemeral key."""
    if zone.signing_key_file is None:
        log.warning(
            "zone %s has no signing_key_file: using an ephemeral ES256 key (dev only; "
            "tokens stop verifying on restart)",
            zone.name,
        )
        current = signing_key(generate_private_key("ES256"))
    else:
        current = signing_key(load_private_key(zone.signing_key_file), zone.signing_alg)
    nxt = None
    if zone.next_signing_key_file is not None:
        nxt = signing_key(load_private_key(zone.next_signing_key_file), zone.signing_alg)
    return ZoneKeys(current, nxt)


class KeyFiles:
    """The key files of every zone and the ring loaded from them."""

    def __init__(self, config: ExchangeConfig) -> None:
        self._zones = config.zones
        self._watches = {
            name: FileWatch(zone.signing_key_file, zone.next_signing_key_file)
            for name, zone in config.zones.items()
        }
        loaded: dict[str, ZoneKeys] = {}
        errors = []
        for name, zone in self._zones.items():
            try:
                loaded[name] = self._watches[name].load(partial(zone_keys, zone))
            except ValueError as e:
                errors.append(f"zones.{name}.signing_key_file: {e}")
        if errors:
            raise ConfigError(errors)
        self.ring = KeyRing(loaded)

    def reload(self) -> list[str]:
        """Re-read the key files that changed; return the errors (old keys kept)."""
        errors = []
        for name, zone in self._zones.items():
            if zone.signing_key_file is None and zone.next_signing_key_file is None:
                continue  # an ephemeral key stays for the process's life
            try:
                keys = self._watches[name].reload(partial(read_zone_keys, zone))
            except ValueError as e:
                errors.append(f"zones.{name}.signing_key_file: {e}")
                continue
            if keys is not None:
                self.ring.replace(name, keys)
                log.info("zone %s keys reloaded (kid %s)", name, keys.current.kid)
        return errors


def load_keyring(config: ExchangeConfig) -> KeyRing:
    """Every zone's keys, or ConfigError naming each key file that cannot be used."""
    return KeyFiles(config).ring
