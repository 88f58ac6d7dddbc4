"""Model and memory directories on disk <-> objects; fingerprints.

Opening a directory reads config, tokenizer and safetensors headers only (no torch); building
the torch model is a separate step. Writes are atomic (fileio).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from engram_edit.config import EngramConfig
from engram_edit.errors import BadInputError, MismatchError
from engram_edit.fileio import atomic_dir, atomic_write_text, read_json
from engram_edit.hashing import NgramHasher
from engram_edit.memory import MemoryTable
from engram_edit.tensorfile import TensorLocation, locate_tensors, read_header
from engram_edit.tokenizer import EngramTokenizer

if TYPE_CHECKING:
    import torch

    from engram_edit.model import EngramModel

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
MEMORY_FILE = "memory.safetensors"
MEMORY_JSON = "memory.json"
MEMORY_FORMAT = "engram-memory"
MEMORY_FORMAT_VERSION = 1
FINGERPRINT_KEY = "engram_fingerprint"  # in the safetensors __metadata__ of a memory file


def table_name(layer_id: int) -> str:
    """Tensor name of the rows of one Engram layer (DeepSeek-V4.1's naming)."""
    return f"layers.{layer_id}.engram.embed.weight"


def scale_name(layer_id: int) -> str:
    """Tensor name of the E8M0 block scales of an FP8 table."""
    return f"layers.{layer_id}.engram.embed.scale"


def table_names(config: EngramConfig) -> dict[int, str]:
    return {i: table_name(i) for i in config.engram_layer_ids}


def is_memory_tensor(name: str, layer_ids: list[int]) -> bool:
    return any(name in (table_name(i), scale_name(i)) for i in layer_ids)


def with_derived(config: EngramConfig, tokenizer: EngramTokenizer) -> EngramConfig:
    """``config`` with its derived keys filled in from the tokenizer and the hash geometry."""
    hasher = NgramHasher.for_tokenizer(config, tokenizer)
    return replace(config, engram_compressed_vocab_size=tokenizer.compressed_vocab_size,
                   engram_num_embeddings=[hasher.rows_per_layer[i]
                                          for i in config.engram_layer_ids])


def fingerprint(config: EngramConfig, tokenizer: EngramTokenizer) -> str:
    """sha256 of the canonical JSON of everything that decides which row a text reads."""
    hasher = NgramHasher.for_tokenizer(config, tokenizer)
    ids = config.engram_layer_ids
    payload = {
        "layer_ids": ids,
        "multipliers": [hasher.multipliers[i].tolist() for i in ids],
        "primes": [hasher.primes[i].tolist() for i in ids],
        "pad_id": hasher.pad_id,
        "compression_sha256": tokenizer.compression_sha256,
    }
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def model_compression(config: EngramConfig, tokenizer: EngramTokenizer) -> np.ndarray:
    """The compression table sized to the embedding (ids past the tokenizer never occur)."""
    table = tokenizer.compression
    if len(table) < config.vocab_size:
        table = np.concatenate([table, np.zeros(config.vocab_size - len(table), np.int64)])
    return table


def derived_problems(config: EngramConfig, tokenizer: EngramTokenizer, hasher: NgramHasher,
                     source: str) -> list[str]:
    """Where config's vocab_size, engram_compressed_vocab_size or engram_num_embeddings
    disagree with the tokenizer and hash geometry, one line each naming ``source``."""
    p = []
    if tokenizer.vocab_size > config.vocab_size:
        p.append(f"{source}: vocab_size {config.vocab_size} is smaller than the tokenizer's "
                 f"{tokenizer.vocab_size} entries")
    vc = config.engram_compressed_vocab_size
    if vc is not None and vc != tokenizer.compressed_vocab_size:
        p.append(f"{source}: engram_compressed_vocab_size is {vc} but tokenizer.json "
                 f"compresses to {tokenizer.compressed_vocab_size}")
    rows = config.engram_num_embeddings
    actual = [hasher.rows_per_layer[i] for i in config.engram_layer_ids]
    if rows is not None and rows != actual:
        p.append(f"{source}: engram_num_embeddings is {rows} but the hash geometry gives {actual}")
    return p


def _require_dir(path: Path, what: str, marker: str) -> None:
    if not path.exists():
        raise BadInputError(f"{path}: no such {what} directory")
    if not path.is_dir():
        raise BadInputError(f"{path}: not a directory (a {what} is a directory)")
    if not (path / marker).is_file():
        raise BadInputError(f"{path}: not a {what} directory (no {marker})")


def _weight_locations(path: Path) -> dict[str, TensorLocation]:
    if not (path / WEIGHTS_FILE).is_file() and not (path / WEIGHTS_INDEX).is_file():
        raise BadInputError(f"{path}: no {WEIGHTS_FILE} or {WEIGHTS_INDEX}")
    return locate_tensors(path)


@dataclass
class MemoryFiles:
    """A split memory directory: rows of every Engram layer, tokenizer and hashing config."""

    path: Path
    config: EngramConfig  # hashing keys from memory.json; backbone keys are placeholders
    tokenizer: EngramTokenizer
    hasher: NgramHasher
    tensors: dict[str, TensorLocation]
    fingerprint: str
    meta: dict[str, Any]

    def table(self, writable: bool = False) -> MemoryTable:
        return MemoryTable.open(self.tensors, table_names(self.config), writable=writable)


@dataclass
class ModelFiles:
    """A model directory (optionally with a plugged-in memory), read without building torch."""

    path: Path
    config: EngramConfig
    tokenizer: EngramTokenizer
    hasher: NgramHasher
    tensors: dict[str, TensorLocation]  # table tensors point into the memory file when plugged
    memory: MemoryFiles | None = None
    layout: str = "engram-edit"  # "v4": a DeepSeek-V4.1 directory read in place (layouts/)

    @property
    def memory_dir(self) -> Path:
        """Where row edits land (and where their ``.engram/`` folder lives)."""
        return self.memory.path if self.memory else self.path

    def table(self, writable: bool = False) -> MemoryTable:
        return MemoryTable.open(self.tensors, table_names(self.config), writable=writable)

    def fingerprint(self) -> str:
        return fingerprint(self.config, self.tokenizer)


def _hashing_keys(config: EngramConfig) -> dict[str, Any]:
    return {k: v for k, v in config.to_dict().items() if k.startswith("engram_")}


def open_memory(path: str | Path) -> MemoryFiles:
    """Read a split memory directory: memory.json, tokenizer.json and the row tensors' headers."""
    path = Path(path)
    _require_dir(path, "memory", MEMORY_JSON)
    meta_path = path / MEMORY_JSON
    meta = read_json(meta_path)
    if not isinstance(meta, dict) or meta.get("format") != MEMORY_FORMAT:
        raise BadInputError(f"{meta_path}: not an engram-edit memory description "
                            f"(format is not {MEMORY_FORMAT!r})")
    hashing = meta.get("hashing")
    if not isinstance(hashing, dict):
        raise BadInputError(f"{meta_path}: hashing: missing or not an object")
    tokenizer = EngramTokenizer.from_file(path / TOKENIZER_FILE)
    layer_ids = hashing.get("engram_layer_ids") or [0]
    config = EngramConfig.from_dict(
        {**hashing, "vocab_size": tokenizer.vocab_size, "num_hidden_layers": max(layer_ids) + 1},
        source=str(meta_path))
    hasher = NgramHasher.for_tokenizer(config, tokenizer)
    problems = derived_problems(config, tokenizer, hasher, str(meta_path))
    fp = fingerprint(config, tokenizer)
    if meta.get("fingerprint") != fp:
        problems.append(f"{meta_path}: fingerprint does not match its own hashing config and "
                        f"tokenizer.json (stored {str(meta.get('fingerprint'))[:12]}, "
                        f"computed {fp[:12]})")
    file = path / MEMORY_FILE
    header = read_header(file)
    if header.metadata.get(FINGERPRINT_KEY) != fp:
        problems.append(f"{file}: __metadata__ {FINGERPRINT_KEY} does not match memory.json")
    if problems:
        raise MismatchError(problems)
    return MemoryFiles(path, config, tokenizer, hasher, dict(header.tensors), fp, meta)


def check_tables(config: EngramConfig, hasher: NgramHasher,
                 tensors: dict[str, TensorLocation], source: Path) -> None:
    """Raise MismatchError unless every Engram layer's table is in ``tensors`` with the
    shape config and hasher give (one line per missing or misshapen table, naming ``source``)."""
    problems = []
    for i in config.engram_layer_ids:
        name = table_name(i)
        loc = tensors.get(name)
        want = (hasher.rows_per_layer[i], config.engram_head_dim)
        if loc is None:
            problems.append(f"{source}: missing tensor {name} (rows of Engram layer {i}); "
                            f"a backbone needs --memory")
        elif tuple(loc.shape) != want:
            problems.append(f"{source}: {name} has shape {list(loc.shape)}, expected "
                            f"{list(want)} from config.json")
    if problems:
        raise MismatchError(problems)


def memory_mismatch(backbone: EngramConfig, tokenizer: EngramTokenizer,
                    memory: MemoryFiles) -> list[str]:
    """Which component differs between a backbone and a memory, one line each."""
    src = f"{memory.path}"
    mc = memory.config
    p = []
    if mc.engram_layer_ids != backbone.engram_layer_ids:
        p.append(f"{src}: layer ids differ (memory {mc.engram_layer_ids}, "
                 f"backbone {backbone.engram_layer_ids})")
    if mc.engram_head_dim != backbone.engram_head_dim:
        p.append(f"{src}: row width differs (memory {mc.engram_head_dim}, "
                 f"backbone {backbone.engram_head_dim})")
    if p:
        return p
    if memory.tokenizer.compression_sha256 != tokenizer.compression_sha256:
        p.append(f"{src}: tokenizer differs (compression table sha256 "
                 f"{memory.tokenizer.compression_sha256[:12]} vs "
                 f"{tokenizer.compression_sha256[:12]})")
    if mc.engram_seed != backbone.engram_seed:
        p.append(f"{src}: hash seed differs (memory {mc.engram_seed}, "
                 f"backbone {backbone.engram_seed})")
    if (mc.engram_max_ngram_size, mc.engram_n_heads) != (backbone.engram_max_ngram_size,
                                                          backbone.engram_n_heads):
        p.append(f"{src}: n-gram orders or heads differ")
    if mc.engram_vocab_sizes != backbone.engram_vocab_sizes:
        p.append(f"{src}: primes differ (table sizes {mc.engram_vocab_sizes} vs "
                 f"{backbone.engram_vocab_sizes})")
    if mc.engram_pad_token_id != backbone.engram_pad_token_id:
        p.append(f"{src}: pad token differs")
    if not p and memory.fingerprint != fingerprint(backbone, tokenizer):
        p.append(f"{src}: fingerprint differs from the backbone's")
    return p


def open_model(path: str | Path, memory: str | Path | None = None) -> ModelFiles:
    """Read a model directory (and plug in a split memory) and check that everything fits.

    A DeepSeek-V4.1 directory is read in place by ``layouts.v4.open_model``; a demo-layout one
    is refused with the ``import`` command that converts it (``layouts.detect``).
    """
    from engram_edit import layouts

    path = Path(path)
    layout = layouts.detect(path)
    if layout == layouts.v4.NAME:
        return layouts.v4.open_model(path, memory)
    if layout != layouts.OURS:
        raise BadInputError(f"{path}: a {layout} layout directory; convert it first: "
                            f"engram-edit import {path} --from {layout} --out DIR")
    _require_dir(path, "model", CONFIG_FILE)
    config = EngramConfig.from_json_file(path / CONFIG_FILE)
    tokenizer = EngramTokenizer.from_file(path / TOKENIZER_FILE)
    hasher = NgramHasher.for_tokenizer(config, tokenizer)
    problems = derived_problems(config, tokenizer, hasher, str(path / CONFIG_FILE))
    if problems:
        raise MismatchError(problems)
    tensors = _weight_locations(path)
    mem = None
    if memory is not None:
        mem = open_memory(memory)
        mismatch = memory_mismatch(config, tokenizer, mem)
        if mismatch:
            raise MismatchError(mismatch)
        tensors = {k: v for k, v in tensors.items()
                   if not is_memory_tensor(k, config.engram_layer_ids)}
        tensors.update({k: v for k, v in mem.tensors.items()
                        if is_memory_tensor(k, config.engram_layer_ids)})
    check_tables(config, hasher, tensors, mem.path / MEMORY_FILE if mem else path)
    return ModelFiles(path, config, tokenizer, hasher, tensors, mem)


# --- torch side -------------------------------------------------------------------------------

def _read_tensor(loc: TensorLocation) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(loc.path), framework="pt") as f:
        return f.get_tensor(loc.name)


