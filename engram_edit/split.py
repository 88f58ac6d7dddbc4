"""Split a model into backbone + memory, join them back, re-encode a memory's rows; memory.json.

Files only: no torch, no model, no mapping of whole files. Tensor
bytes move by offset in bounded chunks; each output is built beside its target and renamed last.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engram_edit import dtypes
from engram_edit.checkpoint import (
    CONFIG_FILE,
    FINGERPRINT_KEY,
    MEMORY_FILE,
    MEMORY_FORMAT,
    MEMORY_FORMAT_VERSION,
    MEMORY_JSON,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    MemoryFiles,
    is_memory_tensor,
    open_memory,
    open_model,
    scale_name,
    table_name,
    with_derived,
)
from engram_edit.config import EngramConfig
from engram_edit.errors import BadInputError, MismatchError
from engram_edit.fileio import atomic_dir
from engram_edit.memory import MemoryTable
from engram_edit.tensorfile import TensorLocation, read_header
from engram_edit.tensorwrite import (
    CHUNK_BYTES,
    DEFAULT_METADATA,
    CopyProgress,
    Meter,
    OpenFiles,
    ProgressFn,
    SafetensorsWriter,
    Source,
    TensorEntry,
    write_safetensors,
)
from engram_edit.tokenizer import EngramTokenizer

CONVERT_VALUES = 1 << 20  # values re-encoded at once: 4 MB of float32, ~100 MB of FP8 temporaries
HISTORY_DIR = ".engram"  # journal, applied patches and lock of a model or memory
LOCK_SUFFIX = ".lock"  # lock files are not carried into a new directory
DTYPE_ALIASES = {"fp8": "float8_e4m3", "bf16": "bfloat16", "f16": "float16", "f32": "float32"}


# --- memory.json --------------------------------------------------------------------------------

def memory_json(config: EngramConfig, tokenizer: EngramTokenizer, fingerprint: str,
                row_dtype: str) -> str:
    """The text of ``memory.json``, the description of a split memory directory.

    A JSON object with these fields, in this order (2-space indent, UTF-8, final newline):

    1. ``format`` (str): always ``"engram-memory"``.
    2. ``format_version`` (int): ``1``. A reader refuses versions it does not know.
    3. ``fingerprint`` (str): 64 lowercase hex digits, ``checkpoint.fingerprint``: sha256 of
       the canonical JSON of ``{layer_ids, multipliers, primes, pad_id, compression_sha256}``
       (docs/engram.md sections 1-4). The same string is the ``engram_fingerprint`` entry of
       ``memory.safetensors``' ``__metadata__``.
    4. ``hashing`` (object): every ``engram_*`` key of the model's config.json, the derived
       ``engram_compressed_vocab_size`` and ``engram_num_embeddings`` filled in. Readers build
       an EngramConfig from it, so an unknown ``engram_*`` key is an error.
    5. ``geometry`` (object): ``layer_ids`` (list of int, config order), ``rows_per_layer``
       (list of int, same order), ``width`` (int, columns of one row), ``dtype`` (str, one of
       float32, bfloat16, float16, float8_e4m3).

    Notes:
    - ``hashing`` and ``tokenizer.json`` decide everything; ``fingerprint`` and ``geometry`` are
      derived from them and the tensors, stored so a mismatch is caught and named on open.
    - One dtype for all layers: ``split`` refuses a model whose tables differ in dtype.
    - float8_e4m3 rows carry ``.scale`` tensors (F8_E8M0, ``[rows, width / 32]``,
      docs/engram.md section 7); ``geometry`` does not list them.
    - The row dtype may differ from the backbone's (``convert-memory``); nothing else may.
    - Unknown top-level keys are ignored by readers (room for later fields in version 1).
    """
    full = with_derived(config, tokenizer)
    hashing = {k: v for k, v in full.to_dict().items() if k.startswith("engram_")}
    ids = full.engram_layer_ids
    meta = {
        "format": MEMORY_FORMAT,
        "format_version": MEMORY_FORMAT_VERSION,
        "fingerprint": fingerprint,
        "hashing": hashing,
        "geometry": {"layer_ids": list(ids), "rows_per_layer": list(full.engram_num_embeddings),
                     "width": full.engram_head_dim, "dtype": row_dtype},
    }
    return json.dumps(meta, indent=2) + "\n"


def memory_problems(mem: MemoryFiles) -> list[str]:
    """What in a memory directory disagrees with its own memory.json (empty when all agrees)."""
    src = mem.path / MEMORY_JSON
    version = mem.meta.get("format_version")
    if version != MEMORY_FORMAT_VERSION:
        return [f"{src}: format_version {version!r} is not one this tool reads "
                f"({MEMORY_FORMAT_VERSION})"]
    geometry = mem.meta.get("geometry")
    if not isinstance(geometry, dict):
        return [f"{src}: geometry: missing or not an object"]
    ids = mem.config.engram_layer_ids
    p = []
    try:
        with mem.table() as table:
            found = {"layer_ids": ids, "rows_per_layer": [table.num_rows(i) for i in ids],
                     "width": table.width(ids[0]), "dtype": table.dtype(ids[0])}
            widths = {table.width(i) for i in ids}
            kinds = {table.dtype(i) for i in ids}
    except BadInputError as e:
        return [f"{mem.path / MEMORY_FILE}: {line}" for line in e.problems]
    if len(widths) > 1 or len(kinds) > 1:
        p.append(f"{mem.path / MEMORY_FILE}: layers differ in width or dtype")
    for key, value in found.items():
        if geometry.get(key) != value:
            p.append(f"{src}: geometry {key} is {geometry.get(key)!r}, the tensors give {value!r}")
    return p


# --- checks shared by every writer --------------------------------------------------------------

def _inside(path: Path, other: Path) -> bool:
    return path == other or other in path.parents


def _replaceable(path: Path) -> bool:
    """What --force may replace: an empty directory, or a model or memory directory."""
    return path.is_dir() and (not any(path.iterdir()) or (path / CONFIG_FILE).is_file()
                              or (path / MEMORY_JSON).is_file())


def check_outputs(outputs: list[Path], inputs: list[Path], force: bool) -> None:
    """Refuse outputs that overlap an input or each other, or exist (unless ``force``).

    Raises:
        BadInputError: one line per problem, each naming the output.
    """
    problems = []
    real_inputs = [(p, p.resolve()) for p in inputs]
    real_outputs = [(p, p.resolve()) for p in outputs]
    for n, (out, real) in enumerate(real_outputs):
        for inp, real_in in real_inputs:
            if _inside(real, real_in):
                problems.append(f"{out}: is inside the input {inp}; write it somewhere else")
            elif _inside(real_in, real):
                problems.append(f"{out}: contains the input {inp}; write it somewhere else")
        for other, real_other in real_outputs[:n]:
            if _inside(real, real_other) or _inside(real_other, real):
                problems.append(f"{out}: overlaps the other output {other}")
        parent = next(a for a in real.parents if a.exists())
        if not parent.is_dir():
            problems.append(f"{out}: {parent} is not a directory")
        if out.is_symlink():
            problems.append(f"{out}: is a symbolic link; give the path it points to")
        elif out.exists():
            if not force:
                problems.append(f"{out}: already exists (pass --force to replace it)")
            elif not _replaceable(out):
                problems.append(f"{out}: already exists and is not a model or memory directory "
                                f"(no {CONFIG_FILE} or {MEMORY_JSON}); --force replaces only "
                                f"those, remove it yourself")
    if problems:
        raise BadInputError(problems)


def _row_dtype(table: MemoryTable, layer_ids: list[int], source: Path) -> str:
    kinds = {i: table.dtype(i) for i in layer_ids}
    if len(set(kinds.values())) > 1:
        raise BadInputError(f"{source}: Engram tables differ in dtype ({kinds}); a memory holds "
                            f"one dtype for every layer")
    return kinds[layer_ids[0]]


def _metadata_of(locations: Iterable[TensorLocation]) -> dict[str, str]:
    """The ``__metadata__`` of the files these tensors come from (first file wins a key)."""
    out = dict(DEFAULT_METADATA)
    for path in sorted({loc.path for loc in locations}, reverse=True):
        out.update(read_header(path).metadata)
    out.pop(FINGERPRINT_KEY, None)
    return out


def _entries(locations: list[TensorLocation]) -> list[tuple[TensorEntry, Source]]:
    return [(TensorEntry(loc.name, loc.dtype, tuple(loc.shape)), loc) for loc in locations]


def _copy_history(source_dir: Path, out_dir: Path) -> bool:
    history = source_dir / HISTORY_DIR
    if not history.is_dir():
        return False
    shutil.copytree(history, out_dir / HISTORY_DIR,
                    ignore=shutil.ignore_patterns(f"*{LOCK_SUFFIX}"))
    return True


# --- split ----------------------------------------------------------------------------------------

@dataclass
class SplitReport:
    model: str
    backbone: str
    memory: str
    fingerprint: str
    row_dtype: str
    backbone_tensors: int
    memory_tensors: int
    backbone_bytes: int  # size of the backbone's weight files
    memory_bytes: int  # size of memory.safetensors
    history_copied: bool  # the model's .engram/ went along into the memory
    seconds: float
    layout: str = "engram-edit"  # "v4": the backbone is a V4.1 directory without its tables
    notes: list[str] = field(default_factory=list)


def split_model(model: str | Path, backbone_out: str | Path, memory_out: str | Path,
                force: bool = False, progress: ProgressFn | None = None,
                memory: str | Path | None = None) -> SplitReport:
    """Write a model's Engram tables to a memory directory and everything else to a backbone.

    ``backbone_out`` gets config.json, tokenizer.json and ``model.safetensors`` with every
    tensor but the table rows and their FP8 scales (Engram projections, norms and conv stay).
    ``memory_out`` gets ``memory.safetensors`` (rows and scales under their model names, the
    fingerprint in ``__metadata__``), tokenizer.json, ``memory.json`` (``memory_json``) and a
    copy of the model's ``.engram/`` folder (lock files left behind). Sharded inputs are read
    through their index; each output is one file. Everything is checked before the first byte
    is written, both outputs are built in temp directories and renamed at the end, and the
    input is only read.

    A DeepSeek-V4.1 directory keeps its own layout (layouts/v4_split.py): the backbone is the
    directory without its Engram tables, no V4.1 server can load it, and ``join_model`` with
    the memory gives back the original directory byte for byte.

    Args:
        model (`str` or `Path`): the model directory.
        backbone_out (`str` or `Path`): the backbone directory to create.
        memory_out (`str` or `Path`): the memory directory to create.
        force (`bool`, defaults to False): replace outputs that exist (model, memory or empty
            directories only).
        progress (callable, optional): called with a ``CopyProgress`` after every chunk.
        memory (`str` or `Path`, optional): a split memory plugged into ``model`` (which is
            then a backbone): the pair is written out again.

    Returns:
        `SplitReport`

    Raises:
        BadInputError: a missing or damaged model, a backbone without ``memory``, or bad
            outputs. MismatchError: a memory that does not fit the backbone.

    Example:
        >>> r = split_model("my-model", "out/backbone", "out/memory")  # doctest: +SKIP
        >>> r.memory_bytes  # doctest: +SKIP
        4194560
    """
    from engram_edit.layouts import v4, v4_split  # v4_split imports this module

    t0 = time.monotonic()
    model, backbone_out, memory_out = Path(model), Path(backbone_out), Path(memory_out)
    files = open_model(model, memory)
    if files.memory is not None:
        _raise_if(memory_problems(files.memory))
    inputs = [model] + ([files.memory.path] if files.memory else [])
    check_outputs([backbone_out, memory_out], inputs, force)
    config, ids = files.config, files.config.engram_layer_ids
    with files.table() as table:
        row_dtype = _row_dtype(table, ids, model)
    rows = [loc for name, loc in sorted(files.tensors.items()) if is_memory_tensor(name, ids)]
    rest = [loc for name, loc in sorted(files.tensors.items()) if not is_memory_tensor(name, ids)]
    plan = v4_split.backbone_plan(files) if files.layout == v4.NAME else None
    fp = files.fingerprint()
    memory_meta = {**DEFAULT_METADATA, FINGERPRINT_KEY: fp}
    rest_bytes = plan.nbytes if plan else sum(loc.nbytes for loc in rest)
    total = rest_bytes + sum(loc.nbytes for loc in rows)

    def shifted(base: int) -> ProgressFn | None:
        """``progress`` with both files' bytes on one scale."""
        if progress is None:
            return None
        return lambda p: progress(CopyProgress(base + p.done, total, p.tensor))

    with atomic_dir(backbone_out, replace=force) as tb, atomic_dir(memory_out, replace=force) as tm:
        if plan is not None:
            backbone_bytes = v4_split.write_plan(plan, tb, shifted(0))
        else:
            shutil.copyfile(model / CONFIG_FILE, tb / CONFIG_FILE)
            shutil.copyfile(model / TOKENIZER_FILE, tb / TOKENIZER_FILE)
            backbone_bytes = write_safetensors(tb / WEIGHTS_FILE, _entries(rest),
                                               _metadata_of(rest), shifted(0))
        memory_bytes = write_safetensors(tm / MEMORY_FILE, _entries(rows), memory_meta,
                                         shifted(rest_bytes))
        shutil.copyfile(model / TOKENIZER_FILE, tm / TOKENIZER_FILE)
        (tm / MEMORY_JSON).write_text(memory_json(config, files.tokenizer, fp, row_dtype),
                                      encoding="utf-8")
        history = _copy_history(files.memory_dir, tm)
    notes = [f"{backbone_out} is {model} without its Engram tables: no DeepSeek-V4.1 server "
             f"loads it alone; engram-edit join {backbone_out} {memory_out} --out DIR gives back "
             f"the original directory byte for byte"] if plan else []
    return SplitReport(str(model), str(backbone_out), str(memory_out), fp, row_dtype,
                       plan.tensors if plan else len(rest), len(rows), backbone_bytes,
                       memory_bytes, history, time.monotonic() - t0, files.layout, notes)


