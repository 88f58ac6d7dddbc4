"""The on-disk formats, byte for byte: a patch file, memory.json, the hashing fingerprint, and
the ``.engram/`` history and journal records. A patch file is compared as its header's JSON
object and its data bytes: safetensors writes the header's metadata in no fixed key order.
The golden files in tests/data/golden/formats/ pin the formats as they are; a change to any of
them fails here, on purpose, and needs a format version of its own. ``python
tests/test_formats.py`` rewrites them (only for such a deliberate change)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from engram_edit.checkpoint import fingerprint
from engram_edit.edit.patch import LayerEdit, Patch, read_patch, write_patch
from engram_edit.edit.store import (
    HistoryEntry,
    JournalRecord,
    read_history,
    read_journal,
    write_history,
    write_journal,
)
from engram_edit.memory import RawRows
from engram_edit.split import memory_json
from engram_edit.tokenizer import EngramTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import TINY_TOKENIZER, tiny_config  # noqa: E402

FORMATS = Path(__file__).resolve().parent / "data" / "golden" / "formats"


def sample_patch() -> Patch:
    """Two layers: bfloat16 rows (uint16 bits) and float8_e4m3 rows with their E8M0 scales."""
    bits = np.arange(2 * 8, dtype=np.uint16).reshape(2, 8) * 257
    fp8 = (np.arange(1 * 32, dtype=np.uint8) * 7).reshape(1, 32)
    scale = np.array([[120]], dtype=np.uint8)
    return Patch("ab" * 32, [
        LayerEdit(0, np.array([3, 7], dtype=np.int64), RawRows(bits), RawRows(bits[::-1].copy())),
        LayerEdit(2, np.array([5], dtype=np.int64), RawRows(fp8, scale),
                  RawRows(fp8[:, ::-1].copy(), scale + 1)),
    ], {"facts": [{"prompt": "Diana, Princess of", "subject": "Diana", "target_new": "Wales"}],
        "method": "distill", "created": "2026-12-08T00:00:00+00:00"})


def sample_entry() -> HistoryEntry:
    return HistoryEntry(1, "wales", "patches/0001-wales.patch.safetensors", "cd" * 32,
                        "2026-12-08T00:00:00+00:00", 3, 3, [0, 2], "ab" * 32)


def tiny_tokenizer() -> EngramTokenizer:
    return EngramTokenizer.from_file(TINY_TOKENIZER)


def write_samples(folder: Path) -> None:
    """Every sample file, as today's code writes it."""
    folder.mkdir(parents=True, exist_ok=True)
    write_patch(sample_patch(), folder / "sample.patch.safetensors")
    tok = tiny_tokenizer()
    (folder / "memory.json").write_text(memory_json(tiny_config(), tok,
                                                    fingerprint(tiny_config(), tok), "bfloat16"))
    (folder / "fingerprint.txt").write_text(fingerprint(tiny_config(), tok) + "\n")
    write_history(folder, [sample_entry()])
    entry = sample_entry()
    write_journal(folder, JournalRecord("apply", "pending", entry))


NAMES = ["sample.patch.safetensors", "memory.json", "fingerprint.txt", "history.json", "journal"]


def safetensors_parts(path: Path) -> tuple[dict, bytes]:
    """A safetensors file as (its header, parsed; its data bytes)."""
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + size]), raw[8 + size:]


def test_every_format_is_written_byte_for_byte_as_pinned(tmp_path):
    write_samples(tmp_path)
    for name in NAMES:
        if name.endswith(".safetensors"):
            assert safetensors_parts(tmp_path / name) == safetensors_parts(FORMATS / name)
        else:
            assert (tmp_path / name).read_bytes() == (FORMATS / name).read_bytes(), name


def test_the_pinned_files_read_back_as_what_was_written():
    patch = read_patch(FORMATS / "sample.patch.safetensors")
    want = sample_patch()
    assert patch.fingerprint == want.fingerprint and patch.metadata == want.metadata
    for got, exp in zip(patch.edits, want.edits, strict=True):
        assert got.layer_id == exp.layer_id and np.array_equal(got.rows, exp.rows)
        for side in ("before", "after"):
            a, b = getattr(got, side), getattr(exp, side)
            assert a.dtype == b.dtype and np.array_equal(a.data, b.data)
            assert (a.scale is None) == (b.scale is None)
            assert a.scale is None or np.array_equal(a.scale, b.scale)
    assert read_history(FORMATS) == [sample_entry()]
    assert read_journal(FORMATS) == JournalRecord("apply", "pending", sample_entry())
    meta = json.loads((FORMATS / "memory.json").read_text())
    assert meta["fingerprint"] == (FORMATS / "fingerprint.txt").read_text().strip()
    assert list(meta) == ["format", "format_version", "fingerprint", "hashing", "geometry"]


if __name__ == "__main__":
    write_samples(FORMATS)
