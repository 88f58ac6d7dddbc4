"""N-gram index and row search: the index agrees with direct hashing, the file is as specified,
mismatches are refused, and search finds a row overwritten to point at a token."""

import json
import os
import subprocess
import sys
from collections import Counter, defaultdict

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from typer.testing import CliRunner

from commands.main import app
from conftest import make_tiny_model
from engram_edit.checkpoint import load_model, open_model
from engram_edit.errors import BadInputError, MismatchError
from engram_edit.index import (
    INDEX_FILE,
    NgramIndex,
    bundled_index_file,
    default_index_for,
)
from engram_edit.index_build import _OrderCounter, build_index
from engram_edit.index_corpus import ngram_keys
from engram_edit.paths import bundled_model_dir
from engram_edit.search import RowSearch, search_rows
from engram_edit.tensorfile import read_header

WORDS = ("the cat sat on a mat while Sri Lanka is an island of tea and the dog ran to "
         "Paris in spring").split()


def corpus_texts(n: int = 40, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(3, 12))) for _ in range(n)]


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


@pytest.fixture
def model_dir(tmp_path):
    path = tmp_path / "model"
    make_tiny_model(path)
    return path


@pytest.fixture
def indexed(model_dir, tmp_path):
    texts = corpus_texts()
    corpus = write_jsonl(tmp_path / "corpus.jsonl", texts)
    files = open_model(model_dir)
    build_index([corpus], files, tmp_path / INDEX_FILE)
    return files, NgramIndex.open(tmp_path / INDEX_FILE, files), texts


def direct_slots(files, texts):
    """(layer, row) -> Counter of the compressed n-grams that read it, hashing each text whole."""
    hasher, tok = files.hasher, files.tokenizer
    found = defaultdict(Counter)
    for text in texts:
        ids = tok.compress(tok.encode(text))
        rows = hasher.rows(ids[None, :])
        for lid in hasher.layer_ids:
            for t in range(len(ids)):
                for order in range(2, hasher.max_ngram + 1):
                    if t - order + 1 < 0:  # reaches before the document: not indexed
                        continue
                    gram = tuple(ids[t - order + 1:t + 1].tolist())
                    for head in range(hasher.n_heads):
                        row = int(rows[lid][0, t, hasher.column(order, head)])
                        found[(lid, row)][gram] += 1
    return found


def test_collisions_found_by_the_index_equal_those_found_by_hashing_directly(indexed):
    files, index, texts = indexed
    expected = direct_slots(files, texts)
    assert any(len(grams) > 1 for grams in expected.values()), "the corpus should collide"
    for (lid, row), grams in expected.items():
        want = Counter((index.ngram_text(g), c) for g, c in grams.items())
        assert Counter(index.sharers(lid, row)) == want
        assert tuple(index.slot_load(lid, row)) == (len(grams), sum(grams.values()))
    for lid in files.hasher.layer_ids:
        ngrams, occurrences = index.slot_loads(lid)
        rows = [r for (layer, r) in expected if layer == lid]
        assert set(np.flatnonzero(ngrams).tolist()) == set(rows)
        for r in rows:
            assert occurrences[r] == sum(expected[(lid, r)].values())


def test_sharers_are_most_frequent_first_and_can_leave_one_out(indexed):
    files, index, _ = indexed
    for (lid, row), grams in direct_slots(files, corpus_texts()).items():
        counts = [s.count for s in index.sharers(lid, row)]
        assert counts == sorted(counts, reverse=True)
        top = max(grams, key=lambda g: (grams[g], [-i for i in g]))
        left = index.sharers(lid, row, exclude=[top])
        assert len(left) == len(grams) - 1
        assert index.sharers(lid, row, top_k=1) == index.sharers(lid, row)[:1]


def test_members_of_many_rows_equal_a_direct_hashing(indexed):
    files, index, _ = indexed
    expected = direct_slots(files, corpus_texts())
    for lid in files.hasher.layer_ids:
        rows = [r for (layer, r) in expected if layer == lid]
        empty = [r for r in (0, files.hasher.rows_per_layer[lid] - 1) if (lid, r) not in expected]
        found = index.members_of(lid, rows + empty)
        assert set(found) == set(rows + empty)
        for r in rows:
            assert dict(found[r]) == dict(expected[(lid, r)])
            counts = [c for _, c in found[r]]
            assert counts == sorted(counts, reverse=True)
        assert all(found[r] == [] for r in empty)


def test_ngram_count_equals_a_direct_count(indexed):
    files, index, texts = indexed
    tok = files.tokenizer
    direct = Counter()
    for text in texts:
        ids = tok.compress(tok.encode(text)).tolist()
        for n in (2, 3):
            direct.update(tuple(ids[i:i + n]) for i in range(len(ids) - n + 1))
    for gram, count in direct.items():
        assert index.ngram_count(gram) == count
    assert index.ngram_count((1, 1, 1)) == 0
    assert index.ngram_count(" the cat") == direct[index.ngram_ids(" the cat")] > 0


