"""split / join / convert-memory: bit-identical round trips, fingerprints, refusals, atomicity."""

import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from commands.main import app
from conftest import GOLDEN
from engram_edit import tensorwrite
from engram_edit.checkpoint import (
    FINGERPRINT_KEY,
    open_memory,
    open_model,
    scale_name,
    table_name,
    with_derived,
)
from engram_edit.config import EngramConfig
from engram_edit.dtypes import decode
from engram_edit.errors import BadInputError, MismatchError
from engram_edit.hashing import NgramHasher
from engram_edit.split import convert_memory, join_model, split_model
from engram_edit.tensorfile import locate_tensors, read_header
from engram_edit.tensorwrite import CopyProgress, TensorEntry, safetensors_header, write_safetensors
from engram_edit.tokenizer import EngramTokenizer

TOKENIZER = GOLDEN / "tiny_tokenizer.json"
LAYERS = [0, 2]


def tiny_config(**engram: object) -> EngramConfig:
    base = dict(vocab_size=512, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                intermediate_size=32, max_position_embeddings=64, engram_layer_ids=LAYERS,
                engram_max_ngram_size=3, engram_n_heads=2, engram_head_dim=32,
                engram_vocab_size=[40, 50])
    return EngramConfig(**{**base, **engram})


def other_tokenizer(path):
    """The tiny tokenizer plus one added token: a different compression table."""
    data = json.loads(TOKENIZER.read_text())
    data["added_tokens"].append({"id": 500, "content": "<extra>", "single_word": False,
                                 "lstrip": False, "rstrip": False, "normalized": False,
                                 "special": True})
    path.write_text(json.dumps(data))
    return path


