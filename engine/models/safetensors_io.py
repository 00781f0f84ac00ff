"""Reading safetensors files with plain reads straight into tensor memory.

safetensors' own `get_tensor` returns tensors backed by a memory map of the file. Adopting those as
parameters would tie the model to the file (overwriting it changes the weights, truncating it
crashes the process with SIGBUS), and copying out of the map touches every page of it, so the
process's peak memory approaches twice the checkpoint. Here each tensor's bytes are read with
`readinto` directly into the buffer that keeps them, so peak memory stays near the model's size.

Format: an 8-byte little-endian header length, a JSON header mapping names to
{dtype, shape, data_offsets: [begin, end]} (offsets relative to the end of the header), then the data.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch

from engine.errors import ModelLoadError

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_HEADER = 100 << 20  # the format's own limit


class SafetensorsFile:
    """An open safetensors file: names, dtypes and shapes from the header; data read on demand."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._file = open(path, "rb")  # noqa: SIM115 - closed by close() / the context manager
        except OSError as exc:
            raise ModelLoadError(f"cannot open {path}: {exc}") from exc
        self.bytes_read = 0  # tensor bytes read so far (the header aside)
        try:
            self._entries, self._data_start = self._read_header()
        except Exception:
            self._file.close()
            raise

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def _corrupt(self, why: str) -> ModelLoadError:
        return ModelLoadError(f"corrupt safetensors file {self.path}: {why}")

    def _read_header(self) -> tuple[dict[str, tuple[torch.dtype, tuple[int, ...], int, int]], int]:
        size = self.path.stat().st_size
        raw = self._file.read(8)
        if len(raw) != 8:
            raise self._corrupt("shorter than its 8-byte header length")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > min(_MAX_HEADER, size - 8):
            raise self._corrupt(f"header length {header_len} exceeds the file")
        try:
            header = json.loads(self._file.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise self._corrupt(f"header is not valid JSON ({exc})") from exc
        if not isinstance(header, dict):
            raise self._corrupt("header is not a JSON object")
        data_start, data_size = 8 + header_len, size - 8 - header_len
        entries = {}
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype = _DTYPES[meta["dtype"]]
                shape = tuple(int(d) for d in meta["shape"])
                begin, end = (int(o) for o in meta["data_offsets"])
            except (KeyError, TypeError, ValueError) as exc:
                raise self._corrupt(f"bad entry for {name!r} ({exc!r})") from exc
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            if not 0 <= begin <= end <= data_size or end - begin != nbytes:
                raise self._corrupt(f"{name!r} lies outside the file or has the wrong size")
            entries[name] = (dtype, shape, data_start + begin, nbytes)
        return entries, data_start

    def keys(self) -> list[str]:
        return list(self._entries)

    def dtype(self, name: str) -> torch.dtype:
        return self._entries[name][0]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def read_into(self, name: str, out: torch.Tensor) -> None:
        """Fill `out` (contiguous, on CPU, of this tensor's dtype and size) with the tensor's bytes."""
        dtype, shape, offset, nbytes = self._entries[name]
        if out.dtype != dtype or out.numel() != math.prod(shape) or not out.is_contiguous() or out.device.type != "cpu":
            raise ValueError(f"{name}: destination does not match {dtype} {shape}")
        self._read_at(name, offset, out)

    def _read_at(self, name: str, offset: int, out: torch.Tensor) -> None:
        """Fill the contiguous `out` with the file's bytes from `offset`."""
        nbytes = out.numel() * out.element_size()
        if nbytes == 0:
            return
        buffer = memoryview(out.detach().reshape(-1).view(torch.uint8).numpy())
        self._file.seek(offset)
        got = self._file.readinto(buffer)
        self.bytes_read += got or 0
        if got != nbytes:
            raise self._corrupt(f"{name!r} is truncated ({got} of {nbytes} bytes)")

    def read_part(self, name: str, dim: int, segments: tuple[tuple[int, int], ...]) -> torch.Tensor:
        """The concatenation along `dim` (0, or 1 of a 2-D tensor) of the tensor's `segments`, (start, length) pairs,
        reading only their bytes: a tensor-parallel rank's part (engine/models/common.py WeightTarget)."""
        dtype, shape, offset, _ = self._entries[name]
        if dim >= len(shape) or (dim == 1 and len(shape) != 2) or any(
                start < 0 or length < 0 or start + length > shape[dim] for start, length in segments):
            raise ModelLoadError(f"{name}: shape {shape} has no part {segments} along dimension {dim}")
        item = torch.empty((), dtype=dtype).element_size()
        total = sum(length for _, length in segments)
        if dim == 0:  # whole rows: one contiguous read per segment
            row_bytes = math.prod(shape[1:]) * item
            out = torch.empty((total, *shape[1:]), dtype=dtype)
            at = 0
            for start, length in segments:
                self._read_at(name, offset + start * row_bytes, out[at : at + length])
                at += length
            return out
        rows, cols = shape  # columns: one read per row and segment
        out = torch.empty((rows, total), dtype=dtype)
        for row in range(rows):
            at = 0
            for start, length in segments:
                self._read_at(name, offset + (row * cols + start) * item, out[row, at : at + length])
                at += length
        return out

    def read(self, name: str) -> torch.Tensor:
        dtype, shape, _, _ = self._entries[name]
        out = torch.empty(shape, dtype=dtype)
        self.read_into(name, out)
        return out
