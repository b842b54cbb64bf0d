"""Loads the mesh key: the shared secret every router and worker of one mesh is started with.

It signs relay routes (:mod:`services.security.route_mac`) and authenticates mesh calls. The file
holds either 64+ hex digits (what ``shardmesh up`` writes) or 32+ raw bytes (e.g. a Kubernetes
Secret). Read once in ``main()``; a missing, short or unreadable file is a ConfigError that says
which file and what to do, never a silent fallback to "no key".
"""

from __future__ import annotations

import logging
import os
import stat
import string
from collections.abc import Mapping

from services.errors import ConfigError

MESH_KEY_ENV = "SHARDMESH_MESH_KEY_FILE"
MIN_KEY_BYTES = 32
_MAX_FILE_BYTES = 64 * 1024
_HEX = frozenset(string.hexdigits.encode())

log = logging.getLogger(__name__)


def load_mesh_key(path: str | None, env: Mapping[str, str]) -> bytes | None:
    """The key from ``path`` (``--mesh-key-file``) or, if unset, ``$SHARDMESH_MESH_KEY_FILE``; None if neither."""
    source = "--mesh-key-file"
    if not path:
        path, source = env.get(MESH_KEY_ENV) or None, f"${MESH_KEY_ENV}"
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise ConfigError(f"{source} {path} is not a regular file; point it at the mesh key file")
            raw = f.read(_MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{source} {path} does not exist; create it (e.g. 32 random bytes) or fix the path") from None
    except PermissionError:
        raise ConfigError(f"{source} {path} is not readable by this user (uid {os.geteuid()})") from None
    except IsADirectoryError:
        raise ConfigError(f"{source} {path} is a directory; point it at the mesh key file") from None
    except OSError as exc:
        raise ConfigError(f"{source} {path} cannot be read: {exc.strerror}") from None
    if len(raw) > _MAX_FILE_BYTES:
        raise ConfigError(f"{source} {path} is larger than {_MAX_FILE_BYTES} bytes; is this really a key file?")
    key = _decode(raw)
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(
            f"{source} {path} holds a {len(key)}-byte key; use at least {MIN_KEY_BYTES} random bytes"
            f" (or {2 * MIN_KEY_BYTES} hex digits)"
        )
    # Group read is how Kubernetes mounts Secrets under an fsGroup (0440): only "other" access is a leak.
    if st.st_mode & 0o007:
        log.warning("mesh key %s is accessible to every user (mode %o); restrict it to 0600 or 0640", path, stat.S_IMODE(st.st_mode))
    return key


def _decode(raw: bytes) -> bytes:
    """Hex text (surrounding whitespace ignored) is decoded; anything else is the key as it is."""
    text = raw.strip()
    if text and len(text) % 2 == 0 and all(c in _HEX for c in text):
        return bytes.fromhex(text.decode())
    return raw
