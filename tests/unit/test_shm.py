from __future__ import annotations

import os
import stat
import threading
import time
from pathlib import Path

import pytest
import torch

from services.errors import InvalidArgument, PermissionDenied, Unavailable
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
    # Refused, and not deleted either: a caller must not be able to make a worker remove entries it did not claim.
    assert os.path.lexists(shm.SHM_DIR / name) and target.exists()
    os.unlink(shm.SHM_DIR / name)


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


# --- issue 15: segments are bound to their owner; hostile entries are refused without blocking or deleting ---


def test_private_directory_is_0700_and_owned_by_us() -> None:
    st = os.lstat(shm.private_dir())
    assert stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) == 0o700
    assert shm.SHM_DIR.parent == shm.SHM_ROOT


def test_stealing_another_requests_segment_is_denied_and_owner_still_reads_it() -> None:
    msg = tensor_pb2.Tensor()
    name = shm.export_tensor(torch.arange(6.0), msg, request_id="owner/0/0")
    stolen = tensor_pb2.Tensor()
    stolen.CopyFrom(msg)
    with pytest.raises(PermissionDenied, match="made for another request, not 'thief/0/0'"):
        shm.import_tensor(stolen, field="input", max_bytes=LIMIT, request_id="thief/0/0")
    assert _exists(name)  # left for its owner
    out = shm.import_tensor(msg, field="input", max_bytes=LIMIT, request_id="owner/0/0")
    assert torch.equal(out, torch.arange(6.0)) and not _exists(name)


def test_forged_segment_without_our_mac_is_denied_and_left_alone() -> None:
    name = shm.new_segment_name()
    path = shm.private_dir() / name
    path.write_bytes(b"\0" * (shm.HEADER_BYTES + 16))
    msg = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[4], shm_handle=name)
    try:
        with pytest.raises(PermissionDenied, match="not written by a peer of this mesh"):
            shm.import_tensor(msg, field="input", max_bytes=LIMIT, request_id="r")
        assert path.exists()
    finally:
        path.unlink()


def test_directory_named_like_a_segment_is_invalid_argument_and_kept() -> None:
    name = shm.new_segment_name()
    path = shm.private_dir() / name
    path.mkdir()
    msg = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[1], shm_handle=name)
    try:
        with pytest.raises(InvalidArgument, match="is not a regular file"):
            shm.import_tensor(msg, field="input", max_bytes=LIMIT)
        assert path.is_dir()
    finally:
        path.rmdir()


def test_fifo_named_like_a_segment_is_refused_without_blocking() -> None:
    name = shm.new_segment_name()
    path = shm.private_dir() / name
    os.mkfifo(path)
    msg = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[1], shm_handle=name)
    result: list[BaseException] = []

    def attempt() -> None:
        try:
            shm.import_tensor(msg, field="input", max_bytes=LIMIT)
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            result.append(exc)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(5)
    try:
        if worker.is_alive():  # unblock the thread (a writer opens the FIFO) before failing
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            pytest.fail("opening a FIFO named like a segment blocked")
        assert len(result) == 1 and isinstance(result[0], InvalidArgument), result
        assert "is not a regular file" in str(result[0])
        assert stat.S_ISFIFO(os.lstat(path).st_mode)
    finally:
        os.unlink(path)


def test_segment_rejected_on_its_message_header_is_unlinked() -> None:
    msg = tensor_pb2.Tensor()
    name = shm.export_tensor(torch.zeros(2, 3), msg, request_id="r")
    with pytest.raises(InvalidArgument, match="dtype float32 not accepted here"):
        shm.import_tensor(msg, field="input", max_bytes=LIMIT, request_id="r", expect_dtype=(torch.int64,))
    assert not _exists(name)


def test_overflowing_shape_is_invalid_argument() -> None:
    msg = tensor_pb2.Tensor()
    name = shm.export_tensor(torch.zeros(0, 4), msg, request_id="r")
    msg.shape[:] = [0, 2**62, 384]
    with pytest.raises(InvalidArgument, match=r"input: empty tensor of shape \[0, 4611686018427387904, 384\]"):
        shm.import_tensor(msg, field="input", max_bytes=LIMIT, request_id="r")
    assert not _exists(name)


