"""import and export: engram-edit's layout <-> the demo and DeepSeek-V4.1 layouts, losslessly.

Applies the declared tables of layouts/ to tensor bytes moved by offset in bounded chunks
(layouts/write.py, split.py's writer); outputs are built beside their target and renamed last
(fileio). The provenance file ``import.json`` (IMPORT_JSON) lets export write the source layout
back bit for bit. docs/engram.md section 7.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engram_edit import layouts
from engram_edit.checkpoint import (
    CONFIG_FILE,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    WEIGHTS_INDEX,
    ModelFiles,
    derived_problems,
    is_memory_tensor,
    open_model,
    scale_name,
    table_name,
    with_derived,
)
from engram_edit.config import EngramConfig
from engram_edit.errors import BadInputError, MismatchError
from engram_edit.fileio import atomic_dir, read_json
from engram_edit.hashing import NgramHasher
from engram_edit.layouts import demo, v4
from engram_edit.layouts.base import (
    OURS,
    ConfigMapping,
    Derived,
    Rename,
    Stack,
    header_entries,
    header_metadata,
    locate_some,
    raw_header,
    read_config,
    weight_map,
)
from engram_edit.layouts.write import (
    OutFile,
    concat,
    constant,
    fp8_rows,
    header_bytes,
    matches,
    piece,
    write_files,
)
from engram_edit.memory import MemoryTable
from engram_edit.split import check_outputs
from engram_edit.tensorfile import TensorLocation, locate_tensors, read_range
from engram_edit.tensorwrite import (
    DEFAULT_METADATA,
    ProgressFn,
    Source,
    TensorEntry,
    write_safetensors,
)
from engram_edit.tokenizer import EngramTokenizer

IMPORT_JSON = "import.json"
IMPORT_FORMAT = "engram-edit-import"
IMPORT_FORMAT_VERSION = 1


@dataclass
class ImportReport:
    source: str
    out: str
    layout: str
    tensors: int  # tensors written to the new model.safetensors
    bytes: int  # its size
    referenced: int  # source tensors left in the source checkpoint (v4: the rest of the network)
    unmapped_config: list[str]  # source config keys kept only in import.json
    filled: list[str]  # engram-edit config fields the source does not set (defaults used)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class ExportReport:
    model: str
    out: str
    layout: str
    files: int  # safetensors files written
    tensors: int
    bytes: int  # tensor files together
    copied_files: int  # source shards copied unchanged (v4: the ones without Engram tensors)
    verbatim_headers: int  # files whose header is the source's, byte for byte
    requantized: list[int] = field(default_factory=list)  # layers re-encoded to FP8 (spec 7)
    seconds: float = 0.0


# --- import ----------------------------------------------------------------------------------

@dataclass
class _Source:
    """What import reads from a foreign directory, checked."""

    path: Path
    layout: str
    raw_config: dict[str, Any]
    mapping: ConfigMapping
    config: EngramConfig  # with derived keys filled in
    tokenizer: EngramTokenizer
    hasher: NgramHasher


def _open_source(source: Path, layout: str) -> _Source:
    found = layouts.detect(source)
    if found != layout:
        what = "engram-edit's own layout (nothing to import)" if found == OURS else \
            f"the {found} layout"
        raise BadInputError(f"{source}: is in {what}, not the {layout} layout")
    module = layouts.get(layout)
    raw = read_config(source)
    mapping = module.config_to_ours(raw, str(source / CONFIG_FILE))
    config = EngramConfig.from_dict(mapping.ours, source=str(source / CONFIG_FILE))
    tokenizer = EngramTokenizer.from_file(source / TOKENIZER_FILE)
    hasher = NgramHasher.for_tokenizer(config, tokenizer)
    problems = derived_problems(config, tokenizer, hasher, str(source / CONFIG_FILE))
    if problems:
        raise MismatchError(problems)
    return _Source(source, layout, raw, mapping, with_derived(config, tokenizer), tokenizer,
                   hasher)


def _demo_tensors(src: _Source) -> tuple[list[tuple[TensorEntry, Source]], list[str]]:
    """Every demo tensor mapped to ours (Engram rules, then the backbone as it is), and notes."""
    config, hasher, n = src.config, src.hasher, src.config.hc_mult
    locs = locate_tensors(src.path)
    out: list[tuple[TensorEntry, Source]] = []
    used: set[str] = set()
    problems: list[str] = []
    for i in config.engram_layer_ids:
        pre = demo.LAYER_PREFIX.format(i=i)
        for rule in demo.ENGRAM_RULES:
            if isinstance(rule, Derived):
                loc = locs.get(pre + rule.source)
                if loc is not None:
                    used.add(loc.name)
                    want = hasher.offsets[i].astype("<i8").tobytes()
                    if (loc.dtype, loc.nbytes) != (rule.dtype, len(want)) or \
                            read_range(loc, 0, loc.nbytes) != want:
                        problems.append(f"{src.path}: {loc.name} differs from the column "
                                        f"offsets of the hashing config")
                continue
            names = ([pre + rule.source.format(b=b) for b in range(n)] if isinstance(rule, Stack)
                     else [pre + rule.source])
            parts = [locs.get(name) for name in names]
            missing = [name for name, p in zip(names, parts, strict=True) if p is None]
            if missing:
                problems += [f"{src.path}: missing tensor {name}" for name in missing]
                continue
            used.update(names)
            first = parts[0]
            if any((p.dtype, p.shape) != (first.dtype, first.shape) for p in parts):
                problems.append(f"{src.path}: {pre}{rule.source}: the branches differ in dtype "
                                f"or shape")
                continue
            shape = tuple(first.shape)
            if isinstance(rule, Stack):
                shape = (n, *shape) if rule.new_axis else (n * shape[0], *shape[1:])
            if rule.ours == "embed.weight" and first.dtype not in demo.TABLE_DTYPES:
                problems.append(f"{src.path}: dtype not supported: {first.name} is "
                                f"{first.dtype}; demo tables are {', '.join(demo.TABLE_DTYPES)}")
                continue
            source = concat(parts) if len(parts) > 1 else first
            out.append((TensorEntry(pre + rule.ours, first.dtype, shape), source))
    prefixes = tuple(demo.LAYER_PREFIX.format(i=i) for i in config.engram_layer_ids)
    rest = [loc for name, loc in sorted(locs.items()) if name not in used]
    problems += [f"{src.path}: tensor {loc.name} has no mapping in the demo layout"
                 for loc in rest if loc.name.startswith(prefixes) or ".engram." in loc.name]
    if problems:
        raise BadInputError(problems)
    backbone = [(TensorEntry(loc.name, loc.dtype, tuple(loc.shape)), loc) for loc in rest]
    notes = _backbone_check(src, backbone)
    return out + backbone, notes


def _backbone_check(src: _Source, backbone: list[tuple[TensorEntry, Source]]) -> list[str]:
    """The demo's backbone tensors against the engram-edit model of the config (built on the
    meta device: names and shapes only). Unknown or misshapen ones are refused; missing ones
    are a note (the import then serves table work, not gates or generation)."""
    import torch

    from engram_edit.checkpoint import model_compression
    from engram_edit.model import EngramModel

    with torch.device("meta"):
        model = EngramModel(src.config, model_compression(src.config, src.tokenizer))
    wanted = {k: tuple(v.shape) for k, v in model.state_dict().items()
              if not is_memory_tensor(k, src.config.engram_layer_ids) and ".engram." not in k}
    if src.config.tie_word_embeddings:
        wanted.pop("lm_head.weight", None)
    have = {e.name: tuple(e.shape) for e, _ in backbone}
    problems = [f"{src.path}: tensor {k} has no mapping in the demo layout (not an engram-edit "
                f"backbone tensor)" for k in sorted(set(have) - set(wanted))]
    problems += [f"{src.path}: {k} has shape {list(have[k])}, the config gives {list(wanted[k])}"
                 for k in sorted(set(have) & set(wanted)) if have[k] != wanted[k]]
    if problems:
        raise BadInputError(problems)
    missing = sorted(set(wanted) - set(have))
    if not missing:
        return []
    return [f"no backbone weights for {len(missing)} tensor(s) (first {missing[0]}): the model "
            f"serves lookup, rows and edits, not gates or generation"]


def _v4_tensors(src: _Source) -> tuple[list[tuple[TensorEntry, Source]], list[str]]:
    """The V4.1 tensors that have an engram-edit place, and the names left in the source."""
    wanted = v4.wanted_tensors(src.config)
    found = locate_some(src.path, list(wanted.values()))
    tensors = {ours: found[name] for ours, name in wanted.items() if name in found}
    problems = v4.tensor_problems(src.config, tensors, src.path)
    for i in src.config.engram_layer_ids:
        for name in (table_name(i), scale_name(i)):
            if name not in tensors:
                problems.append(f"{src.path}: missing tensor {name}")
    if problems:
        raise BadInputError(problems)
    entries = [(TensorEntry(ours, loc.dtype, tuple(loc.shape)), loc)
               for ours, loc in sorted(tensors.items())]
    taken = {loc.name for loc in tensors.values()}
    referenced = sorted(layouts.base.tensor_names(src.path) - taken)
    return entries, referenced


def _provenance(src: _Source, mapped: set[str], referenced: list[str]) -> dict[str, Any]:
    found = weight_map(src.path)
    files = sorted(set(found.values())) if found is not None else [WEIGHTS_FILE]
    holds = {f: [] for f in files}
    for name in mapped:
        holds[found[name] if found is not None else WEIGHTS_FILE].append(name)
    index = src.path / WEIGHTS_INDEX
    skip = {CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_INDEX, *files}
    return {
        "format": IMPORT_FORMAT,
        "format_version": IMPORT_FORMAT_VERSION,
        "layout": src.layout,
        "source": str(src.path.resolve()),
        "config": (src.path / CONFIG_FILE).read_text(encoding="utf-8"),
        "unmapped_config": src.mapping.unmapped,
        "index": index.read_text(encoding="utf-8") if found is not None else None,
        "headers": {f: raw_header(src.path / f)[8:].decode("utf-8")
                    for f, names in holds.items() if names},
        "referenced": referenced,
        "other_files": sorted(p.name for p in src.path.iterdir()
                              if p.is_file() and p.name not in skip),
    }


def import_model(source: str | Path, layout: str, out: str | Path, force: bool = False,
                 progress: ProgressFn | None = None) -> ImportReport:
    """Write a demo or DeepSeek-V4.1 checkpoint as an engram-edit model directory.

    Config keys and tensor names go through the layout's declared tables (layouts/demo.py,
    layouts/v4.py); bytes are copied unchanged (a demo's per-branch tensors are concatenated,
    which is their stacking). What has no mapping is reported, never guessed: a demo tensor
    without a rule is refused; a V4.1 tensor outside the Engram modules and the embedding, final
    norm and LM head stays in the source checkpoint (``referenced``), and unmapped config keys
    are kept verbatim. ``import.json`` records all of it, so ``export_model`` writes the source
    layout back bit for bit. For V4.1 only the shards that hold mapped tensors are read.

    Args:
        source (`str` or `Path`): the checkpoint directory.
        layout (`str`): ``"demo"`` or ``"v4"``; it must be what ``layouts.detect`` finds.
        out (`str` or `Path`): the model directory to create.
        force (`bool`, defaults to False): replace ``out`` if it exists (model, memory or empty
            directory only).
        progress (callable, optional): called with a ``CopyProgress`` after every chunk.

    Returns:
        `ImportReport`

    Raises:
        BadInputError: an unknown or different layout, a missing shard or tensor, a dtype the
            layout does not allow, a tensor with no mapping. MismatchError: derived keys or
            stored offsets that disagree with the hashing config.

    Example:
        >>> import_model("engram-demo", "demo", "my-model").tensors  # doctest: +SKIP
        27
    """
    t0 = time.monotonic()
    source, out = Path(source), Path(out)
    layouts.get(layout)
    src = _open_source(source, layout)
    if layout == demo.NAME:
        tensors, notes = _demo_tensors(src)
        referenced: list[str] = []
        mapped = {n for n in layouts.base.tensor_names(source)}
    else:
        tensors, referenced = _v4_tensors(src)
        notes = [f"{len(referenced)} tensor(s) of the rest of the network stay in {source}; "
                 f"export --to v4 copies them back"] if referenced else []
        mapped = {loc.name for _, loc in tensors if isinstance(loc, TensorLocation)}
    check_outputs([out], [source], force)
    meta = dict(DEFAULT_METADATA)
    provenance = _provenance(src, mapped, referenced)
    with atomic_dir(out, replace=force) as tmp:
        (tmp / CONFIG_FILE).write_text(src.config.to_json(), encoding="utf-8")
        shutil.copyfile(source / TOKENIZER_FILE, tmp / TOKENIZER_FILE)
        size = write_safetensors(tmp / WEIGHTS_FILE, tensors, meta, progress)
        (tmp / IMPORT_JSON).write_text(json.dumps(provenance, indent=1) + "\n", encoding="utf-8")
    return ImportReport(str(source), str(out), layout, len(tensors), size, len(referenced),
                        sorted(src.mapping.unmapped), src.mapping.filled, notes,
                        time.monotonic() - t0)


# --- export ----------------------------------------------------------------------------------

def read_provenance(model: Path) -> dict[str, Any] | None:
    """A model's ``import.json``, or None when it was not imported."""
    file = model / IMPORT_JSON
    if not file.is_file():
        return None
    data = read_json(file)
    if not isinstance(data, dict) or data.get("format") != IMPORT_FORMAT:
        raise BadInputError(f"{file}: not an engram-edit import record")
    if data.get("format_version") != IMPORT_FORMAT_VERSION:
        raise BadInputError(f"{file}: format_version {data.get('format_version')!r} is not one "
                            f"this tool reads ({IMPORT_FORMAT_VERSION})")
    return data


