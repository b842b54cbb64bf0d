"""Process-level memory settings for servers."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_ARENA_MAX = -8  # glibc mallopt parameter


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Caps glibc's malloc arenas (as MALLOC_ARENA_MAX does) before server threads start.

    gRPC's threads each get an arena by default; message buffers freed in one arena are not reused by
    another, so bursts of large messages leave RSS far above what is in use. With two arenas, repeated
    request floods plateaued instead of stepping RSS up when this was added; since workers run Python objects
    on glibc malloc (``fast_exit_env``) floods plateau with or without the cap (tests/integration/test_overload.py
    bounds RSS either way).
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


FAST_EXIT_ENV = "SHARDMESH_FAST_EXIT"  # "0": keep Python's own allocator (no re-exec)
_HUGETLB_TUNABLE = "glibc.malloc.hugetlb=1"


def fast_exit_env(environ: dict[str, str]) -> dict[str, str] | None:
    """The environment a worker re-executes itself with so that a SIGKILL closes its sockets sooner; None to keep.

    Peers learn that a killed process died only when the kernel closes its sockets, which ``do_exit``
    does after freeing the whole address space. With Python's small-object arenas in 4 KiB pages that
    took 80-115 ms for an idle tiny-llama worker (440 MiB, 320 MiB anonymous); with Python objects on
    glibc malloc (``PYTHONMALLOC=malloc``) and malloc's heap in transparent huge pages
    (``glibc.malloc.hugetlb=1``, honoured where THP is ``madvise`` or ``always``) it took 18-21 ms,
    and that time is a floor under every kill's failover (docs/chaos.md). Pure, for tests.
    """
    if environ.get(FAST_EXIT_ENV) in ("0", "applied") or "PYTHONMALLOC" in environ:
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" not in tunables:
        tunables = f"{tunables}:{_HUGETLB_TUNABLE}" if tunables else _HUGETLB_TUNABLE
    return {**environ, "PYTHONMALLOC": "malloc", "GLIBC_TUNABLES": tunables, FAST_EXIT_ENV: "applied"}


def reexec_for_fast_exit() -> None:
    """Replaces this process (same pid, same command line) with one started under ``fast_exit_env``.

    Only for a process started from the command line: allocator settings are read at interpreter start,
    so there is no way to apply them in place. Returns without change where they do not apply.
    """
    if not sys.platform.startswith("linux"):
        return
    env = fast_exit_env(dict(os.environ))
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)