_EXPORT_AND_WAIT = """
import sys, time, torch
from services.gen.shardmesh.v1 import tensor_pb2
from services.wire import shm
print(shm.export_tensor(torch.zeros(1024), tensor_pb2.Tensor(), request_id="x"), flush=True)
time.sleep(60)
"""


def test_sweep_dead_removes_a_killed_processes_segments_but_not_live_ones() -> None:
    import subprocess
    import sys

    children = [
        subprocess.Popen([sys.executable, "-c", _EXPORT_AND_WAIT], stdout=subprocess.PIPE, text=True) for _ in range(2)
    ]
    try:
        names = [c.stdout.readline().strip() for c in children]  # type: ignore[union-attr]
        assert all(_exists(n) for n in names)
        children[0].kill()
        children[0].wait(10)
        mine = tensor_pb2.Tensor()
        own = shm.export_tensor(torch.zeros(4), mine)
        assert shm.sweep_dead() >= 1
        assert not _exists(names[0])  # creator SIGKILLed: swept
        assert _exists(names[1]) and _exists(own)  # creators alive: kept
        # A pid reused by a process that started after the segment was written does not keep it alive.
        old = time.time() - 3600
        os.utime(shm.SHM_DIR / names[1], (old, old))
        assert shm.sweep_dead() >= 1 and not _exists(names[1])
        shm.discard(own)
    finally:
        for c in children:
            c.kill()
            c.wait(10)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_another_user_can_neither_list_nor_open_segments() -> None:
    import subprocess

    msg = tensor_pb2.Tensor()
    name = shm.export_tensor(torch.zeros(4), msg)
    probe = f"ls {shm.SHM_DIR} >/dev/null 2>&1 && echo open || echo denied; cat {shm.SHM_DIR / name} >/dev/null 2>&1 && echo open || echo denied"
    out = subprocess.run(["/bin/sh", "-c", probe], user=65534, group=65534, capture_output=True, text=True, timeout=30)
    assert out.stdout.split() == ["denied", "denied"], out.stderr
    shm.discard(name)


def test_a_dropped_request_frees_only_its_own_segment() -> None:
    """A stream server frees the input of a request it dropped unanswered (stream ended): only when the
    segment was made for that request. A caller naming someone else's segment cannot get it deleted, and a
    handle that is not a segment name at all is ignored (it used to escape the stream as UNKNOWN)."""
    from services.gen.shardmesh.v1 import worker_pb2
    from services.transport.release import release_request

    victim = tensor_pb2.Tensor()
    shm.export_tensor(torch.ones(1024), victim, request_id="victim")
    hostile = worker_pb2.ForwardRequest(request_id="attacker", input=victim)
    release_request(hostile)
    assert (shm.SHM_DIR / victim.shm_handle).exists(), "a caller got another request's segment deleted"
    for bogus in ("shardmesh-../../tmp/x", "not-a-segment", "shardmesh-1-" + "0" * 32):
        release_request(worker_pb2.ForwardRequest(request_id="r", input=tensor_pb2.Tensor(shm_handle=bogus)))
    release_request(worker_pb2.ForwardRequest(request_id="victim", input=victim))
    assert not (shm.SHM_DIR / victim.shm_handle).exists()


def test_names_a_peer_claimed_do_not_accumulate_in_a_long_running_sender() -> None:
    """Peers unlink the segments they read without telling the sender: its record of them must stay bounded."""
    before = len(shm._created)
    for i in range(3 * shm._PRUNE_MIN):
        msg = tensor_pb2.Tensor()
        name = shm.export_tensor(torch.full((4,), float(i)), msg, request_id=f"r{i}")
        os.unlink(shm.SHM_DIR / name)  # what a peer process does when it claims the segment
    assert len(shm._created) <= before + shm._PRUNE_MIN
    kept = tensor_pb2.Tensor()
    name = shm.export_tensor(torch.ones(4), kept)
    assert name in shm._created  # a segment still on disk is remembered (sweep_own frees it at shutdown)
    shm.discard(name)
