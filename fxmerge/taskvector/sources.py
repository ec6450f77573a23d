"""Tensor sources for task-vector merging: in-memory state dicts, safetensors files, HF directories.

Every source exposes the same small interface (:class:`TensorSource`): the tensor names with their
shapes and dtypes (read from headers only), and ``load(name)`` which returns a fresh tensor that the
caller owns. Safetensors files are parsed here (header validation) and read through a private
memory map, one tensor at a time; the pages of a tensor are released right after it is copied, so
resident memory stays bounded by the tensors being merged, not by the model size.
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fxmerge.errors import TaskVectorError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_CODES: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024

Span = tuple[int, int]  # [start, stop) of a flattened tensor


@dataclass(frozen=True)
class TensorInfo:
    """Shape and storage dtype of one named tensor."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        """Number of elements."""
        n = 1
        for s in self.shape:
            n *= s
        return n


class TensorSource:
    """A named collection of tensors that can be read one at a time."""

    label: str = "source"
    config_dir: Path | None = None

    def infos(self) -> dict[str, TensorInfo]:
        """Names (in storage order) mapped to shape and dtype, without reading any data."""
        raise TaskVectorError(f"{type(self).__name__} does not list tensors")

    def load(self, name: str, dtype: torch.dtype | None = None, out: torch.Tensor | None = None,
             span: Span | None = None) -> torch.Tensor:
        """Return a fresh copy of tensor ``name`` (cast to ``dtype``), or fill ``out`` (same shape) with it.

        With ``span=(start, stop)`` only that range of the flattened tensor is read, as a 1-d tensor.
        """
        raise TaskVectorError(f"{type(self).__name__} cannot load {name!r}")

    def close(self) -> None:
        """Release file handles and memory maps."""

    def paths(self) -> list[Path]:
        """The files and folders this source reads (none for tensors held in memory)."""
        return []


class StateDictSource(TensorSource):
    """A state dict (or a module's) held in memory; loads return copies, the input is never modified."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], label: str) -> None:
        self.label = label
        self._tensors: dict[str, torch.Tensor] = {}
        for key, value in tensors.items():
            if not isinstance(value, torch.Tensor):
                raise TaskVectorError(
                    f"{label}: state-dict entry {key!r} is a {type(value).__name__}, not a tensor; "
                    "pass a dict of tensors (e.g. module.state_dict())"
                )
            self._tensors[key] = value.detach()

    def infos(self) -> dict[str, TensorInfo]:
        return {k: TensorInfo(tuple(v.shape), v.dtype) for k, v in self._tensors.items()}

    def load(self, name: str, dtype: torch.dtype | None = None, out: torch.Tensor | None = None,
             span: Span | None = None) -> torch.Tensor:
        t = self._tensors[name]
        if span is not None:
            t = t.reshape(-1)[span[0]:span[1]]
        if out is not None:
            return out.copy_(t)
        return t.to(device="cpu", dtype=dtype or t.dtype, copy=True)


def _corrupt(path: Path, why: str) -> TaskVectorError:
    return TaskVectorError(
        f"corrupt safetensors file {path}: {why}; re-save or re-download it (a partial download often causes this)"
    )


def _entry_span(path: Path, name: str, entry: object, data_len: int) -> tuple[TensorInfo, int, int]:
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise _corrupt(path, f"header entry {name!r} lacks dtype/shape/data_offsets")
    dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
    if dtype is None:
        raise _corrupt(path, f"tensor {name!r} has unknown dtype {entry['dtype']!r}")
    shape, offsets = entry["shape"], entry["data_offsets"]
    ok_shape = isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)
    ok_offsets = isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
    if not (ok_shape and ok_offsets):
        raise _corrupt(path, f"tensor {name!r} has a malformed shape or data_offsets")
    info = TensorInfo(tuple(shape), dtype)
    start, end = offsets
    if not 0 <= start <= end <= data_len:
        raise _corrupt(path, f"tensor {name!r} lies outside the file ({end} > {data_len} data bytes)")
    if end - start != info.numel * dtype.itemsize:
        raise _corrupt(path, f"tensor {name!r} spans {end - start} bytes but its shape needs {info.numel * dtype.itemsize}")
    return info, start, end