def _config_text(files: ModelFiles, layout: str, prov: dict[str, Any] | None) -> str:
    """The source's own config.json text when it still says what the model's config says,
    else the model's config in the layout's keys (kept unmapped keys included)."""
    module = layouts.get(layout)
    if prov is not None:
        original = json.loads(prov["config"])
        mapping = module.config_to_ours(original, f"{files.path / IMPORT_JSON}: config")
        before = with_derived(EngramConfig.from_dict(mapping.ours), files.tokenizer)
        if before.to_dict() == files.config.to_dict():
            return prov["config"]
    if layout == v4.NAME:
        assert prov is not None, "a v4 export always has its source config"
        new = v4.config_from_ours(files.config, json.loads(prov["config"]))
    else:
        new = demo.config_from_ours(files.config, prov["unmapped_config"] if prov else {})
    return json.dumps(new, indent=2) + "\n"


def _demo_export(files: ModelFiles, prov: dict[str, Any] | None
                 ) -> tuple[list[OutFile], str, str | None]:
    config, n = files.config, files.config.hc_mult
    layer_prefixes = {demo.LAYER_PREFIX.format(i=i): i for i in config.engram_layer_ids}
    out: list[tuple[TensorEntry, Source]] = []
    problems: list[str] = []
    fp8 = [i for i in config.engram_layer_ids if scale_name(i) in files.tensors]
    if fp8:
        raise BadInputError(f"{files.path}: dtype not supported: the tables of layers {fp8} are "
                            f"FP8 (F8_E4M3 + scales) and the demo layout stores float rows; "
                            f"convert-memory to bf16 or f32 first")
    for pre, i in layer_prefixes.items():
        for rule in demo.ENGRAM_RULES:
            if isinstance(rule, Derived):
                data = files.hasher.offsets[i].astype("<i8").tobytes()
                out.append((TensorEntry(pre + rule.source, rule.dtype, (config.engram_columns,)),
                            constant(data)))
                continue
            loc = files.tensors.get(pre + rule.ours)
            if loc is None:
                problems.append(f"{files.path}: missing tensor {pre}{rule.ours}")
                continue
            if isinstance(rule, Rename):
                out.append((TensorEntry(pre + rule.source, loc.dtype, tuple(loc.shape)), loc))
                continue
            shape = tuple(loc.shape[1:]) if rule.new_axis else (loc.shape[0] // n,
                                                                *loc.shape[1:])
            for b in range(n):
                name = pre + rule.source.format(b=b)
                out.append((TensorEntry(name, loc.dtype, shape), piece(loc, b, n, shape)))
    if problems:
        raise BadInputError(problems)
    for name, loc in sorted(files.tensors.items()):
        if not name.startswith(tuple(layer_prefixes)):
            out.append((TensorEntry(name, loc.dtype, tuple(loc.shape)), loc))
    if prov is not None:  # a derived buffer the source did not store stays out
        stored = {t for text in prov["headers"].values()
                  for t in header_entries(header_bytes(text))}
        out = [(e, s) for e, s in out if e.name in stored or not e.name.endswith(
            tuple(r.source for r in demo.ENGRAM_RULES if isinstance(r, Derived)))]
    return _place(out, prov), _config_text(files, demo.NAME, prov), prov["index"] if prov else None