def build_model(files: ModelFiles, device: str | torch.device | None = None,
                placement: str | None = None) -> EngramModel:
    """Build the torch model from a model directory.

    ``placement`` says where the tables live (model/placement.py): "gpu", parameters on
    ``device`` dequantized to float32; "host", CPU memory in their stored dtype; "mmap", read
    from the file per forward, never whole. None: "gpu" on the CPU, or on CUDA when the whole
    model in float32 fits in free device memory; else "host". Tables outside the model are not
    in its ``state_dict()``.
    """

    from engram_edit.model import EngramModel, pick_device
    from engram_edit.model.placement import choose_placement, row_source

    if files.layout != "engram-edit":
        raise BadInputError(f"{files.path}: a {files.layout} layout directory has no "
                            f"engram-edit backbone to build (its rows decode through "
                            f"layouts.lens; gates and generation need the whole network)")
    config = files.config
    target = pick_device(device)
    placement = choose_placement(placement, target,
                                 4 * sum(loc.numel for loc in files.tensors.values()))
    table = files.table()
    model = EngramModel(config, model_compression(config, files.tokenizer),
                        row_source(placement, table))
    wanted = model.state_dict()
    layer_ids = config.engram_layer_ids
    state: dict[str, torch.Tensor] = {}
    missing = []
    for name in wanted:
        if is_memory_tensor(name, layer_ids):
            state[name] = table.to_torch(int(name.split(".")[1]))
        elif name in files.tensors:
            state[name] = _read_tensor(files.tensors[name]).float()
        elif not (name == "lm_head.weight" and config.tie_word_embeddings):
            missing.append(name)
    unexpected = sorted(k for k in files.tensors
                        if k not in wanted and not is_memory_tensor(k, layer_ids))
    problems = [f"{files.path}: missing tensor {k}" for k in sorted(missing)]
    problems += [f"{files.path}: unexpected tensor {k}" for k in unexpected]
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(wanted[name].shape):
            problems.append(f"{files.path}: {name} has shape {list(tensor.shape)}, "
                            f"expected {list(wanted[name].shape)}")
    if problems:
        raise MismatchError(problems)
    model.load_state_dict(state, strict=False)
    return model.to(target).eval()


