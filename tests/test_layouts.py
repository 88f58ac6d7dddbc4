"""Foreign layouts: detection, import/export round trips, V4.1 read in place, FP8 edits, profile."""

import builtins
import filecmp
import io
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from test_journal import digests
from typer.testing import CliRunner

from commands.main import app
from engram_edit import layouts
from engram_edit.checkpoint import build_model, open_memory, open_model
from engram_edit.config import EngramConfig
from engram_edit.errors import BadInputError
from engram_edit.hashing import NgramHasher, layer_multipliers, model_primes
from engram_edit.interop import export_model, import_model
from engram_edit.layouts import v4
from engram_edit.layouts.lens import lens_probs
from engram_edit.split import convert_memory, join_model, split_model
from make_layouts import make_demo_dir, make_v4_dir

EXPERT_SHARD = "model-00002-of-00005.safetensors"  # make_v4_dir puts every MoE expert here


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return make_demo_dir(tmp_path_factory.mktemp("demo") / "demo")


@pytest.fixture(scope="module")
def v4_dir(tmp_path_factory):
    return make_v4_dir(tmp_path_factory.mktemp("v4") / "v4")


def same_files(a, b) -> list[str]:
    """Names of the files of ``a`` whose bytes differ in ``b`` (or are missing there)."""
    return [p.name for p in sorted(a.iterdir())
            if not (b / p.name).is_file() or not filecmp.cmp(p, b / p.name, shallow=False)]


def cli(args: list[str]):
    return CliRunner().invoke(app, args)


def cli_error(args: list[str]) -> str:
    result = cli(args)
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    return result.stderr


# --- detection -------------------------------------------------------------------------------

def test_layout_is_detected_from_config_and_tensor_names_not_the_path(demo_dir, v4_dir,
                                                                      tiny_model_dir, tmp_path):
    assert layouts.detect(demo_dir) == "demo"
    assert layouts.detect(v4_dir) == "v4"
    assert layouts.detect(tiny_model_dir) == "engram-edit"
    misnamed = tmp_path / "v4"
    shutil.copytree(demo_dir, misnamed)
    assert layouts.detect(misnamed) == "demo"


def test_unknown_layout_exits_2_with_one_line(tmp_path, v4_dir):
    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    line = cli_error(["import", str(other), "--from", "v4", "--out", str(tmp_path / "o")])
    assert "unknown layout" in line and "'llama'" in line
    assert "unknown layout" in cli_error(["info", "--model", str(other)])
    fake = tmp_path / "fake"
    fake.mkdir()
    shutil.copyfile(v4_dir / "config.json", fake / "config.json")
    save_file({"x": torch.zeros(1)}, str(fake / "model.safetensors"))
    assert "no tensor layers.1.engram.embed.weight" in cli_error(["info", "--model", str(fake)])


def test_import_refuses_a_different_layout_than_claimed(demo_dir, tmp_path):
    line = cli_error(["import", str(demo_dir), "--from", "v4", "--out", str(tmp_path / "o")])
    assert "demo layout, not the v4 layout" in line
    assert not (tmp_path / "o").exists()


# --- demo ------------------------------------------------------------------------------------

@pytest.mark.parametrize("sharded", [False, True])
def test_demo_import_then_export_is_bit_identical(tmp_path, sharded):
    source = make_demo_dir(tmp_path / "demo", sharded=sharded)
    report = import_model(source, "demo", tmp_path / "ours")
    assert report.unmapped_config == ["tokenizer_name_or_path"]
    back = export_model(tmp_path / "ours", "demo", tmp_path / "back")
    assert back.verbatim_headers == (2 if sharded else 1)
    assert same_files(source, tmp_path / "back") == []


