import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers

from conftest import GOLDEN
from engram_edit.tokenizer import EngramTokenizer, build_compression, compression_normalizer


def test_compression_table_matches_golden(golden_compression):
    tok = EngramTokenizer.from_file(GOLDEN / golden_compression["tokenizer"], use_cache=False)
    assert tok.vocab_size == golden_compression["vocab_size_with_added"]
    assert tok.compressed_vocab_size == golden_compression["compressed_vocab_size"]
    np.testing.assert_array_equal(tok.compression, golden_compression["raw_to_compressed"])


def test_text_to_compressed_ids_matches_golden(golden_compression):
    tok = EngramTokenizer.from_file(GOLDEN / golden_compression["tokenizer"])
    for case in golden_compression["cases"]:
        assert tok.encode(case["text"]) == case["ids"], case["text"]
        assert tok.compress(case["ids"]).tolist() == case["compressed_ids"], case["text"]


def test_cached_table_equals_rebuilt_table(golden_compression):
    path = GOLDEN / golden_compression["tokenizer"]
    first = EngramTokenizer.from_file(path)  # builds and caches
    second = EngramTokenizer.from_file(path)  # reads the cache
    np.testing.assert_array_equal(first.compression, second.compression)
    np.testing.assert_array_equal(second.compression,
                                  build_compression(Tokenizer.from_file(str(path))))


def test_normalizer_keeps_a_lone_space_and_strips_outer_space():
    norm = compression_normalizer()
    assert norm.normalize_str("\n") == " "
    assert norm.normalize_str("  ") == " "
    assert norm.normalize_str("  Café \t x ") == "cafe x"
    assert norm.normalize_str("ﬁ") == "fi"


def test_special_tokens_stay_distinct_after_compression():
    vocab = {"<pad>": 0, "<bos>": 1, "a": 2, "A": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<pad>", "<bos>"])
    table = build_compression(tok)
    assert table.tolist() == [0, 1, 2, 2]  # "a" and "A" merge; the specials do not


def test_missing_tokenizer_file_names_the_file(tmp_path):
    import pytest

    from engram_edit.errors import BadInputError

    with pytest.raises(BadInputError, match="tokenizer.json: file not found"):
        EngramTokenizer.from_file(tmp_path / "tokenizer.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(BadInputError, match="bad.json: not a valid tokenizers file"):
        EngramTokenizer.from_file(bad)