def _table_tensors(model: EngramModel, dtype: str) -> dict[str, torch.Tensor]:
    """Each layer's rows encoded in ``dtype`` (FP8 adds the scale tensor)."""
    import torch

    from engram_edit.dtypes import encode_torch

    placement = model.row_source.placement
    if placement != "gpu":
        raise BadInputError(f"the model's tables live outside it (placement {placement!r}); "
                            f"build it with placement 'gpu' to save it")
    out = {}
    for i in model.config.engram_layer_ids:
        weight = model.state_dict()[table_name(i)].detach().float().cpu()
        data, scale = encode_torch(dtype, weight)
        out[table_name(i)] = data
        if scale is not None:
            out[scale_name(i)] = scale
    assert all(isinstance(t, torch.Tensor) for t in out.values())
    return out


def save_model(model: EngramModel, tokenizer: EngramTokenizer, out: str | Path, *,
               dtype: str = "float32", table_dtype: str | None = None,
               overwrite: bool = False) -> Path:
    """Write config.json, tokenizer.json and model.safetensors into ``out``, atomically.

    ``dtype`` is the storage type of every weight; ``table_dtype`` (default: ``dtype``) that of
    the Engram rows, "float8_e4m3" included.
    """
    import torch
    from safetensors.torch import save_file

    from engram_edit.dtypes import torch_dtype

    out = Path(out)
    if out.exists() and not overwrite:
        raise BadInputError(f"{out}: already exists (pass --force to replace it)")
    config = with_derived(model.config, tokenizer)
    layer_ids = config.engram_layer_ids
    tensors = {}
    for name, tensor in model.state_dict().items():
        if is_memory_tensor(name, layer_ids):
            continue
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        tensors[name] = tensor.detach().to("cpu", torch_dtype(dtype)).contiguous()
    tensors.update(_table_tensors(model, table_dtype or dtype))
    assert all(t.dtype != torch.float64 for t in tensors.values())
    with atomic_dir(out, replace=overwrite) as tmp:
        (tmp / CONFIG_FILE).write_text(config.to_json(), encoding="utf-8")
        tokenizer.tokenizer.save(str(tmp / TOKENIZER_FILE))
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
    return out


