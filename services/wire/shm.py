"""Shared-memory transport for co-located peers: the wire carries a segment name, not the bytes.

Like Triton's shared-memory extension, a sender on the same host writes an activation into a file
and sends only ``Tensor.shm_handle``; the receiver copies it out and unlinks it. Plain files
(``os.open`` + ``os.write``) are used rather than ``multiprocessing.shared_memory``, whose resource
tracker on Python 3.11 unlinks or warns about segments that crossed processes.

Ownership and trust (issue 15): segments live in a private directory, ``/dev/shm/shardmesh-<uid>``
(mode 0700, owned by this user, refused otherwise), so another user can neither list nor open them.
Each segment starts with a header: magic, payload length, the creator's pid namespace, a digest of
the request id it was made for, and an HMAC (key: a random per-directory secret, readable only by
this user) over all of it and the segment name. A receiver claims a segment only if the MAC holds
and it was made for the request that names it: a caller naming another request's segment gets
PERMISSION_DENIED and the segment is left for its owner; a directory, FIFO or symlink named like a
segment is refused without blocking (``O_NONBLOCK``, ``fstat``) and never deleted.

Lifetime (issue 14): the creator owns a segment until it is sent; once the receiver has claimed it
(accepted or rejected) the receiver unlinks it. A send that fails or is cancelled calls
:func:`discard`; :func:`sweep_own` at shutdown removes whatever this process created and nobody
consumed; :func:`sweep_dead` at start removes segments whose creator died (pid gone, or reused by a
process that started after the segment was written), so even a SIGKILL leaks only until the next
router or worker starts on the host.

Measured on the 2-core dev box, 8 MiB float32: ``os.write`` of a memoryview 2.4 ms vs 6.8-11 ms for
``mmap`` + copy (fresh tmpfs pages fault one at a time under mmap); ``readv`` into a preallocated
tensor 2.0 ms vs 4.4-9.1 ms for ``mmap`` + ``torch.frombuffer().clone()``. Hence write/read here.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import hmac
import ipaddress
import os
import re
import secrets
import stat
import struct
import threading
import uuid
from pathlib import Path

import torch

from services.errors import ConfigError, InvalidArgument, PermissionDenied, ResourceExhausted, ShardmeshError, Unavailable
from services.gen.shardmesh.v1 import tensor_pb2
from services.net import split_host_port
from services.telemetry import SHM_IN_FLIGHT_BYTES, SHM_READ_BYTES, SHM_WRITTEN_BYTES, watch
from services.wire import codec

SHM_PREFIX = "shardmesh-"
SHM_ROOT = Path("/dev/shm")
SHM_DIR = SHM_ROOT / f"{SHM_PREFIX}{os.getuid()}"  # private: 0700, this user's only
_KEY_NAME = "mac.key"
_KEY_BYTES = 32
# Exactly what new_segment_name() produces: no slashes, no dots, nothing outside SHM_DIR.
_NAME_RE = re.compile(re.escape(SHM_PREFIX) + r"([0-9]{1,10})-[0-9a-f]{32}")
_LOCALHOST_NAMES = frozenset({"localhost", "localhost.", "ip6-localhost", "ip6-loopback"})

# Header: magic, payload bytes, creator's pid namespace inode, sha256(request id)[:16], HMAC-SHA256.
_MAGIC = b"SMSHM\x01\x00\x00"
_HEAD = struct.Struct("<8sQQ16s")
_MAC_BYTES = 32
HEADER_BYTES = _HEAD.size + _MAC_BYTES

_created: set[str] = set()  # segments this process made and has not seen consumed
_created_lock = threading.Lock()  # export may run in executor threads
_PRUNE_MIN = 1024
_prune_at = _PRUNE_MIN  # when _created reaches this size, names a peer already claimed are dropped


def _remember(name: str) -> None:
    """Records a segment this process made. Peers claim (unlink) most segments without telling us, so the set
    is pruned of names whose files are gone whenever it doubles: a long-running sender's memory stays bounded
    by the segments still on disk, at amortised O(1) per export."""
    global _prune_at
    with _created_lock:
        _created.add(name)
        if len(_created) < _prune_at:
            return
        names = list(_created)
    gone = [n for n in names if not (SHM_DIR / n).exists()]
    with _created_lock:
        _created.difference_update(gone)
        _prune_at = max(_PRUNE_MIN, 2 * len(_created))


def shm_available() -> bool:
    """Whether this host offers a usable private segment directory (not on macOS or some sandboxes)."""
    try:
        private_dir()
    except (ConfigError, OSError):
        return False
    return True


def private_dir() -> Path:
    """Creates (once) and checks ``SHM_DIR``: a real directory of this user, mode 0700.

    A directory planted by someone else (another owner, a symlink, group/other access) is refused
    with ConfigError rather than used: whoever controls it could read or swap our activations.
    """
    try:
        os.mkdir(SHM_DIR, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(SHM_DIR)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise ConfigError(
            f"{SHM_DIR} is not a private directory of uid {os.geteuid()} (mode 0700); remove it so shardmesh"
            " can create it, or run with --no-shm"
        )
    return SHM_DIR


def _mac_key() -> bytes:
    """The per-directory secret: created once (atomically, 0600), then read by every process of this user."""
    path = private_dir() / _KEY_NAME
    for _ in range(3):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            tmp = path.with_name(f".{_KEY_NAME}.{os.getpid()}.{uuid.uuid4().hex}")
            tfd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600)
            try:
                os.write(tfd, secrets.token_bytes(_KEY_BYTES))
            finally:
                os.close(tfd)
            try:
                os.link(tmp, path)  # atomic: the first process to get here defines the key
            except FileExistsError:
                pass
            finally:
                os.unlink(tmp)
            continue
        try:
            st = os.fstat(fd)
            key = os.read(fd, _KEY_BYTES + 1)
        finally:
            os.close(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077 or len(key) != _KEY_BYTES:
            raise ConfigError(f"{path} is not a {_KEY_BYTES}-byte file private to uid {os.geteuid()}; remove it")
        return key
    raise ConfigError(f"cannot create the shared-memory key {path}")


def _pid_namespace() -> int:
    """Inode of this process's pid namespace (0 if unknown): pids mean something only within one."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _bind_digest(request_id: str) -> bytes:
    return hashlib.sha256(request_id.encode()).digest()[:16]