def test_demo_tensors_map_to_the_module_they_mean(demo_dir, tmp_path):
    """Our Engram module, loaded from an imported demo checkpoint, computes the demo's forward
    (engram_demo_v1.py Engram.forward and ShortConv, written out here)."""
    import_model(demo_dir, "demo", tmp_path / "ours")
    model = build_model(open_model(tmp_path / "ours"), device="cpu")
    demo = load_file(str(demo_dir / "model.safetensors"))
    layer, hc, d = 2, 2, 32
    p = f"layers.{layer}.engram."
    torch.manual_seed(0)
    streams = torch.randn(1, 5, hc, d)
    rows = torch.randint(0, demo[p + "multi_head_embedding.embedding.weight"].shape[0], (1, 5, 4))
    ours, _ = model.engram(layer)(streams, rows)

    e = demo[p + "multi_head_embedding.embedding.weight"][rows].flatten(-2)
    gates = []
    for b in range(hc):
        key = F.rms_norm(F.linear(e, demo[p + f"key_projs.{b}.weight"],
                                  demo[p + f"key_projs.{b}.bias"]), (d,),
                         demo[p + f"norm1.{b}.weight"])
        query = F.rms_norm(streams[:, :, b], (d,), demo[p + f"norm2.{b}.weight"])
        g = (key * query).sum(-1) / math.sqrt(d)
        gates.append((g.abs().clamp_min(1e-6).sqrt() * g.sign()).sigmoid().unsqueeze(-1))
    value = torch.stack(gates, 2) * F.linear(e, demo[p + "value_proj.weight"],
                                             demo[p + "value_proj.bias"]).unsqueeze(2)
    normed = torch.cat([F.rms_norm(value[:, :, b], (d,), demo[p + f"short_conv.norms.{b}.weight"],
                                   eps=1e-5) for b in range(hc)], -1).transpose(1, 2)
    conv = demo[p + "short_conv.conv.weight"]
    y = F.conv1d(normed, conv, padding=(conv.shape[-1] - 1) * 3, dilation=3, groups=hc * d)
    expected = value + F.silu(y[..., :5]).transpose(1, 2).view(1, 5, hc, d)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


def test_demo_offsets_that_disagree_with_the_hashing_are_refused(tmp_path):
    source = make_demo_dir(tmp_path / "demo")
    tensors = load_file(str(source / "model.safetensors"))
    tensors["layers.0.engram.multi_head_embedding.offsets"][1] += 1
    tensors["layers.0.engram.extra.weight"] = torch.zeros(2)
    save_file(tensors, str(source / "model.safetensors"))
    with pytest.raises(BadInputError) as err:
        import_model(source, "demo", tmp_path / "ours")
    assert err.value.problems == [
        f"{source}: layers.0.engram.multi_head_embedding.offsets differs from the column offsets "
        f"of the hashing config",
        f"{source}: tensor layers.0.engram.extra.weight has no mapping in the demo layout"]


def test_demo_export_of_fp8_tables_is_a_one_line_dtype_error(tmp_path):
    from conftest import make_tiny_model

    make_tiny_model(tmp_path / "m", table_dtype="float8_e4m3", engram_head_dim=32)
    line = cli_error(["export", str(tmp_path / "m"), "--to", "demo", "--out", str(tmp_path / "o")])
    assert "dtype not supported" in line
    assert not (tmp_path / "o").exists()


# --- V4.1 ------------------------------------------------------------------------------------

def test_v4_import_then_export_is_bit_identical(v4_dir, tmp_path):
    report = import_model(v4_dir, "v4", tmp_path / "ours")
    assert report.referenced > 0 and "quantization_config" in report.unmapped_config
    back = export_model(tmp_path / "ours", "v4", tmp_path / "back")
    assert back.copied_files >= 1 and back.requantized == []
    assert same_files(v4_dir, tmp_path / "back") == []


def test_v4_export_reencodes_a_bf16_memory_to_the_same_fp8_values(v4_dir, tmp_path):
    import_model(v4_dir, "v4", tmp_path / "ours")
    split_model(tmp_path / "ours", tmp_path / "bb", tmp_path / "mem")
    convert_memory(tmp_path / "mem", "bf16", tmp_path / "mem16")
    shutil.copyfile(tmp_path / "ours" / "import.json", tmp_path / "bb" / "import.json")
    back = export_model(tmp_path / "bb", "v4", tmp_path / "back", memory=tmp_path / "mem16")
    assert back.requantized == [1, 3]
    with open_model(v4_dir).table() as before, open_model(tmp_path / "back").table() as after:
        for layer in (1, 3):
            ids = np.arange(before.num_rows(layer))
            np.testing.assert_array_equal(after.read_rows(layer, ids), before.read_rows(layer, ids))


class Opened:
    """Every path the process opens while recording (os.open and Python's open)."""

    def __init__(self, monkeypatch):
        self.paths: list[str] = []
        for module, name in ((os, "open"), (builtins, "open"), (io, "open")):
            real = getattr(module, name)
            monkeypatch.setattr(module, name, self._wrap(real))

    def _wrap(self, real):
        def opener(file, *args, **kwargs):
            if isinstance(file, (str, os.PathLike)):
                self.paths.append(os.path.basename(os.fspath(file)))
            return real(file, *args, **kwargs)
        return opener


