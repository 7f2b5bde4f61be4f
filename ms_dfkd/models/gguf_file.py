"""A GGUF file's metadata and tensors, read in one pass over a memory map.

gguf.GGUFReader builds a numpy view for every part of every metadata value. SmolLM2's
tokenizer arrays hold ~98k strings, so opening the file took 14-16 s on our 2-core machines,
and a real run opened it twice (tokenizer and weights). This reader decodes the metadata
with ``struct`` (well under a second) and hands out tensors as raw byte views, which
``gguf.quants.dequantize`` takes as they are. The layout (GGUF v2/v3, little-endian) is the
one in ggml's docs/gguf.md; tests/test_llama.py checks every field and tensor against
GGUFReader on the real file.
"""
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .checkpoint_io import CheckpointError


class GGUFError(CheckpointError):
    pass


# GGUF metadata value types: id -> struct format of one scalar (8 = string, 9 = array)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_NUMPY = {vtype: np.dtype("<" + fmt) for vtype, fmt in _SCALARS.items()}  # same codes ("?" is bool)


@dataclass
class GGUFTensor:
    name: str
    shape: tuple        # GGUF order: innermost dimension first
    tensor_type: object  # gguf.GGMLQuantizationType
    data: np.ndarray    # raw bytes, shape (rows, bytes per row), a view into the file


@dataclass
class GGUFFile:
    path: str
    version: int
    fields: dict        # key -> int / float / bool / str / list
    tensors: list       # GGUFTensor, in file order

    def get(self, key, default=None):
        return self.fields.get(key, default)


class _Cursor:
    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def scalar(self, fmt):
        (v,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return v

    def string(self):
        n = self.scalar("Q")
        if self.pos + n > len(self.buf):
            raise ValueError(f"a string of {n} bytes at offset {self.pos} runs past the end of the file")
        s = self.buf[self.pos:self.pos + n].decode("utf-8")
        self.pos += n
        return s

    def value(self, vtype):
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, n = self.scalar("I"), self.scalar("Q")
            if etype == _STRING:
                return [self.string() for _ in range(n)]
            if etype in _NUMPY:  # numeric arrays in one read, not one struct call per element
                arr = np.frombuffer(self.buf, _NUMPY[etype], count=n, offset=self.pos)
                self.pos += arr.nbytes
                return arr.tolist()
            return [self.value(etype) for _ in range(n)]  # arrays of arrays
        if vtype not in _SCALARS:
            raise ValueError(f"unknown metadata value type {vtype} at offset {self.pos - 4}")
        return self.scalar(_SCALARS[vtype])


def read_gguf(path):
    """GGUFFile for ``path``. FileNotFoundError for a missing file; GGUFError naming the file for
    anything else that is wrong with it (bad magic, unsupported version, truncation)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        with open(path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        cur = _Cursor(buf)
        magic = bytes(buf[:4])
        if magic != b"GGUF":
            raise ValueError(f"magic is {magic!r}, not b'GGUF'")
        cur.pos = 4
        version = cur.scalar("I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported (2 or 3, little-endian)")
        n_tensors, n_kv = cur.scalar("Q"), cur.scalar("Q")
        fields = {}
        for _ in range(n_kv):
            key = cur.string()
            fields[key] = cur.value(cur.scalar("I"))
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            dims = tuple(cur.scalar("Q") for _ in range(cur.scalar("I")))
            infos.append((name, dims, GGMLQuantizationType(cur.scalar("I")), cur.scalar("Q")))
        align = int(fields.get("general.alignment", 32))
        start = -(-cur.pos // align) * align
        tensors = []
        for name, dims, qtype, offset in infos:
            block, type_size = GGML_QUANT_SIZES[qtype]
            row_bytes = dims[0] // block * type_size
            rows = int(np.prod(dims[1:], dtype=np.int64))
            if start + offset + rows * row_bytes > len(buf):
                raise ValueError(f"tensor {name!r} runs past the end of the file")
            data = np.frombuffer(buf, np.uint8, count=rows * row_bytes, offset=start + offset)
            tensors.append(GGUFTensor(name, dims, qtype, data.reshape(rows, row_bytes)))
    except struct.error as e:
        raise GGUFError(f"cannot read GGUF file {path}: truncated or corrupt ({e})") from None
    except (ValueError, KeyError, UnicodeDecodeError, OSError) as e:
        raise GGUFError(f"cannot read GGUF file {path}: {type(e).__name__}: {e}") from None
    return GGUFFile(str(path), version, fields, tensors)
