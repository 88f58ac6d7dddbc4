"""Reading corpus files for the n-gram index: documents one at a time, tokenized batches and
the sortable keys of their n-grams. Building the index (index_build.py), finding corpus text
that ends with given n-grams (``NgramIndex.sample_contexts``) and search's row names all stream
a corpus this way. A document is one JSONL line's ``"text"`` (files ending in .jsonl or
.ndjson), or one paragraph of any other file (text between blank lines, inner line breaks
kept).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engram_edit.errors import BadInputError
from engram_edit.tokenizer import EngramTokenizer

JSONL_SUFFIXES = (".jsonl", ".ndjson")
BATCH_CHARS = 4 << 20  # characters of text tokenized per batch


def read_documents(path: Path, digest: Any) -> Iterator[tuple[str, int]]:
    """(document, bytes read so far) of one corpus file; ``digest`` sees every byte."""
    jsonl = path.suffix.lower() in JSONL_SUFFIXES
    done, paragraph = 0, []
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            digest.update(raw)
            done += len(raw)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise BadInputError(f"{path}:{number}: not UTF-8 text") from None
            if jsonl:
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    text = None
                if not isinstance(text, str):
                    raise BadInputError(f"{path}:{number}: not a JSON object with a string "
                                        f"'text'")
                yield text, done
            elif line.strip():
                paragraph.append(line)
            elif paragraph:
                yield "".join(paragraph).rstrip("\r\n"), done
                paragraph = []
    if paragraph:
        yield "".join(paragraph).rstrip("\r\n"), done


def check_sources(paths: Sequence[Path]) -> list[Path]:
    """The corpus files as paths; BadInputError when none is given or any is missing."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise BadInputError("no corpus files given")
    problems = [f"{p}: no such file" for p in paths if not p.is_file()]
    if problems:
        raise BadInputError(problems)
    return paths


# --- n-grams of tokenized documents -------------------------------------------------------------

def ngram_keys(columns: Sequence[np.ndarray], vocab: int) -> np.ndarray:
    """One sortable key per n-gram given as id columns (oldest first); sorting the keys sorts
    the n-grams lexicographically. An int64 ``sum(id_j * vocab**(n-1-j))`` when that fits, else
    the big-endian int64 ids viewed as one opaque value (compared bytewise, so in the same
    order)."""
    if vocab ** len(columns) <= np.iinfo(np.int64).max:
        keys = np.asarray(columns[0], np.int64)
        for col in columns[1:]:
            keys = keys * vocab + col
        return keys
    rows = np.ascontiguousarray(np.stack(columns, axis=1).astype(">i8"))
    return rows.view(np.dtype((np.void, 8 * len(columns)))).reshape(-1)


@dataclass
class TokenBatch:
    """Documents tokenized together: raw and compressed ids, concatenated."""

    raw: np.ndarray  # int64 [T]
    ids: np.ndarray  # compressed, int64 [T]
    position: np.ndarray  # index of each token within its document, [T]

    @classmethod
    def encode(cls, texts: list[str], tokenizer: EngramTokenizer) -> TokenBatch:
        encodings = tokenizer.tokenizer.encode_batch(texts, add_special_tokens=False)
        lengths = np.array([len(e.ids) for e in encodings], np.int64)
        raw = np.concatenate([np.asarray(e.ids, np.int64) for e in encodings] +
                             [np.zeros(0, np.int64)])
        starts = np.cumsum(lengths) - lengths
        return cls(raw, tokenizer.compression[raw], np.arange(len(raw)) - np.repeat(starts,
                                                                                    lengths))

    def ngrams(self, order: int, vocab: int) -> tuple[np.ndarray, np.ndarray]:
        """(last token's index, ``ngram_keys``) of every n-gram of ``order`` inside a document."""
        ends = np.flatnonzero(self.position >= order - 1)
        return ends, ngram_keys([self.ids[ends - (order - 1) + j] for j in range(order)], vocab)


def document_batches(paths: Sequence[Path], digests: list[Any] | None = None,
                     chars_per_batch: int = BATCH_CHARS) -> Iterator[tuple[list[str], int]]:
    """Documents of the files in batches of about ``chars_per_batch`` characters, with the
    bytes of all files read so far; ``digests`` gets one sha256 per file, fed every byte."""
    done_before = 0
    for path in paths:
        digest = hashlib.sha256()
        if digests is not None:
            digests.append(digest)
        batch: list[str] = []
        chars = 0
        for text, done in read_documents(path, digest):
            batch.append(text)
            chars += len(text)
            if chars >= chars_per_batch:
                yield batch, done_before + done
                batch, chars = [], 0
        done_before += path.stat().st_size
        yield batch, done_before
