from __future__ import annotations

import pytest

from services.errors import ConfigError
from services.layers import LayerSpan
from services.localmesh.spec import parse_spec


def test_minimal_spec_defaults() -> None:
    spec = parse_spec({"model": "minilm", "workers": [{"layers": "0:2"}, {"layers": "2:6", "listen": "127.0.0.1:5000"}]})
    assert spec.router_listen == "127.0.0.1:0"
    assert [w.span for w in spec.workers] == [LayerSpan(0, 2), LayerSpan(2, 6)]
    assert spec.workers[0].listen == "127.0.0.1:0" and spec.workers[1].listen == "127.0.0.1:5000"


def test_replicas_expand() -> None:
    spec = parse_spec({"model": "m", "workers": [{"layers": "0:2", "replicas": 2}, {"layers": "2:4"}]})
    assert [w.name for w in spec.workers] == ["w0r0", "w0r1", "w1"]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"model": "m", "workers": [{"layers": "0:2"}], "colour": 1}, "unknown key\\(s\\) colour"),
        ({"model": "m", "workers": [{"layers": "0:2", "gpu": 1}]}, "workers\\[0\\]: unknown key\\(s\\) gpu"),
        ({"model": "m", "router": {"port": 1}, "workers": [{"layers": "0:2"}]}, "router: unknown key\\(s\\) port"),
        ({"model": "m", "workers": []}, "non-empty list"),
        ({"workers": [{"layers": "0:2"}]}, "missing key 'model'"),
        ({"model": "m", "workers": [{"layers": "3:1"}]}, "invalid layer range 3:1"),
        ({"model": "m", "workers": [{"layers": "2:2"}]}, "invalid layer range 2:2"),
        ({"model": "m", "workers": [{"layers": "0:3"}, {"layers": "2:4"}]}, "overlap"),
        ({"model": "m", "workers": [{"layers": "0:2"}, {"layers": "3:4"}]}, "no worker holds layers 2:3"),
        ({"model": "m", "workers": [{"layers": "0:2", "replicas": 0}]}, "replicas must be an integer >= 1"),
        ({"model": "m", "workers": [{"layers": "0:2", "listen": "nowhere"}]}, "expected HOST:PORT"),
    ],
)
def test_bad_specs_name_the_problem(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_spec(data)
