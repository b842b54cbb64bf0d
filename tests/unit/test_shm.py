from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from services.errors import InvalidArgument, Unavailable
from services.gen.shardmesh.v1 import tensor_pb2
from services.wire import shm

pytestmark = pytest.mark.skipif(not shm.shm_available(), reason="no writable /dev/shm")

LIMIT = 64 << 20


def _exists(name: str) -> bool:
    return (shm.SHM_DIR / name).exists()


def _export(tensor: torch.Tensor) -> tuple[tensor_pb2.Tensor, str]:
    msg = tensor_pb2.Tensor()
    return msg, shm.export_tensor(tensor, msg)


@pytest.mark.parametrize(
    "tensor",
    [
        torch.randn(2, 3, 4),
        torch.randn(5).to(torch.float16),
        torch.randn(3, 7).to(torch.bfloat16),
        torch.arange(12, dtype=torch.int64).reshape(3, 4),
        torch.tensor(3.5),
        torch.zeros(0, 4),
        torch.randn(4, 6).t(),  # non-contiguous
        torch.randn(1024, 2048 + 17),  # > 8 MiB
        torch.randn(2048, 2048).to(torch.bfloat16),  # 8 MiB
    ],
)
def test_round_trip_is_exact_and_consumes_segment(tensor: torch.Tensor) -> None:
    msg, name = _export(tensor)
    assert msg.shm_handle == name and msg.data == b"" and list(msg.shape) == list(tensor.shape)
    assert name.startswith(f"{shm.SHM_PREFIX}{os.getpid()}-") and _exists(name)
    out = shm.import_tensor(msg, field="input", max_bytes=LIMIT)
    assert out.dtype == tensor.dtype and out.shape == tensor.shape
    assert torch.equal(out, tensor)
    assert not _exists(name)


def test_imported_tensor_is_writable_copy() -> None:
    msg, _ = _export(torch.zeros(4))
    out = shm.import_tensor(msg, field="input", max_bytes=LIMIT)
    out += 1  # owns its memory: no view over a vanished segment
    assert torch.equal(out, torch.ones(4))


def test_export_rejects_unsupported_dtype() -> None:
    with pytest.raises(InvalidArgument, match="complex64"):
        _export(torch.zeros(2, dtype=torch.complex64))


@pytest.mark.parametrize(
    "name",
    ["../etc/passwd", "shardmesh-x/y", f"other-1-{'a' * 32}", f"shardmesh-1-{'a' * 31}", f"shardmesh-1-{'A' * 32}",
     f"shardmesh-1-{'a' * 32}/..", "", f"/dev/shm/shardmesh-1-{'a' * 32}"],
)
def test_invalid_names_are_rejected_naming_field(name: str) -> None:
    msg = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[1], shm_handle=name)
    with pytest.raises(InvalidArgument, match=r"input\.shm_handle: invalid shared-memory handle"):
        shm.import_tensor(msg, field="input", max_bytes=LIMIT)
    with pytest.raises(InvalidArgument):
        shm.discard(name)


def test_size_mismatch_names_both_numbers_and_unlinks() -> None:
    msg, name = _export(torch.randn(2, 3))
    msg.shape[:] = [2, 4]
    pattern = r"input: shared-memory segment .* has 24 bytes but shape \[2, 4\] x float32 needs 32"
    with pytest.raises(InvalidArgument, match=pattern):
        shm.import_tensor(msg, field="input", max_bytes=LIMIT)
    assert not _exists(name)


def test_oversize_is_rejected_before_reading() -> None:
    msg, name = _export(torch.randn(256))
    pattern = r"input: tensor of shape \[256\] \(1024 bytes\) exceeds the limit of 1000"
    with pytest.raises(InvalidArgument, match=pattern):
        shm.import_tensor(msg, field="input", max_bytes=1000)
    assert not _exists(name)


def test_bad_dtype_and_inline_data_are_rejected() -> None:
    msg, _ = _export(torch.randn(2))
    msg.dtype = tensor_pb2.DTYPE_UNSPECIFIED  # type: ignore[assignment]
    with pytest.raises(InvalidArgument, match="input: unknown or unspecified dtype 0"):
        shm.import_tensor(msg, field="input", max_bytes=LIMIT)
    msg, _ = _export(torch.randn(2))
    msg.data = b"x"
    with pytest.raises(InvalidArgument, match="both inline data and a shared-memory handle"):
        shm.import_tensor(msg, field="input", max_bytes=LIMIT)


def test_missing_segment_is_unavailable() -> None:
    msg, name = _export(torch.randn(3))
    os.unlink(shm.SHM_DIR / name)
    with pytest.raises(Unavailable, match=f"shared-memory segment {name} is gone; the sender must resend the bytes"):
        shm.import_tensor(msg, field="input", max_bytes=LIMIT)


def test_symlink_under_our_prefix_is_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "secret"
    target.write_bytes(b"\0" * 4)
    name = shm.new_segment_name()
    os.symlink(target, shm.SHM_DIR / name)
    msg = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[1], shm_handle=name)
    with pytest.raises(InvalidArgument, match="cannot open"):
        shm.import_tensor(msg, field="input", max_bytes=LIMIT)
    assert not os.path.lexists(shm.SHM_DIR / name) and target.exists()


def test_discard_and_sweep_own() -> None:
    shm.sweep_own()  # start from a clean slate
    _, a = _export(torch.randn(2))
    _, b = _export(torch.randn(2))
    msg_c, c = _export(torch.randn(2))
    shm.discard(a)
    shm.discard(a)  # idempotent
    assert not _exists(a)
    shm.import_tensor(msg_c, field="input", max_bytes=LIMIT)  # consumed: not counted
    assert shm.sweep_own() == 1
    assert not _exists(b)
    assert shm.sweep_own() == 0


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1:50051", True),
        ("127.8.9.10:1", True),
        ("localhost:50051", True),
        ("LOCALHOST:1", True),
        ("[::1]:50051", True),
        ("::1", True),
        ("localhost", True),
        ("ipv4:127.0.0.1:5", True),
        ("dns:///localhost:5", True),
        ("[::ffff:127.0.0.1]:5", True),
        ("10.0.0.1:50051", False),
        ("[2001:db8::1]:50051", False),
        ("worker-0.shardmesh:50051", False),
        ("0.0.0.0:50051", False),
        ("", False),
        ("garbage", False),
    ],
)
def test_is_colocated(address: str, expected: bool) -> None:
    assert shm.is_colocated(address) is expected


@pytest.mark.slow
def test_throughput_8mib() -> None:
    """Prints export+import GB/s for 8 MiB (information, not an assertion)."""
    tensor = torch.randn(2 << 20)
    best = float("inf")
    for _ in range(30):
        start = time.perf_counter()
        msg, _ = _export(tensor)
        out = shm.import_tensor(msg, field="input", max_bytes=LIMIT)
        best = min(best, time.perf_counter() - start)
    assert torch.equal(out, tensor)
    print(f"\nshm export+import 8 MiB: best {best * 1e3:.2f} ms = {tensor.nbytes / best / 1e9:.2f} GB/s")