def _raise_if(problems: list[str]) -> None:
    if problems:
        raise MismatchError(problems)


# --- join -----------------------------------------------------------------------------------------

@dataclass
class JoinReport:
    backbone: str
    memory: str
    out: str
    fingerprint: str
    row_dtype: str
    tensors: int
    bytes: int  # size of the joined weight files
    history_copied: bool  # the memory's .engram/ went along into the model
    seconds: float
    layout: str = "engram-edit"  # "v4": a V4.1 directory, the one split had, byte for byte


def join_model(backbone: str | Path, memory: str | Path, out: str | Path, force: bool = False,
               progress: ProgressFn | None = None) -> JoinReport:
    """Plug a memory back into a backbone and write the whole model to ``out``.

    The memory must fit the backbone: same layer ids, rows per layer, row width, tokenizer,
    seed and primes, i.e. the same fingerprint; the row dtype may differ. ``out`` gets the
    backbone's config.json and tokenizer.json, one ``model.safetensors`` with the backbone's
    tensors and the memory's rows (bit for bit; split then join gives back every tensor of the
    model), and a copy of the memory's ``.engram/`` folder. Atomic as ``split_model``. The
    backbone of a DeepSeek-V4.1 directory gives that directory back, byte for byte when the
    memory's rows are unchanged (a memory in another dtype is re-encoded to FP8 per
    docs/engram.md section 7; layouts/v4_split.py).

    Args:
        backbone (`str` or `Path`): the backbone directory (from ``split_model``).
        memory (`str` or `Path`): the memory directory.
        out (`str` or `Path`): the model directory to create.
        force (`bool`, defaults to False): replace ``out`` if it exists (model, memory or empty
            directory only).
        progress (callable, optional): called with a ``CopyProgress`` after every chunk.

    Returns:
        `JoinReport`

    Raises:
        MismatchError: the memory does not fit; one line names each differing component.
        BadInputError: missing or damaged inputs, or a bad ``out``.

    Example:
        >>> join_model("out/backbone", "out/memory", "out/model").tensors  # doctest: +SKIP
        23
    """
    from engram_edit.layouts import v4, v4_split  # v4_split imports this module

    t0 = time.monotonic()
    backbone, memory, out = Path(backbone), Path(memory), Path(out)
    files = open_model(backbone, memory)
    assert files.memory is not None
    _raise_if(memory_problems(files.memory))
    check_outputs([out], [backbone, memory], force)
    ids = files.config.engram_layer_ids
    with files.table() as table:
        row_dtype = _row_dtype(table, ids, memory)
        with atomic_dir(out, replace=force) as tmp:
            if files.layout == v4.NAME:
                plan = v4_split.join_plan(files, table)
                count, size = plan.tensors, v4_split.write_plan(plan, tmp, progress)
            else:
                locations = [loc for _, loc in sorted(files.tensors.items())]
                metadata = _metadata_of(loc for loc in locations
                                        if not is_memory_tensor(loc.name, ids))
                shutil.copyfile(backbone / CONFIG_FILE, tmp / CONFIG_FILE)
                shutil.copyfile(backbone / TOKENIZER_FILE, tmp / TOKENIZER_FILE)
                count = len(locations)
                size = write_safetensors(tmp / WEIGHTS_FILE, _entries(locations), metadata,
                                         progress)
            history = _copy_history(memory, tmp)
    return JoinReport(str(backbone), str(memory), str(out), files.memory.fingerprint, row_dtype,
                      count, size, history, time.monotonic() - t0, files.layout)


