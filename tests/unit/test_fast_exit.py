"""The worker's allocator settings for fast failure detection (services/memory.py)."""

from __future__ import annotations

from services.memory import FAST_EXIT_ENV, fast_exit_env


def test_sets_malloc_and_huge_pages_once() -> None:
    env = fast_exit_env({"PATH": "/bin"})
    assert env == {"PATH": "/bin", "PYTHONMALLOC": "malloc", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1", FAST_EXIT_ENV: "applied"}
    assert fast_exit_env(env) is None  # the re-executed process does not exec again


def test_keeps_other_tunables_and_an_operator_choice() -> None:
    env = fast_exit_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert env is not None and env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    env = fast_exit_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    assert env is not None and env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=0"  # the operator's value stays
    assert fast_exit_env({"PYTHONMALLOC": "pymalloc"}) is None  # an explicit allocator is respected
    assert fast_exit_env({FAST_EXIT_ENV: "0"}) is None  # opt-out
