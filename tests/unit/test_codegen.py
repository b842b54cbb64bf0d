from __future__ import annotations

from services import codegen


def test_generated_code_is_fresh() -> None:
    """Fails when protos/ changed without `python -m services.codegen`."""
    assert codegen.check() == []