def _header(name: str, payload_len: int, pidns: int, bound: bytes, key: bytes) -> bytes:
    head = _HEAD.pack(_MAGIC, payload_len, pidns, bound)
    return head + hmac.new(key, name.encode() + b"\0" + head, hashlib.sha256).digest()


@functools.lru_cache(maxsize=1024)
def is_colocated(address: str) -> bool:
    """True when ``address`` (``HOST:PORT``, ``[::1]:PORT`` or a bare host) is a loopback host.

    Only then can the peer see this host's ``/dev/shm``. Pure: no name resolution, so a host name
    other than ``localhost`` counts as remote even if it happens to resolve to this machine; being
    pure, it is memoised (it runs on every hop and parses an IP address each time).
    """
    text = address.strip()
    for scheme in ("dns:///", "ipv4:", "ipv6:"):
        if text.startswith(scheme):
            text = text[len(scheme) :]
            break
    host = text.strip("[]")
    if not _is_loopback_host(host):
        try:
            host, _ = split_host_port(text)
        except ConfigError:
            return False
    return _is_loopback_host(host)


def _is_loopback_host(host: str) -> bool:
    if host.lower() in _LOCALHOST_NAMES:
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def new_segment_name() -> str:
    """``shardmesh-<pid>-<uuid hex>``: the pid lets :func:`sweep_dead` find segments whose creator died."""
    return f"{SHM_PREFIX}{os.getpid()}-{uuid.uuid4().hex}"


def validate_name(name: str, *, field: str) -> str:
    """Rejects any name that is not exactly one of ours, so a peer cannot point us at other files."""
    if not _NAME_RE.fullmatch(name):
        raise InvalidArgument(
            f"{field}: invalid shared-memory handle {name[:80]!r}; expected {SHM_PREFIX}<pid>-<32 hex digits>"
        )
    return name


def export_tensor(tensor: torch.Tensor, out: tensor_pb2.Tensor, *, request_id: str = "") -> str:
    """Writes ``tensor``'s raw little-endian bytes to a new segment made for ``request_id``.

    Fills ``out.dtype``, ``out.shape`` and ``out.shm_handle``; ``out.data`` stays empty. Returns the
    segment name; the caller must :func:`discard` it if the message is never delivered. Only a
    request with this id can claim the segment (:func:`import_tensor` with ``request_id``).
    """
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    # The codec checks the dtype and sets the wire enum; an empty tensor keeps that free.
    codec.encode(torch.empty(0, dtype=t.dtype), out)
    del out.shape[:]
    out.shape.extend(t.shape)
    payload = memoryview(t.reshape(-1).view(torch.uint8).numpy())

    key = _mac_key()
    name = new_segment_name()
    header = _header(name, len(payload), _pid_namespace(), _bind_digest(request_id), key)
    fd = os.open(SHM_DIR / name, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600)
    _remember(name)
    try:
        _write_all(fd, memoryview(header))
        _write_all(fd, payload)  # one call for anything tmpfs accepts
    except OSError as exc:
        discard(name)
        if exc.errno == errno.ENOSPC:
            raise ResourceExhausted(
                f"{SHM_ROOT} is full: cannot place a {len(payload)}-byte tensor in shared memory"
            ) from None
        raise
    finally:
        os.close(fd)
    SHM_WRITTEN_BYTES.inc(len(payload))
    out.shm_handle = name
    return name


