"""tensorfile: safetensors headers parsed by hand, tensors located by offset, shards, damage."""

import json
import os
import struct
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from engram_edit.errors import BadInputError
from engram_edit.tensorfile import (
    DTYPE_BITS,
    MAX_HEADER_BYTES,
    TensorLocation,
    locate_tensors,
    read_header,
    read_range,
)


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def handmade(path, header: dict, buffer: bytes, pad: int = 0) -> None:
    text = json.dumps(header).encode() + b" " * pad
    path.write_bytes(struct.pack("<Q", len(text)) + text + buffer)


@pytest.fixture
def mixed(tmp_path):
    tensors = {
        "f32": torch.randn(3, 4),
        "bf16": torch.randn(5, 8).to(torch.bfloat16),
        "f16": torch.randn(2, 2).to(torch.float16),
        "rows.weight": torch.randn(4, 64).to(torch.float8_e4m3fn),
        "rows.scale": torch.randint(100, 140, (4, 2), dtype=torch.uint8).view(
            torch.float8_e8m0fnu),
        "ids": torch.arange(7),
        "scalar": torch.tensor(1.5),
        "empty": torch.zeros(0, 3),
    }
    path = tmp_path / "mixed.safetensors"
    save_file(tensors, path, metadata={"fingerprint": "abc"})
    return path, tensors


def test_golden_bytes_of_a_handmade_file_parse_to_exact_offsets(tmp_path):
    path = tmp_path / "g.safetensors"
    header = {"__metadata__": {"k": "v"},
              "a": {"dtype": "I32", "shape": [2, 2], "data_offsets": [0, 16]},
              "b": {"dtype": "U8", "shape": [3], "data_offsets": [16, 19]}}
    handmade(path, header, bytes(range(19)), pad=5)
    h = read_header(path)
    n = len(json.dumps(header)) + 5
    assert h.data_start == 8 + n and h.file_size == 8 + n + 19
    assert h.metadata == {"k": "v"}
    assert h.tensors["a"] == TensorLocation(path, "a", "I32", (2, 2), 8 + n, 16)
    assert h.tensors["b"] == TensorLocation(path, "b", "U8", (3,), 8 + n + 16, 3)
    assert read_range(h.tensors["b"], 1, 2) == bytes([17, 18])


def test_header_matches_what_safetensors_wrote_and_ranges_hold_the_tensor_bytes(mixed):
    path, tensors = mixed
    h = read_header(path)
    assert h.metadata == {"fingerprint": "abc"}
    assert set(h.tensors) == set(tensors)
    for name, t in tensors.items():
        loc = h.tensors[name]
        assert loc.shape == tuple(t.shape) and loc.numel == t.numel()
        assert loc.nbytes == t.numel() * t.element_size()
        assert read_range(loc, 0, loc.nbytes) == raw_bytes(t)
    row = h.tensors["bf16"]
    assert read_range(row, 2 * 16, 16) == raw_bytes(tensors["bf16"][2])


def test_safetensors_writes_F8_E4M3_and_F8_E8M0_for_torch_float8_types(mixed):
    h = read_header(mixed[0])
    assert {n: h.tensors[n].dtype for n in ("f32", "bf16", "f16", "rows.weight",
                                             "rows.scale", "ids")} == {
        "f32": "F32", "bf16": "BF16", "f16": "F16", "rows.weight": "F8_E4M3",
        "rows.scale": "F8_E8M0", "ids": "I64"}
    assert all(loc.dtype in DTYPE_BITS for loc in h.tensors.values())


def test_missing_file_is_bad_input_naming_it(tmp_path):
    with pytest.raises(BadInputError, match="nope.safetensors: no such file"):
        read_header(tmp_path / "nope.safetensors")


def test_truncated_file_is_one_line_naming_the_file(mixed, tmp_path):
    path, _ = mixed
    cut = tmp_path / "cut.safetensors"
    data = path.read_bytes()
    cut.write_bytes(data[:-10])
    with pytest.raises(BadInputError) as e:
        read_header(cut)
    assert len(e.value.problems) == 1
    assert str(cut) in str(e.value) and "truncated" in str(e.value)


@pytest.mark.parametrize("damage, needle", [
    (lambda d: d[:5], "8-byte header length is missing"),
    (lambda d: struct.pack("<Q", MAX_HEADER_BYTES + 1) + d[8:], "over the 100 MB limit"),
    (lambda d: struct.pack("<Q", len(d)) + d[8:], "runs past the end of the file"),
    (lambda d: d[:8] + b"[" + d[9:], "does not start with '{'"),
    (lambda d: d[:9] + b"!" + d[10:], "not valid JSON"),
    (lambda d: d + b"\0" * 4, "4 bytes after the last tensor"),
])
def test_damaged_headers_are_bad_input_naming_the_file(mixed, tmp_path, damage, needle):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(damage(mixed[0].read_bytes()))
    with pytest.raises(BadInputError, match=needle) as e:
        read_header(bad)
    assert all(p.startswith(str(bad)) for p in e.value.problems)


