"""Issue 14 defect 5, worker side: a compute that packs its output after the request went away (cancelled,
timed out) must not leave the segment behind, whichever side finishes last."""

from __future__ import annotations

import torch

from services.gen.shardmesh.v1 import tensor_pb2
from services.wire import placement, shm
from shard_worker.core import OutputHandoff


def _packed() -> tuple[tensor_pb2.Tensor, str]:
    msg = placement.pack(torch.zeros(1 << 18), colocated=True, request_id="r")  # 1 MiB: shared memory
    assert msg.shm_handle
    return msg, msg.shm_handle


def test_abandon_after_the_compute_packed_frees_the_segment() -> None:
    handoff = OutputHandoff()
    msg, name = _packed()
    handoff.put(msg)
    assert (shm.SHM_DIR / name).exists()
    handoff.abandon()
    assert not (shm.SHM_DIR / name).exists()


def test_packing_after_the_request_left_frees_the_segment_at_once() -> None:
    handoff = OutputHandoff()
    handoff.abandon()
    msg, name = _packed()
    handoff.put(msg)  # the compute thread finishes late
    assert not (shm.SHM_DIR / name).exists()


def test_a_delivered_output_is_left_to_its_receiver() -> None:
    handoff = OutputHandoff()
    msg, name = _packed()
    handoff.put(msg)
    assert (shm.SHM_DIR / name).exists()
    out = placement.unpack(msg, field="output", max_bytes=1 << 30, request_id="r")
    assert out.shape == (1 << 18,) and not (shm.SHM_DIR / name).exists()