def test_min_count_drops_rare_ngrams_but_totals_count_them_all(model_dir, tmp_path):
    files = open_model(model_dir)
    corpus = write_jsonl(tmp_path / "c.jsonl", corpus_texts())
    full = build_index([corpus], files, tmp_path / "all.safetensors").info
    cut = build_index([corpus], files, tmp_path / "cut.safetensors", min_count=3).info
    assert cut.occurrences == full.occurrences and cut.distinct == full.distinct
    index = NgramIndex.open(tmp_path / "cut.safetensors", files)
    for n in cut.orders:
        assert 0 < cut.kept[n] < full.kept[n]
        assert np.asarray(index.counts[n]).min() >= 3


def test_file_is_sorted_packed_and_described_as_the_spec_says(indexed, tmp_path):
    files, index, texts = indexed
    header = read_header(tmp_path / INDEX_FILE)
    meta = header.metadata
    assert meta["format"] == "engram-ngram-index" and meta["version"] == "1"
    assert meta["compression_sha256"] == files.tokenizer.compression_sha256
    assert json.loads(meta["orders"]) == [2, 3] and meta["min_count"] == "1"
    assert int(meta["documents"]) == len(texts)
    assert int(meta["tokens"]) == sum(len(files.tokenizer.encode(t)) for t in texts)
    assert sorted(header.tensors) == ["order.2.counts", "order.2.ngrams", "order.3.counts",
                                      "order.3.ngrams", "tokens.spelling"]
    assert header.tensors["order.3.ngrams"].dtype == "U16"  # 424 compressed ids
    assert header.tensors["order.3.counts"].dtype == "U8"
    assert header.tensors["tokens.spelling"].shape == (files.tokenizer.compressed_vocab_size,)
    for n in (2, 3):
        grams = np.asarray(index.grams[n], np.int64)
        keys = [tuple(g) for g in grams.tolist()]
        assert keys == sorted(set(keys)), "n-grams must be strictly increasing"
        assert isinstance(index.grams[n], np.memmap)  # opened by offset, not read whole


def test_the_same_corpus_gives_the_same_bytes(model_dir, tmp_path):
    files = open_model(model_dir)
    corpus = write_jsonl(tmp_path / "c.jsonl", corpus_texts())
    build_index([corpus], files, tmp_path / "a.safetensors")
    build_index([corpus], files, tmp_path / "b.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert set(load_file(str(tmp_path / "a.safetensors"))) == set(read_header(
        tmp_path / "a.safetensors").tensors)


def test_counts_agree_whether_ngram_keys_fit_in_int64_or_not():
    rng = np.random.default_rng(1)
    small, large = _OrderCounter(3, 50), _OrderCounter(3, 2**22)  # 2**66 keys: no int64
    for _ in range(3):
        cols = [rng.integers(0, 50, 200) for _ in range(3)]
        assert ngram_keys(cols, 50).dtype == np.int64 and ngram_keys(cols, 2**22).dtype.kind == "V"
        small.add(ngram_keys(cols, 50))
        large.add(ngram_keys(cols, 2**22))
    g1, c1 = small.result()
    g2, c2 = large.result()
    assert np.array_equal(g1, g2) and np.array_equal(c1, c2) and c1.sum() == 600
    assert [tuple(g) for g in g1.tolist()] == sorted(tuple(g) for g in g1.tolist())


def test_plain_text_paragraphs_are_documents_and_ngrams_stay_inside_them(model_dir, tmp_path):
    files = open_model(model_dir)
    plain = tmp_path / "notes.txt"
    plain.write_text("the cat\nsat\n\n\nthe dog\n", encoding="utf-8")
    info = build_index([plain], files, tmp_path / "i.safetensors").info
    assert info.documents == 2
    index = NgramIndex.open(tmp_path / "i.safetensors", files)
    tok = files.tokenizer
    across = tok.compress(tok.encode("sat\nthe")).tolist()[-2:]
    assert index.ngram_count(across) == 0
    assert index.ngram_count(tok.compress(tok.encode("cat\nsat")).tolist()[-2:]) == 1


def test_every_missing_corpus_file_is_named(model_dir, tmp_path):
    with pytest.raises(BadInputError) as err:
        build_index([tmp_path / "a.jsonl", tmp_path / "b.txt"], open_model(model_dir),
                    tmp_path / "i.safetensors")
    assert len(err.value.problems) == 2 and "a.jsonl" in err.value.problems[0]
    assert not (tmp_path / "i.safetensors").exists()


def test_a_bad_jsonl_line_is_named(model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"title": "no text"}\n')
    with pytest.raises(BadInputError, match=r"bad.jsonl:2: not a JSON object"):
        build_index([bad], open_model(model_dir), tmp_path / "i.safetensors")