def write_config(path: str | Path, config: EngramConfig) -> None:
    atomic_write_text(Path(path) / CONFIG_FILE, config.to_json())


# --- description ------------------------------------------------------------------------------

@dataclass
class TableInfo:
    layer_id: int
    rows: int
    width: int
    dtype: str
    rows_per_column: list[int]  # the primes, in column order
    nbytes: int


@dataclass
class ModelInfo:
    path: str
    kind: str  # "model", "model+memory" or "memory"
    fingerprint: str
    config: dict[str, Any]  # v4: only the figures its config.json sets (v4.described_config)
    vocab_size: int
    compressed_vocab_size: int
    backbone_parameters: int | None  # None: not counted (``notes`` says why)
    table_parameters: int
    tables: list[TableInfo]
    files: dict[str, int]  # file name -> size in bytes
    layout: str = "engram-edit"
    notes: list[str] = field(default_factory=list)


def _files_of(*dirs: Path) -> dict[str, int]:
    out = {}
    for d in dirs:
        for f in sorted(d.iterdir()):
            if f.is_file():
                out[str(f)] = f.stat().st_size
    return out


def _tables_info(config: EngramConfig, hasher: NgramHasher,
                 tensors: dict[str, TensorLocation]) -> list[TableInfo]:
    from engram_edit.dtypes import dtype_from_safetensors

    out = []
    for i in config.engram_layer_ids:
        loc = tensors[table_name(i)]
        scale = tensors.get(scale_name(i))
        out.append(TableInfo(i, hasher.rows_per_layer[i], config.engram_head_dim,
                             dtype_from_safetensors(loc.dtype), hasher.primes[i].tolist(),
                             loc.nbytes + (scale.nbytes if scale else 0)))
    return out


