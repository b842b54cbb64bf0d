"""A bounded fuzzer for live router and worker processes (a test fixture, never shipped).

Each call is hostile in one way: random bytes instead of a protobuf, a valid message with bytes
flipped or cut, a well-formed message with hostile values (shapes that overflow, unknown dtypes,
chunk bombs, foreign shared-memory names, forged relay routes, someone else's session), or a stream
opened and abandoned. The contract under test (issue 15): every bad call ends with a specific status
(never UNKNOWN or INTERNAL), within its deadline, and the processes keep serving with bounded memory.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2

from services.gen.shardmesh.v1 import router_pb2, tensor_pb2, worker_pb2

ROUTER = "/shardmesh.v1.Router/"
WORKER = "/shardmesh.v1.ShardWorker/"
HEALTH = "/grpc.health.v1.Health/Check"
BAD_CODES = frozenset({grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL})
HANG_SLACK_S = 2.0  # a call that returns this long after its deadline counts as a hang

Metadata = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class FuzzTargets:
    router: str
    first_worker: str  # holds layer 0 (token ids in)
    last_worker: str  # holds the last layers (hidden states in)
    hidden_size: int
    total_layers: int
    first_span: tuple[int, int]
    last_span: tuple[int, int]
    router_metadata: Metadata = ()
    worker_metadata: Metadata = ()


@dataclass(frozen=True)
class CallResult:
    kind: str
    method: str
    code: grpc.StatusCode
    details: str
    elapsed_s: float
    deadline_s: float

    @property
    def bad(self) -> bool:
        return self.code in BAD_CODES

    @property
    def hung(self) -> bool:
        return self.elapsed_s > self.deadline_s + HANG_SLACK_S


@dataclass
class FuzzReport:
    results: list[CallResult] = field(default_factory=list)

    @property
    def bad(self) -> list[CallResult]:
        return [r for r in self.results if r.bad]

    @property
    def hangs(self) -> list[CallResult]:
        return [r for r in self.results if r.hung]

    def codes(self) -> Counter[str]:
        return Counter(r.code.name for r in self.results)

    def summary(self) -> str:
        lines = [f"{len(self.results)} calls; codes: {dict(self.codes())}"]
        for r in (self.bad + self.hangs)[:20]:
            lines.append(f"  {r.kind} {r.method}: {r.code.name} after {r.elapsed_s:.2f}s: {r.details[:200]}")
        return "\n".join(lines)


def _tensor(dtype: int, shape: Sequence[int], data: bytes = b"", **extra: object) -> tensor_pb2.Tensor:
    msg = tensor_pb2.Tensor(dtype=dtype, data=data, **extra)  # type: ignore[arg-type]
    msg.shape.extend(shape)
    return msg


def _ids(rng: random.Random, seq: int = 4, vocab: int = 100) -> tensor_pb2.Tensor:
    values = [rng.randrange(vocab) for _ in range(seq)]
    return _tensor(tensor_pb2.DTYPE_INT64, [1, seq], b"".join(v.to_bytes(8, "little") for v in values))


def _hidden(rng: random.Random, hidden: int, seq: int = 2) -> tensor_pb2.Tensor:
    return _tensor(tensor_pb2.DTYPE_FLOAT32, [1, seq, hidden], rng.randbytes(4 * seq * hidden))


def _hostile_tensor(rng: random.Random, hidden: int) -> tensor_pb2.Tensor:
    """A tensor message that is wrong in one way a careless decoder would trip over."""
    choice = rng.randrange(14)
    big = rng.choice([2**31, 2**40, 2**62, 2**63 - 1])
    if choice == 0:
        return _tensor(tensor_pb2.DTYPE_FLOAT32, [0, big, hidden])  # stride overflow
    if choice == 1:
        return _tensor(tensor_pb2.DTYPE_FLOAT32, [big, big, 2])
    if choice == 2:
        return _tensor(tensor_pb2.DTYPE_FLOAT32, [1, -3, hidden])
    if choice == 3:
        return _tensor(rng.choice([0, 42, 9999, -1 & 0x7FFFFFFF]), [1, 2], b"\0" * 16)
    if choice == 4:
        return _tensor(tensor_pb2.DTYPE_FLOAT32, [1] * rng.randrange(9, 40))
    if choice == 5:  # data length disagrees with the shape
        return _tensor(tensor_pb2.DTYPE_FLOAT32, [1, 2, hidden], rng.randbytes(rng.randrange(0, 64)))
    if choice == 6:  # chunk bomb: tiny declared tensor, huge chunk count
        return _tensor(tensor_pb2.DTYPE_FLOAT32, [1, 2, 3], b"\0" * 8, chunk_count=rng.choice([2, 701, 2**31]), chunk_index=0)
    if choice == 7:  # a chunk that is not the first
        return _tensor(tensor_pb2.DTYPE_FLOAT32, [], rng.randbytes(32), chunk_count=5, chunk_index=rng.randrange(1, 9))
    if choice == 8:  # shared-memory names: foreign, traversal, well-formed but absent
        name = rng.choice([
            "shardmesh-1-" + "0" * 32,
            f"shardmesh-{rng.randrange(1, 99999)}-{rng.randbytes(16).hex()}",
            "../../etc/passwd",
            "shardmesh-../../tmp/x",
            "/dev/shm/shardmesh-1-" + "a" * 32,
            "",
        ])
        return _tensor(tensor_pb2.DTYPE_FLOAT32, [1, 2, hidden], shm_handle=name)
    if choice == 9:  # both inline data and a handle
        return _tensor(tensor_pb2.DTYPE_FLOAT32, [1, 1, 1], b"\0" * 4, shm_handle="shardmesh-1-" + "b" * 32)
    if choice == 10:
        return _tensor(tensor_pb2.DTYPE_BOOL, [1, 3, hidden], rng.randbytes(3 * hidden))
    if choice == 11:  # NaN/inf activations are values, not errors: any status but INTERNAL is fine
        return _tensor(tensor_pb2.DTYPE_FLOAT32, [1, 1, hidden], b"\xff\xff\xff\x7f" * hidden)
    if choice == 12:  # token ids out of the vocabulary
        return _tensor(tensor_pb2.DTYPE_INT64, [1, 2], (2**62).to_bytes(8, "little") + (-5 & (2**64 - 1)).to_bytes(8, "little"))
    return _tensor(tensor_pb2.DTYPE_INT64, [rng.randrange(1, 4096), rng.randrange(1, 4096)])  # big, no data


def _mutate(rng: random.Random, payload: bytes) -> bytes:
    data = bytearray(payload)
    for _ in range(rng.randrange(1, 6)):
        op = rng.randrange(4)
        if op == 0 and data:
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif op == 1 and data:
            del data[rng.randrange(len(data)) :]
        elif op == 2:
            data[rng.randrange(len(data) + 1) : 0] = rng.randbytes(rng.randrange(1, 12))
        elif data:
            start = rng.randrange(len(data))
            data[start : start + 1] = b"\x0a\xff\xff\xff\xff\x0f"  # a length prefix far past the end
    return bytes(data)


class LiveFuzzer:
    """Sends ``calls`` hostile calls with bounded concurrency; each has its own deadline."""

    def __init__(self, targets: FuzzTargets, seed: int = 0, deadline_s: float = 5.0, concurrency: int = 8) -> None:
        self.t = targets
        self.rng = random.Random(seed)
        self.deadline_s = deadline_s
        self.concurrency = concurrency
        self.report = FuzzReport()
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _channel(self, address: str) -> grpc.aio.Channel:
        if address not in self._channels:
            self._channels[address] = grpc.aio.insecure_channel(
                address, options=[("grpc.max_send_message_length", 64 << 20)]
            )
        return self._channels[address]

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close(None)

    # --- one call of each kind --------------------------------------------------------------

    async def _unary(self, kind: str, address: str, method: str, payload: bytes, metadata: Metadata) -> CallResult:
        call = self._channel(address).unary_unary(method)
        started = time.monotonic()
        try:
            await call(payload, timeout=self.deadline_s, metadata=metadata)
            code, details = grpc.StatusCode.OK, ""
        except grpc.aio.AioRpcError as exc:
            code, details = exc.code(), exc.details() or ""
        return CallResult(kind, method, code, details, time.monotonic() - started, self.deadline_s)

    async def _server_stream(self, kind: str, address: str, method: str, payload: bytes, metadata: Metadata) -> CallResult:
        call = self._channel(address).unary_stream(method)(payload, timeout=self.deadline_s, metadata=metadata)
        started = time.monotonic()
        try:
            async for _ in call:
                pass
            code, details = grpc.StatusCode.OK, ""
        except grpc.aio.AioRpcError as exc:
            code, details = exc.code(), exc.details() or ""
        return CallResult(kind, method, code, details, time.monotonic() - started, self.deadline_s)

    async def _stream(
        self, kind: str, address: str, method: str, messages: list[bytes], metadata: Metadata, *, abandon: bool
    ) -> CallResult:
        """Sends ``messages`` on a bidi stream; abandoned streams are cancelled without half-closing.

        In-band errors are fine; the stream itself must not end with UNKNOWN/INTERNAL, and every
        message that parses must get an answer unless the stream is abandoned.
        """
        call = self._channel(address).stream_stream(method)(timeout=self.deadline_s, metadata=metadata)
        started = time.monotonic()
        code, details = grpc.StatusCode.OK, ""
        try:
            for message in messages:
                await call.write(message)
            if abandon:
                await asyncio.sleep(self.rng.random() * 0.05)
                call.cancel()
                return CallResult(kind, method, grpc.StatusCode.CANCELLED, "abandoned", time.monotonic() - started, self.deadline_s)
            await call.done_writing()
            while (reply := await call.read()) is not grpc.aio.EOF:
                del reply
        except grpc.aio.AioRpcError as exc:
            code, details = exc.code(), exc.details() or ""
        except asyncio.InvalidStateError:
            code, details = await call.code(), await call.details()
        return CallResult(kind, method, code, details, time.monotonic() - started, self.deadline_s)

    # --- hostile requests -------------------------------------------------------------------

    def _forward_request(self, to_first: bool) -> worker_pb2.ForwardRequest:
        rng, t = self.rng, self.t
        span = t.first_span if to_first else t.last_span
        request = worker_pb2.ForwardRequest(request_id=self._request_id())
        variant = rng.randrange(10)
        if variant < 4:
            request.input.CopyFrom(_hostile_tensor(rng, t.hidden_size))
        else:
            request.input.CopyFrom(_ids(rng) if to_first else _hidden(rng, t.hidden_size))
        if rng.random() < 0.7:
            request.layers.start, request.layers.end = span if rng.random() < 0.8 else (rng.randrange(50), rng.randrange(50))
        if variant == 4:  # forged relay route to an arbitrary host
            request.downstream.add(worker_id="evil", address=rng.choice(["10.0.0.1:1", "127.0.0.1:9", "example.invalid:80"]),
                                   layers=tensor_pb2.LayerRange(start=span[1], end=t.total_layers))
        if variant == 5:
            request.reply_dtype = rng.choice([tensor_pb2.DTYPE_INT64, tensor_pb2.DTYPE_BOOL, tensor_pb2.DTYPE_UINT8, 77])
        if variant == 6:  # someone else's session, odd positions, no key
            request.session_id = rng.choice(["s", "victim#0", "x" * 5000, ""])
            request.position = rng.choice([0, 1, 7, 2**31])
        if variant == 7:
            request.attention_mask.CopyFrom(_hostile_tensor(rng, t.hidden_size))
        if variant == 8:
            request.timeout_ms = rng.choice([1, 0, 2**32 - 1])
            request.hop_timeout_ms = rng.choice([1, 2**32 - 1])
        if variant == 9:
            request.model_checksum = rng.randbytes(16).hex()
        return request

    def _infer_request(self) -> router_pb2.InferRequest:
        rng = self.rng
        request = router_pb2.InferRequest(request_id=self._request_id())
        variant = rng.randrange(7)
        if variant == 0:
            request.text = rng.choice(["", "   ", "\x00" * 10, "ok " * rng.randrange(1, 3000), rng.randbytes(64).decode("latin-1")])
        elif variant == 1:
            request.tokens.ids.extend(rng.choice([[], [2**62], [-1, 5], [1] * rng.randrange(1, 5000)]))
        elif variant == 2:
            request.tensor.CopyFrom(_hostile_tensor(rng, self.t.hidden_size))
        elif variant == 3:
            request.tensor.CopyFrom(_ids(rng))
            request.attention_mask.CopyFrom(_hostile_tensor(rng, self.t.hidden_size))
        elif variant == 4:
            request.text = "hello"
            request.mode = rng.choice([0, 1, 2, 3, 99])  # type: ignore[assignment]
        elif variant == 5:
            request.text = "hello"
            request.timeout_ms = rng.choice([1, 2, 2**32 - 1])
        else:
            request.tokens.ids.extend([1, 2, 3])
        return request

    def _generate_request(self) -> router_pb2.GenerateRequest:
        rng = self.rng
        request = router_pb2.GenerateRequest(request_id=self._request_id())
        if rng.random() < 0.5:
            request.text = rng.choice(["", "hi", "x" * rng.randrange(1, 4000)])
        else:
            request.tokens.ids.extend(rng.choice([[], [1, 2], [2**40], [-7]]))
        request.max_new_tokens = rng.choice([0, 1, 3, 2**31])
        request.temperature = rng.choice([0.0, -1.0, 1e30, float("nan")])
        request.top_p = rng.choice([0.0, 1.0, -2.0, float("inf")])
        request.top_k = rng.choice([0, 1, 2**31])
        request.stop_strings.extend(rng.choice([[], [""], ["a" * 10000]]))
        return request

    def _request_id(self) -> str:
        rng = self.rng
        return rng.choice([
            f"fz-{rng.getrandbits(64):x}",
            "dup",  # collides with itself across concurrent calls
            "",
            "x" * rng.randrange(1, 20000),
            "\u2603/../\x00",
        ])

    def _one(self) -> Callable[[], Awaitable[CallResult]]:
        rng, t = self.rng, self.t
        kind = rng.choices(
            ["raw", "mutated", "forward", "infer", "generate", "stream", "abandon", "close", "misc"],
            weights=[10, 20, 22, 18, 5, 10, 6, 5, 4],
        )[0]
        worker = t.first_worker if rng.random() < 0.5 else t.last_worker
        wmeta, rmeta = t.worker_metadata, t.router_metadata
        if kind == "raw":
            address, prefix, meta = (t.router, ROUTER, rmeta) if rng.random() < 0.5 else (worker, WORKER, wmeta)
            method = prefix + rng.choice(["Infer", "Forward", "Describe", "CloseSession", "Topology", "Nope"])
            payload = rng.randbytes(rng.randrange(0, 2048))
            return lambda: self._unary(kind, address, method, payload, meta)
        if kind == "mutated":
            if rng.random() < 0.5:
                payload = _mutate(rng, self._infer_request().SerializeToString())
                return lambda: self._unary(kind, t.router, ROUTER + "Infer", payload, rmeta)
            payload = _mutate(rng, self._forward_request(worker == t.first_worker).SerializeToString())
            return lambda: self._unary(kind, worker, WORKER + "Forward", payload, wmeta)
        if kind == "forward":
            payload = self._forward_request(worker == t.first_worker).SerializeToString()
            return lambda: self._unary(kind, worker, WORKER + "Forward", payload, wmeta)
        if kind == "infer":
            payload = self._infer_request().SerializeToString()
            return lambda: self._unary(kind, t.router, ROUTER + "Infer", payload, rmeta)
        if kind == "generate":
            payload = self._generate_request().SerializeToString()
            return lambda: self._server_stream(kind, t.router, ROUTER + "Generate", payload, rmeta)
        if kind in ("stream", "abandon"):
            to_router = rng.random() < 0.4
            messages: list[bytes] = []
            for _ in range(rng.randrange(1, 6)):
                if to_router:
                    message = self._infer_request().SerializeToString()
                else:
                    message = self._forward_request(worker == t.first_worker).SerializeToString()
                if rng.random() < 0.3:
                    message = _mutate(rng, message)
                messages.append(message)
            address, method, meta = (t.router, ROUTER + "InferStream", rmeta) if to_router else (worker, WORKER + "ForwardStream", wmeta)
            return lambda: self._stream(kind, address, method, messages, meta, abandon=kind == "abandon")
        if kind == "close":
            payload = worker_pb2.CloseSessionRequest(
                session_id=rng.choice(["", "victim#0", "x" * 9000]), session_key=rng.randbytes(rng.randrange(0, 64))
            ).SerializeToString()
            return lambda: self._unary(kind, worker, WORKER + "CloseSession", payload, wmeta)
        payload = rng.choice([
            worker_pb2.DescribeRequest().SerializeToString(),
            health_pb2.HealthCheckRequest(service=rng.choice(["", "nope", "x" * 1000])).SerializeToString(),
        ])
        address = rng.choice([t.router, worker])
        method = HEALTH if payload and rng.random() < 0.5 else rng.choice([WORKER + "Describe", HEALTH])
        return lambda: self._unary(kind, address, method, payload, ())

    async def run(self, calls: int, on_progress: Callable[[int], None] | None = None) -> FuzzReport:
        """Runs ``calls`` calls, at most ``concurrency`` at once; returns the report."""
        queue: asyncio.Queue[Callable[[], Awaitable[CallResult]]] = asyncio.Queue()
        for _ in range(calls):
            queue.put_nowait(self._one())

        async def worker() -> None:
            while not queue.empty():
                make = queue.get_nowait()
                started = time.monotonic()
                try:
                    result = await asyncio.wait_for(make(), self.deadline_s + 2 * HANG_SLACK_S)
                except TimeoutError:  # the client's own deadline did not end the call: a hang
                    elapsed = time.monotonic() - started
                    result = CallResult("hang", "?", grpc.StatusCode.DEADLINE_EXCEEDED, "no answer", elapsed, self.deadline_s)
                self.report.results.append(result)
                if on_progress is not None:
                    on_progress(len(self.report.results))

        await asyncio.gather(*(worker() for _ in range(self.concurrency)))
        return self.report