def _place(tensors: list[tuple[TensorEntry, Source]], prov: dict[str, Any] | None
           ) -> list[OutFile]:
    """Tensors into the source's files when every file's entries still match its header,
    else into one fresh ``model.safetensors``."""
    if prov is not None and prov["headers"]:
        by_name = {e.name: (e, s) for e, s in tensors}
        files = []
        for name, text in sorted(prov["headers"].items()):
            header = header_bytes(text)
            held = [by_name.pop(t) for t in header_entries(header) if t in by_name]
            if not matches(header, held):
                break
            files.append(OutFile(name, held, header_metadata(header), header))
        else:
            if not by_name:
                return files
    return [OutFile(WEIGHTS_FILE, tensors, dict(DEFAULT_METADATA))]


def _v4_export(files: ModelFiles, prov: dict[str, Any] | None, table: MemoryTable
               ) -> tuple[list[OutFile], list[tuple[Path, str]], str, str | None, list[int]]:
    if prov is None or prov.get("layout") != v4.NAME:
        raise BadInputError(f"{files.path}: export --to v4 writes the rest of the network from "
                            f"the DeepSeek-V4.1 checkpoint this model was imported from, and "
                            f"this model has no v4 {IMPORT_JSON}; import it with --from v4")
    source = Path(prov["source"])
    if not source.is_dir():
        raise BadInputError(f"{source}: the DeepSeek-V4.1 checkpoint this model was imported "
                            f"from is gone; export --to v4 copies its other tensors from there")
    tables = {table_name(i): i for i in files.config.engram_layer_ids}
    scales = {scale_name(i): i for i in files.config.engram_layer_ids}
    requantized = sorted(i for i in files.config.engram_layer_ids
                         if table.dtype(i) != "float8_e4m3")
    served: dict[str, Source] = {}  # V4.1 name -> where its bytes come from in this model
    for ours, name in v4.wanted_tensors(files.config).items():
        layer = tables.get(ours, scales.get(ours))
        if layer in requantized:
            served[name] = fp8_rows(table, layer, "data" if ours in tables else "scale")
        elif ours in files.tensors:
            served[name] = files.tensors[ours]
        elif ours in scales:
            raise BadInputError(f"{files.path}: missing tensor {ours}")
    index = json.loads(prov["index"])["weight_map"] if prov["index"] else None
    shard_names = sorted(set(index.values())) if index else [WEIGHTS_FILE]
    out: list[OutFile] = []
    copies: list[tuple[Path, str]] = []
    for shard in shard_names:
        if shard not in prov["headers"]:
            if not (source / shard).is_file():
                raise BadInputError(f"{source}: missing shard {shard}")
            copies.append((source / shard, shard))
            continue
        header = header_bytes(prov["headers"][shard])
        entries = header_entries(header)
        others = [name for name in entries if name not in served]
        from_source = locate_some(source, others) if others else {}
        held: list[tuple[TensorEntry, Source]] = []
        for name, (dtype, shape, _, _) in entries.items():
            src = served.get(name, from_source.get(name))
            if src is None:
                raise BadInputError(f"{source}: missing tensor {name} (in {shard})")
            if isinstance(src, TensorLocation) and (src.dtype, tuple(src.shape)) != (dtype,
                                                                                    shape):
                raise BadInputError(f"{files.path}: {src.name} is {src.dtype} "
                                    f"{list(src.shape)}, the v4 layout needs {dtype} "
                                    f"{list(shape)}")
            held.append((TensorEntry(name, dtype, shape), src))
        out.append(OutFile(shard, held, header_metadata(header), header))
    return out, copies, _config_text(files, v4.NAME, prov), prov["index"], requantized


