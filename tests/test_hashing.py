import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import GOLDEN
from engram_edit.config import EngramConfig
from engram_edit.hashing import NgramHasher, explain, model_primes
from engram_edit.tokenizer import EngramTokenizer


def _config(c: dict, **extra) -> EngramConfig:
    """Our config from a golden case (hashing.json uses the reference's key names)."""
    c = {"engram_max_ngram_size": c.get("max_ngram_size"), "engram_n_heads":
         c.get("n_head_per_ngram"), "engram_seed": c.get("seed"), **c}
    return EngramConfig(num_hidden_layers=max(c["engram_layer_ids"]) + 1, vocab_size=200_000,
                        engram_layer_ids=c["engram_layer_ids"],
                        engram_max_ngram_size=c["engram_max_ngram_size"],
                        engram_n_heads=c["engram_n_heads"],
                        engram_vocab_size=c["engram_vocab_size"],
                        engram_seed=c["engram_seed"], **extra)


def _cases(golden_hashing):
    for case in golden_hashing["cases"]:
        c = case["config"]
        yield case, NgramHasher(_config(c), c["compressed_vocab_size"], c["pad_id_compressed"])


def test_multipliers_and_primes_match_golden(golden_hashing):
    for case, hasher in _cases(golden_hashing):
        for layer, mult in case["multipliers"].items():
            assert hasher.multipliers[int(layer)].tolist() == mult, case["name"]
            assert (hasher.multipliers[int(layer)] % 2 == 1).all()
        for layer, primes in case["primes"].items():
            assert hasher.primes[int(layer)].tolist() == primes, case["name"]


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_slots_and_global_rows_match_golden(golden_hashing, backend):
    for case, hasher in _cases(golden_hashing):
        ids = np.array(case["compressed_ids"], dtype=np.int64)
        if backend == "torch":
            ids = torch.from_numpy(ids)
        slots, rows = hasher.slots(ids), hasher.rows(ids)
        for layer in case["slots"]:
            assert slots[int(layer)].tolist() == case["slots"][layer], case["name"]
            assert rows[int(layer)].tolist() == case["global_rows"][layer], case["name"]


def test_text_to_slots_end_to_end_matches_golden(golden_compression):
    tok = EngramTokenizer.from_file(GOLDEN / golden_compression["tokenizer"])
    c = golden_compression["config"]
    config = _config(c, engram_pad_token_id=c["engram_pad_token_id"])
    hasher = NgramHasher.for_tokenizer(config, tok)
    for case in golden_compression["cases"]:
        cids = tok.compress(tok.encode(case["text"]))
        slots, rows = hasher.slots(cids), hasher.rows(cids)
        for layer in case["slots"]:
            assert slots[int(layer)].tolist() == case["slots"][layer], case["text"]
            assert rows[int(layer)].tolist() == case["global_rows"][layer], case["text"]


def test_v41_geometry_gives_its_published_row_counts():
    config = EngramConfig(num_hidden_layers=43, vocab_size=129_280, engram_layer_ids=[1, 14],
                          engram_max_ngram_size=4, engram_n_heads=8, engram_head_dim=256,
                          engram_vocab_size=16_000_000)
    primes = model_primes(config)
    assert int(primes[1].sum()) == 384_006_168
    assert int(primes[14].sum()) == 384_016_682
    every = np.concatenate(list(primes.values()))
    assert len(set(every.tolist())) == len(every)  # one shared "seen" set: no prime twice


def test_locate_inverts_column_offsets(golden_hashing):
    case, hasher = next(_cases(golden_hashing))
    for layer in hasher.layer_ids:
        rows = hasher.rows(np.array(case["compressed_ids"]))[layer]
        slots = hasher.slots(np.array(case["compressed_ids"]))[layer]
        for col in range(hasher.columns):
            assert hasher.locate(layer, int(rows[0, 5, col])) == (col, int(slots[0, 5, col]))


def test_explain_lists_each_ngram_with_its_rows(golden_compression):
    tok = EngramTokenizer.from_file(GOLDEN / golden_compression["tokenizer"])
    c = golden_compression["config"]
    config = _config(c, engram_pad_token_id=c["engram_pad_token_id"])
    hasher = NgramHasher.for_tokenizer(config, tok)
    case = golden_compression["cases"][0]
    result = explain(case["text"], tok, hasher, config.engram_pad_token_id)
    assert result.raw_ids == case["ids"]
    last = [g for g in result.ngrams if g.layer_id == 2 and g.position == 6 and g.order == 3][0]
    assert "".join(last.tokens) == tok.decode(case["ids"][4:7])
    assert last.rows == case["global_rows"]["2"][6][4:8]
    first = [g for g in result.ngrams if g.position == 0 and g.order == 2][0]
    assert first.padded and first.raw_ids[0] == config.engram_pad_token_id


geometries = st.fixed_dictionaries({
    "layers": st.lists(st.integers(0, 5), min_size=1, max_size=3, unique=True),
    "max_ngram": st.integers(2, 5),
    "heads": st.integers(1, 4),
    "size": st.integers(2, 5000),
    "vc": st.integers(2, 200_000),
    "seed": st.integers(0, 2**31),
    "shape": st.tuples(st.integers(1, 3), st.integers(1, 9)),
})


@settings(max_examples=60, deadline=None)
@given(g=geometries, data=st.data())
def test_torch_hash_equals_numpy_hash(g, data):
    config = EngramConfig(num_hidden_layers=6, engram_layer_ids=g["layers"],
                          engram_max_ngram_size=g["max_ngram"], engram_n_heads=g["heads"],
                          engram_vocab_size=g["size"], engram_seed=g["seed"])
    pad = data.draw(st.integers(0, g["vc"] - 1))
    hasher = NgramHasher(config, g["vc"], pad)
    flat = data.draw(st.lists(st.integers(0, g["vc"] - 1), min_size=g["shape"][0] * g["shape"][1],
                              max_size=g["shape"][0] * g["shape"][1]))
    ids = np.array(flat, dtype=np.int64).reshape(g["shape"])
    by_numpy = hasher.rows(ids)
    by_torch = hasher.rows(torch.from_numpy(ids))
    for layer in g["layers"]:
        assert by_torch[layer].dtype == torch.int64
        np.testing.assert_array_equal(by_torch[layer].numpy(), by_numpy[layer])
        assert (by_numpy[layer] >= 0).all()
        assert (by_numpy[layer] < hasher.rows_per_layer[layer]).all()
