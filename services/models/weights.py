"""Lazy weight loading: a stage reads only the tensors of its own modules from the safetensors files.

Modules are built on the ``meta`` device (no memory, no random init) and then given real tensors with
``load_state_dict(assign=True)``, so a worker never holds more of the model than its layer range needs.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from services.errors import ConfigError

SHARD_INDEX_FILE = "model.safetensors.index.json"


def weight_files(model_dir: Path) -> list[Path]:
    """The model's ``*.safetensors`` files in a stable order (the order the checksum uses)."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"no *.safetensors weight files in {model_dir}: export the model with safetensors")
    return files


class WeightReader:
    """Maps tensor names to their file and reads single tensors on demand (headers only until asked)."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        self._file_of: dict[str, Path] = {}
        index = model_dir / SHARD_INDEX_FILE
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            self._file_of = {key: model_dir / name for key, name in weight_map.items()}
        else:
            for path in weight_files(model_dir):
                with safe_open(str(path), framework="pt") as handle:
                    self._file_of.update(dict.fromkeys(handle.keys(), path))

    def keys(self) -> set[str]:
        return set(self._file_of)

    def __contains__(self, key: str) -> bool:
        return key in self._file_of

    def shape(self, key: str) -> tuple[int, ...]:
        with safe_open(str(self._path(key)), framework="pt") as handle:
            return tuple(handle.get_slice(key).get_shape())

    def read(self, keys: Iterable[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Reads ``keys`` (grouped per file) and casts floating tensors to ``dtype``."""
        by_file: dict[Path, list[str]] = {}
        for key in keys:
            by_file.setdefault(self._path(key), []).append(key)
        tensors: dict[str, torch.Tensor] = {}
        for path, names in by_file.items():
            with safe_open(str(path), framework="pt") as handle:
                for name in names:
                    tensor = handle.get_tensor(name)
                    tensors[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
        return tensors

    def _path(self, key: str) -> Path:
        path = self._file_of.get(key)
        if path is None:
            raise ConfigError(f"weight {key!r} is missing from the safetensors files in {self.model_dir}")
        return path


def load_module(module: nn.Module, reader: WeightReader, prefix: str, dtype: torch.dtype) -> None:
    """Gives a meta-device ``module`` the real tensors stored under ``prefix`` (strict: every key must exist)."""
    names = list(module.state_dict().keys())
    tensors = reader.read([prefix + name for name in names], dtype)
    module.load_state_dict({name: tensors[prefix + name] for name in names}, strict=True, assign=True)
    module.requires_grad_(False)


def assert_materialised(module: nn.Module, what: str) -> None:
    """Fails loudly if any parameter or buffer was left on the meta device (a loading bug, not user input)."""
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if tensor.is_meta:
            raise RuntimeError(f"{what}: tensor {name!r} was not loaded")


def count_parameters(modules: Iterable[nn.Module]) -> int:
    """Counts parameters once each, so a weight shared by two modules (tied embeddings) counts once."""
    seen: set[int] = set()
    total = 0
    for module in modules:
        for param in module.parameters():
            if id(param) not in seen and not param.is_meta:
                seen.add(id(param))
                total += param.numel()
    return total