def test_an_index_of_another_tokenizer_is_refused(indexed, tmp_path):
    files, _, _ = indexed
    path = tmp_path / INDEX_FILE
    meta = read_header(path).metadata
    save_file(load_file(str(path)), str(tmp_path / "other.safetensors"),
              metadata={**meta, "compression_sha256": "0" * 64})
    with pytest.raises(MismatchError, match="another tokenizer"):
        NgramIndex.open(tmp_path / "other.safetensors", files)


def test_a_model_file_is_not_an_index(model_dir):
    with pytest.raises(BadInputError, match="not an n-gram index"):
        NgramIndex.open(model_dir / "model.safetensors", open_model(model_dir))


def test_the_model_s_own_index_is_found_and_no_index_is_none(model_dir, tmp_path):
    files = open_model(model_dir)
    assert default_index_for(files) is None  # the bundled index is for another tokenizer
    corpus = write_jsonl(tmp_path / "c.jsonl", corpus_texts())
    build_index([corpus], files, model_dir / ".engram" / INDEX_FILE)
    found = default_index_for(files)
    assert found is not None and found.path == model_dir / ".engram" / INDEX_FILE


def test_an_index_for_a_memory_alone_imports_neither_torch_nor_faiss(model_dir, tmp_path):
    from engram_edit.split import split_model

    split_model(model_dir, tmp_path / "backbone", tmp_path / "memory")
    corpus = write_jsonl(tmp_path / "c.jsonl", corpus_texts())
    code = ("import sys; from engram_edit.checkpoint import open_memory; "
            "from engram_edit.index import NgramIndex; "
            "from engram_edit.index_build import build_index; "
            "m = open_memory(sys.argv[1]); build_index([sys.argv[2]], m, sys.argv[3]); "
            "ix = NgramIndex.open(sys.argv[3], m); ix.sharers(0, 5); ix.slot_load(0, 5); "
            "assert 'torch' not in sys.modules and 'faiss' not in sys.modules, 'imported'")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "memory"), str(corpus),
                    str(tmp_path / "i.safetensors")], check=True, env={**os.environ})


@pytest.mark.skipif(not (bundled_model_dir() / "config.json").is_file()
                    or not bundled_index_file().is_file(),
                    reason="the bundled model or its index is not installed")
def test_the_bundled_index_goes_with_the_bundled_model():
    files = open_model(bundled_model_dir())
    index = default_index_for(files)
    assert index is not None and index.path == bundled_index_file()
    assert (index.info.documents, index.info.min_count) == (125_357 + 302_400, 3)  # plain + facts
    gram = index.ngram_ids("the Ottoman")
    assert index.ngram_count(gram) >= 3
    for lid in files.config.engram_layer_ids:
        for row in index.rows_of(lid, gram):
            assert "the ottoman" in [s.text for s in index.sharers(lid, row)]


def test_sample_contexts_end_with_the_ngram(indexed):
    files, index, _ = indexed
    counts = np.asarray(index.counts[3])
    gram = tuple(np.asarray(index.grams[3][int(counts.argmax())]).tolist())
    assert counts.max() >= 2
    contexts = index.sample_contexts([gram], per_ngram=2, context_tokens=4)
    assert len(contexts[gram]) == 2
    tok = files.tokenizer
    for text in contexts[gram]:
        assert tuple(tok.compress(tok.encode(text)).tolist()[-len(gram):]) == gram


# --- row search ---------------------------------------------------------------------------------

def decoded_top(model, layer_id, column, row):
    """Top token of the logit lens of one row alone (as inspect.decode_rows reads a row)."""
    cfg = model.config
    e = torch.zeros(cfg.engram_columns, cfg.engram_head_dim)
    e[column] = torch.as_tensor(row)
    v = model.engram_value(layer_id, e.flatten())
    streams = v.expand(cfg.hc_mult, v.shape[-1])[None, None]
    return int(model.readout_logits(streams)[0, 0].argmax())


def test_search_returns_a_row_overwritten_to_point_at_the_token(model_dir):
    files, model = load_model(model_dir, device="cpu")
    layer_id, column, slot = 2, 1, 5
    row = int(files.hasher.offsets[layer_id][column]) + slot
    probe = RowSearch.build(model, scale=1.0)
    with torch.no_grad():
        for token in range(10, files.tokenizer.vocab_size):  # a token one row can say
            direction = probe.queries(layer_id, token)[column]
            vector = torch.as_tensor(50 * direction / np.linalg.norm(direction))
            if decoded_top(model, layer_id, column, vector) == token:
                break
        else:
            pytest.fail("no token can be pointed at by one row")
        model.engram(layer_id).embed.weight[row] = vector
        searcher = RowSearch.build(model, scale=1.0, tokenizer=files.tokenizer)
    hits = searcher.search(token, top_k=3)
    assert (hits[0].layer_id, hits[0].row, hits[0].slot) == (layer_id, row, slot)
    assert (hits[0].column, hits[0].order, hits[0].head) == (column, 2, 1)
    assert hits[0].top_tokens[0].id == token == decoded_top(model, layer_id, column, vector)
    assert hits[0].top_tokens[0].token == files.tokenizer.token_text(token)
    assert hits[0].score > hits[1].score


