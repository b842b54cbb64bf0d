"""A local mesh's security set-up: a fresh mesh key per run, and a plain statement of what is protected.

The key lives in a private temporary directory (0700, file 0600) for as long as the mesh runs, so only
this user's processes can read it; every router and worker of the mesh gets ``--mesh-key-file``.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import tempfile
from pathlib import Path

from services.net import split_host_port

MESH_KEY_FLAG = "--mesh-key-file"
MESH_KEY_BYTES = 32


def write_mesh_key(directory: Path) -> Path:
    """A new random key, hex-encoded, readable by this user only."""
    path = directory / "mesh.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(MESH_KEY_BYTES) + "\n")
    return path


class MeshKeyDir:
    """Owns the private directory holding a local mesh's key; :meth:`remove` deletes it."""

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="shardmesh-key-"))  # mkdtemp creates it 0700
        self.path = write_mesh_key(self.directory)

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def has_flag(args: tuple[str, ...] | list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def is_loopback_listen(listen: str) -> bool:
    host, _ = split_host_port(listen)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def security_line(listens: list[str], tls: bool, mesh_key: Path | None) -> str:
    """The line ``shardmesh up`` and ``demo`` print, e.g. ``security: plaintext on loopback, mesh key /tmp/...``."""
    key = f"mesh key {mesh_key}" if mesh_key is not None else "mesh key from the configured --mesh-key-file"
    if tls:
        return f"security: TLS, {key}"
    exposed = [a for a in listens if not is_loopback_listen(a)]
    if exposed:
        return (
            f"security: WARNING plaintext on non-loopback {', '.join(exposed)} (anyone on the network can call it; "
            f"see docs/security.md), {key}"
        )
    return f"security: plaintext on loopback, {key}"
