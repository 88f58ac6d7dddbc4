"""lookup, gates and rows: slots as hashing gives them, the JSON scripts rely on, the logit lens,
gates and predictions against the model, errors, no torch for a memory alone, and what the
bundled model's memory knows."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from commands.main import app
from conftest import make_tiny_model
from engram_edit.checkpoint import build_model, open_memory, open_model
from engram_edit.errors import BadInputError
from engram_edit.hashing import explain
from engram_edit.inspect import decode_rows, gates, lookup, read_rows
from engram_edit.paths import bundled_model_dir
from engram_edit.split import split_model

TEXT = "the cat sat on the mat"


@pytest.fixture
def model_dir(tmp_path):
    make_tiny_model(tmp_path / "model")
    return tmp_path / "model"


@pytest.fixture
def memory_dir(model_dir, tmp_path):
    split_model(model_dir, tmp_path / "backbone", tmp_path / "memory")
    return tmp_path / "memory"


def run_json(args: list[str]) -> dict:
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# --- slots and rows --------------------------------------------------------------------------

@pytest.mark.parametrize("alone", [False, True])
def test_slots_shown_equal_hash_for_the_same_text(model_dir, memory_dir, alone):
    files = open_memory(memory_dir) if alone else open_model(model_dir)
    result = lookup(files, TEXT, include_padded=True)
    expected = explain(TEXT, files.tokenizer, files.hasher, files.config.engram_pad_token_id)
    shown = [(layer.layer_id, g.position, g.order, [h.column for h in g.heads],
              [h.slot for h in g.heads], [h.row for h in g.heads])
             for layer in result.layers for g in layer.ngrams]
    want = [(h.layer_id, h.position, h.order, h.columns, h.slots, h.rows)
            for h in expected.ngrams]
    assert sorted(shown) == sorted(want)
    assert [t.id for t in result.tokens] == expected.raw_ids
    assert [t.compressed_id for t in result.tokens] == expected.compressed_ids


def test_padded_ngrams_are_shown_only_with_all(model_dir):
    files = open_model(model_dir)
    plain = lookup(files, TEXT)
    assert all(not g.padded and g.position - g.order + 1 >= 0
               for layer in plain.layers for g in layer.ngrams)
    full = lookup(files, TEXT, include_padded=True)
    padded = [g for layer in full.layers for g in layer.ngrams if g.padded]
    assert padded and all(g.position - g.order + 1 < 0 for g in padded)


def test_norms_are_those_of_the_stored_rows(model_dir):
    files = open_model(model_dir)
    result = lookup(files, TEXT, layers=[2])
    assert [layer.layer_id for layer in result.layers] == [2]
    with files.table() as table:
        for g in result.layers[0].ngrams:
            rows = np.array([h.row for h in g.heads])
            np.testing.assert_allclose([h.norm for h in g.heads], table.norms(2, rows))


def test_merged_lists_every_raw_token_with_the_same_compressed_id(model_dir):
    files = open_model(model_dir)
    for t in lookup(files, TEXT).tokens:
        ids = [m.id for m in t.merged]
        assert t.id in ids
        assert ids == files.tokenizer.merged_with(t.compressed_id)


# --- JSON --------------------------------------------------------------------------------------

def test_json_has_the_documented_shape(model_dir):
    data = run_json(["lookup", TEXT, "--model", str(model_dir), "--top", "3"])
    files = open_model(model_dir)
    assert {"text", "tokens", "layers"} <= set(data) and data["text"] == TEXT
    assert [t["id"] for t in data["tokens"]] == files.tokenizer.encode(TEXT)
    for token in data["tokens"]:
        assert {"id", "text", "compressed_id", "merged", "prediction"} <= set(token)
        assert {"memory_on", "memory_off"} == set(token["prediction"])
    assert [layer["layer_id"] for layer in data["layers"]] == files.config.engram_layer_ids
    for layer in data["layers"]:
        assert {"layer_id", "ngrams"} <= set(layer) and layer["ngrams"]
        for g in layer["ngrams"]:
            assert {"position", "order", "tokens", "text", "heads", "decoded", "gate"} <= set(g)
            assert len(g["tokens"]) == g["order"]
            assert g["tokens"][-1] == data["tokens"][g["position"]]["text"]
            assert len(g["heads"]) == files.config.engram_n_heads
            for h in g["heads"]:
                assert set(h) >= {"head", "column", "slot", "row", "norm"}
                offset = files.hasher.offsets[layer["layer_id"]][h["column"]]
                assert h["row"] == offset + h["slot"]
            assert len(g["decoded"]) == 3 and {"token", "prob"} <= set(g["decoded"][0])
            assert len(g["gate"]) == files.config.hc_mult


def test_json_of_a_memory_alone_has_rows_but_no_decoding(memory_dir):
    data = run_json(["lookup", TEXT, "--memory", str(memory_dir)])
    g = data["layers"][0]["ngrams"][0]
    assert g["heads"] and g["decoded"] is None and g["gate"] is None
    assert data["tokens"][0]["prediction"] is None


def test_ngram_text_is_the_decoded_ngram_in_compressed_form(model_dir):
    result = lookup(open_model(model_dir), "Princess of Wales", layers=[0])
    texts = {(g.position, g.order): (g.tokens, g.text) for g in result.layers[0].ngrams}
    assert texts[(6, 2)] == ([" of", " Wales"], "of wales")
    assert texts[(2, 3)] == (["P", "ri", "n"], "prin")


# --- the logit lens, gates and predictions -----------------------------------------------------

def test_decode_rows_follows_its_definition(model_dir):
    files = open_model(model_dir)
    model = build_model(files, "cpu")
    cfg = model.config
    rows = torch.randn(cfg.engram_n_heads, cfg.engram_head_dim)
    columns = [cfg.engram_n_heads + j for j in range(cfg.engram_n_heads)]  # order 3
    e = torch.zeros(cfg.engram_columns, cfg.engram_head_dim)
    e[columns] = rows
    engram = model.engram(2)
    v = engram.value_proj.weight @ e.flatten() + engram.value_proj.bias
    x = model.norm(v)  # every stream holds v, so their mean is v
    want = torch.softmax(F.linear(x, model.embed_tokens.weight), -1)
    with torch.no_grad():
        got = decode_rows(model, 2, columns, rows)
    torch.testing.assert_close(got, want)


def test_decoded_tokens_change_after_a_row_is_overwritten(model_dir):
    files = open_model(model_dir)
    before = lookup(files, TEXT, layers=[0])
    g = before.layers[0].ngrams[-1]
    rows = np.array([h.row for h in g.heads])
    with files.table(writable=True) as table:
        rng = np.random.default_rng(0)
        new = rng.normal(0, 3.0, (len(rows), table.width(0))).astype(np.float32)
        table.write_raw(0, rows, table.encode(0, new))
        table.flush()
    after = lookup(open_model(model_dir), TEXT, layers=[0])
    h = next(x for x in after.layers[0].ngrams if (x.position, x.order) == (g.position, g.order))
    assert [(t.id, round(t.prob, 4)) for t in h.decoded] != [
        (t.id, round(t.prob, 4)) for t in g.decoded]
    np.testing.assert_allclose([x.norm for x in h.heads], np.linalg.norm(new, axis=1), rtol=1e-5)


def test_gates_and_predictions_are_those_of_the_model_in_context(model_dir):
    files = open_model(model_dir)
    model = build_model(files, "cpu")
    context = "a dog"
    before = files.tokenizer.encode(context)
    raw = files.tokenizer.encode(TEXT)
    ids = torch.tensor([before + raw])
    with torch.no_grad():
        on = model(ids, return_gates=True)
        off = model(ids, memory=False)
    result = lookup(files, TEXT, context=context, model=model, top_k=2)
    for layer in result.layers:
        want = on.gates[layer.layer_id][0, len(before):]
        for g in layer.ngrams:
            torch.testing.assert_close(torch.tensor(g.gate), want[g.position])
    for pos, token in enumerate(result.tokens):
        for out, tops in ((on, token.prediction.memory_on), (off, token.prediction.memory_off)):
            probs = torch.softmax(out.logits[0, len(before) + pos], -1)
            assert [t.id for t in tops] == probs.topk(2).indices.tolist()
    heat = gates(files, TEXT, context=context, model=model)
    for layer in heat.layers:
        want = on.gates[layer.layer_id][0, len(before):]
        torch.testing.assert_close(torch.tensor(layer.gates), want)
        torch.testing.assert_close(torch.tensor(layer.values), want.mean(-1))
    one = gates(files, TEXT, context=context, model=model, branch=1)
    torch.testing.assert_close(torch.tensor(one.layers[0].values),
                               on.gates[0][0, len(before):, 1])


def test_gates_json_and_html(model_dir, tmp_path):
    page = tmp_path / "out" / "gates.html"
    data = run_json(["gates", TEXT, "--model", str(model_dir), "--html", str(page)])
    n = len(data["tokens"])
    assert [len(layer["values"]) for layer in data["layers"]] == [n, n]
    assert all(0 < v < 1 for layer in data["layers"] for v in layer["values"])
    text = page.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and text.count('class="tok"') == 2 * n + 11
    assert [p.name for p in page.parent.iterdir()] == ["gates.html"]  # no temp file left


def test_gates_heatmap_has_a_row_per_layer(model_dir):
    result = CliRunner().invoke(app, ["gates", TEXT, "--model", str(model_dir)])
    assert result.exit_code == 0, result.output
    assert "layer 0" in result.stdout and "layer 2" in result.stdout


# --- rows --------------------------------------------------------------------------------------

def test_rows_shows_place_values_and_what_they_say(model_dir):
    files = open_model(model_dir)
    n = files.hasher.rows_per_layer[2]
    picked = [0, 40, n - 1]
    result = read_rows(files, 2, picked, top_k=3)
    with files.table() as table:
        values = table.read_rows(2, np.array(picked))
    model = build_model(files, "cpu")
    for info, v in zip(result.rows, values, strict=True):
        assert (info.column, info.slot) == files.hasher.locate(2, info.row)
        assert (info.order, info.head) == files.hasher.column_order_head(info.column)
        np.testing.assert_array_equal(info.values, v[:8])
        assert math.isclose(info.norm, float(np.linalg.norm(v)), rel_tol=1e-5)
        with torch.no_grad():
            probs = decode_rows(model, 2, [info.column], v[None])
        assert [t.id for t in info.decoded] == probs.topk(3).indices.tolist()
    full = read_rows(files, 2, [40], full=True)
    assert len(full.rows[0].values) == result.width == files.config.engram_head_dim


def test_rows_of_a_memory_alone_are_not_decoded(memory_dir):
    data = run_json(["rows", "0", "3", "5", "--memory", str(memory_dir)])
    assert data["dtype"] == "float32" and [r["row"] for r in data["rows"]] == [3, 5]
    assert all(r["decoded"] is None for r in data["rows"])


# --- errors ------------------------------------------------------------------------------------

def cli_error(args: list[str]) -> str:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert "Traceback" not in result.output
    return result.stderr


def test_empty_text_is_refused(model_dir, memory_dir):
    assert "empty" in cli_error(["lookup", "", "--model", str(model_dir)])
    assert "empty" in cli_error(["lookup", "", "--memory", str(memory_dir)])
    assert "empty" in cli_error(["gates", "", "--model", str(model_dir)])


def test_a_layer_that_is_not_an_engram_layer_is_refused(model_dir):
    line = cli_error(["lookup", TEXT, "--model", str(model_dir), "--layer", "1"])
    assert "layer 1 is not an Engram layer" in line
    assert "layer 1 is not" in cli_error(["rows", "1", "0", "--model", str(model_dir)])
    assert "layer 5 is not" in cli_error(["gates", TEXT, "--model", str(model_dir),
                                          "--layer", "5"])


def test_a_row_out_of_range_is_refused(model_dir):
    n = open_model(model_dir).hasher.rows_per_layer[0]
    line = cli_error(["rows", "0", str(n), "--model", str(model_dir)])
    assert f"row {n} is out of range" in line
    with pytest.raises(BadInputError) as err:
        read_rows(open_model(model_dir), 0, [n + 5, -1, 3])
    assert len(err.value.problems) == 2


def test_a_missing_model_dir_is_refused(tmp_path):
    assert "no such model directory" in cli_error(["lookup", TEXT, "--model",
                                                   str(tmp_path / "nope")])
    assert "no such memory directory" in cli_error(["lookup", TEXT, "--memory",
                                                    str(tmp_path / "nope")])


def test_a_broken_model_dir_is_refused(model_dir):
    (model_dir / "config.json").write_text("{not json")
    assert "config.json" in cli_error(["lookup", TEXT, "--model", str(model_dir)])


def test_a_truncated_weights_file_is_refused(model_dir):
    weights = model_dir / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 10)
    assert "truncated" in cli_error(["lookup", TEXT, "--model", str(model_dir)])


def test_gates_of_a_memory_alone_are_refused(memory_dir):
    assert "backbone" in cli_error(["gates", TEXT, "--memory", str(memory_dir)])


# --- speed: no torch without a backbone --------------------------------------------------------

def test_lookup_with_only_a_memory_does_not_import_torch(memory_dir):
    code = ("import sys; from commands.main import app; "
            f"app(['lookup', {TEXT!r}, '--memory', {str(memory_dir)!r}, '--json'], "
            "standalone_mode=False); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ},
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["layers"][0]["ngrams"]



# --- the bundled model -------------------------------------------------------------------------

def _prob(tops: list, token_id: int) -> float:
    return next((t.prob for t in tops if t.id == token_id), 0.0)


def test_bundled_model_memory_knows_princess_of_wales():
    """Its rows for "Princess of Wales" decode far from uniform, to the text's own continuation,
    and the memory lifts "ales" after "Princess of W". A missing model fails here, never skips."""
    files = open_model(bundled_model_dir())
    result = lookup(files, "Princess of Wales", top_k=20)
    ids = [t.id for t in result.tokens]
    uniform = 1 / files.config.vocab_size
    ngrams = [(layer.layer_id, g) for layer in result.layers for g in layer.ngrams]
    assert max(g.decoded[0].prob for _, g in ngrams) >= 200 * uniform
    best = max((_prob(g.decoded, ids[g.position + 1]), lid, g.text)
               for lid, g in ngrams if g.position + 1 < len(ids))
    assert best[0] >= 200 * uniform, f"no n-gram's rows name the next token: best {best}"
    w = [t.text for t in result.tokens].index(" W")
    after = result.tokens[w].prediction
    on, off = _prob(after.memory_on, ids[w + 1]), _prob(after.memory_off, ids[w + 1])
    assert on >= 2 * off, f"memory on {on:.3f}, off {off:.3f}"



def test_lookup_lists_the_corpus_ngrams_that_share_each_row():
    from engram_edit.checkpoint import open_model
    from engram_edit.index import default_index_for
    from engram_edit.inspect import lookup
    from engram_edit.paths import bundled_model_dir

    files = open_model(bundled_model_dir())
    index = default_index_for(files)
    assert index is not None  # the bundled model ships its corpus index
    result = lookup(files, "of France", layers=[0], index=index, sharers=3)
    gram = result.layers[0].ngrams[-1]
    assert gram.text == "of france"
    own = tuple(files.tokenizer.compress(files.tokenizer.encode("of France")).tolist())
    for head in gram.heads:
        expected = index.sharers(0, head.row, top_k=3, exclude=[own])
        assert [(s.ngram, s.count) for s in head.sharers] == [tuple(e) for e in expected]
        load = index.slot_load(0, head.row)
        assert (head.slot_ngrams, head.slot_occurrences) == tuple(load)
        assert "of france" not in [s.ngram for s in head.sharers]


def test_lookup_and_rows_on_a_v41_directory_use_its_lens(tmp_path):
    import numpy as np

    from engram_edit.checkpoint import open_model
    from engram_edit.inspect import lookup, read_rows
    from engram_edit.layouts.lens import lens_probs
    from make_layouts import make_v4_dir

    files = open_model(make_v4_dir(tmp_path / "v4"))
    assert files.layout == "v4"
    result = lookup(files, "Princess of Wales", top_k=3)
    layer = result.layers[0]
    gram = layer.ngrams[-1]
    assert gram.gate is None and result.tokens[0].prediction is None  # gates need the network
    rows = files.table().read_rows(layer.layer_id, np.array([h.row for h in gram.heads]))
    probs = lens_probs(files, layer.layer_id, [h.column for h in gram.heads], rows[None])[0]
    assert [t.id for t in gram.decoded] == np.argsort(-probs, kind="stable")[:3].tolist()
    shown = read_rows(files, layer.layer_id, [gram.heads[0].row], top_k=2)
    assert shown.rows[0].decoded is not None and len(shown.rows[0].decoded) == 2
