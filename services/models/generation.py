"""Token selection, stop rules and single-process reference generation: pure, no transport.

The router samples with these functions from the last stage's logits, so a generation through the mesh
and :func:`generate_reference` over local stages pick the same tokens: the stages are bit-identical to
``LlamaForCausalLM`` and sampling draws from one ``torch.Generator`` seeded once per request, so a seed
and a step count fix every draw (a failover that replays a session does not disturb the sampler).
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

from services.errors import InvalidArgument
from services.models.kv_cache import SessionCache

StopReason = Literal["eos", "stop_string", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """``temperature == 0`` is greedy (argmax, as ``generate(do_sample=False)``); ``top_k == 0`` and
    ``top_p == 1`` switch those filters off; ``seed`` seeds the request's one generator."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.temperature >= 0.0:
            raise InvalidArgument(f"temperature must be >= 0 (0 = greedy); got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidArgument(f"top_p must lie in (0, 1]; got {self.top_p}")
        if self.top_k < 0:
            raise InvalidArgument(f"top_k must be >= 0 (0 = off); got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def sampling_generator(params: SamplingParams) -> torch.Generator:
    """The request's generator: create it once per request and pass it to every :func:`next_token`."""
    return torch.Generator().manual_seed(params.seed)


def next_token(logits_row: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Picks the next token from one position's logits (any shape holding ``vocab`` values).

    Sampling applies temperature, then top-k, then top-p (the order and tie rules of transformers'
    logits warpers) and draws once from ``generator``; greedy draws nothing.
    """
    scores = logits_row.detach().reshape(-1).to(torch.float32)
    if params.greedy:
        return int(torch.argmax(scores))
    if generator is None:
        raise InvalidArgument("sampling needs the request's generator (see sampling_generator)")
    scores = scores / params.temperature
    if params.top_k > 0:
        kth_best = torch.topk(scores, min(params.top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth_best, float("-inf"))
    if params.top_p < 1.0:
        ascending, order = torch.sort(scores)
        cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= 1.0 - params.top_p
        drop[-1] = False  # always keep the most likely token
        scores = scores.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return int(torch.multinomial(scores.softmax(dim=-1), 1, generator=generator))


# --- stop rules -------------------------------------------------------------------------------------


def find_stop_string(text: str, stop_strings: Sequence[str]) -> int | None:
    """Where the earliest stop string starts in ``text`` (the output is cut there), or None."""
    hits = [i for s in stop_strings if s and (i := text.find(s)) >= 0]
    return min(hits) if hits else None


def streamable_length(text: str, stop_strings: Sequence[str]) -> int:
    """How much of ``text`` may be streamed now: up to a stop string, and never a tail that could still
    grow into one (``"Obs"`` is held back while ``"Observation:"`` is a stop string)."""
    cut = find_stop_string(text, stop_strings)
    if cut is not None:
        return cut
    held = 0
    for stop in stop_strings:
        for n in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:n]):
                held = n
                break
    return len(text) - held


@dataclass(frozen=True)
class StopRule:
    """When a generation ends: an end-of-sequence token, a stop string in the decoded text, or the length."""

    max_new_tokens: int
    eos_ids: frozenset[int] = field(default_factory=frozenset)
    stop_strings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise InvalidArgument(f"max_new_tokens must be >= 1; got {self.max_new_tokens}")

    def reason(self, generated: Sequence[int], text: str = "") -> StopReason | None:
        """Why to stop after ``generated`` (new tokens only; ``text`` = their decoded text), or None."""
        if generated and generated[-1] in self.eos_ids:
            return "eos"
        if self.stop_strings and find_stop_string(text, self.stop_strings) is not None:
            return "stop_string"
        if len(generated) >= self.max_new_tokens:
            return "length"
        return None


# --- single-process reference -----------------------------------------------------------------------


class SessionStage(Protocol):
    """What generation needs of a stage (``LlamaStage``)."""

    def step(
        self, x: torch.Tensor, *, session_cache: SessionCache, position: int, logit_rows: Sequence[int] | None = None
    ) -> torch.Tensor: ...

    def step_batch(self, inputs: Sequence[tuple[torch.Tensor, SessionCache, int]]) -> list[torch.Tensor]: ...

    def prefill_batch(self, inputs: Sequence[tuple[torch.Tensor, SessionCache]]) -> list[torch.Tensor]: ...


@dataclass(frozen=True)
class GeneratedToken:
    token_id: int
    logits: torch.Tensor  # the last stage's logits ``[vocab]`` the token was chosen from


def generate_steps(
    stages: Sequence[SessionStage],
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    params: SamplingParams,
    eos_ids: Collection[int] = (),
) -> Iterator[GeneratedToken]:
    """Prefill, then one decode step per token through every stage, each stage with its own cache."""
    rule = StopRule(max_new_tokens, frozenset(eos_ids))
    if not prompt_ids:
        raise InvalidArgument("generation needs a prompt of at least one token")
    caches = [SessionCache(f"reference-stage-{i}") for i in range(len(stages))]
    generator = sampling_generator(params)
    x = torch.tensor([list(prompt_ids)], dtype=torch.int64)
    generated: list[int] = []
    while True:
        position = caches[0].position
        for stage, cache in zip(stages, caches, strict=True):
            x = stage.step(x, session_cache=cache, position=position)
        logits = x[0, -1]
        generated.append(next_token(logits, params, generator))
        yield GeneratedToken(generated[-1], logits)
        if rule.reason(generated) is not None:
            return
        x = torch.tensor([[generated[-1]]])


def generate_reference(
    stages: Sequence[SessionStage],
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    params: SamplingParams,
    eos_ids: Collection[int] = (),
) -> list[int]:
    """The new tokens (an end-of-sequence token included, as ``generate`` includes it)."""
    return [t.token_id for t in generate_steps(stages, prompt_ids, max_new_tokens, params, eos_ids)]


@dataclass
class _BatchedSession:
    caches: list[SessionCache]
    generator: torch.Generator
    tokens: list[int] = field(default_factory=list)
    done: bool = False


def generate_reference_batched(
    stages: Sequence[SessionStage],
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    params: SamplingParams,
    eos_ids: Collection[int] = (),
    *,
    join_at: Sequence[int] | None = None,
) -> list[list[int]]:
    """Continuous batching in one process: prompt ``i`` is prefilled alone at decode round ``join_at[i]``
    (default 0), then decodes together with every other live session in one ``step_batch`` per stage;
    finished sessions leave the batch. Returns each prompt's new tokens, as :func:`generate_reference`."""
    rule = StopRule(max_new_tokens, frozenset(eos_ids))
    joins = list(join_at) if join_at is not None else [0] * len(prompts)
    if len(joins) != len(prompts) or any(not p for p in prompts):
        raise InvalidArgument("need one join round per prompt, and no empty prompt")
    sessions: list[_BatchedSession | None] = [None] * len(prompts)
    round_ = 0
    while any(s is None or not s.done for s in sessions):
        for i, prompt in enumerate(prompts):
            if sessions[i] is None and joins[i] <= round_:
                session = _BatchedSession([SessionCache(f"batch-{i}-{k}") for k in range(len(stages))],
                                          sampling_generator(params))
                x = torch.tensor([list(prompt)], dtype=torch.int64)
                for stage, cache in zip(stages, session.caches, strict=True):
                    x = stage.step(x, session_cache=cache, position=0)
                _append(session, x, params, rule)
                sessions[i] = session
        live = [s for s in sessions if s is not None and not s.done]
        if live:
            xs = [torch.tensor([[s.tokens[-1]]]) for s in live]
            for k, stage in enumerate(stages):
                xs = stage.step_batch([(x, s.caches[k], s.caches[k].position) for x, s in zip(xs, live, strict=True)])
            for x, s in zip(xs, live, strict=True):
                _append(s, x, params, rule)
        round_ += 1
    return [s.tokens for s in sessions if s is not None]


def _append(session: _BatchedSession, logits: torch.Tensor, params: SamplingParams, rule: StopRule) -> None:
    session.tokens.append(next_token(logits[0, -1], params, session.generator))
    session.done = rule.reason(session.tokens) is not None
