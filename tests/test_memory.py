"""MemoryTable: rows read by offset equal what torch wrote; writes touch only their rows."""

import json
import os
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from engram_edit import memory as memory_module
from engram_edit.dtypes import ROW_DTYPES, decode, encode, storage_from_torch, torch_dtype
from engram_edit.errors import BadInputError
from engram_edit.memory import MemoryTable, RawRows, scale_tensor_name
from engram_edit.tensorfile import locate_tensors, read_header

ROWS, WIDTH = 40, 64
NAMES = {0: "layers.0.engram.embed.weight", 2: "layers.2.engram.embed.weight"}


def make_tensors(dtype: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Two Engram layers of ``dtype`` rows between unrelated backbone tensors."""
    g = torch.Generator().manual_seed(seed)
    out = {"embed.weight": torch.randn(7, 5, generator=g),
           "norm.weight": torch.randn(9, generator=g).to(torch.bfloat16)}
    for layer, name in NAMES.items():
        rows = ROWS + layer  # layers differ in size
        x = torch.randn(rows, WIDTH, generator=g) * 3
        if dtype == "float8_e4m3":
            out[name] = x.clamp(-448, 448).to(torch.float8_e4m3fn)
            scale = torch.randint(110, 135, (rows, WIDTH // 32), generator=g, dtype=torch.uint8)
            out[scale_tensor_name(name)] = scale.view(torch.float8_e8m0fnu)
        else:
            out[name] = x.to(torch_dtype(dtype))
    return out


def torch_rows(tensors: dict[str, torch.Tensor], layer: int) -> np.ndarray:
    """The reference: torch's own float32 view of a layer's rows (FP8 times its scales)."""
    w = tensors[NAMES[layer]]
    if w.dtype != torch.float8_e4m3fn:
        return w.float().numpy()
    s = tensors[scale_tensor_name(NAMES[layer])].float()
    return (w.float().reshape(len(w), -1, 32) * s.unsqueeze(-1)).reshape(len(w), -1).numpy()


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


@pytest.fixture(params=list(ROW_DTYPES))
def saved(request, tmp_path):
    tensors = make_tensors(request.param)
    path = tmp_path / "model.safetensors"
    save_file(tensors, path)
    return request.param, path, tensors


def open_table(path, writable=False) -> MemoryTable:
    return MemoryTable.open(locate_tensors(path), NAMES, writable=writable)


def row_byte_ranges(path, layer: int, rows) -> list[tuple[int, int]]:
    """Absolute byte ranges of the given rows (and their scales) in the file."""
    locs = read_header(path).tensors
    out = []
    for name in (NAMES[layer], scale_tensor_name(NAMES[layer])):
        if name in locs:
            loc = locs[name]
            row_bytes = loc.nbytes // loc.shape[0]
            out += [(loc.offset + r * row_bytes, loc.offset + (r + 1) * row_bytes) for r in rows]
    return out


# --- reading ----------------------------------------------------------------------------------

def test_geometry_comes_from_the_header(saved):
    dtype, path, _ = saved
    with open_table(path) as table:
        assert table.layer_ids == [0, 2]
        assert [table.num_rows(i) for i in (0, 2)] == [ROWS, ROWS + 2]
        assert table.width(2) == WIDTH and table.dtype(0) == dtype


def test_read_rows_equal_the_torch_rows_exactly_in_any_order_with_repeats(saved):
    _, path, tensors = saved
    rows = np.array([5, 0, 39, 5, 17, 18, 19, 5])
    with open_table(path) as table:
        for layer in (0, 2):
            assert same_bits(table.read_rows(layer, rows), torch_rows(tensors, layer)[rows])


def test_read_raw_returns_the_stored_bytes(saved):
    dtype, path, tensors = saved
    rows = np.array([3, 1, 3])
    with open_table(path) as table:
        raw = table.read_raw(2, rows)
    assert raw.dtype == dtype and raw.data.dtype == ROW_DTYPES[dtype].storage
    assert np.array_equal(raw.data, storage_from_torch(tensors[NAMES[2]])[rows])
    if dtype == "float8_e4m3":
        scale = storage_from_torch(tensors[scale_tensor_name(NAMES[2])])
        assert raw.scale.dtype == np.uint8 and np.array_equal(raw.scale, scale[rows])
    else:
        assert raw.scale is None


def test_gather_torch_reads_unique_rows_and_matches_read_rows(saved, monkeypatch):
    _, path, tensors = saved
    ids = torch.tensor([[4, 9, 4], [0, 9, 33]])
    asked = []
    original = memory_module._FileLayer.read
    monkeypatch.setattr(memory_module._FileLayer, "read",
                        lambda self, rows: asked.append(rows.tolist()) or original(self, rows))
    with open_table(path) as table:
        got = table.gather_torch(0, ids)
    assert asked == [[0, 4, 9, 33]]
    assert got.dtype == torch.float32 and got.shape == (2, 3, WIDTH)
    assert same_bits(got.numpy(), torch_rows(tensors, 0)[ids.numpy()])


def test_to_torch_is_the_whole_layer_decoded(saved, monkeypatch):
    _, path, tensors = saved
    monkeypatch.setattr(memory_module, "CHUNK_BYTES", 300)  # several chunks, one partial
    with open_table(path) as table:
        whole = table.to_torch(2)
        assert same_bits(whole.numpy(), torch_rows(tensors, 2))
        half = table.to_torch(2, torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.equal(half, whole.to(torch.bfloat16))


def test_norms_are_the_l2_norms_of_the_decoded_rows(saved):
    _, path, tensors = saved
    rows = np.array([2, 8])
    with open_table(path) as table:
        got = table.norms(0, rows)
    ref = np.linalg.norm(torch_rows(tensors, 0)[rows].astype(np.float64), axis=1)
    assert got.dtype == np.float32 and np.allclose(got, ref, rtol=1e-6)


def test_out_of_range_rows_name_the_layer_the_row_and_the_table_size(saved):
    _, path, _ = saved
    with open_table(path) as table:
        with pytest.raises(BadInputError) as e:
            table.read_rows(0, np.array([1, ROWS, -1, ROWS]))
        assert e.value.problems == [
            f"layer 0: row -1 is out of range (the table has {ROWS} rows)",
            f"layer 0: row {ROWS} is out of range (the table has {ROWS} rows)"]
        with pytest.raises(BadInputError, match="layer 1 is not an Engram layer"):
            table.read_rows(1, np.array([0]))
        with pytest.raises(BadInputError, match="1-D integer array"):
            table.read_rows(0, np.array([0.5]))
        assert table.read_rows(0, np.array([], dtype=np.int64)).shape == (0, WIDTH)


def test_reading_three_rows_of_a_huge_sparse_file_reads_only_those_rows(tmp_path, monkeypatch):
    rows, width = 1 << 22, 256  # 1 GiB of FP8 rows + 32 MiB of scales, sparse on disk
    name = "layers.1.engram.embed.weight"
    header = {name: {"dtype": "F8_E4M3", "shape": [rows, width], "data_offsets": [0, rows * width]},
              scale_tensor_name(name): {"dtype": "F8_E8M0", "shape": [rows, width // 32],
                                        "data_offsets": [rows * width, rows * (width + 8)]}}
    text = json.dumps(header).encode()
    path = tmp_path / "huge.safetensors"
    path.write_bytes(len(text).to_bytes(8, "little") + text)
    with open(path, "r+b") as f:
        f.truncate(8 + len(text) + rows * (width + 8))
    want = np.array([rows - 1, 12345, 0])
    values = np.random.default_rng(0).standard_normal((3, width)).astype(np.float32)
    with MemoryTable.open(locate_tensors(path), {1: name}, writable=True) as table:
        table.write_raw(1, want, table.encode(1, values))

    reads: list[tuple[int, int]] = []
    real_preadv, real_pread = os.preadv, os.pread
    monkeypatch.setattr(os, "preadv", lambda fd, bufs, off: reads.append(
        (off, sum(len(b) for b in bufs))) or real_preadv(fd, bufs, off))
    monkeypatch.setattr(os, "pread", lambda fd, n, off: reads.append((off, n))
                        or real_pread(fd, n, off))
    with MemoryTable.open(locate_tensors(path), {1: name}) as table:
        tracemalloc.start()
        got = table.read_rows(1, want)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert np.array_equal(got, decode("float8_e4m3", *encode("float8_e4m3", values)))
    assert sorted(n for _, n in reads) == [8, 8, 8, 256, 256, 256]
    locs = read_header(path).tensors
    expected = {(locs[name].offset + r * width, width) for r in want.tolist()} | {
        (locs[scale_tensor_name(name)].offset + r * 8, 8) for r in want.tolist()}
    assert set(reads) == expected
    assert peak < 1 << 20


def test_reading_rows_does_not_import_torch(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(make_tensors("float8_e4m3"), path)
    code = ("import sys, numpy as np;"
            "from engram_edit.tensorfile import locate_tensors;"
            "from engram_edit.memory import MemoryTable;"
            f"t = MemoryTable.open(locate_tensors({str(path)!r}), {{0: {NAMES[0]!r}}});"
            "t.read_rows(0, np.array([1, 2])); t.norms(0, np.array([3]));"
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


# --- writing ----------------------------------------------------------------------------------

def test_write_raw_changes_only_those_rows_bytes_and_rereads_exactly(saved):
    dtype, path, tensors = saved
    before = path.read_bytes()
    rows = np.array([7, 0, 41])
    values = np.random.default_rng(1).standard_normal((3, WIDTH)).astype(np.float32) * 5
    with open_table(path, writable=True) as table:
        raw = table.encode(2, values)
        table.write_raw(2, rows, raw)
        table.flush()
        assert same_bits(table.read_rows(2, rows), decode(dtype, raw.data, raw.scale))
        assert table.read_raw(2, rows).equals(raw)
    after = path.read_bytes()
    outside = np.ones(len(before), dtype=bool)
    for a, b in row_byte_ranges(path, 2, rows):
        outside[a:b] = False
    assert np.array_equal(np.frombuffer(before, np.uint8)[outside],
                          np.frombuffer(after, np.uint8)[outside])
    assert before != after
    reloaded = load_file(path)  # still a valid safetensors file, rows where they belong
    expect = torch_rows(tensors, 2)
    expect[rows] = decode(dtype, raw.data, raw.scale)
    assert same_bits(torch_rows(reloaded, 2), expect)


def test_write_on_a_read_only_table_is_refused_and_nothing_changes(saved):
    _, path, _ = saved
    before = path.read_bytes()
    with open_table(path) as table:
        raw = table.read_raw(0, np.array([1]))
        with pytest.raises(BadInputError, match="opened read-only"):
            table.write_raw(0, np.array([2]), raw)
    assert path.read_bytes() == before


def test_repeated_row_ids_in_a_write_must_carry_identical_data(saved):
    _, path, _ = saved
    before = path.read_bytes()
    with open_table(path, writable=True) as table:
        raw = table.read_raw(0, np.array([1, 2, 1, 3]))
        with pytest.raises(BadInputError) as e:
            table.write_raw(0, np.array([5, 6, 6, 5]), raw)
        assert e.value.problems == ["layer 0: row 5 is given more than once with different "
                                    "data", "layer 0: row 6 is given more than once with "
                                    "different data"]
        assert path.read_bytes() == before
        table.write_raw(0, np.array([9, 8, 9, 10]), raw)
        written = table.read_raw(0, np.array([9, 8, 10]))
        assert written.equals(table.read_raw(0, np.array([1, 2, 3])))


def test_write_raw_refuses_rows_of_the_wrong_dtype_or_shape(saved):
    dtype, path, _ = saved
    with open_table(path, writable=True) as table:
        raw = table.read_raw(0, np.array([1, 2]))
        with pytest.raises(BadInputError, match="rows to write must be"):
            table.write_raw(0, np.array([1]), raw)
        wrong = "float16" if dtype != "float16" else "float32"
        other = RawRows(*encode(wrong, np.ones((2, WIDTH), np.float32)))
        with pytest.raises(BadInputError, match=f"layer 0: .*{dtype}"):
            table.write_raw(0, np.array([1, 2]), other)
        with pytest.raises(BadInputError, match=r"row 99 is out of range"):
            table.write_raw(0, np.array([1, 99]), raw)


def test_encode_names_the_layer_in_its_errors(saved):
    _, path, _ = saved
    with open_table(path) as table:
        with pytest.raises(BadInputError, match=rf"layer 0: values must be \[n, {WIDTH}\]"):
            table.encode(0, np.ones((1, 3), np.float32))
        values = np.zeros((1, WIDTH), np.float32)
        values[0, 3] = np.nan
        with pytest.raises(BadInputError, match="layer 2: cannot encode 1 non-finite"):
            table.encode(2, values)


# --- opening ----------------------------------------------------------------------------------

def test_open_reports_every_bad_layer_at_once(tmp_path):
    path = tmp_path / "model.safetensors"
    tensors = make_tensors("float8_e4m3")
    del tensors[scale_tensor_name(NAMES[2])]
    tensors["ids.weight"] = torch.arange(4).reshape(2, 2)
    tensors["odd.weight"] = torch.zeros(3, 32, dtype=torch.float8_e4m3fn)
    tensors["odd.scale"] = torch.zeros(3, 2, dtype=torch.float8_e8m0fnu)
    save_file(tensors, path)
    layers = {0: NAMES[0], 2: NAMES[2], 3: "missing.weight", 4: "ids.weight", 5: "odd.weight"}
    with pytest.raises(BadInputError) as e:
        MemoryTable.open(locate_tensors(path), layers)
    text = str(e.value)
    assert len(e.value.problems) == 4
    assert f"layer 2: tensor {NAMES[2]!r}: F8_E4M3 rows need the scale tensor" in text
    assert "layer 3: no tensor 'missing.weight'" in text
    assert "layer 4: tensor 'ids.weight': safetensors dtype 'I64' is not a row dtype" in text
    assert "scale tensor 'odd.scale' must be F8_E8M0 [3, 1], got F8_E8M0 [3, 2]" in text


def test_a_file_truncated_while_open_is_bad_input_naming_it(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(make_tensors("float32"), path)
    with open_table(path) as table:
        os.truncate(path, os.path.getsize(path) - 100)
        with pytest.raises(BadInputError, match=f"{path}: file ends at byte"):
            table.read_rows(2, np.array([ROWS + 1]))


def test_a_file_that_cannot_be_opened_for_writing_is_bad_input_naming_it(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    save_file(make_tensors("bfloat16"), path)
    locs = locate_tensors(path)

    def refuse(*args):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(os, "open", refuse)  # what a read-only file does to a non-root user
    with pytest.raises(BadInputError, match=rf"{path}: cannot open for writing \(Permission"):
        MemoryTable.open(locs, NAMES, writable=True)


def test_closed_table_refuses_to_read(saved):
    _, path, _ = saved
    table = open_table(path)
    table.close()
    with pytest.raises(BadInputError, match="memory table is closed"):
        table.read_rows(0, np.array([0]))


def test_layers_and_scales_in_different_shards_are_read_through_the_index(tmp_path):
    tensors = make_tensors("float8_e4m3")
    shards = {"model-00001-of-00002.safetensors": [NAMES[0], "embed.weight",
                                                   scale_tensor_name(NAMES[2])],
              "model-00002-of-00002.safetensors": [NAMES[2], scale_tensor_name(NAMES[0]),
                                                   "norm.weight"]}
    weight_map = {}
    for shard, names in shards.items():
        save_file({n: tensors[n] for n in names}, tmp_path / shard)
        weight_map.update({n: shard for n in names})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    rows = np.array([0, 3, 3, 41])
    with MemoryTable.open(locate_tensors(tmp_path), NAMES) as table:
        assert same_bits(table.read_rows(2, rows), torch_rows(tensors, 2)[rows])
        assert same_bits(table.read_rows(0, rows[:3]), torch_rows(tensors, 0)[rows[:3]])


# --- in-memory tables -------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", list(ROW_DTYPES))
def test_in_memory_table_reads_and_writes_like_a_file_table(dtype, tmp_path):
    tensors = make_tensors(dtype)
    arrays = {}
    for layer, name in NAMES.items():
        scale = tensors.get(scale_tensor_name(name))
        arrays[layer] = (storage_from_torch(tensors[name]),
                         None if scale is None else storage_from_torch(scale))
    table = MemoryTable.from_arrays(arrays, dtype)
    assert table.layer_ids == [0, 2] and table.dtype(2) == dtype and table.writable
    rows = np.array([1, 30, 1])
    assert same_bits(table.read_rows(2, rows), torch_rows(tensors, 2)[rows])
    assert same_bits(table.gather_torch(0, torch.tensor(rows)).numpy(),
                     torch_rows(tensors, 0)[rows])
    raw = table.encode(2, np.full((1, WIDTH), 0.25, np.float32))
    table.write_raw(2, np.array([30]), raw)
    assert table.read_raw(2, np.array([30])).equals(raw)
    assert not np.array_equal(arrays[2][0][30], raw.data[0])  # the table holds its own copy


def test_from_arrays_refuses_arrays_that_are_not_the_dtypes_storage():
    with pytest.raises(BadInputError) as e:
        MemoryTable.from_arrays({0: (np.zeros((4, 32), np.float32), None),
                                 1: (np.zeros((4, 32), np.uint8), None),
                                 2: (np.zeros(4, np.uint8), None)}, "float8_e4m3")
    assert e.value.problems == [
        "layer 0: float8_e4m3 rows are stored as uint8, got float32",
        "layer 0: float8_e4m3 rows need their F8_E8M0 scales",
        "layer 1: float8_e4m3 rows need their F8_E8M0 scales",
        "layer 2: rows must be a 2-D array [rows, width], got shape (4,)"]


def test_raw_rows_compare_by_stored_bits():
    a = RawRows(np.array([[0x7FC0, 1], [2, 3]], np.uint16))
    b = RawRows(np.array([[0x7FC0, 1], [2, 4]], np.uint16))
    assert a.dtype == "bfloat16" and len(a) == 2
    assert a.row_equal(b).tolist() == [True, False] and not a.equals(b) and a.equals(a)
    assert not a.equals(RawRows(a.data.astype(np.float16)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gather_torch_on_cuda_equals_the_cpu_rows(tmp_path):
    path = tmp_path / "model.safetensors"
    tensors = make_tensors("float8_e4m3")
    save_file(tensors, path)
    ids = torch.tensor([[3, 1], [3, 40]], device="cuda")
    with open_table(path) as table:
        got = table.gather_torch(2, ids)
    assert got.device.type == "cuda"
    assert same_bits(got.cpu().numpy(), torch_rows(tensors, 2)[ids.cpu().numpy()])
