"""Atomic, streamed, sharded safetensors output in the Hugging Face directory layout.

The shard layout is planned up front from the output names, shapes and dtypes, so every tensor's bytes are
streamed straight to their final offset: no shard is ever assembled in memory. A shard's header is written
last, when all its data is in place, so a shard cut short (a killed run) is not a valid safetensors file.
Everything goes to a locked hidden staging folder next to the target (:mod:`fxmerge.outputs`), which is
renamed into place with a manifest only when the whole merge succeeded; on any failure it is removed, and a
staging folder left by a killed run is removed by the next run into the same place.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from fxmerge.errors import FxmergeError, TaskVectorPathError
from fxmerge.outputs import open_stage, publish_dir
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
    """Write tensors in plan order into a staging folder, then :meth:`commit` it atomically.

    ``out_dir`` must have passed :func:`fxmerge.outputs.check_output_dir` (new, empty or an earlier fxmerge
    output, disjoint from the inputs); it is checked again when the result replaces it.
    """

    def __init__(self, out_dir: Path, infos: Mapping[str, TensorInfo], shard_size: int, overwrite: bool = False) -> None:
        self.out_dir = Path(out_dir).absolute()
        self.overwrite = overwrite
        self.infos = dict(infos)
        self.shards = plan_shards(self.infos, shard_size)
        self._order: Iterator[tuple[Shard, str]] = ((s, n) for s in self.shards for n in s.names)
        try:
            self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TaskVectorPathError(f"cannot create {self.out_dir.parent}: {exc.strerror or exc}") from exc
        self._stage = open_stage(self.out_dir.parent, self.out_dir.name, TaskVectorPathError)
        self.tmp = self._stage.path
        self._shard: Shard | None = None
        self._fh = None
        self._header = b""
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
            raise FxmergeError(f"internal write-order error: got {name!r}, expected {self._current!r} {info}")
        start, stop = span if span is not None else (0, info.numel)
        if start != self._filled or stop > info.numel:
            raise FxmergeError(f"internal write-order error: {name!r} piece {start}:{stop} after {self._filled} elements")
        if tensor.numel():
            flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
            self._fh.write(memoryview(flat.numpy()))
        self._filled = stop

    def _open_shard(self, shard: Shard) -> None:
        """Start ``shard``'s file: reserve its exact final size and leave the header zeroed until the end."""
        self._close_file()
        self._header = _header_bytes(self.infos, shard.names)
        self._size = len(self._header) + sum(self.infos[n].numel * self.infos[n].dtype.itemsize for n in shard.names)
        self._shard = shard
        self._fh = open(self.tmp / shard.filename, "wb")  # noqa: SIM115 - closed in _close_file
        _preallocate(self._fh.fileno(), self._size)
        self._fh.write(bytes(len(self._header)))

    def _close_file(self) -> None:
        """Check the shard is complete, then write its header (until now zero: an invalid file)."""
        if self._fh is not None:
            if self._fh.tell() != self._size:
                raise FxmergeError(f"internal error: shard {self._shard.filename} has {self._fh.tell()} bytes, "
                                   f"planned {self._size}")
            self._fh.seek(0)
            self._fh.write(self._header)
            # no fsync: the output is atomic against a failed merge (staging folder + rename), and the page
            # cache writes it back; forcing it to disk made the merge wait on the device (mergekit does not either)
            self._fh.close()
            self._fh = None

    def commit(self, config_dir: Path | None, out_dtype: torch.dtype | None) -> Path:
        """Finish the last shard, write the index and copied config, and move the directory into place."""
        leftover = next(self._order, None)
        if leftover is not None:
            raise FxmergeError(f"internal error: tensor {leftover[1]!r} was never written")
        self._close_file()
        if len(self.shards) > 1:
            self._write_index()
        if config_dir is not None:
            _copy_config(config_dir, self.tmp, out_dtype)
        publish_dir(self.tmp, self.out_dir, TaskVectorPathError, overwrite=self.overwrite)
        self._stage.release()
        return self.out_dir

    def _write_index(self) -> None:
        total = sum(i.numel * i.dtype.itemsize for i in self.infos.values())
        weight_map = {n: s.filename for s in self.shards for n in s.names}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (self.tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    def abort(self) -> None:
        """Remove the staging folder (called on any failure)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        self._stage.discard()


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