# --- convert-memory -------------------------------------------------------------------------------

@dataclass
class ConvertReport:
    memory: str
    out: str
    fingerprint: str
    from_dtype: str
    to_dtype: str
    rows: int  # rows re-encoded, every layer together
    bytes: int  # size of the new memory.safetensors
    max_abs_error: float  # largest |new - old| over every value (0.0 when exact)
    seconds: float


def _layer_entries(table: MemoryTable, layer: int, dtype: dtypes.RowDtype) -> list[TensorEntry]:
    rows, width = table.num_rows(layer), table.width(layer)
    out = [TensorEntry(table_name(layer), dtype.code, (rows, width))]
    if dtype.scaled:
        out.append(TensorEntry(scale_name(layer), dtypes.SCALE_CODE,
                               (rows, width // dtypes.SCALE_BLOCK)))
    return out


def _convert_layer(table: MemoryTable, layer: int, dtype: dtypes.RowDtype,
                   writer: SafetensorsWriter, meter: Meter, source: Path) -> float:
    """Re-encode one layer chunk by chunk into ``writer``; returns the largest change."""
    rows, width = table.num_rows(layer), table.width(layer)
    step = max(1, CONVERT_VALUES // width)
    worst = 0.0
    for first in range(0, rows, step):
        last = min(rows, first + step)
        values = table.read_raw(layer, np.arange(first, last, dtype=np.int64)).values()
        try:
            data, scale = dtypes.encode(dtype.name, values)
        except BadInputError as e:
            raise BadInputError([f"{source}: layer {layer}, rows {first}..{last - 1}: {line}"
                                 for line in e.problems]) from None
        if len(values):
            worst = max(worst, float(np.abs(dtypes.decode(dtype.name, data, scale)
                                             - values).max()))
        n = writer.write(table_name(layer), first * width * dtype.itemsize, data)
        if scale is not None:
            n += writer.write(scale_name(layer), first * scale.shape[1], scale)
        meter.tick(table_name(layer), n)
    return worst


def convert_memory(memory: str | Path, dtype: str, out: str | Path, force: bool = False,
                   progress: ProgressFn | None = None) -> ConvertReport:
    """Write a copy of a memory with its rows re-encoded in another dtype.

    Rows are read, decoded to float32 and encoded again (``dtypes.encode``; float8_e4m3 per
    docs/engram.md section 7, adding ``.scale`` tensors; other dtypes drop them) a chunk of
    about ``CONVERT_VALUES`` values at a time, never a whole table. The fingerprint does not
    change, so the result plugs into the same backbone. The ``.engram/`` folder is not carried:
    its patches hold rows in the old dtype and could not be undone against the new rows.

    Args:
        memory (`str` or `Path`): the memory directory.
        dtype (`str`): float8_e4m3, bfloat16, float16 or float32 (or fp8, bf16, f16, f32).
        out (`str` or `Path`): the memory directory to create.
        force (`bool`, defaults to False): replace ``out`` if it exists (model, memory or empty
            directory only).
        progress (callable, optional): called with a ``CopyProgress`` after every chunk.

    Returns:
        `ConvertReport`

    Raises:
        BadInputError: an unknown dtype, a damaged memory, a bad ``out``, or values the new
            dtype cannot hold (too large for float16, say); nothing is left behind.

    Example:
        >>> convert_memory("out/memory", "fp8", "out/memory-fp8").max_abs_error  # doctest: +SKIP
        0.0625
    """
    t0 = time.monotonic()
    memory, out = Path(memory), Path(out)
    target = dtypes.row_dtype(DTYPE_ALIASES.get(dtype, dtype))
    mem = open_memory(memory)
    _raise_if(memory_problems(mem))
    check_outputs([out], [memory], force)
    ids = mem.config.engram_layer_ids
    extra = [loc for name, loc in sorted(mem.tensors.items()) if not is_memory_tensor(name, ids)]
    metadata = {**_metadata_of(mem.tensors.values()), FINGERPRINT_KEY: mem.fingerprint}
    with mem.table() as table:
        before = _row_dtype(table, ids, memory)
        entries = [e for i in ids for e in _layer_entries(table, i, target)]
        entries += [TensorEntry(loc.name, loc.dtype, tuple(loc.shape)) for loc in extra]
        meter = Meter(sum(e.nbytes for e in entries), progress)
        worst = 0.0
        with atomic_dir(out, replace=force) as tmp:
            with OpenFiles() as files, SafetensorsWriter(tmp / MEMORY_FILE, entries,
                                                         metadata) as writer:
                for i in ids:
                    worst = max(worst, _convert_layer(table, i, target, writer, meter, memory))
                buffer = memoryview(bytearray(min(CHUNK_BYTES, max(
                    [loc.nbytes for loc in extra] + [1]))))
                for loc in extra:
                    writer.copy(loc.name, loc, files.fd(loc.path), buffer, meter)
            size = os.stat(tmp / MEMORY_FILE).st_size
            shutil.copyfile(memory / TOKENIZER_FILE, tmp / TOKENIZER_FILE)
            (tmp / MEMORY_JSON).write_text(
                memory_json(mem.config, mem.tokenizer, mem.fingerprint, target.name),
                encoding="utf-8")
        rows = sum(table.num_rows(i) for i in ids)
    return ConvertReport(str(memory), str(out), mem.fingerprint, before, target.name, rows,
                         size, worst, time.monotonic() - t0)