def export_model(model: str | Path, layout: str, out: str | Path,
                 memory: str | Path | None = None, force: bool = False,
                 progress: ProgressFn | None = None) -> ExportReport:
    """Write an engram-edit model (edited or not) back in the demo or DeepSeek-V4.1 layout.

    demo: the Engram modules under the demo's names (stacked tensors split per branch, the
    offsets buffer rebuilt), the backbone as it is, the demo config fields; FP8 tables are
    refused (the demo stores float rows). v4: every shard of the checkpoint the model was
    imported from, the Engram tables, ``wkv``, norms, embedding and head taken from this model
    (tables in another dtype re-encoded to FP8 per docs/engram.md section 7), every other
    tensor from the source; shards without mapped tensors are copied unchanged. With the
    model's ``import.json``, files keep their source headers byte for byte when their tensors
    keep name, dtype and shape, so import then export gives back the same files.

    Args:
        model (`str` or `Path`): an engram-edit model directory.
        layout (`str`): ``"demo"`` or ``"v4"``.
        out (`str` or `Path`): the directory to create.
        memory (`str` or `Path`, optional): a split memory plugged into ``model``.
        force (`bool`, defaults to False): replace ``out`` if it exists (model, memory or empty
            directory only).
        progress (callable, optional): called with a ``CopyProgress`` after every chunk.

    Returns:
        `ExportReport`

    Raises:
        BadInputError: a foreign-layout ``model``, a dtype the layout cannot store, a v4 export
            without the source checkpoint or with a missing shard.

    Example:
        >>> export_model("my-model", "v4", "my-model-v4").copied_files  # doctest: +SKIP
        46
    """
    t0 = time.monotonic()
    model, out = Path(model), Path(out)
    layouts.get(layout)
    files = open_model(model, memory)
    if files.layout != OURS:
        raise BadInputError(f"{model}: already in the {files.layout} layout (edits to it are "
                            f"made in place); export reads engram-edit model directories")
    prov = read_provenance(model)
    if prov is not None and prov["layout"] != layout:
        prov = None
    inputs = [model] + ([files.memory.path] if files.memory else [])
    if prov is not None and layout == v4.NAME:
        inputs.append(Path(prov["source"]))
    check_outputs([out], inputs, force)
    copies: list[tuple[Path, str]] = []
    requantized: list[int] = []
    with files.table() as table:
        if layout == demo.NAME:
            plan, config_text, index_text = _demo_export(files, prov)
        else:
            plan, copies, config_text, index_text, requantized = _v4_export(files, prov, table)
        with atomic_dir(out, replace=force) as tmp:
            (tmp / CONFIG_FILE).write_text(config_text, encoding="utf-8")
            shutil.copyfile(files.path / TOKENIZER_FILE, tmp / TOKENIZER_FILE)
            size = write_files(tmp, plan, progress)
            if index_text is not None and len(plan) + len(copies) > 1:
                (tmp / WEIGHTS_INDEX).write_text(index_text, encoding="utf-8")
            elif len(plan) + len(copies) > 1:
                (tmp / WEIGHTS_INDEX).write_text(_index(plan, copies), encoding="utf-8")
            for path, name in copies:
                shutil.copyfile(path, tmp / name)
                size += (tmp / name).stat().st_size
            if prov is not None:
                for name in prov["other_files"]:
                    if (Path(prov["source"]) / name).is_file():
                        shutil.copyfile(Path(prov["source"]) / name, tmp / name)
    return ExportReport(str(model), str(out), layout, len(plan) + len(copies),
                        sum(len(f.tensors) for f in plan), size, len(copies),
                        sum(f.header is not None for f in plan), requantized,
                        time.monotonic() - t0)


def _index(plan: list[OutFile], copies: list[tuple[Path, str]]) -> str:
    weights = {e.name: f.name for f in plan for e, _ in f.tensors}
    for path, name in copies:
        weights.update(dict.fromkeys(layouts.base.header_entries(raw_header(path)), name))
    return json.dumps({"metadata": {}, "weight_map": dict(sorted(weights.items()))},
                      indent=2) + "\n"
