"""The inputs a chaos run sends and what the single-process model answers for them (the oracle).

Llama models get fixed, seeded token sequences: ``infer`` must return the logits of one full forward
bit for bit, ``generate`` must stream the tokens of transformers' greedy ``generate`` (workers run with
``--no-batching``, so each step is the same computation as in one process). BERT models get texts and
sentence-transformers' embedding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.chaos.history import tensor_digest, tokens_digest
from services.models.registry import resolve_model

INPUT_COUNT = 6
TEXTS = (
    "The router keeps each stage's input until the stage answers.",
    "A hung worker keeps its socket open and answers nothing.",
    "Consul is the slower, authoritative view of which workers live.",
    "Failover must not recompute what upstream stages already did.",
    "short",
    "Every output must equal the single-process reference bit for bit.",
)


@dataclass(frozen=True)
class Oracle:
    """Per input key: what to send, and the digest and shape of the correct answer."""

    texts: dict[str, str]  # bert inputs
    tokens: dict[str, tuple[int, ...]]  # llama inputs
    infer_digest: dict[str, str]
    infer_shape: dict[str, tuple[int, ...]]
    generate_tokens: dict[str, tuple[int, ...]]

    @property
    def keys(self) -> list[str]:
        return sorted(self.texts or self.tokens)

    def generate_digest(self, key: str) -> str:
        return tokens_digest(self.generate_tokens[key])


def build_oracle(model_name: str, *, generate: bool, max_new_tokens: int, seed: int = 0, threads: int = 0) -> Oracle:
    """``threads``: the workers' ``--threads`` (0 = torch's default). fp32 results depend on the intra-op thread
    count (measured: a 7-token tiny-llama forward differs by 2e-7 between 1 and 2 threads), so the oracle
    computes with the same count as the mesh."""
    if threads:
        torch.set_num_threads(threads)
    source = resolve_model(model_name)
    if source.architecture == "bert":
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(source.model_dir), device="cpu")
        texts = {f"in{i}": t for i, t in enumerate(TEXTS)}
        outs = {k: model.encode(t, convert_to_tensor=True) for k, t in texts.items()}
        return Oracle(texts, {}, {k: tensor_digest(v) for k, v in outs.items()},
                      {k: tuple(v.shape) for k, v in outs.items()}, {})
    from transformers import LlamaForCausalLM

    llama = LlamaForCausalLM.from_pretrained(str(source.model_dir), torch_dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(1000 + seed)
    tokens: dict[str, tuple[int, ...]] = {}
    for i in range(INPUT_COUNT):
        length = 4 + 3 * i
        tokens[f"in{i}"] = tuple(int(t) for t in torch.randint(3, source.vocab_size, (length,), generator=g))
    digests, shapes, generated = {}, {}, {}
    eos = llama.generation_config.eos_token_id
    with torch.inference_mode():
        for key, ids in tokens.items():
            logits = llama(input_ids=torch.tensor([ids])).logits
            digests[key], shapes[key] = tensor_digest(logits), tuple(logits.shape)
            if generate:
                out = llama.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=eos if isinstance(eos, int) else None)
                generated[key] = tuple(int(t) for t in out[0, len(ids):])
    return Oracle({}, tokens, digests, shapes, generated)