def test_a_v4_directory_is_read_in_place_without_opening_the_experts(v4_dir, monkeypatch,
                                                                     tmp_path):
    opened = Opened(monkeypatch)
    files = open_model(v4_dir)
    assert files.layout == "v4"
    with files.table() as table:
        rows = table.read_rows(3, np.array([0, 7]))
    lens_probs(files, 3, [0, 1], np.stack([rows, rows], 1))
    import_model(v4_dir, "v4", tmp_path / "ours")
    shards = {p for p in opened.paths if p.startswith("model-")}  # the source's shards
    assert EXPERT_SHARD not in shards
    assert shards == {"model-00001-of-00005.safetensors", "model-00003-of-00005.safetensors",
                      "model-00004-of-00005.safetensors", "model-00005-of-00005.safetensors"}


def test_info_on_v4_shows_only_figures_from_its_config_and_headers(v4_dir, tmp_path,
                                                                  monkeypatch):
    model = shutil.copytree(v4_dir, tmp_path / "v4")
    config = json.loads((model / "config.json").read_text())
    config["text_config"]["num_attention_heads"] = 6  # not our default (4)
    (model / "config.json").write_text(json.dumps(config))
    opened = Opened(monkeypatch)
    result = cli(["info", "--model", str(model), "--json"])
    assert result.exit_code == 0, result.output
    assert EXPERT_SHARD not in opened.paths
    info = json.loads(result.stdout)
    assert info["layout"] == "v4" and info["backbone_parameters"] is None
    assert "not counted" in info["notes"][0]
    text = config["text_config"]
    assert info["config"]["num_attention_heads"] == 6
    assert {k: info["config"][k] for k in ("num_hidden_layers", "hidden_size", "hc_mult",
                                           "engram_n_heads", "engram_head_dim")} == {
        k: text[k] for k in ("num_hidden_layers", "hidden_size", "hc_mult", "engram_n_heads",
                             "engram_head_dim")}
    for default in ("intermediate_size", "moe_num_experts", "hc_sinkhorn_iters", "model_type",
                    "max_position_embeddings", "engram_kernel_size"):
        assert default not in info["config"]
    rows = [384, 552]  # the fixture's rows per layer, from its headers
    assert info["table_parameters"] == 32 * sum(rows)
    assert [t["rows"] for t in info["tables"]] == rows

    lines = cli(["info", "--model", str(model)]).stdout
    assert "4 layers, hidden 64, 6 attention heads, hc_mult 4, vocab 500" in lines
    assert "parameters: Engram tables 29.95k\n" in lines
    del config["text_config"]["num_attention_heads"]
    (model / "config.json").write_text(json.dumps(config))
    lines = cli(["info", "--model", str(model)]).stdout
    assert "attention heads" not in lines and "4 layers, hidden 64, hc_mult 4" in lines


def test_v4_fp8_rows_read_exactly(v4_dir):
    raw = load_file(str(v4_dir / "model-00005-of-00005.safetensors"))
    codes = raw["layers.3.engram.embed.weight"].view(torch.uint8).numpy().astype(np.int64)
    scale = raw["layers.3.engram.embed.scale"].view(torch.uint8).numpy().astype(np.int64)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    exp, man = (codes >> 3) & 0xF, codes & 7
    value = sign * np.where(exp == 0, man * 2.0 ** -9, (1 + man / 8) * 2.0 ** (exp - 7))
    expected = value * 2.0 ** (np.repeat(scale, 32, axis=1) - 127)  # spec section 7
    with open_model(v4_dir).table() as table:
        got = table.read_rows(3, np.arange(len(codes)))
    np.testing.assert_array_equal(got, expected.astype(np.float32))


def spec_e4m3(x: float) -> int:
    """E4M3 code of x by the spec: round to nearest, ties to even, saturate at 448."""
    values = [(c, (c & 7) * 2.0 ** -9 if c >> 3 == 0 else (1 + (c & 7) / 8) * 2.0 ** ((c >> 3) - 7))
              for c in range(0x7F)]
    a = min(abs(x), 448.0)
    best = min(values, key=lambda cv: (abs(cv[1] - a), cv[0] & 1))
    return best[0] | (0x80 if math.copysign(1.0, x) < 0 else 0)