def _write_all(fd: int, data: memoryview) -> None:
    written = 0
    while written < len(data):  # loop for short writes
        written += os.write(fd, data[written:])


def import_tensor(
    msg: tensor_pb2.Tensor,
    *,
    field: str,
    max_bytes: int,
    request_id: str | None = None,
    expect_dtype: tuple[torch.dtype, ...] | None = None,
    expect_rank: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """Claims ``msg``'s segment, checks it against the message, copies it out and unlinks it.

    ``request_id``: the request that named the segment; the segment must have been made for it
    (``None``: any request of this mesh, for callers that read their own peers' replies).
    Before the claim nothing is deleted: a name that is not one of ours, a non-regular file, or a
    segment whose MAC or request does not match is refused (INVALID_ARGUMENT / PERMISSION_DENIED)
    and left alone. After the claim every problem (shape, dtype, size) still unlinks the segment,
    since its sender handed it over. A segment that no longer exists is UNAVAILABLE: the sender can
    recover by resending the bytes inline.
    """
    name = validate_name(msg.shm_handle, field=f"{field}.shm_handle")
    try:
        fd = os.open(SHM_DIR / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise Unavailable(
            f"{field}: shared-memory segment {name} is gone; the sender must resend the bytes"
        ) from None
    except OSError as exc:  # e.g. ELOOP: a symlink planted under our prefix; ENXIO: a socket
        raise InvalidArgument(f"{field}: cannot open shared-memory segment {name}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)  # never read anything but a regular file: a FIFO would block the event loop
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            raise InvalidArgument(f"{field}: shared-memory segment {name} is not a regular file of this mesh")
        payload_len = _claim(fd, st.st_size, name, field=field, request_id=request_id)
        try:
            return _read_payload(fd, msg, payload_len, name=name, field=field, max_bytes=max_bytes,
                                 expect_dtype=expect_dtype, expect_rank=expect_rank)
        finally:
            _unlink(name)
    finally:
        os.close(fd)


def _claim(fd: int, size: int, name: str, *, field: str, request_id: str | None) -> int:
    """Verifies the header (MAC, request binding); returns the payload length. Raises without unlinking."""
    head = os.pread(fd, HEADER_BYTES, 0) if size >= HEADER_BYTES else b""
    if len(head) != HEADER_BYTES:
        raise PermissionDenied(f"{field}: shared-memory segment {name} has no valid shardmesh header")
    magic, payload_len, _pidns, bound = _HEAD.unpack(head[: _HEAD.size])
    expected_mac = hmac.new(_mac_key(), name.encode() + b"\0" + head[: _HEAD.size], hashlib.sha256).digest()
    if magic != _MAGIC or not hmac.compare_digest(expected_mac, head[_HEAD.size :]):
        raise PermissionDenied(f"{field}: shared-memory segment {name} was not written by a peer of this mesh")
    if request_id is not None and not hmac.compare_digest(bound, _bind_digest(request_id)):
        raise PermissionDenied(
            f"{field}: shared-memory segment {name} was made for another request, not {request_id[:80]!r};"
            " a request may only hand over its own segments"
        )
    if size != HEADER_BYTES + payload_len:
        raise InvalidArgument(f"{field}: shared-memory segment {name} was truncated or extended after it was written")
    return int(payload_len)


def _read_payload(
    fd: int,
    msg: tensor_pb2.Tensor,
    payload_len: int,
    *,
    name: str,
    field: str,
    max_bytes: int,
    expect_dtype: tuple[torch.dtype, ...] | None,
    expect_rank: tuple[int, ...] | None,
) -> torch.Tensor:
    if msg.data:
        raise InvalidArgument(f"{field}: carries both inline data and a shared-memory handle")
    dtype, shape, expected = codec.check_header(
        msg, field=field, max_bytes=max_bytes, expect_dtype=expect_dtype, expect_rank=expect_rank
    )
    if payload_len != expected:
        raise InvalidArgument(
            f"{field}: shared-memory segment {name} has {payload_len} bytes but shape {shape}"
            f" x {codec.dtype_name(dtype)} needs {expected}"
        )
    out = torch.empty(shape, dtype=dtype)
    if expected == 0:
        return out
    buf = memoryview(out.view(-1).view(torch.uint8).numpy())
    done = 0
    while done < expected:
        got = os.preadv(fd, [buf[done:]], HEADER_BYTES + done)
        if got == 0:
            raise InvalidArgument(f"{field}: shared-memory segment {name} shrank while being read")
        done += got
    SHM_READ_BYTES.inc(expected)
    return out


def in_flight_bytes() -> int:
    """Payload bytes of this process's segments that still exist (written, not yet claimed by a receiver).

    Read from the directory at metrics scrape time: a receiver in another process unlinks what it claims,
    which this process is never told about."""
    own_prefix = f"{SHM_PREFIX}{os.getpid()}-"
    total = 0
    try:
        with os.scandir(SHM_DIR) as entries:
            for entry in entries:
                if entry.name.startswith(own_prefix):
                    try:
                        total += max(0, entry.stat(follow_symlinks=False).st_size - HEADER_BYTES)
                    except FileNotFoundError:
                        pass  # claimed meanwhile
    except OSError:
        return 0  # no shared-memory directory (yet): nothing in flight
    return total


watch(SHM_IN_FLIGHT_BYTES, in_flight_bytes)


def discard(name: str) -> None:
    """Unlinks a segment if it still exists; for sends that failed or were abandoned before the peer read it."""
    _unlink(validate_name(name, field="shm_handle"))


def discard_unread(name: str, request_id: str) -> bool:
    """Unlinks a segment a caller handed over that was never read (its request was dropped unanswered),
    but only one made for ``request_id`` by a peer of this mesh: a caller can never make this process
    delete anything else. Never raises; returns whether a segment was removed."""
    if not _NAME_RE.fullmatch(name):
        return False
    try:
        fd = os.open(SHM_DIR / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            return False
        try:
            _claim(fd, st.st_size, name, field="input", request_id=request_id)
        except ShardmeshError:
            return False
    finally:
        os.close(fd)
    _unlink(name)
    return True


def sweep_own() -> int:
    """Unlinks every segment this process created that still exists; returns how many. Call at shutdown."""
    own_prefix = f"{SHM_PREFIX}{os.getpid()}-"
    with _created_lock:
        names = [n for n in _created if n.startswith(own_prefix)]
        _created.clear()
    removed = 0
    for name in names:
        try:
            os.unlink(SHM_DIR / name)
            removed += 1
        except FileNotFoundError:
            pass  # consumed by the receiver, as intended
    return removed


def sweep_dead() -> int:
    """Unlinks segments whose creator is dead; returns how many. Call at start (router and worker).

    Safe with live processes around: a segment is removed only if it is a regular file of ours
    with a valid header from this pid namespace, and its creator pid either does not exist or
    belongs to a process that started after the segment was written (the pid was reused). Anything
    else, including another live process's segments and entries we did not make, is left alone.
    """
    if not shm_available():
        return 0
    key, pidns, removed = _mac_key(), _pid_namespace(), 0
    for entry in os.scandir(SHM_DIR):
        match = _NAME_RE.fullmatch(entry.name)
        if match is None or int(match.group(1)) == os.getpid():
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode) or st.st_size < HEADER_BYTES:
                continue
            with open(entry.path, "rb", buffering=0) as f:  # regular file: no blocking open
                head = f.read(HEADER_BYTES)
        except OSError:
            continue
        magic, _len, creator_ns, _bound = _HEAD.unpack(head[: _HEAD.size])
        mac = hmac.new(key, entry.name.encode() + b"\0" + head[: _HEAD.size], hashlib.sha256).digest()
        if magic != _MAGIC or not hmac.compare_digest(mac, head[_HEAD.size :]) or creator_ns != pidns:
            continue  # not provably ours, or made in another pid namespace where we cannot judge the pid
        if _alive_since(int(match.group(1)), st.st_mtime):
            continue
        try:
            os.unlink(entry.path)
            removed += 1
        except FileNotFoundError:
            pass  # its receiver consumed it meanwhile
    return removed


def _alive_since(pid: int, written: float) -> bool:
    """Whether process ``pid`` exists and is the one that could have written at ``written`` (epoch s)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, belongs to someone else: not ours to judge
    started = _process_start(pid)
    return started is None or started <= written + 1.0


def _process_start(pid: int) -> float | None:
    """Epoch seconds at which ``pid`` started, from /proc (None where /proc is unavailable)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        with open("/proc/stat", "rb") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith(b"btime"))
        return btime + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError, StopIteration):
        return None


def _unlink(name: str) -> None:
    with _created_lock:
        _created.discard(name)
    try:
        os.unlink(SHM_DIR / name)
    except FileNotFoundError:
        pass
