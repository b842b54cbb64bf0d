"""Model checksums: equal checksums mean byte-identical config and weights, in any process or machine.

The checksum is sha256 over each file's name and its own sha256 (config.json, then every *.safetensors
in name order). Per-file digests are remembered in a small JSON side file keyed by (path, size,
mtime_ns), so a restart does not re-read gigabytes; any change to a file invalidates its entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from pathlib import Path

from services.models.weights import weight_files

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


def model_checksum(model_dir: Path, cache_file: Path | None = None) -> str:
    """sha256 over config.json and the safetensors files of ``model_dir``."""
    cache = _load_cache(cache_file)
    combined = hashlib.sha256()
    changed = False
    for path in [model_dir / "config.json", *weight_files(model_dir)]:
        digest, fresh = _file_digest(path, cache)
        changed = changed or fresh
        combined.update(f"{path.name}\0{digest}\n".encode())
    if changed and cache_file is not None:
        _store_cache(cache_file, cache)
    return combined.hexdigest()


def _file_digest(path: Path, cache: dict[str, dict[str, object]]) -> tuple[str, bool]:
    """Returns (hex digest, whether it had to be computed)."""
    stat = path.stat()
    key = str(path.resolve())
    entry = cache.get(key)
    if entry and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
        return str(entry["sha256"]), False
    hasher = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            hasher.update(chunk)
    digest = hasher.hexdigest()
    cache[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
    return digest, True


def _load_cache(cache_file: Path | None) -> dict[str, dict[str, object]]:
    if cache_file is None or not cache_file.is_file():
        return {}
    try:
        data = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        return {}  # a corrupt cache only costs a re-hash
    return data if isinstance(data, dict) else {}


def _store_cache(cache_file: Path, cache: dict[str, dict[str, object]]) -> None:
    """Atomic replace, so concurrent writers never leave a torn file (last writer wins; it is a cache)."""
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        staging = cache_file.with_name(f".{cache_file.name}.{os.getpid()}-{uuid.uuid4().hex}")
        staging.write_text(json.dumps(cache, indent=1, sort_keys=True))
        os.replace(staging, cache_file)
    except OSError as exc:
        log.warning("could not store checksum cache %s: %s", cache_file, exc)