def spec_quantize(row: np.ndarray) -> tuple[list[int], list[int]]:
    """docs/engram.md section 7, block by block of 32 columns."""
    codes, scales = [], []
    for block in row.reshape(-1, 32).astype(np.float64):
        amax = max(float(np.abs(block).max()), 1e-4)
        k = -200
        while amax > 448 * 2.0 ** k:  # the smallest power of two with amax <= 448 * s
            k += 1
        scales.append(k + 127)
        codes += [spec_e4m3(max(-448.0, min(448.0, x / 2.0 ** k))) for x in block]
    return codes, scales


def test_an_edited_v4_row_is_requantized_exactly_as_the_spec_says(v4_dir, tmp_path):
    model = shutil.copytree(v4_dir, tmp_path / "v4")
    files = open_model(model)
    grid = sorted({abs(float(v)) for v in np.arange(0x7F)
                   for v in [(v & 7) * 2.0 ** -9 if v >> 3 == 0 else
                             (1 + (v & 7) / 8) * 2.0 ** ((v >> 3) - 7)]})
    ties = [(a + b) / 2 for a, b in zip(grid[40:56], grid[41:57], strict=True)]
    rng = np.random.default_rng(3)
    row = np.float32(rng.standard_normal(32) * 0.05)
    row[:16] = ties
    row[16] = 448.0
    values = np.stack([row, np.float32(rng.standard_normal(32) * 3e-3)])
    target = np.array([5, 9])
    with files.table(writable=True) as table:
        table.write_raw(3, target, table.encode(3, values))
        table.flush()
    raw = load_file(str(model / "model-00005-of-00005.safetensors"))
    before = load_file(str(v4_dir / "model-00005-of-00005.safetensors"))
    for k, r in enumerate(target):
        codes, scales = spec_quantize(values[k])
        assert raw["layers.3.engram.embed.weight"][r].view(torch.uint8).tolist() == codes
        assert raw["layers.3.engram.embed.scale"][r].view(torch.uint8).tolist() == scales
    untouched = np.setdiff1d(np.arange(len(raw["layers.3.engram.embed.weight"])), target)
    for name in ("layers.3.engram.embed.weight", "layers.3.engram.embed.scale"):
        assert torch.equal(raw[name][untouched].view(torch.uint8),
                           before[name][untouched].view(torch.uint8))


def test_v4_profile_reproduces_the_released_geometry():
    r = v4.RELEASE
    config = EngramConfig(vocab_size=r["vocab_size"], hidden_size=r["hidden_size"],
                          num_hidden_layers=43, num_attention_heads=64, hc_mult=r["hc_mult"],
                          engram_layer_ids=r["engram_layer_ids"],
                          engram_max_ngram_size=r["engram_max_ngram_size"],
                          engram_n_heads=r["engram_n_heads"], engram_head_dim=r["engram_head_dim"],
                          engram_vocab_size=r["engram_vocab_size"], engram_seed=v4.PROFILE.seed)
    primes = model_primes(config)
    assert [int(primes[i].sum()) for i in (1, 14)] == r["engram_num_embeddings"]
    assert primes[1][:3].tolist() == [16000057, 16000079, 16000081]
    assert primes[14][-3:].tolist() == [16000877, 16000879, 16000889]
    # multipliers for the released compressed vocab (99,092), as third-party converters list them
    vc = r["engram_compressed_vocab_size"]
    assert layer_multipliers(1, 4, vc, 0).tolist() == [
        76632096046245, 4839876093313, 35959672319349, 73987337458391]
    assert layer_multipliers(14, 4, vc, 0).tolist() == [
        67716810739261, 51510806800915, 30921347202721, 82619226485591]


def test_v4_lookback_stops_at_blocked_tokens(v4_dir):
    files = open_model(v4_dir)
    h = files.hasher
    rng = np.random.default_rng(1)
    ids = rng.integers(0, h.compressed_vocab_size, 9)
    none = np.zeros(9, dtype=bool)
    assert all(np.array_equal(v4.hash_rows(h, ids, none)[i], h.rows(ids[None])[i][0])
               for i in h.layer_ids)
    dead = none.copy()
    dead[[3, 7]] = True
    got = v4.hash_rows(h, ids, dead)
    for lid in h.layer_ids:
        m = h.multipliers[lid].tolist()
        for t in range(9):
            for n in range(2, h.max_ngram + 1):
                blocked, mix = False, 0
                for k in range(n):  # vLLM: blocked sticks from the first dead or missing token
                    blocked = blocked or t - k < 0 or bool(dead[t - k])
                    mix ^= (h.pad_id if blocked else int(ids[t - k])) * m[k]
                for j in range(h.n_heads):
                    col = h.column(n, j)
                    want = mix % int(h.primes[lid][col]) + int(h.offsets[lid][col])
                    assert got[lid][t, col] == want
    from tokenizers import AddedToken

    tokenizer = open_model(v4_dir).tokenizer
    assert v4.blocked_ids(tokenizer) == []
    tokenizer.tokenizer.add_special_tokens([AddedToken(t, special=True)
                                            for t in v4.PROFILE.blocked_tokens])
    assert v4.blocked_ids(tokenizer) == [500, 501]


