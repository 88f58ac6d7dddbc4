"""bench/patch_bench.py in a small configuration on the bundled model: every part runs, the
figures land in the results file, and undoing the sequential patches gives every byte back."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "patch_bench.py"


def test_the_patch_benchmark_runs_small_and_its_undo_restores_every_file(tmp_path):
    run = subprocess.run([sys.executable, str(SCRIPT), "--batch", "6", "--patches", "2",
                          "--per-patch", "4", "--threads", "2", "--results", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    (out,) = tmp_path.glob("patch-*.json")
    result = json.loads(out.read_text())
    batch, overwrite, seq = result["batch"], result["overwrite"], result["sequential"]
    assert batch["facts"] == overwrite["facts"] == result["prefers"]["facts"] == 6
    assert batch["goal"] == "says" and result["prefers"]["goal"] == "prefers"
    assert batch["after"]["says"] > batch["before"]["says"]
    assert batch["after"]["paraphrase_says"] is not None  # measured on held-out rephrasings
    assert set(result["bars"]) == {"says>=0.95", "paraphrase_says>=0.6",
                                   "neighbourhood_unchanged>=0.95", "heldout_loss_rise<1%",
                                   "edits_per_s>=20"}
    baselines = result["baselines"]
    assert set(baselines) == {"ft_l", "ft_l_loose", "memit", "memit_loose"}
    for run in baselines.values():
        assert run["facts"] == 6 and run["undo_bytes"] > 0 and run["after"]["says"] is not None
    # each baseline gave the model back: the runs after them start where the first did
    assert result["prefers"]["before"] == batch["before"]
    assert result["speed"]["facts"] == 6 and result["speed"]["seconds"] > 0
    assert seq["edits"] == 8 and len(seq["patches"]) == 2
    known = seq["known_right_before"]
    assert known >= 500 and 0 <= seq["known_right_after"] <= known
    assert seq["sha256_equal"] and all(seq["sha256_equal"].values())
    assert seq["bars"]["undo_byte_identical"]
