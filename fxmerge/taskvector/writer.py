"""Atomic, streamed, sharded safetensors output in the Hugging Face directory layout.

The shard layout is planned up front from the output names, shapes and dtypes, so each shard's
header can be written first and every tensor's bytes streamed straight to its final offset: no shard
is ever assembled in memory. Everything goes to a hidden temporary directory next to the target,
which is renamed into place only when the whole merge succeeded; on any failure it is removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from fxmerge.errors import TaskVectorError
from fxmerge.taskvector.sources import DTYPE_CODES, SafetensorsSource, TensorInfo

COPIED_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
)


@dataclass(frozen=True)
class Shard:
    """One planned output file: its name and its tensors in write order."""

    filename: str
    names: tuple[str, ...]


def plan_shards(infos: Mapping[str, TensorInfo], shard_size: int) -> list[Shard]:
    """Greedily pack tensors (in the given order) into shards of at most ``shard_size`` bytes.

    A tensor larger than ``shard_size`` gets a shard of its own. One shard is named
    ``model.safetensors``; several are ``model-0000i-of-0000n.safetensors``.
    """
    groups: list[list[str]] = [[]]
    used = 0
    for name, info in infos.items():
        nbytes = info.numel * info.dtype.itemsize
        if groups[-1] and used + nbytes > shard_size:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += nbytes
    if len(groups) == 1:
        return [Shard("model.safetensors", tuple(groups[0]))]
    n = len(groups)
    return [Shard(f"model-{i + 1:05d}-of-{n:05d}.safetensors", tuple(g)) for i, g in enumerate(groups)]


def _header_bytes(infos: Mapping[str, TensorInfo], names: tuple[str, ...]) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        info = infos[name]
        nbytes = info.numel * info.dtype.itemsize
        header[name] = {"dtype": DTYPE_CODES[info.dtype], "shape": list(info.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _preallocate(fd: int, size: int) -> None:
    """Reserve ``size`` bytes for a new file up front.

    On ext4/xfs, appending to a fresh file allocates blocks page by page (delayed allocation), which
    measured 4-10x slower than writing into a preallocated extent (1 GB: 0.7-2.8 s vs 0.2 s). The file's
    final size is known from the plan, so nothing extra is reserved. File systems without fallocate
    support simply skip this.
    """
    if size <= 0 or not hasattr(os, "posix_fallocate"):
        return
    with contextlib.suppress(OSError):
        os.posix_fallocate(fd, 0, size)


class ShardedWriter:
    """Write tensors in plan order into a temporary directory, then :meth:`commit` it atomically."""

    def __init__(self, out_dir: Path, infos: Mapping[str, TensorInfo], shard_size: int, overwrite: bool = False) -> None:
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise TaskVectorError(f"output path {self.out_dir} exists and is not a directory")
        if self.out_dir.is_dir() and any(self.out_dir.iterdir()) and not overwrite:
            raise TaskVectorError(f"output directory {self.out_dir} is not empty; choose a new path or pass overwrite=True")
        self.infos = dict(infos)
        self.shards = plan_shards(self.infos, shard_size)
        self._order: Iterator[tuple[Shard, str]] = ((s, n) for s in self.shards for n in s.names)
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.out_dir.parent / f".{self.out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
        self.tmp.mkdir()
        self._shard: Shard | None = None
        self._fh = None
        self._size = 0
        self._current: str | None = None
        self._filled = 0

    def write(self, name: str, tensor: torch.Tensor, span: tuple[int, int] | None = None) -> None:
        """Append ``tensor`` as ``name``; names must arrive in the planned order with the planned shape/dtype.

        A tensor may also arrive in consecutive pieces: 1-d ``tensor`` holding elements ``span=(start, stop)``
        of the flattened tensor, starting at 0 and ending at its element count.
        """
        if span is None or span[0] == 0:
            shard, expected = next(self._order, (None, None))
            if shard is not self._shard and shard is not None:
                self._open_shard(shard)
            self._current, self._filled = expected, 0
        info = self.infos.get(self._current) if self._current is not None else None
        shape = info.shape if span is None or info is None else (span[1] - span[0],)
        if info is None or name != self._current or tuple(tensor.shape) != shape or tensor.dtype != info.dtype:
            raise TaskVectorError(f"internal write-order error: got {name!r}, expected {self._current!r} {info}")
        start, stop = span if span is not None else (0, info.numel)
        if start != self._filled or stop > info.numel:
            raise TaskVectorError(f"internal write-order error: {name!r} piece {start}:{stop} after {self._filled} elements")
        if tensor.numel():
            flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
            self._fh.write(memoryview(flat.numpy()))
        self._filled = stop

    def _open_shard(self, shard: Shard) -> None:
        """Start ``shard``'s file: reserve its exact final size, then write the header."""
        self._close_file()
        header = _header_bytes(self.infos, shard.names)
        self._size = len(header) + sum(self.infos[n].numel * self.infos[n].dtype.itemsize for n in shard.names)
        self._shard = shard
        self._fh = open(self.tmp / shard.filename, "wb")  # noqa: SIM115 - closed in _close_file
        _preallocate(self._fh.fileno(), self._size)
        self._fh.write(header)

    def _close_file(self) -> None:
        if self._fh is not None:
            if self._fh.tell() != self._size:
                raise TaskVectorError(f"internal error: shard {self._shard.filename} has {self._fh.tell()} bytes, "
                                      f"planned {self._size}")
            # no fsync: the output is atomic against a failed merge (temp dir + rename), and the page cache
            # writes it back; forcing it to disk made the merge wait on the device (mergekit does not either)
            self._fh.close()
            self._fh = None

    def commit(self, config_dir: Path | None, out_dtype: torch.dtype | None) -> Path:
        """Finish the last shard, write the index and copied config, and move the directory into place."""
        leftover = next(self._order, None)
        if leftover is not None:
            raise TaskVectorError(f"internal error: tensor {leftover[1]!r} was never written")
        self._close_file()
        if len(self.shards) > 1:
            self._write_index()
        if config_dir is not None:
            _copy_config(config_dir, self.tmp, out_dtype)
        backup = None
        if self.out_dir.exists():
            backup = self.out_dir.parent / f".{self.out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(self.out_dir, backup)
        os.replace(self.tmp, self.out_dir)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
        return self.out_dir

    def _write_index(self) -> None:
        total = sum(i.numel * i.dtype.itemsize for i in self.infos.values())
        weight_map = {n: s.filename for s in self.shards for n in s.names}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (self.tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    def abort(self) -> None:
        """Remove the temporary directory (called on any failure)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        shutil.rmtree(self.tmp, ignore_errors=True)


def _copy_config(src: Path, dst: Path, out_dtype: torch.dtype | None) -> None:
    for fname in COPIED_FILES:
        if (src / fname).is_file():
            shutil.copyfile(src / fname, dst / fname)
    cfg_path = dst / "config.json"
    if out_dtype is not None and cfg_path.is_file():
        try:
            cfg = json.loads(cfg_path.read_text())
        except json.JSONDecodeError:
            return
        if isinstance(cfg, dict):
            name = str(out_dtype).removeprefix("torch.")
            for key in ("torch_dtype", "dtype"):
                if key in cfg:
                    cfg[key] = name
            cfg_path.write_text(json.dumps(cfg, indent=2))


class LazyStateDict(Mapping[str, torch.Tensor]):
    """A read-only state dict backed by a merged output directory; each access reads one tensor."""

    def __init__(self, out_dir: Path) -> None:
        files = sorted(Path(out_dir).glob("*.safetensors"))
        self.path = Path(out_dir)
        self._source = SafetensorsSource(files, label=f"merged output {out_dir}")
        self._infos = self._source.infos()

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._infos:
            raise KeyError(name)
        return self._source.load(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def __len__(self) -> int:
        return len(self._infos)

    def infos(self) -> dict[str, TensorInfo]:
        """Names mapped to shape and dtype, without reading data."""
        return dict(self._infos)