def test_v4_lens_reads_the_value_rows_of_wkv_and_the_head(v4_dir):
    files = open_model(v4_dir)
    config = files.config
    engram = load_file(str(v4_dir / "model-00005-of-00005.safetensors"))
    rest = load_file(str(v4_dir / "model-00003-of-00005.safetensors"))
    d, n = config.hidden_size, config.hc_mult
    wkv = engram["layers.3.engram.wkv.weight"].float()
    scale = engram["layers.3.engram.wkv.scale"].float()
    wkv = wkv * scale.repeat_interleave(32, 0).repeat_interleave(32, 1)
    value = wkv[n * d:(n + 1) * d]  # keys first, then the value
    rng = np.random.default_rng(2)
    rows = np.float32(rng.standard_normal((3, 2, 32)))
    e = torch.zeros(3, config.engram_columns, 32)
    e[:, [4, 1]] = torch.from_numpy(rows)
    v = e.flatten(1) @ value.T
    h = F.rms_norm(v, (d,), rest["norm.weight"].float(), eps=config.rms_norm_eps)
    expected = torch.softmax(h @ rest["head.weight"].float().T, -1).numpy()
    np.testing.assert_allclose(lens_probs(files, 3, [4, 1], rows), expected, rtol=1e-4,
                               atol=1e-7)


def test_a_missing_shard_exits_2_with_one_line(v4_dir, tmp_path):
    model = shutil.copytree(v4_dir, tmp_path / "v4")
    (model / "model-00004-of-00005.safetensors").unlink()
    line = cli_error(["info", "--model", str(model)])
    assert "missing shard model-00004-of-00005.safetensors" in line
    line = cli_error(["import", str(model), "--from", "v4", "--out", str(tmp_path / "o")])
    assert "missing shard model-00004-of-00005.safetensors" in line


def test_a_v4_table_in_another_dtype_is_a_one_line_dtype_error(v4_dir, tmp_path):
    model = shutil.copytree(v4_dir, tmp_path / "v4")
    shard = model / "model-00005-of-00005.safetensors"
    tensors = load_file(str(shard))
    tensors["layers.3.engram.embed.weight"] = tensors["layers.3.engram.embed.weight"].bfloat16()
    save_file(tensors, str(shard))
    line = cli_error(["info", "--model", str(model)])
    assert "dtype not supported: layers.3.engram.embed.weight is BF16" in line


