import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from commands.main import app
from conftest import make_tiny_model
from engram_edit.checkpoint import (
    build_model,
    load_model,
    model_compression,
    open_model,
    save_model,
    table_name,
)
from engram_edit.errors import BadInputError, MismatchError
from engram_edit.memory import MemoryTable
from engram_edit.model import EngramModel, placement
from engram_edit.model.placement import DeviceRows, HostRows, MmapRows, choose_placement

PLACEMENTS = ("gpu", "host", "mmap")
SOURCES = {"gpu": DeviceRows, "host": HostRows, "mmap": MmapRows}


def _model_dir(tmp_path, table_dtype):
    path = tmp_path / "m"
    if table_dtype == "float8_e4m3":  # FP8 rows need a width divisible by 32
        make_tiny_model(path, table_dtype=table_dtype, engram_head_dim=32)
    else:
        make_tiny_model(path, table_dtype=table_dtype)
    return path


def _ids(batch: int = 2, t: int = 9) -> torch.Tensor:
    return torch.randint(0, 500, (batch, t), generator=torch.Generator().manual_seed(5))


def _run(model: EngramModel, ids: torch.Tensor):
    with torch.no_grad():
        return model(ids.to(model.embed_tokens.weight.device), return_gates=True)


@pytest.mark.parametrize("table_dtype", ["bfloat16", "float8_e4m3"])
def test_every_placement_gives_identical_logits_and_gates_on_cpu(tmp_path, table_dtype):
    files = open_model(_model_dir(tmp_path, table_dtype))
    ids = _ids()
    outs = {}
    for p in PLACEMENTS:
        model = build_model(files, "cpu", placement=p)
        assert isinstance(model.row_source, SOURCES[p]) and model.row_source.placement == p
        outs[p] = _run(model, ids)
        again = _run(model, ids)  # a second forward starts from a fresh prefetch
        assert torch.equal(again.logits, outs[p].logits)
    for p in ("host", "mmap"):
        assert torch.equal(outs[p].logits, outs["gpu"].logits), p
        for layer, gate in outs["gpu"].gates.items():
            assert torch.equal(outs[p].gates[layer], gate), (p, layer)


def test_mmap_placement_never_reads_a_table_whole(tmp_path, monkeypatch):
    files = open_model(_model_dir(tmp_path, "bfloat16"))
    whole = []
    real = MemoryTable.to_torch

    def spy(self, layer, dtype=None):
        whole.append(layer)
        return real(self, layer, dtype)

    monkeypatch.setattr(MemoryTable, "to_torch", spy)
    model = build_model(files, "cpu", placement="mmap")
    _run(model, _ids())
    model.gather_rows(2, model.compute_rows(_ids())[2])
    assert whole == []
    build_model(files, "cpu", placement="gpu")  # the spy does see whole reads
    assert sorted(whole) == [0, 2]


@pytest.mark.parametrize("where", ["host", "mmap"])
def test_tables_outside_the_model_are_not_parameters_and_cannot_be_saved(tmp_path, where):
    files = open_model(_model_dir(tmp_path, "bfloat16"))
    inside = build_model(files, "cpu", placement="gpu")
    outside = build_model(files, "cpu", placement=where)
    tables = {table_name(i) for i in files.config.engram_layer_ids}
    assert tables <= set(inside.state_dict())
    assert set(outside.state_dict()) == set(inside.state_dict()) - tables
    assert not any(".engram.embed." in name for name, _ in outside.named_parameters())
    for name, tensor in outside.state_dict().items():
        assert torch.equal(tensor, inside.state_dict()[name]), name
    with pytest.raises(BadInputError, match=f"placement '{where}'"):
        save_model(outside, files.tokenizer, tmp_path / "copy")
    assert not (tmp_path / "copy").exists()


def test_device_rows_keep_the_tables_trainable_and_honour_a_swapped_lookup(tiny_model_dir):
    _, model = load_model(tiny_model_dir, device="cpu")
    assert model.row_source.placement == "gpu"
    ids = _ids()
    rows = model.compute_rows(ids)
    model(ids).logits.sum().backward()
    grad = model.engram(2).embed.weight.grad
    touched = set(rows[2].unique().tolist())
    assert {int(r) for r in grad.abs().sum(1).nonzero()} == touched

    class Zeros(torch.nn.Module):
        def forward(self, r: torch.Tensor) -> torch.Tensor:
            return torch.zeros(*r.shape, 8)

    model.engram(2).embed = Zeros()  # what edit/distill.py does to add its deltas
    assert not model.gather_rows(2, rows[2]).any()


def test_host_rows_gather_without_prefetch_like_the_table(tmp_path):
    files = open_model(_model_dir(tmp_path, "float8_e4m3"))
    inside = build_model(files, "cpu", placement="gpu")
    host = build_model(files, "cpu", placement="host")
    rows = inside.compute_rows(_ids())
    for layer in files.config.engram_layer_ids:
        assert torch.equal(host.gather_rows(layer, rows[layer]),
                           inside.gather_rows(layer, rows[layer]))


