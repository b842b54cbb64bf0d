"""Fixtures for the Helm chart tests; the rendering and checking helpers live in tests/helm/rendering.py."""

from __future__ import annotations

from collections.abc import Iterator

import helm_python as helm
import pytest

from tests.helm.rendering import CHART_DIR


@pytest.fixture(scope="session")
def chart() -> Iterator[helm.Chart]:
    """The chart loaded once by Helm's engine (a handle into libhelm_c, freed at the end)."""
    with helm.Chart.load(CHART_DIR) as loaded:
        yield loaded
