"""split and join of a DeepSeek-V4.1 directory in its own layout: the backbone half and the way
back (the memory half is split.py's, as for any model).

The backbone is the directory without its Engram tables (``layers.N.engram.embed.weight`` and
``.scale``): every file and shard that holds no table is copied unchanged and never parsed; a
shard that holds one is rewritten without it; the index lists what is left; ``BACKBONE_JSON``
keeps the original index and the original headers of the rewritten shards. No V4.1 server can
load that backbone (its Engram layers have no rows); ``join`` with the memory writes the
directory back byte for byte, each rewritten shard under its original header.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engram_edit.checkpoint import WEIGHTS_FILE, WEIGHTS_INDEX, ModelFiles, scale_name, table_name
from engram_edit.errors import BadInputError
from engram_edit.fileio import read_json
from engram_edit.layouts.base import header_entries, header_metadata, raw_header, weight_map
from engram_edit.layouts.write import OutFile, fp8_rows, header_bytes, write_files
from engram_edit.memory import MemoryTable
from engram_edit.split import HISTORY_DIR
from engram_edit.tensorfile import TensorLocation, read_header
from engram_edit.tensorwrite import CopyProgress, ProgressFn, Source, TensorEntry

BACKBONE_JSON = "engram-backbone.json"
BACKBONE_FORMAT = "engram-edit-v4-backbone"
BACKBONE_FORMAT_VERSION = 1


@dataclass
class Plan:
    """What one side writes: files copied unchanged, shards written, new index and record."""

    copies: list[Path]  # files (and folders) copied as they are
    shards: list[OutFile]
    index: str | None  # text of the index to write
    record: str | None  # text of BACKBONE_JSON to write
    tensors: int  # tensors in the output's weight files

    @property
    def nbytes(self) -> int:
        return sum(map(_size, self.copies)) + sum(e.nbytes for f in self.shards
                                                  for e, _ in f.tensors)


def _size(path: Path) -> int:
    """Bytes of a file, or of every file in a folder."""
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    return sum(f.stat().st_size for f in files)


def _engram_tables(files: ModelFiles) -> set[str]:
    return {n for i in files.config.engram_layer_ids for n in (table_name(i), scale_name(i))}


def _shard_tensors(path: Path) -> dict[str, set[str]]:
    """shard file -> the tensor names the index puts in it (a single file's own header)."""
    found = weight_map(path)
    if found is None:
        return {WEIGHTS_FILE: set(read_header(path / WEIGHTS_FILE).tensors)}
    out: dict[str, set[str]] = {}
    for name, shard in found.items():
        out.setdefault(shard, set()).add(name)
    return out


def _others(path: Path, skip: Iterable[str]) -> list[Path]:
    """Everything in ``path`` but ``skip`` and the ``.engram/`` history (which split gives to
    the memory), by name."""
    left_out = {*skip, HISTORY_DIR}
    return sorted(p for p in path.iterdir() if p.name not in left_out)


def _index_text(path: Path) -> str | None:
    file = path / WEIGHTS_INDEX
    return file.read_text(encoding="utf-8") if file.is_file() else None


def _record(path: Path) -> dict[str, Any] | None:
    file = path / BACKBONE_JSON
    if not file.is_file():
        return None
    data = read_json(file)
    if not isinstance(data, dict) or data.get("format") != BACKBONE_FORMAT or \
            not isinstance(data.get("headers"), dict):
        raise BadInputError(f"{file}: not an engram-edit V4.1 backbone record")
    if data.get("format_version") != BACKBONE_FORMAT_VERSION:
        raise BadInputError(f"{file}: format_version {data.get('format_version')!r} is not one "
                            f"this tool reads ({BACKBONE_FORMAT_VERSION})")
    return data


def backbone_plan(files: ModelFiles) -> Plan:
    """What the backbone of a V4.1 directory is made of (nothing is written).

    Only the headers of the shards that hold a table are read. A directory that is itself a
    backbone (its tables come from ``--memory``) is copied with its record.

    Raises:
        BadInputError: a directory that holds tables and a backbone record at once.
    """
    path, tables = files.path, _engram_tables(files)
    shard_map = _shard_tensors(path)
    holders = sorted(s for s, names in shard_map.items() if names & tables)
    has_record = (path / BACKBONE_JSON).is_file()
    if holders and has_record:
        raise BadInputError(f"{path}: holds Engram tables in {holders[0]} and a {BACKBONE_JSON} "
                            f"(a backbone's record); remove one")
    shards, headers, dropped = [], {}, 0
    for shard in holders:
        header = read_header(path / shard)
        kept = [loc for name, loc in sorted(header.tensors.items()) if name not in tables]
        dropped += sum(loc.nbytes for name, loc in header.tensors.items() if name in tables)
        headers[shard] = raw_header(path / shard)[8:].decode("utf-8")
        if kept:
            shards.append(OutFile(shard, [(TensorEntry(loc.name, loc.dtype, tuple(loc.shape)),
                                           loc) for loc in kept], dict(header.metadata)))
    original = _index_text(path)
    index = original
    if original is not None and holders:
        data = json.loads(original)
        data["weight_map"] = {k: v for k, v in data["weight_map"].items() if k not in tables}
        total = (data.get("metadata") or {}).get("total_size")
        if isinstance(total, int):
            data["metadata"]["total_size"] = total - dropped
        index = json.dumps(data, indent=2) + "\n"
    record = None
    if holders:
        record = json.dumps({"format": BACKBONE_FORMAT,
                             "format_version": BACKBONE_FORMAT_VERSION,
                             "index": original, "headers": headers}, indent=1) + "\n"
    tensors = len(set().union(*shard_map.values()) - tables)
    copies = _others(path, [*holders, WEIGHTS_INDEX])
    return Plan(copies, shards, index, record, tensors)


def join_plan(files: ModelFiles, table: MemoryTable) -> Plan:
    """What the V4.1 directory joined from a backbone and ``files.memory`` is made of.

    Each shard the record lists is written under its original header: table rows from the
    memory (re-encoded to FP8 per docs/engram.md section 7 when the memory holds another
    dtype), every other tensor from the backbone's shard of that name. A V4.1 directory that
    still holds its tables (no record) gets the memory's rows in its own shards.

    Raises:
        BadInputError: nowhere to put the tables, or a tensor the header lists is missing or
            has another dtype or shape.
    """
    path, tables = files.path, _engram_tables(files)
    record = _record(path)
    if record is not None:
        headers = dict(record["headers"])
        index = record["index"]
    else:
        holders = sorted(s for s, names in _shard_tensors(path).items() if names & tables)
        headers = {s: raw_header(path / s)[8:].decode("utf-8") for s in holders}
        index = _index_text(path)
    if not headers:
        raise BadInputError(f"{path}: no shard holds the Engram tables and there is no "
                            f"{BACKBONE_JSON} saying where they go")
    layer_of = {n: i for i in files.config.engram_layer_ids for n in (table_name(i),
                                                                      scale_name(i))}
    shards = []
    for shard, text in sorted(headers.items()):
        header = header_bytes(text)
        entries = header_entries(header)
        stored = read_header(path / shard).tensors if (path / shard).is_file() else {}
        held: list[tuple[TensorEntry, Source]] = []
        for name, (dtype, shape, _, _) in entries.items():
            layer = layer_of.get(name)
            src: Source | None = stored.get(name)
            if layer is not None:
                src = files.tensors[name] if table.dtype(layer) == "float8_e4m3" else \
                    fp8_rows(table, layer, "data" if name == table_name(layer) else "scale")
            if src is None:
                raise BadInputError(f"{path}: missing tensor {name} (in {shard})")
            if isinstance(src, TensorLocation) and (src.dtype, tuple(src.shape)) != (dtype,
                                                                                    shape):
                raise BadInputError(f"{src.path}: {name} is {src.dtype} {list(src.shape)}, "
                                    f"the original {shard} holds {dtype} {list(shape)}")
            held.append((TensorEntry(name, dtype, shape), src))
        shards.append(OutFile(shard, held, header_metadata(header), header))
    tensors = len(json.loads(index)["weight_map"]) if index else len(shards[0].tensors)
    copies = _others(path, [*headers, WEIGHTS_INDEX, BACKBONE_JSON])
    return Plan(copies, shards, index, None, tensors)


def write_plan(plan: Plan, out: Path, progress: ProgressFn | None = None) -> int:
    """Write ``plan`` into the directory ``out``; returns the bytes of the weight files.

    ``progress`` counts every byte of ``plan.nbytes`` (copied files as they finish).
    """
    total, base = plan.nbytes, 0
    for src in plan.copies:
        if src.is_dir():
            shutil.copytree(src, out / src.name)
        else:
            shutil.copyfile(src, out / src.name)
        base += _size(src)
        if progress is not None:
            progress(CopyProgress(base, total, src.name))
    size = write_files(out, plan.shards, None if progress is None else
                       lambda p: progress(CopyProgress(base + p.done, total, p.tensor)))
    if plan.index is not None:
        (out / WEIGHTS_INDEX).write_text(plan.index, encoding="utf-8")
    if plan.record is not None:
        (out / BACKBONE_JSON).write_text(plan.record, encoding="utf-8")
    shard_names = {f.name for f in plan.shards}
    size += sum((out / p.name).stat().st_size for p in plan.copies
                if p.suffix == ".safetensors" and p.name not in shard_names)
    return size
