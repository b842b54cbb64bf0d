"""Mesh output equals the single-process model exactly (fp32, CPU), over several splits.

References are independent of shardmesh: sentence-transformers' own ``encode`` for minilm and
transformers' ``LlamaForCausalLM`` for tiny-llama.
"""

from __future__ import annotations

import json

import pytest
import torch

from services.client import RouterClient
from services.models.registry import resolve_model
from tests.procs import CLI, Proc, mesh_up

pytestmark = [pytest.mark.integration]

SENTENCES = [
    "Sharded inference must equal the single-process model.",
    "Short one.",
    "A somewhat longer sentence that talks about routers, shard workers, activations and Consul discovery.",
]


@pytest.fixture(scope="module")
def sentence_model():  # type: ignore[no-untyped-def]
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(resolve_model("minilm").model_dir), device="cpu")


@pytest.mark.parametrize("split", [["0:6"], ["0:1", "1:5", "5:6"], ["0:2", "2:4", "4:6"]], ids=lambda s: ",".join(s))
def test_minilm_matches_sentence_transformers(split: list[str], sentence_model) -> None:  # type: ignore[no-untyped-def]
    config = {"model": "minilm", "workers": [{"layers": s} for s in split]}
    with mesh_up(config) as mesh, RouterClient(mesh.router) as client:
        for text in SENTENCES:
            result = client.infer(text=text)
            expected = sentence_model.encode(text, convert_to_tensor=True)
            assert torch.equal(result.output.reshape(expected.shape), expected), text
            assert len(result.route) == len(split)
            assert [h.layers.start for h in result.hops] == [int(s.split(":")[0]) for s in split]


def test_infer_cli_json_matches_reference(sentence_model) -> None:  # type: ignore[no-untyped-def]
    config = {"model": "minilm", "workers": [{"layers": "0:3"}, {"layers": "3:6"}]}
    with mesh_up(config) as mesh:
        proc = Proc([*CLI, "infer", "--router", mesh.router, "--json", SENTENCES[0], SENTENCES[1]])
        assert proc.wait(120) == 0, "\n".join(proc.stderr)
        objects = [json.loads(line) for line in proc.stdout if line.strip()]
    assert len(objects) == 2
    for text, obj in zip(SENTENCES, objects):
        assert set(obj) >= {"output", "route", "mode", "hops_ms"}
        assert obj["mode"] == "direct" and len(obj["route"]) == 2 and len(obj["hops_ms"]) == 2
        expected = sentence_model.encode(text, convert_to_tensor=True)
        # JSON floats round-trip float32 exactly (repr of the widened double).
        assert torch.equal(torch.tensor(obj["output"], dtype=torch.float32), expected)


@pytest.fixture(scope="module")
def llama_reference():  # type: ignore[no-untyped-def]
    from transformers import LlamaForCausalLM

    source = resolve_model("tiny-llama")
    model = LlamaForCausalLM.from_pretrained(str(source.model_dir), torch_dtype=torch.float32).eval()
    return source, model


def _llama_splits() -> list[list[str]]:
    total = resolve_model("tiny-llama").total_layers
    return [[f"0:{total}"], ["0:1", f"1:{total - 1}", f"{total - 1}:{total}"], ["0:2", f"2:{total}"]]


@pytest.mark.parametrize("split", _llama_splits(), ids=lambda s: ",".join(s))
def test_tiny_llama_matches_single_process(split: list[str], llama_reference) -> None:  # type: ignore[no-untyped-def]
    source, model = llama_reference
    generator = torch.Generator().manual_seed(7)
    ids = torch.randint(0, source.vocab_size, (2, 24), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding on the second row
    with torch.inference_mode():
        expected = model(input_ids=ids, attention_mask=mask).logits
    config = {"model": "tiny-llama", "workers": [{"layers": s} for s in split]}
    with mesh_up(config) as mesh, RouterClient(mesh.router) as client:
        result = client.infer(tensor=ids, attention_mask=mask)
        assert torch.equal(result.output, expected)
        text_result = client.infer(text="hello mesh")
        assert text_result.output.shape[-1] == source.vocab_size
