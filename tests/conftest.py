"""Shared fixtures: every process a test starts is reaped at the end of the session."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests import procs

pytest_plugins = ["tests.consul_fixtures"]

# Tokenizers' thread pool and torch threads would oversubscribe 2 cores across many processes.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def _reap_children() -> Iterator[None]:
    yield
    procs.reap_all()