def describe_model(files: ModelFiles) -> ModelInfo:
    """Geometry, parameter counts, dtypes and file sizes of a model directory.

    A DeepSeek-V4.1 directory is described from its config.json and the headers ``open_model``
    read: the backbone's parameters are not counted (that needs every shard's header) and the
    config holds only what the file sets, never our defaults.
    """
    from engram_edit.layouts import v4

    ids = files.config.engram_layer_ids
    tables = sum(files.tensors[table_name(i)].numel for i in ids)
    dirs = [files.path] + ([files.memory.path] if files.memory else [])
    backbone: int | None
    if files.layout == v4.NAME:
        config, backbone = v4.described_config(files.path), None
        notes = ["backbone parameters not counted: only the shards holding the Engram "
                 "tensors, token embedding, final norm and LM head of a DeepSeek-V4.1 "
                 "directory are read"]
    else:
        config, notes = files.config.to_dict(), []
        backbone = sum(loc.numel for name, loc in files.tensors.items()
                       if not is_memory_tensor(name, ids))
    return ModelInfo(str(files.path), "model+memory" if files.memory else "model",
                     files.fingerprint(), config, files.config.vocab_size,
                     files.tokenizer.compressed_vocab_size, backbone, tables,
                     _tables_info(files.config, files.hasher, files.tensors), _files_of(*dirs),
                     files.layout, notes)


def describe_memory(mem: MemoryFiles) -> ModelInfo:
    """The same description for a split memory directory alone."""
    ids = mem.config.engram_layer_ids
    return ModelInfo(str(mem.path), "memory", mem.fingerprint,
                     {k: v for k, v in mem.config.to_dict().items() if k.startswith("engram_")},
                     mem.tokenizer.vocab_size, mem.tokenizer.compressed_vocab_size, 0,
                     sum(mem.tensors[table_name(i)].numel for i in ids),
                     _tables_info(mem.config, mem.hasher, mem.tensors), _files_of(mem.path))


def load_model(path: str | Path, memory: str | Path | None = None,
               device: str | torch.device | None = None,
               placement: str | None = None) -> tuple[ModelFiles, EngramModel]:
    """Open a model directory (plus an optional split memory) and build its torch model
    (``placement`` as in ``build_model``)."""
    files = open_model(path, memory)
    return files, build_model(files, device, placement)
