"""Process-level memory settings for servers."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_ARENA_MAX = -8  # glibc mallopt parameter


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Caps glibc's malloc arenas (as MALLOC_ARENA_MAX does) before server threads start.

    gRPC's threads each get an arena by default; message buffers freed in one arena are not reused by
    another, so bursts of large messages leave RSS far above what is in use. With two arenas, repeated
    request floods plateau instead of stepping RSS up (measured in tests/integration/test_overload.py).
    Returns whether the setting applied (glibc on Linux only).
    """
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_ARENA_MAX, arenas))
    except (OSError, AttributeError):
        return False