def make_model(path, table_dtype="float32", sharded=False, seed=0, tokenizer=TOKENIZER,
               **engram):
    """A model directory written without model code: random tensors under the right names."""
    tok = EngramTokenizer.from_file(tokenizer)
    config = with_derived(tiny_config(**engram), tok)
    hasher = NgramHasher.for_tokenizer(config, tok)
    g = torch.Generator().manual_seed(seed)
    h, w = config.hidden_size, config.engram_head_dim
    tensors = {"embed.weight": torch.randn(config.vocab_size, h, generator=g),
               "norm.weight": torch.randn(h, generator=g).to(torch.float16),
               "layers.1.mlp.up.weight": torch.randn(3, 7, generator=g).to(torch.bfloat16)}
    for i in config.engram_layer_ids:
        rows = hasher.rows_per_layer[i]
        tensors[f"layers.{i}.engram.wkv.weight"] = torch.randn(
            5 * h, config.engram_input_dim, generator=g).to(torch.bfloat16)
        tensors[f"layers.{i}.engram.q_weight"] = torch.randn(4, h, generator=g)
        x = torch.randn(rows, w, generator=g) * 3
        if table_dtype == "float8_e4m3":
            tensors[table_name(i)] = x.to(torch.float8_e4m3fn)
            scale = torch.randint(115, 130, (rows, w // 32), generator=g, dtype=torch.uint8)
            tensors[scale_name(i)] = scale.view(torch.float8_e8m0fnu)
        else:
            tensors[table_name(i)] = x.to(getattr(torch, table_dtype))
    path.mkdir(parents=True)
    (path / "config.json").write_text(config.to_json())
    (path / "tokenizer.json").write_bytes(tokenizer.read_bytes())
    if not sharded:
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
        return path
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    for shard, part in shards.items():
        save_file({k: tensors[k] for k in part}, path / shard, metadata={"format": "pt"})
    weight_map = {k: shard for shard, part in shards.items() for k in part}
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return path


def tensors_of(path) -> dict[str, tuple[str, tuple, bytes]]:
    """name -> (dtype, shape, raw bytes), every tensor read with safetensors itself."""
    out = {}
    for name, loc in locate_tensors(path).items():
        with safe_open(str(loc.path), framework="pt") as f:
            t = f.get_tensor(name)
        raw = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        out[name] = (loc.dtype, tuple(t.shape), raw)
    return out


def is_table(name: str) -> bool:
    return name.endswith(("engram.embed.weight", "engram.embed.scale"))


def leftovers(parent) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.fixture
def split_dirs(tmp_path):
    model = make_model(tmp_path / "model")
    split_model(model, tmp_path / "backbone", tmp_path / "memory")
    return model, tmp_path / "backbone", tmp_path / "memory"


# --- round trips ---------------------------------------------------------------------------------

@pytest.mark.parametrize("table_dtype,sharded", [("float32", False), ("float8_e4m3", False),
                                                  ("bfloat16", True)])
def test_split_then_join_is_bit_identical(tmp_path, table_dtype, sharded):
    model = make_model(tmp_path / "model", table_dtype, sharded)
    seen: list[CopyProgress] = []
    report = split_model(model, tmp_path / "bb", tmp_path / "mem", progress=seen.append)
    join_model(tmp_path / "bb", tmp_path / "mem", tmp_path / "joined")
    original = tensors_of(model)
    done = [p.done for p in seen]
    assert done == sorted(done) and done[-1] == seen[-1].total == sum(
        len(raw) for _, _, raw in original.values())
    backbone, memory = tensors_of(tmp_path / "bb"), tensors_of(tmp_path / "mem")
    assert sorted(backbone) == sorted(k for k in original if not is_table(k))
    assert sorted(memory) == sorted(k for k in original if is_table(k))
    assert len(memory) == (4 if table_dtype == "float8_e4m3" else 2)
    assert tensors_of(tmp_path / "joined") == original
    for name in ("config.json", "tokenizer.json"):
        assert (tmp_path / "joined" / name).read_bytes() == (model / name).read_bytes()
    assert (report.row_dtype, report.memory_tensors) == (table_dtype, len(memory))
    assert leftovers(tmp_path) == []


def test_memory_json_fingerprint_equals_the_metadata_and_both_open(split_dirs):
    model, backbone, memory = split_dirs
    meta = json.loads((memory / "memory.json").read_text())
    assert list(meta) == ["format", "format_version", "fingerprint", "hashing", "geometry"]
    assert meta["format"] == "engram-memory" and meta["format_version"] == 1
    header = read_header(memory / "memory.safetensors")
    assert header.metadata[FINGERPRINT_KEY] == meta["fingerprint"]
    files = open_model(model)
    assert meta["fingerprint"] == files.fingerprint()
    assert meta["geometry"] == {"layer_ids": LAYERS, "width": 32, "dtype": "float32",
                                "rows_per_layer": [files.hasher.rows_per_layer[i]
                                                   for i in LAYERS]}
    assert all(k.startswith("engram_") for k in meta["hashing"])
    assert open_memory(memory).fingerprint == meta["fingerprint"]
    plugged = open_model(backbone, memory)
    assert plugged.tensors[table_name(0)].path == memory / "memory.safetensors"
    with pytest.raises(MismatchError, match="a backbone needs --memory"):
        open_model(backbone)


def test_written_files_follow_the_safetensors_layout(split_dirs):
    _, backbone, _ = split_dirs
    raw = (backbone / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    text = raw[8:8 + n]
    assert n % 8 == 0 and text.startswith(b"{")
    header = json.loads(text)
    assert list(header) == ["__metadata__"] + sorted(k for k in header if k != "__metadata__")
    assert header["__metadata__"] == {"format": "pt"}
    bits = {"F32": 4, "BF16": 2, "F16": 2}
    for entry in (v for k, v in header.items() if k != "__metadata__"):
        assert (8 + n + entry["data_offsets"][0]) % bits[entry["dtype"]] == 0  # aligned


def test_header_bytes_are_exact():
    head, offsets = safetensors_header(
        [TensorEntry("b", "U8", (3,)), TensorEntry("a", "F32", (1,))], {"k": "v"})
    text = b'{"__metadata__":{"k":"v"},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},' \
           b'"b":{"dtype":"U8","shape":[3],"data_offsets":[4,7]}}'
    assert len(text) == 131  # padded with 5 spaces to 136, a multiple of 8
    assert head == struct.pack("<Q", 136) + text + b"     "
    assert offsets == {"a": 0, "b": 4}


def test_small_chunks_and_producers_copy_every_byte(tmp_path, monkeypatch):
    monkeypatch.setattr(tensorwrite, "CHUNK_BYTES", 24)
    src = tmp_path / "src.safetensors"
    x = torch.arange(50, dtype=torch.int32)
    save_file({"x": x}, src)
    loc = read_header(src).tensors["x"]
    seen: list[CopyProgress] = []
    out = tmp_path / "out.safetensors"
    write_safetensors(out, [(TensorEntry("x", "I32", (50,)), loc),
                            (TensorEntry("y", "U8", (5,)), lambda: [b"ab", b"cde"])],
                      {}, seen.append)
    with safe_open(str(out), framework="pt") as f:
        assert torch.equal(f.get_tensor("x"), x)
        assert f.get_tensor("y").numpy().tobytes() == b"abcde"
    assert [p.done for p in seen][-1] == seen[-1].total == 205
    assert len(seen) == 11  # 200 bytes in 24-byte chunks, then two producer chunks


def test_history_goes_with_the_memory_and_back_but_not_its_lock(tmp_path):
    model = make_model(tmp_path / "model")
    (model / ".engram" / "patches").mkdir(parents=True)
    (model / ".engram" / "journal.jsonl").write_text("{}\n")
    (model / ".engram" / "patches" / "p1.patch.safetensors").write_bytes(b"x")
    (model / ".engram" / "write.lock").write_text("1")
    report = split_model(model, tmp_path / "bb", tmp_path / "mem")
    assert report.history_copied
    assert sorted(p.relative_to(tmp_path / "mem").as_posix()
                  for p in (tmp_path / "mem" / ".engram").rglob("*")) == [
        ".engram/journal.jsonl", ".engram/patches", ".engram/patches/p1.patch.safetensors"]
    assert not (tmp_path / "bb" / ".engram").exists()
    assert join_model(tmp_path / "bb", tmp_path / "mem", tmp_path / "joined").history_copied
    assert (tmp_path / "joined" / ".engram" / "journal.jsonl").read_text() == "{}\n"


def test_split_reads_no_torch(split_dirs, tmp_path):
    model, _, _ = split_dirs
    code = ("import sys; from engram_edit.split import split_model; "
            f"split_model({str(model)!r}, {str(tmp_path / 'b2')!r}, {str(tmp_path / 'm2')!r}); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ})


# --- refusals ------------------------------------------------------------------------------------

@pytest.mark.parametrize("change,component", [
    ({"seed": 1}, "hash seed differs"),
    ({"tokenizer": "other"}, "tokenizer differs"),
    ({"engram_vocab_size": [40, 60]}, "primes differ"),
    ({"engram_layer_ids": [0, 1]}, "layer ids differ"),
    ({"engram_head_dim": 64}, "row width differs"),
])
def test_a_memory_of_another_model_is_refused_naming_the_component(split_dirs, tmp_path,
                                                                   change, component):
    _, backbone, _ = split_dirs
    if change.get("tokenizer"):
        change = {"tokenizer": other_tokenizer(tmp_path / "other.json")}
    if "seed" in change:
        change = {"engram_seed": change["seed"]}
    other = make_model(tmp_path / "other", **change)
    split_model(other, tmp_path / "obb", tmp_path / "omem")
    with pytest.raises(MismatchError) as err:
        join_model(backbone, tmp_path / "omem", tmp_path / "joined")
    assert len(err.value.problems) == 1 and component in err.value.problems[0]
    result = CliRunner().invoke(app, ["join", str(backbone), str(tmp_path / "omem"),
                                      "--out", str(tmp_path / "joined")])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and component in result.stderr
    assert not (tmp_path / "joined").exists() and leftovers(tmp_path) == []


def test_a_memory_json_that_disagrees_with_its_tensors_is_refused(split_dirs, tmp_path):
    _, backbone, memory = split_dirs
    meta = json.loads((memory / "memory.json").read_text())
    meta["geometry"]["dtype"] = "bfloat16"
    (memory / "memory.json").write_text(json.dumps(meta))
    with pytest.raises(MismatchError, match="geometry dtype is 'bfloat16'"):
        join_model(backbone, memory, tmp_path / "joined")


def cli_error(args: list[str]) -> str:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    return result.stderr


def test_missing_model_exits_2_and_writes_nothing(tmp_path):
    line = cli_error(["split", str(tmp_path / "nope"), "--out", str(tmp_path / "b"),
                      str(tmp_path / "m")])
    assert "no such model directory" in line
    assert list(tmp_path.iterdir()) == []


def test_truncated_safetensors_exits_2_and_writes_nothing(tmp_path):
    model = make_model(tmp_path / "model")
    weights = model / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 10)
    line = cli_error(["split", str(model), "--out", str(tmp_path / "b"), str(tmp_path / "m")])
    assert "truncated" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_output_inside_the_input_exits_2_and_writes_nothing(tmp_path):
    model = make_model(tmp_path / "model")
    before = sorted(p.name for p in model.iterdir())
    line = cli_error(["split", "--model", str(model), "--out", str(model / "bb"),
                      str(tmp_path / "m")])
    assert "is inside the input" in line
    assert sorted(p.name for p in model.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_existing_output_needs_force(split_dirs, tmp_path):
    model, backbone, memory = split_dirs
    stamp = (memory / "memory.json").stat().st_mtime_ns
    line = cli_error(["split", str(model), "--out", str(tmp_path / "bb2"), str(memory)])
    assert line.startswith(f"error: {memory}: already exists (pass --force")
    assert not (tmp_path / "bb2").exists()
    assert (memory / "memory.json").stat().st_mtime_ns == stamp
    result = CliRunner().invoke(app, ["split", str(model), "--out", str(backbone), str(memory),
                                      "--force", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["memory_tensors"] == 2
    assert leftovers(tmp_path) == []


def test_a_failure_mid_copy_leaves_no_output_and_the_input_untouched(tmp_path):
    model = make_model(tmp_path / "model", sharded=True)
    before = {p.name: p.read_bytes() for p in model.iterdir()}

    def interrupt(p: CopyProgress) -> None:
        if p.done > p.total // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        split_model(model, tmp_path / "out" / "bb", tmp_path / "out" / "mem", progress=interrupt)
    assert list((tmp_path / "out").iterdir()) == []
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before


def test_force_replaces_only_model_or_memory_directories(tmp_path):
    model = make_model(tmp_path / "model")
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(BadInputError, match="is not a model or memory directory"):
        split_model(model, tmp_path / "precious", tmp_path / "mem", force=True)
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"


# --- convert-memory ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,name", [("bf16", "bfloat16"), ("fp8", "float8_e4m3"),
                                        ("f16", "float16")])
def test_converted_memory_plugs_into_the_backbone_within_precision(split_dirs, tmp_path,
                                                                   dtype, name):
    _, backbone, memory = split_dirs
    result = CliRunner().invoke(app, ["convert-memory", str(memory), "--dtype", dtype,
                                      "--out", str(tmp_path / "conv"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["from_dtype"], report["to_dtype"]) == ("float32", name)
    files = open_model(backbone, tmp_path / "conv")
    names = sorted(k for k in tensors_of(tmp_path / "conv"))
    assert names == sorted([table_name(i) for i in LAYERS]
                           + ([scale_name(i) for i in LAYERS] if dtype == "fp8" else []))
    worst = 0.0
    with files.table() as new, open_memory(memory).table() as old:
        assert new.dtype(0) == name
        for i in LAYERS:
            rows = np.arange(new.num_rows(i))
            a, b = old.read_rows(i, rows), new.read_rows(i, rows)
            worst = max(worst, float(np.abs(a - b).max()))
            bound = {"bfloat16": 2.0**-8, "float16": 2.0**-11}.get(name)
            if bound:
                assert np.all(np.abs(a - b) <= np.abs(a) * bound)
            else:  # E4M3: 3 mantissa bits, relative to each 32-column block's max
                amax = np.abs(a).reshape(len(a), -1, 32).max(axis=2, keepdims=True)
                assert np.all(np.abs(a - b).reshape(len(a), -1, 32) <= amax / 16)
    assert report["max_abs_error"] == pytest.approx(worst)
    join_model(backbone, tmp_path / "conv", tmp_path / "joined")
    assert open_model(tmp_path / "joined").table().dtype(2) == name


def test_fp8_memory_converted_to_f32_holds_its_exact_values(tmp_path):
    model = make_model(tmp_path / "model", "float8_e4m3")
    split_model(model, tmp_path / "bb", tmp_path / "mem")
    report = convert_memory(tmp_path / "mem", "f32", tmp_path / "f32")
    assert report.max_abs_error == 0.0 and report.to_dtype == "float32"
    assert sorted(tensors_of(tmp_path / "f32")) == [table_name(i) for i in LAYERS]
    raw = tensors_of(tmp_path / "mem")
    with open_memory(tmp_path / "f32").table() as table:
        for i in LAYERS:
            data = np.frombuffer(raw[table_name(i)][2], np.uint8).reshape(-1, 32)
            scale = np.frombuffer(raw[scale_name(i)][2], np.uint8).reshape(-1, 1)
            want = decode("float8_e4m3", data, scale)
            assert np.array_equal(table.read_rows(i, np.arange(len(data))), want)
    back = convert_memory(tmp_path / "f32", "fp8", tmp_path / "fp8")
    assert back.max_abs_error == 0.0  # FP8 values re-quantize to themselves (spec section 7)


def test_convert_refuses_values_the_dtype_cannot_hold_and_leaves_nothing(split_dirs, tmp_path):
    _, _, memory = split_dirs
    loc = read_header(memory / "memory.safetensors").tensors[table_name(2)]
    with open(loc.path, "r+b") as f:  # one value too large for float16
        f.seek(loc.offset + 4 * 33)
        f.write(np.float32(1e6).tobytes())
    with pytest.raises(BadInputError, match="layer 2, rows 0..*too large for float16"):
        convert_memory(memory, "f16", tmp_path / "f16")
    assert not (tmp_path / "f16").exists() and leftovers(tmp_path) == []


def test_info_describes_a_memory_alone(split_dirs):
    _, _, memory = split_dirs
    result = CliRunner().invoke(app, ["info", "--memory", str(memory), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["kind"] == "memory" and [t["layer_id"] for t in info["tables"]] == LAYERS
