"""Editing a DeepSeek-V4.1 directory in place from the command line: overwrite NGRAM and
patch --method overwrite (the closed form through the logit lens), FP8 rows re-quantized as the
spec says, undo byte for byte, distill refused, and the MoE experts never opened."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_journal import digests
from test_layouts import EXPERT_SHARD, Opened, spec_quantize
from typer.testing import CliRunner

from commands.main import app
from engram_edit.checkpoint import open_model
from engram_edit.edit.facts import Fact
from engram_edit.edit.lens_overwrite import lens_edit
from engram_edit.edit.patch import read_patch
from engram_edit.layouts.lens import lens_probs
from make_layouts import make_v4_dir

ROOT = Path(__file__).parent.parent

FACTS = [  # first tokens of target and ground truth differ in the tiny tokenizer
    {"prompt": "The cat sat on", "subject": "cat", "target_new": " the", "ground_truth": " a"},
    {"prompt": "Paris is the capital of", "subject": "Paris", "target_new": " and",
     "ground_truth": " of"},
]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_v4_dir(tmp_path_factory.mktemp("v4") / "v4")


@pytest.fixture
def v4(source, tmp_path):
    return shutil.copytree(source, tmp_path / "v4")


def run(*args, code: int = 0):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == code, (result.stdout, result.stderr)
    return result


def stored(model, layer: int, rows: list[int]):
    """(E4M3 codes, E8M0 bytes) of rows as they are on disk now."""
    with open_model(model).table() as table:
        raw = table.read_raw(layer, np.array(rows))
    return raw.data.tolist(), raw.scale.tolist()


def values(model, layer: int, rows: list[int]) -> np.ndarray:
    with open_model(model).table() as table:
        return table.read_rows(layer, np.array(rows))


def test_overwrite_on_v4_requantizes_by_the_spec_and_undo_restores_every_shard(v4):
    original = digests(v4)
    source = json.loads(run("overwrite", "of the", "--zero", "--dry-run", "--out",
                            v4.parent / "x.patch.safetensors", "--model", v4,
                            "--json").stdout)["rows"]
    copied_from = {int(k): values(v4, int(k), r) for k, r in source.items()}
    copy = json.loads(run("overwrite", "the cat", "--copy-from", "of the", "--model", v4,
                          "--json").stdout)
    assert copy["op"] == "copy" and copy["rows_touched"] > 0
    for layer, rows in copy["rows"].items():
        codes, scales = stored(v4, int(layer), rows)
        for k in range(len(rows)):
            assert (codes[k], scales[k]) == spec_quantize(copied_from[int(layer)][k])
    before = values(v4, 3, source["3"])
    scaled = json.loads(run("overwrite", "of the", "--scale", "0.3", "--layer", "3", "--heads",
                            "1", "--model", v4, "--json").stdout)
    assert list(scaled["rows"]) == ["3"] and scaled["rows"]["3"] == source["3"][1:]
    codes, scales = stored(v4, 3, scaled["rows"]["3"])
    assert (codes[0], scales[0]) == spec_quantize(before[1] * np.float32(0.3))
    run("overwrite", "of the", "--zero", "--model", v4)
    for layer, rows in source.items():
        assert not values(v4, int(layer), rows).any()
    listed = json.loads(run("history", "--model", v4, "--json").stdout)["patches"]
    assert [p["name"] for p in listed] == ["overwrite-the-cat", "overwrite-of-the",
                                           "overwrite-of-the"]
    assert json.loads(run("verify", "--model", v4, "--json").stdout)["ok"]
    assert digests(v4) != original
    for _ in listed:
        run("undo", "--model", v4)
    assert digests(v4) == original


def ngram_margins(model, fact: dict) -> list[float]:
    """Lens log P(target) - log P(truth) (first tokens) of every n-gram ending on the subject's
    last token, all its heads in their columns, per layer."""
    files = open_model(model)
    tok, h = files.tokenizer, files.hasher
    enc = tok.tokenizer.encode(fact["prompt"], add_special_tokens=False)
    end = fact["prompt"].index(fact["subject"]) + len(fact["subject"])
    last = max(i for i, (a, _) in enumerate(enc.offsets) if a < end)
    rows = h.rows(tok.compress(np.array(enc.ids))[None, :])
    t, g = tok.encode(fact["target_new"])[0], tok.encode(fact["ground_truth"])[0]
    out = []
    with files.table() as table:
        for lid in h.layer_ids:
            for order in range(2, h.max_ngram + 1):
                cols = [h.column(order, j) for j in range(h.n_heads)]
                x = table.read_rows(lid, rows[lid][0, last, cols])
                p = lens_probs(files, lid, cols, x[None])[0]
                out.append(float(np.log(p[t]) - np.log(p[g])))
    return out


def test_patch_overwrite_on_v4_moves_the_lens_toward_the_target(v4, tmp_path):
    facts = tmp_path / "facts.jsonl"
    facts.write_text("".join(json.dumps(f) + "\n" for f in FACTS))
    before = [ngram_margins(v4, f) for f in FACTS]
    result = json.loads(run("patch", facts, "--method", "overwrite", "--rows", "subject",
                            "--model", v4, "--json").stdout)
    assert result["facts"] == 2 and result["rows_touched"] > 0
    assert set(result["before"]) >= {"efficacy", "neighbourhood", "heldout_loss"}
    assert all(v is None for v in [*result["before"].values(), *result["after"].values()])
    lens = result["lens"]
    assert lens["after"]["margin"] > lens["before"]["margin"] and lens["after"]["won"] == 1.0
    for fact, was in zip(FACTS, before, strict=True):
        now = ngram_margins(v4, fact)
        assert all(n > 0 and n >= w - 1e-3 for n, w in zip(now, was, strict=True)), (was, now)
        assert sum(now) > sum(was)
    patch = read_patch(v4 / ".engram" / "patches" / "0001-facts.patch.safetensors")
    assert patch.metadata["method"] == "overwrite"
    assert patch.metadata["metrics"]["after"] is None
    assert patch.metadata["metrics"]["lens_after"]["won"] == 1.0


def test_lens_edit_without_a_ground_truth_raises_the_target_over_the_average(source):
    files = open_model(source)
    fact = Fact("The cat sat on", "cat", " the")
    report = lens_edit(files, [fact])
    assert report.after.margin > report.before.margin and report.after.won == 1.0
    assert report.unsolved == []
    with files.table() as table:
        assert all(table.read_raw(e.layer_id, e.rows).equals(e.before)
                   for e in report.patch.edits)  # computing an edit writes nothing


def test_patch_distill_on_v4_is_refused_in_one_line_and_changes_nothing(v4, tmp_path):
    facts = tmp_path / "facts.jsonl"
    facts.write_text(json.dumps(FACTS[0]) + "\n")
    original = digests(v4)
    result = run("patch", facts, "--method", "distill", "--model", v4, code=2)
    assert result.stdout == "" and result.stderr.count("\n") == 1
    assert "--method distill needs the whole network" in result.stderr
    assert "--method overwrite" in result.stderr
    assert digests(v4) == original and not (v4 / ".engram").exists()


def test_edits_on_v4_never_open_the_expert_shard(v4, tmp_path, monkeypatch):
    facts = tmp_path / "facts.jsonl"
    facts.write_text(json.dumps(FACTS[0]) + "\n")
    opened = Opened(monkeypatch)
    run("overwrite", "the cat", "--copy-from", "of the", "--model", v4)
    run("patch", facts, "--method", "overwrite", "--model", v4)
    run("undo", "--model", v4)
    shards = {p for p in opened.paths if p.startswith("model-")}
    assert EXPERT_SHARD not in shards
    assert shards == {"model-00001-of-00005.safetensors", "model-00003-of-00005.safetensors",
                      "model-00004-of-00005.safetensors", "model-00005-of-00005.safetensors"}


NO_TORCH = """
import sys
from commands.main import main
sys.argv = ["engram-edit", *sys.argv[1:]]
try:
    main()
except SystemExit as e:
    assert e.code == 0, e.code
print("torch imported" if "torch" in sys.modules else "no torch")
"""


def test_overwrite_and_patch_overwrite_on_v4_never_import_torch(v4, tmp_path):
    facts = tmp_path / "facts.jsonl"
    facts.write_text(json.dumps(FACTS[0]) + "\n")
    for args in (["overwrite", "the cat", "--zero", "--model", v4],
                 ["patch", facts, "--method", "overwrite", "--model", v4]):
        out = subprocess.run([sys.executable, "-c", NO_TORCH, *map(str, args)],
                             capture_output=True, text=True, cwd=ROOT, check=True)
        assert out.stdout.splitlines()[-1] == "no torch", (args, out.stdout, out.stderr)
    assert len(list((v4 / ".engram" / "patches").glob("*.patch.safetensors"))) == 2
