"""Applying and undoing patches: exact undo, refusals that change nothing, crash recovery, lock."""

import hashlib
import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import GOLDEN
from engram_edit import dtypes, memory, paths, split
from engram_edit.checkpoint import open_model, scale_name, table_name, with_derived
from engram_edit.config import EngramConfig
from engram_edit.edit import journal
from engram_edit.edit.journal import apply_patch, recover, undo_patch, verify
from engram_edit.edit.patch import LayerEdit, Patch, read_patch, write_patch
from engram_edit.edit.store import hold_lock, patch_name
from engram_edit.edit.target import open_writable, reset, writable_model
from engram_edit.errors import BadInputError, LockHeldError, MismatchError, PatchConflictError
from engram_edit.hashing import NgramHasher
from engram_edit.paths import ModelChoice
from engram_edit.tokenizer import EngramTokenizer

TOKENIZER = GOLDEN / "tiny_tokenizer.json"
DTYPE_CODES = {"bfloat16": "BF16", "float8_e4m3": "F8_E4M3"}


# --- a tiny model directory, written without model code -----------------------------------------

def write_safetensors(path, tensors: dict[str, tuple[str, np.ndarray]]) -> None:
    """The safetensors layout by hand: u64 header length, JSON header padded to 8, the bytes."""
    header: dict = {"__metadata__": {"format": "pt"}}
    blobs, offset = [], 0
    for name in sorted(tensors):
        code, array = tensors[name]
        blob = np.ascontiguousarray(array).tobytes()
        header[name] = {"dtype": code, "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def make_model(path, dtype="bfloat16", seed=0):
    """config.json, tokenizer.json and model.safetensors with random rows in ``dtype``."""
    tok = EngramTokenizer.from_file(TOKENIZER)
    config = with_derived(EngramConfig(
        vocab_size=512, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
        intermediate_size=32, engram_layer_ids=[0, 2], engram_max_ngram_size=3,
        engram_n_heads=2, engram_head_dim=32, engram_vocab_size=[40, 50]), tok)
    hasher = NgramHasher.for_tokenizer(config, tok)
    rng = np.random.default_rng(seed)
    tensors = {"norm.weight": ("F32", rng.standard_normal(16).astype(np.float32))}
    for i in config.engram_layer_ids:
        values = rng.standard_normal((hasher.rows_per_layer[i], 32)).astype(np.float32)
        data, scale = dtypes.encode(dtype, values)
        tensors[table_name(i)] = (DTYPE_CODES[dtype], data)
        if scale is not None:
            tensors[scale_name(i)] = ("F8_E8M0", scale)
    path.mkdir(parents=True)
    (path / "config.json").write_text(config.to_json())
    (path / "tokenizer.json").write_bytes(TOKENIZER.read_bytes())
    write_safetensors(path / "model.safetensors", tensors)
    return path


def make_patch(files, rows: dict[int, list[int]], seed=1) -> Patch:
    """New random rows at ``rows`` (layer -> row ids), before-rows read from the table."""
    rng = np.random.default_rng(seed)
    edits = []
    with files.table() as table:
        for layer, ids in sorted(rows.items()):
            ids = np.array(sorted(ids), dtype=np.int64)
            after = table.encode(layer, rng.standard_normal((len(ids), 32)).astype(np.float32))
            edits.append(LayerEdit(layer, ids, table.read_raw(layer, ids), after))
    return Patch(files.fingerprint(), edits, {"method": "test"})


def digests(path) -> dict[str, str]:
    """sha256 of every file under ``path`` outside .engram/."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file() and ".engram" not in p.parts}


def rows_now(files, patch: Patch) -> list:
    with files.table() as table:
        return [table.read_raw(e.layer_id, e.rows) for e in patch.edits]


def holds(files, patch: Patch, side: str) -> bool:
    return all(now.equals(getattr(e, side)) for now, e in zip(rows_now(files, patch),
                                                              patch.edits, strict=True))


@pytest.fixture(params=["bfloat16", "float8_e4m3"])
def model(request, tmp_path):
    return make_model(tmp_path / "model", request.param)


SPREAD = {0: [3, 10, 40], 2: [0, 7, 99]}  # no two rows adjacent: one pwrite per row and tensor


# --- apply and undo ------------------------------------------------------------------------------

def test_apply_then_undo_is_byte_identical_in_every_file(model):
    files = open_model(model)
    before = digests(model)
    patch = make_patch(files, SPREAD)
    report = apply_patch(files, patch, "fix-wales")
    assert holds(files, patch, "after")
    assert digests(model).keys() == before.keys()
    assert {k for k in before if digests(model)[k] != before[k]} == {"model.safetensors"}
    assert report.entry.label == "0001-fix-wales" and report.entry.rows == 6
    assert report.copy == model / ".engram/patches/0001-fix-wales.patch.safetensors"
    assert read_patch(report.copy).edits[1].after.equals(patch.edits[1].after)
    undone = undo_patch(files)
    assert undone.entry.seq == 1 and undone.entry.undone_at is not None
    assert digests(model) == before
    assert sorted(p.name for p in (model / ".engram").iterdir()) == [
        "history.json", "lock", "patches"]


def test_history_keeps_undone_entries_and_never_reuses_a_seq(model):
    files = open_model(model)
    a = make_patch(files, {0: [1, 2]})
    apply_patch(files, a, "a")
    undo_patch(files, "a")
    apply_patch(files, a, "a")
    entries = journal.history(files)
    assert [(e.seq, e.name, e.applied) for e in entries] == [(1, "a", False), (2, "a", True)]
    assert entries[1].file == "patches/0002-a.patch.safetensors"
    assert entries[1].fingerprint == files.fingerprint() and entries[1].layers == [0]
    saved = json.loads((model / ".engram/history.json").read_text())
    assert saved["format"] == "engram-history" and saved["format_version"] == 1
    assert hashlib.sha256((model / ".engram" / entries[1].file).read_bytes()).hexdigest() == \
        entries[1].sha256


def test_undo_finds_a_patch_by_seq_name_label_or_file(model, tmp_path):
    files = open_model(model)
    a = make_patch(files, {0: [1]})
    apply_patch(files, a, "a")
    b = make_patch(files, {2: [5]}, seed=2)
    apply_patch(files, b, "b")
    c = make_patch(files, {0: [9]}, seed=3)
    apply_patch(files, c, "c")
    assert undo_patch(files, "0002-b").entry.seq == 2
    assert undo_patch(files, "1").entry.seq == 1
    path = write_patch(c, tmp_path / "c.patch.safetensors")
    assert undo_patch(files, str(path)).entry.seq == 3


# --- refusals ------------------------------------------------------------------------------------

def test_apply_refuses_rows_that_differ_from_before_and_changes_nothing(model):
    files = open_model(model)
    first = make_patch(files, {0: [3, 10], 2: [7]})
    stale = make_patch(files, SPREAD, seed=5)  # made before `first` was applied
    apply_patch(files, first, "first")
    state = digests(model)
    history = (model / ".engram/history.json").read_bytes()
    with pytest.raises(PatchConflictError) as err:
        apply_patch(files, stale, "stale")
    assert err.value.problems == ["stale: 3 of 6 rows differ from the patch's before-rows "
                                  "(layer 0: rows 3, 10; layer 2: rows 7); nothing was changed"]
    assert digests(model) == state
    assert (model / ".engram/history.json").read_bytes() == history
    assert len(list((model / ".engram/patches").iterdir())) == 1


def test_applying_twice_says_the_after_rows_are_in_place(model):
    files = open_model(model)
    patch = make_patch(files, {0: [1]})
    apply_patch(files, patch, "once")
    with pytest.raises(PatchConflictError, match="after-rows are in place"):
        apply_patch(files, patch, "once")


def test_rejected_runs_create_nothing_in_the_model_dir(model):
    files = open_model(model)
    patch = make_patch(files, {0: [1, 2]})
    patch.edits[0].before.data[1] ^= 1
    with pytest.raises(PatchConflictError, match="1 of 2 rows differ"):
        apply_patch(files, patch, "bad")
    with pytest.raises(BadInputError, match="patch name"):
        apply_patch(files, make_patch(files, {0: [1]}), "no spaces")
    with pytest.raises(BadInputError, match="no patch has been applied"):
        undo_patch(files)
    assert verify(files).ok and journal.history(files) == []
    assert sorted(p.name for p in model.iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json"]


def test_rows_the_user_cannot_write_are_refused_before_anything_is_created(model, monkeypatch):
    files = open_model(model)
    os.chmod(model / "model.safetensors", 0o444)
    if os.geteuid() == 0:  # root may write any file: ask the kernel's question as a user would
        rows = model / "model.safetensors"
        real = os.access
        monkeypatch.setattr(journal.os, "access",
                            lambda p, mode: False if Path(p) == rows and mode == os.W_OK
                            else real(p, mode))
    with pytest.raises(BadInputError, match="model.safetensors: not writable by you"):
        apply_patch(files, make_patch(files, {0: [1]}), "p")
    assert not (model / ".engram").exists()


def test_a_patch_for_another_memory_is_refused(model):
    files = open_model(model)
    patch = make_patch(files, {0: [1]})
    patch.fingerprint = "ab" * 32
    with pytest.raises(MismatchError) as err:
        apply_patch(files, patch, "other")
    assert "made for memory abababababab" in str(err.value)
    assert f"holds memory {files.fingerprint()[:12]}" in str(err.value)
    assert not (model / ".engram").exists()


def test_every_static_problem_is_reported_at_once(tmp_path):
    files = open_model(make_model(tmp_path / "fp8", "float8_e4m3"))
    bf16 = open_model(make_model(tmp_path / "bf16", "bfloat16"))
    patch = make_patch(bf16, {0: [1], 2: [2]})
    wrong_layer = LayerEdit(1, np.array([0]), patch.edits[0].before, patch.edits[0].after)
    patch.edits.insert(1, wrong_layer)
    patch.edits[2].rows = np.array([10**6])
    with pytest.raises(BadInputError) as err:
        apply_patch(files, patch, "mixed")
    p = err.value.problems
    assert len(p) == 4
    assert "layer 0: the patch holds bfloat16 rows but the table stores float8_e4m3" in p[0]
    assert "layer 1: not an Engram layer" in p[1]
    assert "layer 2: the patch holds bfloat16" in p[2] and "out of range" in p[3]
    assert not (tmp_path / "fp8/.engram").exists()


def test_undo_of_a_patch_not_applied_is_refused(model, tmp_path):
    files = open_model(model)
    applied = make_patch(files, {0: [1]})
    never = make_patch(files, {2: [4]}, seed=9)
    apply_patch(files, applied, "applied")
    path = write_patch(never, tmp_path / "never.patch.safetensors")
    with pytest.raises(PatchConflictError, match="never.patch.safetensors: not applied to"):
        undo_patch(files, str(path))
    with pytest.raises(BadInputError, match="no patch named 'never'"):
        undo_patch(files, "never")
    undo_patch(files, "applied")
    with pytest.raises(PatchConflictError, match="0001-applied is not applied"):
        undo_patch(files, "applied")
    with pytest.raises(BadInputError, match="no applied patch to undo"):
        undo_patch(files)


def test_undo_refuses_an_earlier_patch_whose_rows_a_later_patch_changed(model):
    files = open_model(model)
    original = digests(model)
    apply_patch(files, make_patch(files, {0: [1, 2, 3]}), "first")
    apply_patch(files, make_patch(files, {2: [8]}, seed=3), "unrelated")
    apply_patch(files, make_patch(files, {0: [3, 4]}, seed=2), "second")
    state = digests(model)
    with pytest.raises(PatchConflictError) as err:
        undo_patch(files, "first")
    assert str(err.value) == (f"{model}: cannot undo 0001-first: later patches changed the "
                              f"same rows: 0003-second (1 rows); undo 0003-second first")
    assert digests(model) == state
    undo_patch(files, "second")
    undo_patch(files, "first")
    undo_patch(files, "unrelated")
    assert digests(model) == original


def test_undo_refuses_rows_changed_since_the_apply(model):
    files = open_model(model)
    patch = make_patch(files, {0: [1, 5], 2: [6]})
    apply_patch(files, patch, "p")
    with files.table(writable=True) as table:
        table.write_raw(2, np.array([6]), table.read_raw(2, np.array([7])))
    with pytest.raises(PatchConflictError) as err:
        undo_patch(files)
    assert err.value.problems == ["0001-p: 1 of 3 rows differ from the patch's after-rows "
                                  "(layer 2: rows 6); nothing was changed"]
    report = verify(files)
    assert not report.ok and report.problems == ["0001-p: 1 of its 3 rows no longer hold its "
                                                 "after-rows"]


def test_verify_expects_the_last_patch_to_touch_a_row(model):
    files = open_model(model)
    apply_patch(files, make_patch(files, {0: [1, 2]}), "a")
    apply_patch(files, make_patch(files, {0: [2, 3], 2: [1]}, seed=2), "b")
    report = verify(files)
    assert report.ok and report.journal_clean
    assert [(c.seq, c.rows, c.superseded, c.differ) for c in report.patches] == [
        (1, 2, 1, 0), (2, 3, 0, 0)]
    (model / ".engram/patches/0001-a.patch.safetensors").write_bytes(b"damaged")
    report = verify(files)
    assert not report.ok and "the copy of 0001-a is damaged" in report.problems[0]


# --- the crash guarantee -------------------------------------------------------------------------

CRASH = textwrap.dedent("""
    import os, sys
    from engram_edit import memory
    from engram_edit.checkpoint import open_model
    from engram_edit.edit import journal, store
    from engram_edit.edit.patch import read_patch

    model, patch, op, point, k = sys.argv[1:]
    if point == "rows":  # die before the k-th pwrite of a row
        real, done = memory.pwrite_all, [0]
        def pwrite_all(*args):
            if done[0] == int(k):
                os._exit(17)
            done[0] += 1
            real(*args)
        memory.pwrite_all = pwrite_all
    elif point == "committed":  # die right after the commit marker is written
        real_journal = store.write_journal
        def write_journal(folder, record):
            real_journal(folder, record)
            if record.state == "committed":
                os._exit(17)
        store.write_journal = write_journal
    elif point == "history":  # die after history.json, before the journal is deleted
        real_history = store.write_history
        def write_history(*args):
            real_history(*args)
            os._exit(17)
        store.write_history = write_history
    files = open_model(model)
    if op == "apply":
        journal.apply_patch(files, read_patch(patch), "crash")
    elif op == "undo":
        journal.undo_patch(files)
    else:
        journal.recover(files)
""")


def crash(model, patch_file, op, point, k=0):
    done = subprocess.run([sys.executable, "-c", CRASH, str(model), str(patch_file), op, point,
                           str(k)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 17, done.stderr


def table_bytes(model) -> bytes:
    return (model / "model.safetensors").read_bytes()


@pytest.mark.parametrize("k", [0, 1, 4])
def test_a_crash_during_apply_recovers_to_wholly_before(model, tmp_path, k):
    files = open_model(model)
    before = table_bytes(model)
    patch = make_patch(files, SPREAD)
    crash(model, write_patch(patch, tmp_path / "p.patch.safetensors"), "apply", "rows", k)
    assert (model / ".engram/journal").exists()
    report = recover(files)
    assert (report.op, report.outcome, report.entry.label) == ("apply", "rolled back",
                                                               "0001-crash")
    assert table_bytes(model) == before
    assert journal.history(files) == [] and not (model / ".engram/journal").exists()
    assert list((model / ".engram/patches").iterdir()) == []
    assert recover(files) is None


@pytest.mark.parametrize("point", ["committed", "history"])
def test_a_crash_after_the_commit_marker_recovers_to_wholly_after(model, tmp_path, point):
    files = open_model(model)
    patch = make_patch(files, SPREAD)
    crash(model, write_patch(patch, tmp_path / "p.patch.safetensors"), "apply", point)
    report = verify(files)
    assert report.recovered.outcome == "rolled forward" and not report.journal_clean
    assert report.ok and [c.seq for c in report.patches] == [1]
    assert holds(files, patch, "after")
    assert [e.label for e in journal.history(files)] == ["0001-crash"]


def test_a_crash_during_undo_recovers_to_wholly_applied_then_undo_completes(model, tmp_path):
    files = open_model(model)
    before = table_bytes(model)
    patch = make_patch(files, SPREAD)
    apply_patch(files, patch, "p")
    after = table_bytes(model)
    crash(model, "-", "undo", "rows", 2)
    assert recover(files).outcome == "rolled back"
    assert table_bytes(model) == after and journal.history(files)[0].applied
    crash(model, "-", "undo", "committed")
    assert recover(files).outcome == "rolled forward"
    assert table_bytes(model) == before and not journal.history(files)[0].applied


def test_a_crash_during_recovery_is_recovered_the_same_way(model, tmp_path):
    files = open_model(model)
    before = table_bytes(model)
    patch_file = write_patch(make_patch(files, SPREAD), tmp_path / "p.patch.safetensors")
    crash(model, patch_file, "apply", "rows", 5)
    crash(model, "-", "recover", "rows", 2)
    assert recover(files).outcome == "rolled back"
    assert table_bytes(model) == before


def test_an_error_while_writing_rows_rolls_back_at_once(model, monkeypatch):
    files = open_model(model)
    before = table_bytes(model)
    real, done = memory.pwrite_all, [0]

    def failing(*args):
        done[0] += 1
        if done[0] == 3:
            raise OSError(28, "No space left on device")
        real(*args)

    monkeypatch.setattr(memory, "pwrite_all", failing)
    with pytest.raises(OSError, match="No space left"):
        apply_patch(files, make_patch(files, SPREAD), "full")
    assert table_bytes(model) == before
    assert sorted(p.name for p in (model / ".engram").rglob("*")) == ["lock", "patches"]


def test_leftovers_of_an_interrupted_copy_are_removed_under_the_lock(model):
    files = open_model(model)
    apply_patch(files, make_patch(files, {0: [1]}), "a")
    orphan = model / ".engram/patches/0002-b.patch.safetensors"
    orphan.write_bytes(b"x")
    (model / ".engram/.journal.abc.tmp").write_bytes(b"x")
    apply_patch(files, make_patch(files, {0: [2]}, seed=2), "c")
    assert sorted(p.name for p in (model / ".engram/patches").iterdir()) == [
        "0001-a.patch.safetensors", "0002-c.patch.safetensors"]
    assert not (model / ".engram/.journal.abc.tmp").exists()


# --- the lock ------------------------------------------------------------------------------------

HOLD = textwrap.dedent("""
    import fcntl, os, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, b"%d\\n" % os.getpid())
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
""")


@pytest.fixture
def lock_holder(model):
    (model / ".engram").mkdir()
    procs = []

    def start(seconds: float) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-c", HOLD, str(model / ".engram/lock"),
                              str(seconds)], stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "locked"
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.kill()
        p.wait()


def test_a_second_writer_stops_naming_the_holder(model, lock_holder):
    files = open_model(model)
    holder = lock_holder(60)
    before = table_bytes(model)
    with pytest.raises(LockHeldError, match=f"process {holder.pid} is writing"):
        apply_patch(files, make_patch(files, {0: [1]}), "p")
    with pytest.raises(LockHeldError, match=r"waited 0.2 s"):
        with hold_lock(model / ".engram", wait=True, timeout=0.2):
            pass
    assert table_bytes(model) == before


def test_a_second_writer_with_wait_goes_on_when_the_lock_is_free(model, lock_holder):
    files = open_model(model)
    lock_holder(0.3)
    report = apply_patch(files, make_patch(files, {0: [1]}), "p", wait=True)
    assert report.entry.seq == 1
    assert (model / ".engram/lock").read_text() == ""


# --- names, working copy, memory directories -----------------------------------------------------

def test_patch_names_come_from_file_names():
    assert patch_name("out/fix-wales.patch.safetensors") == "fix-wales"
    assert patch_name("0003-fix-wales.patch.safetensors") == "fix-wales"
    assert patch_name("my fix (2).safetensors") == "my-fix-2-"
    assert patch_name(".patch.safetensors") == "patch"


@pytest.fixture
def bundled(tmp_path, monkeypatch):
    path = make_model(tmp_path / "pkg/bundled/model")
    monkeypatch.setattr(paths, "bundled_model_dir", lambda: path)
    return path


def test_the_bundled_model_is_copied_on_the_first_write_and_never_written(bundled):
    shipped = digests(bundled)
    choice = paths.resolve_model(None)
    assert choice.is_bundled
    with pytest.raises(BadInputError, match="the bundled model is never written"):
        apply_patch(open_model(bundled), make_patch(open_model(bundled), {0: [1]}), "p")
    patch = make_patch(open_model(bundled), {0: [1]})
    files, note = open_writable(choice, None, lambda f: journal.check_patch(f, patch))
    work = paths.working_copy_dir()
    assert files.path == work and note == (f"copied the bundled model to {work}; "
                                           f"`engram-edit reset` removes it")
    apply_patch(files, patch, "p")
    assert paths.resolve_model(None) == ModelChoice(work, "working-copy")
    assert writable_model(paths.resolve_model(None)) == (work, None)
    assert digests(bundled) == shipped and not (bundled / ".engram").exists()
    report = reset()
    assert report.removed and report.applied == 1 and report.files == 6
    assert not work.exists() and paths.resolve_model(None).is_bundled
    assert not reset().removed


def test_a_refused_write_makes_no_working_copy(bundled):
    patch = make_patch(open_model(bundled), {0: [1]})
    patch.fingerprint = "0" * 64
    with pytest.raises(MismatchError):
        open_writable(paths.resolve_model(None), None, lambda f: journal.check_patch(f, patch))
    assert not paths.working_copy_dir().exists()


def test_with_a_memory_edits_land_in_the_memory_dir(tmp_path):
    model = make_model(tmp_path / "model")
    split.split_model(model, tmp_path / "backbone", tmp_path / "memory")
    backbone = digests(tmp_path / "backbone")
    files = open_model(tmp_path / "backbone", tmp_path / "memory")
    assert writable_model(ModelChoice(tmp_path / "backbone", "flag"), tmp_path / "memory") == (
        tmp_path / "backbone", None)
    memory_before = digests(tmp_path / "memory")
    patch = make_patch(files, SPREAD)
    apply_patch(files, patch, "p")
    assert (tmp_path / "memory/.engram/history.json").is_file()
    assert not (tmp_path / "backbone/.engram").exists()
    undo_patch(files)
    assert digests(tmp_path / "memory") == memory_before
    assert digests(tmp_path / "backbone") == backbone