def test_search_equals_brute_force_over_every_row(model_dir):
    files, model = load_model(model_dir, device="cpu")
    searcher = RowSearch.build(model, scale=1.0)
    token = 273
    scored = []
    h = files.hasher
    for lid in h.layer_ids:
        for c, (a, p) in enumerate(zip(h.offsets[lid], h.primes[lid], strict=True)):
            for r in range(a, a + p):
                scored.append((float(searcher.push(lid, r, c)[token]), lid, r))
    scored.sort(reverse=True)
    hits = searcher.search(token, top_k=5)
    assert [(h.layer_id, h.row) for h in hits] == [(lid, r) for _, lid, r in scored[:5]]
    np.testing.assert_allclose([h.score for h in hits], [s for s, _, _ in scored[:5]],
                               rtol=1e-4, atol=1e-6)
    only = searcher.search(token, top_k=5, layers=[0])
    assert {h.layer_id for h in only} == {0}


def test_search_rows_names_the_ngrams_of_each_row(indexed, model_dir):
    files, index, _ = indexed
    _, model = load_model(model_dir, device="cpu")
    result = search_rows(files, model, " the cat", top_k=4, index=index)
    assert result.token == " the" and result.query_tokens == [" the", " c", "at"]
    assert result.scale > 0 and len(result.hits) == 4
    for hit in result.hits:
        assert hit.sharers == index.sharers(hit.layer_id, hit.row, top_k=3)
        assert hit.load == index.slot_load(hit.layer_id, hit.row)
    effects = [g.effect for g in result.ngrams]
    assert len(result.ngrams) == 4 and effects == sorted(effects, reverse=True)
    searcher = RowSearch.build(model, tokenizer=files.tokenizer)
    assert searcher.scale == pytest.approx(result.scale)
    for g in result.ngrams:
        assert g.rows == index.rows_of(g.layer_id, g.ids)
        assert g.count == index.ngram_count(g.ids)
        assert g.push == pytest.approx(sum(
            searcher.push(g.layer_id, row, col)[result.token_id]
            for row, col in zip(g.rows, range((len(g.ids) - 2) * 2, (len(g.ids) - 1) * 2),
                                strict=True)), rel=1e-4)
        for row in g.rows:
            assert tuple(g.ids) in dict(index.members(g.layer_id, row))
        raw = torch.tensor([index.spelling[g.ids].tolist()])
        with torch.no_grad():
            on, off = (torch.softmax(model(raw, memory=m).logits[0, -1], -1)[result.token_id]
                       for m in (True, False))
        assert g.prob == pytest.approx(float(on), abs=1e-6)
        assert g.effect == pytest.approx(float(on - off), abs=1e-6)
    with pytest.raises(BadInputError, match="not an Engram layer"):
        search_rows(files, model, " the", layers=[1])


# --- CLI ----------------------------------------------------------------------------------------

def test_cli_index_then_search_print_json_only(model_dir, tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", corpus_texts())
    runner = CliRunner()
    built = runner.invoke(app, ["index", str(corpus), "--model", str(model_dir), "--json"])
    assert built.exit_code == 0, built.output
    report = json.loads(built.stdout)
    assert report["info"]["path"] == str(model_dir / ".engram" / INDEX_FILE)
    assert [x["layer_id"] for x in report["layers"]] == [0, 2]
    found = runner.invoke(app, ["search", " the", "--model", str(model_dir), "--top", "2",
                                "--json"])
    assert found.exit_code == 0, found.output
    result = json.loads(found.stdout)
    assert result["token"] == " the" and len(result["hits"]) == 2
    assert set(result["hits"][0]["load"]) == {"ngrams", "occurrences"}
    assert all(set(s) == {"text", "count"} for h in result["hits"] for s in h["sharers"])


def test_cli_bad_input_exits_2_with_one_line_per_problem(model_dir, tmp_path):
    runner = CliRunner()
    missing = runner.invoke(app, ["index", str(tmp_path / "nope.jsonl"), "--model",
                                  str(model_dir)])
    assert missing.exit_code == 2 and "nope.jsonl: no such file" in missing.stderr
    layer = runner.invoke(app, ["search", " the", "--model", str(model_dir), "--layer", "1"])
    assert layer.exit_code == 2 and "layer 1 is not an Engram layer" in layer.stderr
