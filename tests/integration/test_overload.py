"""A flood of concurrent requests is shed with RESOURCE_EXHAUSTED and the worker's memory stays bounded."""

from __future__ import annotations

import asyncio

import grpc
import psutil
import pytest
import torch

from services.gen.shardmesh.v1 import worker_pb2, worker_pb2_grpc
from services.wire import codec
from tests.procs import start_worker, wait_serving

pytestmark = [pytest.mark.integration]

MIB = 1024 * 1024
FLOODS = 4


async def _sample_rss(pid: int, stop: asyncio.Event, peak: list[int]) -> None:
    proc = psutil.Process(pid)
    while not stop.is_set():
        peak[0] = max(peak[0], proc.memory_info().rss)
        await asyncio.sleep(0.02)


async def test_flood_is_shed_and_memory_bounded() -> None:
    proc, address = start_worker("minilm", "2:4", "--max-inflight", "4")
    try:
        wait_serving(address)
        hidden = codec.encode(torch.randn(2, 340, 384))  # about 1 MiB per request
        with grpc.insecure_channel(address) as warm:  # first forwards allocate torch's working memory
            for _ in range(3):
                worker_pb2_grpc.ShardWorkerStub(warm).Forward(worker_pb2.ForwardRequest(input=hidden), timeout=60)
        baseline = psutil.Process(proc.pid).memory_info().rss
        peak = [baseline]
        settled: list[int] = []
        async with grpc.aio.insecure_channel(address, options=[("grpc.max_send_message_length", 64 * MIB)]) as channel:
            stub = worker_pb2_grpc.ShardWorkerStub(channel)
            # Four floods of 300 requests of 1 MiB at once: 1.2 GiB of requests in all.
            for flood in range(FLOODS):
                codes: dict[grpc.StatusCode, int] = {}
                stop = asyncio.Event()
                sampler = asyncio.create_task(_sample_rss(proc.pid, stop, peak))

                async def one(i: int) -> None:
                    try:
                        await stub.Forward(worker_pb2.ForwardRequest(request_id=f"{flood}-{i}", input=hidden), timeout=60)
                        code = grpc.StatusCode.OK
                    except grpc.aio.AioRpcError as exc:
                        code = exc.code()
                        if code == grpc.StatusCode.UNAVAILABLE:
                            # HTTP/2 REFUSED_STREAM: beyond the per-connection stream cap before the client saw
                            # the server's SETTINGS; nothing was processed, so a retry is always safe.
                            assert "RST_STREAM with error code 7" in (exc.details() or ""), exc.details()
                    codes[code] = codes.get(code, 0) + 1

                await asyncio.gather(*(one(i) for i in range(300)))
                stop.set()
                await sampler
                settled.append(psutil.Process(proc.pid).memory_info().rss)
                shed = {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE}
                assert set(codes) <= shed, codes
                assert codes.get(grpc.StatusCode.RESOURCE_EXHAUSTED, 0) > 0 and codes.get(grpc.StatusCode.OK, 0) >= 4
            growth = (peak[0] - baseline) / MIB
            steps = [round((r - baseline) / MIB) for r in settled]
            print(f"RSS above baseline after each flood: {steps} MiB; peak {growth:.0f} MiB", flush=True)
            # Shedding bounds the worker's memory: the same worker admitting whole floods (--max-inflight 400) held
            # 1.2 GiB after the first. What a shedding worker keeps is malloc's: RSS climbs over the first floods
            # and drifts towards a plateau whose level varies from run to run (measured over 8-12 floods: 250-480
            # MiB above baseline, a CI run still rising slowly at the 8th flood: 202 ... 460), so a test of the
            # plateau's flatness flakes; the bound on peak and every settled value is what holds.
            assert growth < 600, f"worker RSS grew by {growth:.0f} MiB under {FLOODS * 300} MiB of flooding requests"
            assert max(steps) < 600, f"worker RSS stayed high after floods ({steps} MiB)"
            # Still serving afterwards.
            reply = await stub.Forward(worker_pb2.ForwardRequest(request_id="after", input=hidden), timeout=30)
            assert list(reply.output.shape) == [2, 340, 384]

            # The same flood on one stream: the worker reads only as many requests as it can admit.
            call = stub.ForwardStream()
            peak[0] = psutil.Process(proc.pid).memory_info().rss
            base_stream = peak[0]
            stop = asyncio.Event()
            sampler = asyncio.create_task(_sample_rss(proc.pid, stop, peak))

            async def writer() -> None:
                for i in range(200):
                    await call.write(worker_pb2.ForwardRequest(request_id=f"s{i}", input=hidden))
                await call.done_writing()

            writing = asyncio.create_task(writer())
            replies = [r async for r in call]
            await writing
            stop.set()
            await sampler
            assert len(replies) == 200 and all(not r.HasField("error") for r in replies)
            growth = (peak[0] - base_stream) / MIB
            assert growth < 150, f"worker RSS grew by {growth:.0f} MiB under a stream flood"
    finally:
        assert proc.stop() == 0
