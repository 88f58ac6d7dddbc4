"""What a foreign checkpoint layout declares, and how its tensors are found without reading more.

A layout module (demo.py, v4.py) is a table of these rules plus the few functions a table cannot
say; choices follow declared config keys and tensor names, never a path (STYLE.md 12). Reading
by offset is tensorfile.py's; the rules are applied in interop.py. docs/engram.md section 7.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engram_edit.errors import BadInputError
from engram_edit.fileio import read_json
from engram_edit.tensorfile import INDEX_NAME, MAX_HEADER_BYTES, TensorLocation, read_header

OURS = "engram-edit"  # our own layout: config.json keys of EngramConfig, our tensor names
CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"


# --- tensor rules ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Rename:
    """A tensor stored under another name; the bytes do not change."""

    source: str
    ours: str


@dataclass(frozen=True)
class Stack:
    """One source tensor per hyper-connection branch (``{b}`` in its name) and one of ours.

    The branches are joined along axis 0 in branch order, which in row-major storage is a plain
    concatenation of their bytes: ``[n] x hc -> [hc * n]`` (``new_axis`` False) or
    ``[n] x hc -> [hc, n]`` (``new_axis`` True).
    """

    source: str
    ours: str
    new_axis: bool = False


@dataclass(frozen=True)
class Derived:
    """A source tensor computed from the hashing config; checked on import, rebuilt on export."""

    source: str
    dtype: str  # safetensors code


@dataclass(frozen=True)
class Keep:
    """A source tensor with no engram-edit equivalent; it rides along under its own name."""

    source: str


TensorRule = Rename | Stack | Derived | Keep


@dataclass(frozen=True)
class HashingProfile:
    """The hashing rules of a layout, one small replaceable value (docs/engram.md sections 1-4).

    Everything not named here (compression, multipliers, primes, column order) is the spec's rule;
    the geometry (orders, heads, row width, table sizes, rows per layer) comes from the config.
    """

    name: str
    seed: int | None  # the multiplier seed; None: the config's own (engram_seed)
    blocked_tokens: tuple[str, ...] = ()  # tokens whose position stops the lookback
    verified: str = ""  # what each rule was checked against


@dataclass
class ConfigMapping:
    """A source config read into ours: what mapped, what did not, what took our defaults."""

    ours: dict[str, Any]  # EngramConfig fields
    unmapped: dict[str, Any]  # source keys with no engram-edit meaning, kept verbatim
    filled: list[str] = field(default_factory=list)  # EngramConfig fields left at defaults


# --- finding tensors -----------------------------------------------------------------------

def read_config(path: Path) -> dict[str, Any]:
    """config.json of a directory as a dict (BadInputError naming the file otherwise)."""
    file = path / CONFIG_FILE
    data = read_json(file)
    if not isinstance(data, dict):
        raise BadInputError(f"{file}: expected a JSON object")
    return data


def weight_map(path: Path) -> dict[str, str] | None:
    """The index's tensor -> shard file map, or None for a single ``model.safetensors``."""
    index = path / INDEX_NAME
    if not index.is_file():
        return None
    data = read_json(index)
    found = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(found, dict) or not all(
            isinstance(v, str) and Path(v).name == v and v not in ("", ".", "..")
            for v in found.values()):
        raise BadInputError(f"{index}: needs a \"weight_map\" object from tensor name to a shard "
                            f"file name in {path}")
    return found


def tensor_names(path: Path) -> set[str]:
    """Every tensor name of a directory, from its index or its single file's header."""
    found = weight_map(path)
    if found is not None:
        return set(found)
    if (path / SINGLE_FILE).is_file():
        return set(read_header(path / SINGLE_FILE).tensors)
    raise BadInputError(f"{path}: no {INDEX_NAME} or {SINGLE_FILE} in this directory")


def locate_some(path: Path, names: list[str]) -> dict[str, TensorLocation]:
    """Where the named tensors lie, reading only the headers of the files that hold them.

    Names the directory does not have are left out (the caller decides which are required).

    Raises:
        BadInputError: a shard the index names is missing (one line naming the shard and a
            tensor it holds), or a shard lacks a tensor its index maps to it.
    """
    found = weight_map(path)
    if found is None:
        header = read_header(path / SINGLE_FILE)
        return {n: header.tensors[n] for n in names if n in header.tensors}
    shards: dict[str, list[str]] = {}
    for name in names:
        if name in found:
            shards.setdefault(found[name], []).append(name)
    out: dict[str, TensorLocation] = {}
    for shard, held in sorted(shards.items()):
        file = path / shard
        if not file.is_file():
            raise BadInputError(f"{path}: missing shard {shard} (the index puts {held[0]} in it)")
        header = read_header(file)
        for name in held:
            if name not in header.tensors:
                raise BadInputError(f"{file}: has no tensor {name!r}, which {INDEX_NAME} maps "
                                    f"to it")
            out[name] = header.tensors[name]
    return out


def raw_header(path: Path) -> bytes:
    """The bytes of a safetensors file before its buffer: the 8-byte length and the JSON."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise BadInputError(f"{path}: not a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES:
            raise BadInputError(f"{path}: header length {n} is over the safetensors limit")
        return head + f.read(n)


def header_entries(header: bytes) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    """name -> (dtype, shape, begin, end) of a header from ``raw_header`` (metadata left out)."""
    data = json.loads(header[8:].decode("utf-8"))
    return {name: (e["dtype"], tuple(e["shape"]), *e["data_offsets"])
            for name, e in data.items() if name != "__metadata__"}


def header_metadata(header: bytes) -> dict[str, str]:
    return dict(json.loads(header[8:].decode("utf-8")).get("__metadata__") or {})