def test_default_placement_is_gpu_on_cpu_and_follows_free_memory_on_cuda(monkeypatch):
    assert choose_placement(None, torch.device("cpu"), 10**15) == "gpu"
    monkeypatch.setattr(placement, "_free_device_bytes", lambda device: 1000)
    cuda = torch.device("cuda")
    assert choose_placement(None, cuda, 800) == "gpu"
    assert choose_placement(None, cuda, 801) == "host"
    assert choose_placement("mmap", cuda, 1) == "mmap"
    with pytest.raises(BadInputError, match="placement 'disk': expected one of gpu, host, mmap"):
        choose_placement("disk", cuda, 1)


def test_a_row_source_of_another_geometry_is_refused(tmp_path):
    make_tiny_model(tmp_path / "other", engram_vocab_size=[41, 43])
    other = open_model(tmp_path / "other").table()
    files = open_model(_model_dir(tmp_path, "bfloat16"))
    compression = model_compression(files.config, files.tokenizer)
    with pytest.raises(MismatchError, match=r"layer 0: the mmap row source has \d+ x 8"):
        EngramModel(files.config, compression, MmapRows(other))
    assert isinstance(EngramModel(files.config, compression, MmapRows(files.table())),
                      EngramModel)


def test_generate_gives_the_same_text_with_every_placement(tiny_model_dir):
    def run(*extra):
        result = CliRunner().invoke(app, ["generate", "Princess of", "--model",
                                          str(tiny_model_dir), "--max-new-tokens", "4",
                                          "--json", *extra])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    default = run()
    for p in PLACEMENTS:
        assert run("--placement", p) == default
    bad = CliRunner().invoke(app, ["generate", "x", "--model", str(tiny_model_dir),
                                   "--placement", "disk"])
    assert bad.exit_code == 2 and "--placement" in bad.stderr
    assert "--placement" in CliRunner().invoke(app, ["eval", "--help"]).stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("table_dtype", ["bfloat16", "float8_e4m3"])
def test_every_placement_gives_identical_logits_on_cuda(tmp_path, table_dtype):
    files = open_model(_model_dir(tmp_path, table_dtype))
    ids = _ids(batch=3, t=17)
    outs = {}
    for p in PLACEMENTS:
        model = build_model(files, "cuda", placement=p)
        outs[p] = [_run(model, ids) for _ in range(3)]  # repeated: streams and events reused
        rows = model.compute_rows(ids.cuda())
        direct = model.gather_rows(2, rows[2])  # no prefetch: the synchronous path
        assert direct.device.type == "cuda"
        outs[p].append(direct)
    for p in ("host", "mmap"):
        for got, want in zip(outs[p][:3], outs["gpu"][:3], strict=True):
            assert torch.equal(got.logits, want.logits), p
            assert all(torch.equal(got.gates[i], want.gates[i]) for i in want.gates), p
        assert torch.equal(outs[p][3], outs["gpu"][3]), p
    host = build_model(files, "cuda", placement="host")
    assert all(lay.data.device.type == "cpu" for lay in host.row_source.layers.values())


def test_host_rows_read_every_stored_byte(tmp_path, monkeypatch):
    monkeypatch.setattr(placement, "CHUNK_BYTES", 1000)  # several reads per layer
    files = open_model(_model_dir(tmp_path, "float8_e4m3"))
    table = files.table()
    host = HostRows.from_table(table)
    for layer in table.layer_ids:
        raw = table.read_raw(layer, np.arange(table.num_rows(layer)))
        lay = host.layers[layer]
        assert lay.dtype == "float8_e4m3"
        np.testing.assert_array_equal(lay.data.numpy(), raw.data)
        np.testing.assert_array_equal(lay.scale.numpy(), raw.scale)


def test_gpu_placement_benchmark_runs_tiny_on_the_cpu(tmp_path):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "bench" / "gpu_placement.py"
    spec = importlib.util.spec_from_file_location("gpu_placement", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.main(["--tiny", "--device", "cpu", "--dtype", "float32", "--batch", "1",
                      "--seq", "16", "--warmup", "0", "--iters", "1", "--mmap-iters", "1",
                      "--results", str(tmp_path / "results"), "--dir", str(tmp_path / "w")])
    assert out.name.startswith("gpu-placement-") and out.name.endswith("-cpu.json")
    result = json.loads(out.read_text())
    assert list(result["runs"]) == ["gpu", "host", "mmap"]
    assert result["runs"]["host"]["logits_equal_gpu"] and result["runs"]["mmap"]["logits_equal_gpu"]
    assert set(result["summary"]) == {"host_vs_gpu", "mmap_vs_gpu", "host_within_1pct"}
    assert not (tmp_path / "w").exists()
