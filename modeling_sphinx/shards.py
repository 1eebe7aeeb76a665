"""Sharded safetensors output, written one tensor at a time."""

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file


def parse_size(size: str | int) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)B?\s*", size.upper())
    if match is None:
        raise ValueError(f"cannot read the size {size!r} (use e.g. 500MB or 5GB)")
    return int(float(match.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[match.group(2)])


class ShardWriter:
    """Collects tensors and writes safetensors shards of at most `max_bytes` (a larger tensor gets its own)."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[tuple[str, list[str]]] = []
        self.total = 0

    def add(self, key: str, tensor: torch.Tensor):
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending[key] = tensor.contiguous()
        self.pending_bytes += size
        self.total += size

    def flush(self):
        if not self.pending:
            return
        name = f"part-{len(self.files):05d}.safetensors"
        save_file(self.pending, self.folder / name, metadata={"format": "pt"})
        self.files.append((name, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self):
        self.flush()
        count = len(self.files)
        if count == 1:
            (self.folder / self.files[0][0]).rename(self.folder / "model.safetensors")
            return
        weight_map = {}
        for index, (name, keys) in enumerate(self.files, start=1):
            final = f"model-{index:05d}-of-{count:05d}.safetensors"
            (self.folder / name).rename(self.folder / final)
            weight_map.update(dict.fromkeys(keys, final))
        index_data = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index_data, indent=2) + "\n")


class LazyCheckpoint:
    """Tensors of a Hugging Face model folder (single or sharded safetensors), read one at a time."""

    def __init__(self, folder: str | Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        single = self.folder / "model.safetensors"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif single.is_file():
            weight_map = None
        else:
            raise ValueError(f"{self.folder}: no model.safetensors or model.safetensors.index.json")
        files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        self._handles = {}
        self._location = {}
        for name in files:
            path = self.folder / name
            if not path.is_file():
                raise ValueError(f"{self.folder}: the index names {name}, which is missing")
            handle = safe_open(path, framework="pt")
            self._handles[name] = handle
            for key in handle.keys():  # noqa: SIM118 (a safetensors handle is not iterable)
                self._location[key] = name

    def tensor_names(self) -> list[str]:
        return list(self._location)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handles[self._location[key]].get_slice(key).get_shape())

    def dtype(self, key: str) -> str:
        return self._handles[self._location[key]].get_slice(key).get_dtype()

    def get(self, key: str) -> torch.Tensor:
        return self._handles[self._location[key]].get_tensor(key)