def test_every_bad_entry_is_reported_at_once(tmp_path):
    path = tmp_path / "e.safetensors"
    handmade(path, {
        "a": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]},
        "c": {"dtype": "F32", "shape": [-1], "data_offsets": [4, 8]},
    }, b"\0" * 8)
    with pytest.raises(BadInputError) as e:
        read_header(path)
    text = str(e.value)
    assert "'a': unknown dtype 'F99'" in text
    assert "'b': data_offsets [0, 4] span 4 bytes but F32 [2] needs 8" in text
    assert "'c': shape must be a list of non-negative integers" in text


def test_overlapping_tensors_and_holes_are_refused(tmp_path):
    path = tmp_path / "o.safetensors"
    handmade(path, {"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
                    "b": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]}}, b"\0" * 6)
    with pytest.raises(BadInputError, match="inside the previous tensor's data"):
        read_header(path)
    handmade(path, {"a": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]}}, b"\0" * 6)
    with pytest.raises(BadInputError, match="2 unindexed bytes"):
        read_header(path)


def test_repeated_tensor_names_are_refused(tmp_path):
    path = tmp_path / "d.safetensors"
    entry = '{"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}'
    text = ('{"a": ' + entry + ', "a": ' + entry + "}").encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"\0")
    with pytest.raises(BadInputError, match="repeated key"):
        read_header(path)


def test_read_range_outside_the_tensor_is_refused(mixed):
    loc = read_header(mixed[0]).tensors["f32"]
    with pytest.raises(BadInputError, match="outside tensor 'f32'"):
        read_range(loc, loc.nbytes - 4, 8)


def test_sub_byte_dtypes_are_sized_in_bits(tmp_path):
    path = tmp_path / "f4.safetensors"
    handmade(path, {"p": {"dtype": "F4", "shape": [3, 4], "data_offsets": [0, 6]}}, b"\0" * 6)
    assert read_header(path).tensors["p"].nbytes == 6


def test_header_of_a_huge_sparse_file_is_read_without_reading_the_data(tmp_path):
    path = tmp_path / "huge.safetensors"
    rows, width = 1 << 22, 256  # 1 GiB of FP8 rows, a sparse file on disk
    header = {"t.weight": {"dtype": "F8_E4M3", "shape": [rows, width],
                           "data_offsets": [0, rows * width]}}
    handmade(path, header, b"")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) + rows * width)
    loc = read_header(path).tensors["t.weight"]
    assert loc.nbytes == rows * width
    assert read_range(loc, (rows - 1) * width, width) == b"\0" * width


# --- sharded models -------------------------------------------------------------------------

def sharded(tmp_path):
    a = {"layers.0.engram.embed.weight": torch.randn(6, 32), "embed.weight": torch.randn(3, 4)}
    b = {"layers.2.engram.embed.weight": torch.randn(5, 32).to(torch.bfloat16)}
    save_file(a, tmp_path / "model-00001-of-00002.safetensors")
    save_file(b, tmp_path / "model-00002-of-00002.safetensors")
    weight_map = {**{k: "model-00001-of-00002.safetensors" for k in a},
                  **{k: "model-00002-of-00002.safetensors" for k in b}}
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    return {**a, **b}, weight_map


def test_sharded_model_is_located_through_its_index(tmp_path):
    tensors, weight_map = sharded(tmp_path)
    locs = locate_tensors(tmp_path)
    assert set(locs) == set(tensors)
    for name, t in tensors.items():
        assert locs[name].path == tmp_path / weight_map[name]
        assert read_range(locs[name], 0, locs[name].nbytes) == raw_bytes(t)


def test_index_naming_a_tensor_its_shard_lacks_is_refused(tmp_path):
    _, weight_map = sharded(tmp_path)
    weight_map["ghost.weight"] = "model-00002-of-00002.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(BadInputError, match="'ghost.weight' is mapped to model-00002"):
        locate_tensors(tmp_path)


def test_index_shard_outside_the_directory_is_refused(tmp_path):
    index = {"weight_map": {"a": "../elsewhere.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(BadInputError, match="not a file name inside"):
        locate_tensors(tmp_path)


def test_missing_shard_is_bad_input_naming_it(tmp_path):
    sharded(tmp_path)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(BadInputError, match="model-00002-of-00002.safetensors: no such file"):
        locate_tensors(tmp_path)


def test_single_file_and_plain_directories_are_located(tmp_path, mixed):
    path, tensors = mixed
    assert set(locate_tensors(path)) == set(tensors)
    (tmp_path / "mem").mkdir()
    save_file({"x": torch.ones(2)}, tmp_path / "mem" / "memory.safetensors")
    assert set(locate_tensors(tmp_path / "mem")) == {"x"}
    (tmp_path / "none").mkdir()
    with pytest.raises(BadInputError, match="no model.safetensors.index.json"):
        locate_tensors(tmp_path / "none")


def test_reading_headers_does_not_import_torch(mixed):
    code = ("import sys; from engram_edit.tensorfile import locate_tensors, read_range;"
            f"locs = locate_tensors({str(mixed[0])!r});"
            "read_range(locs['f32'], 0, 4);"
            "assert 'torch' not in sys.modules and 'safetensors' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)