def test_split_of_a_v4_directory_gives_a_memory_that_lookup_reads(v4_dir, tmp_path):
    split_model(v4_dir, tmp_path / "bb", tmp_path / "mem")
    memory = open_memory(tmp_path / "mem")
    with memory.table() as a, open_model(v4_dir).table() as b:
        np.testing.assert_array_equal(a.read_raw(1, np.arange(50)).data,
                                      b.read_raw(1, np.arange(50)).data)
    result = cli(["lookup", "the cat", "--memory", str(tmp_path / "mem"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["backbone"] is False
    files = open_model(tmp_path / "bb", tmp_path / "mem")
    assert files.layout == "v4"


def test_split_then_join_of_a_v4_directory_gives_back_every_file_byte_for_byte(
        v4_dir, tmp_path, monkeypatch):
    model = shutil.copytree(v4_dir, tmp_path / "v4")
    with open(model / EXPERT_SHARD, "r+b") as f:  # split must stream it, never parse it
        f.seek(8)
        f.write(b"not json")
    opened = Opened(monkeypatch)
    result = cli(["split", str(model), "--out", str(tmp_path / "bb"), str(tmp_path / "mem"),
                  "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["layout"] == "v4" and "join" in report["notes"][0]
    assert EXPERT_SHARD in opened.paths  # copied
    bb = tmp_path / "bb"
    index = json.loads((bb / "model.safetensors.index.json").read_text())["weight_map"]
    assert not [n for n in index if ".engram.embed." in n]
    assert "layers.1.engram.wkv.weight" in index and (bb / "engram-backbone.json").is_file()
    assert report["backbone_tensors"] == len(index)
    assert digests(bb)[EXPERT_SHARD] == digests(model)[EXPERT_SHARD]
    with pytest.raises(BadInputError, match="a backbone needs --memory"):
        open_model(bb)

    result = cli(["join", str(bb), str(tmp_path / "mem"), "--out", str(tmp_path / "back"),
                  "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["layout"] == "v4"
    assert digests(tmp_path / "back") == digests(model)


def test_join_of_a_v4_backbone_with_a_bf16_memory_gives_the_same_fp8_values(v4_dir, tmp_path):
    split_model(v4_dir, tmp_path / "bb", tmp_path / "mem")
    convert_memory(tmp_path / "mem", "bf16", tmp_path / "mem16")
    join_model(tmp_path / "bb", tmp_path / "mem16", tmp_path / "back")
    assert set(digests(tmp_path / "back")) == set(digests(v4_dir))
    with open_model(v4_dir).table() as before, open_model(tmp_path / "back").table() as after:
        for layer in (1, 3):
            assert after.dtype(layer) == "float8_e4m3"
            ids = np.arange(before.num_rows(layer))
            np.testing.assert_array_equal(after.read_rows(layer, ids), before.read_rows(layer, ids))


def test_split_help_says_what_a_v4_backbone_is_and_how_to_serve_it_again():
    text = " ".join(cli(["split", "--help"]).stdout.split())
    assert "No V4.1 server can load it alone" in text
    assert "join BACKBONE MEMORY --out DIR" in text and "byte for byte" in text


def test_import_and_export_cli_print_json_only(v4_dir, tmp_path):
    result = cli(["import", str(v4_dir), "--from", "v4", "--out", str(tmp_path / "o"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["layout"] == "v4" and report["tensors"] == 15
    result = cli(["export", str(tmp_path / "o"), "--to", "v4", "--out", str(tmp_path / "b"),
                  "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["verbatim_headers"] == 4


def test_v4_export_of_a_model_never_imported_from_v4_is_refused(tiny_model_dir, tmp_path):
    line = cli_error(["export", str(tiny_model_dir), "--to", "v4", "--out", str(tmp_path / "o")])
    assert "import it with --from v4" in line


def test_hasher_of_a_v4_directory_is_the_spec_hasher_with_seed_0(v4_dir):
    files = open_model(v4_dir)
    assert files.config.engram_seed == 0
    plain = NgramHasher(files.config, files.tokenizer.compressed_vocab_size, files.hasher.pad_id)
    assert all(np.array_equal(plain.multipliers[i], files.hasher.multipliers[i])
               for i in files.config.engram_layer_ids)


def test_a_patch_applies_in_place_to_a_v4_directory_and_undoes_bit_for_bit(v4_dir, tmp_path):
    from engram_edit.edit.journal import apply_patch, undo_patch
    from engram_edit.edit.patch import LayerEdit, Patch

    model = shutil.copytree(v4_dir, tmp_path / "v4")
    files = open_model(model)
    rows = np.array([2, 11])
    values = np.float32(np.random.default_rng(4).standard_normal((2, 32)))
    with files.table() as table:
        edit = LayerEdit(1, rows, table.read_raw(1, rows), table.encode(1, values))
    apply_patch(files, Patch(files.fingerprint(), [edit]), "fix")
    with open_model(model).table() as table:
        assert table.read_raw(1, rows).equals(edit.after)
    undo_patch(open_model(model))
    assert same_files(v4_dir, model) == []


def test_the_hasher_of_a_v4_directory_stops_lookback_at_blocked_tokens(v4_dir):
    files = open_model(v4_dir)
    assert isinstance(files.hasher, v4.BlockingHasher)
    h = files.hasher
    blocking = v4.BlockingHasher(files.config, h.compressed_vocab_size, h.pad_id, [7])
    ids = np.array([[3, 7, 4, 5, 6], [1, 2, 3, 4, 5]])
    rows = blocking.rows(ids)
    for lid in h.layer_ids:
        for b in range(2):
            want = v4.hash_rows(h, ids[b], ids[b] == 7)[lid]
            np.testing.assert_array_equal(rows[lid][b], want)
        np.testing.assert_array_equal(rows[lid][1], h.rows(ids[1:])[lid][0])  # nothing blocked
        torch_rows = blocking.rows(torch.from_numpy(ids))[lid]
        np.testing.assert_array_equal(torch_rows.numpy(), rows[lid])
    assert not np.array_equal(rows[1][0], h.rows(ids[:1])[1][0])