class SafetensorsFile:
    """One ``.safetensors`` file: validated header plus positional tensor reads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            size = path.stat().st_size
            with open(path, "rb") as fh:
                head = fh.read(8)
                if len(head) < 8:
                    raise _corrupt(path, "the file is shorter than the 8-byte header length")
                (hlen,) = struct.unpack("<Q", head)
                if hlen > min(_MAX_HEADER, size - 8):
                    raise _corrupt(path, f"header length {hlen} exceeds the file size {size}")
                raw = fh.read(hlen)
        except OSError as exc:
            raise TaskVectorError(f"cannot read safetensors file {path}: {exc}") from exc
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _corrupt(path, f"header is not valid JSON ({exc})") from exc
        if not isinstance(header, dict):
            raise _corrupt(path, "header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + hlen
        data_len = size - self.data_start
        self.entries: dict[str, tuple[TensorInfo, int, int]] = {}
        for name, entry in header.items():
            self.entries[name] = _entry_span(path, name, entry, data_len)
        self.entries = dict(sorted(self.entries.items(), key=lambda kv: kv[1][1]))
        self._fd: int | None = None
        self._lock = threading.Lock()

    def _file(self) -> int:
        with self._lock:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY)
            return self._fd

    def load(self, name: str, dtype: torch.dtype | None = None, out: torch.Tensor | None = None,
             span: Span | None = None) -> torch.Tensor:
        """Read tensor ``name`` (cast to ``dtype``, or into ``out``) with positional reads; ``span`` reads
        one range of the flattened tensor.

        ``pread`` copies straight from the page cache into the destination (thread-safe, no seek, no mapped
        pages left behind), about 10x faster than faulting in a private memory map page by page.
        """
        info, start, end = self.entries[name]
        target = dtype or info.dtype
        shape = info.shape
        if span is not None:
            shape = (span[1] - span[0],)
            start, end = start + span[0] * info.dtype.itemsize, start + span[1] * info.dtype.itemsize
        if math.prod(shape) == 0:
            return torch.empty(shape, dtype=target) if out is None else out
        same = out is not None and out.dtype == info.dtype and out.is_contiguous()
        raw = out if same else torch.empty(shape, dtype=info.dtype)
        self._read_into(raw, self.data_start + start, end - start)
        if same:
            return raw
        return raw.to(target) if out is None else out.copy_(raw)

    def _read_into(self, t: torch.Tensor, offset: int, nbytes: int) -> None:
        buf = memoryview(t.view(-1).view(torch.uint8).numpy())
        fd = self._file()
        done = 0
        while done < nbytes:
            n = os.preadv(fd, [buf[done:]], offset + done)
            if n <= 0:
                raise _corrupt(self.path, f"unexpected end of file at byte {offset + done}")
            done += n

    def close(self) -> None:
        """Close the file (safe to call twice)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class SafetensorsSource(TensorSource):
    """One or more safetensors files (a single file, or the shards of an HF model directory)."""

    def __init__(self, files: list[Path], label: str, config_dir: Path | None = None) -> None:
        self.label = label
        self.config_dir = config_dir
        self._files = [SafetensorsFile(p) for p in files]
        self._where: dict[str, SafetensorsFile] = {}
        for f in self._files:
            for name in f.entries:
                if name in self._where:
                    raise TaskVectorError(f"{label}: tensor {name!r} appears in both {self._where[name].path} and {f.path}")
                self._where[name] = f

    def infos(self) -> dict[str, TensorInfo]:
        return {name: f.entries[name][0] for name, f in self._where.items()}

    def paths(self) -> list[Path]:
        folder = [self.config_dir] if self.config_dir is not None else []
        return [*folder, *(f.path for f in self._files)]

    def load(self, name: str, dtype: torch.dtype | None = None, out: torch.Tensor | None = None,
             span: Span | None = None) -> torch.Tensor:
        return self._where[name].load(name, dtype, out, span)

    def close(self) -> None:
        for f in self._files:
            f.close()


def _hf_dir_files(path: Path, label: str) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise TaskVectorError(f"{label}: {index} is not a valid safetensors index ({exc})") from exc
        files = [path / f for f in dict.fromkeys(weight_map.values())]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise TaskVectorError(f"{label}: shards listed in {index} are missing: {', '.join(missing)}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        has_bin = any(path.glob("*.bin")) or any(path.glob("*.pt"))
        hint = " (only .bin/.pt weights found: re-save with safetensors)" if has_bin else ""
        raise TaskVectorError(f"{label}: no .safetensors files in directory {path}{hint}")
    return files


def open_source(obj: object, label: str) -> TensorSource:
    """Wrap a module, state dict, ``.safetensors`` path or HF model directory as a :class:`TensorSource`."""
    if isinstance(obj, TensorSource):
        return obj
    if isinstance(obj, nn.Module):
        return StateDictSource(obj.state_dict(), label)
    if isinstance(obj, Mapping):
        return StateDictSource(obj, label)
    if isinstance(obj, str | os.PathLike):
        path = Path(obj)
        if not path.exists():
            raise TaskVectorError(f"{label}: path {path} does not exist")
        if path.is_dir():
            return SafetensorsSource(_hf_dir_files(path, label), label, config_dir=path)
        if path.suffix != ".safetensors":
            raise TaskVectorError(f"{label}: {path} is not a .safetensors file; convert it with safetensors.torch.save_file")
        return SafetensorsSource([path], label)
    raise TaskVectorError(
        f"{label}: unsupported input of type {type(obj).__name__}; pass an nn.Module, a state dict, "
        "a .safetensors file or a Hugging Face model directory"
    )
