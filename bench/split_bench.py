"""Benchmark: `split` of a synthetic model against `cp` of the same bytes, and split's peak RSS.

Builds a model directory of --gb GB of real (not sparse) bytes, written in 64 MB chunks:
--table-fraction of it in two Engram tables (each one tensor), the rest in backbone tensors.
Then, --repeat times, side by side on the same files:
  cp     `cp model.safetensors COPY`, then fsync of COPY (split fsyncs its outputs too)
  split  engram_edit.split.split_model in a child process (no torch); peak RSS is the child's
         VmHWM from /proc/self/status (ru_maxrss would count the parent's pages: Linux carries
         the old high-water mark across exec)
Goals: split <= 2x the time of cp, peak RSS <= 512 MB. Results go to
bench/results/split-<date>.json. Needs about 3x --gb of free disk in --dir.

Run (from the repo root, venv active):
    python bench/split_bench.py --gb 4
    python bench/split_bench.py --gb 1 --repeat 1 --dir /tmp/split-bench
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from engram_edit.checkpoint import table_name, with_derived
from engram_edit.config import EngramConfig
from engram_edit.hashing import NgramHasher
from engram_edit.tensorwrite import CHUNK_BYTES, SafetensorsWriter, TensorEntry
from engram_edit.tokenizer import EngramTokenizer

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "tests" / "data" / "golden" / "tiny_tokenizer.json"
WIDTH = 256  # row width of the synthetic tables (float32: 1 KB per row)
BACKBONE_COLS = 1024  # columns of each synthetic backbone tensor (float32)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gb", type=float, default=4.0,
                   help="size of the synthetic model in GB (1e9 bytes); default 4")
    p.add_argument("--table-fraction", type=float, default=0.5,
                   help="share of the bytes in the two Engram tables; default 0.5")
    p.add_argument("--repeat", type=int, default=2,
                   help="timed rounds of cp and split; the best of each is reported; default 2")
    p.add_argument("--dir", type=Path, default=None,
                   help="new work directory for the model and the copies (default: a temp "
                        "dir); removed afterwards unless --keep")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "results",
                   help="where split-<date>.json is written; default bench/results")
    return p.parse_args()


def make_model(path: Path, total_bytes: int, table_fraction: float) -> dict[str, int]:
    """Write config.json, tokenizer.json and a model.safetensors of about ``total_bytes``."""
    tok = EngramTokenizer.from_file(TOKENIZER)
    columns = 2 * 4  # orders 2..3 x 4 heads
    rows_per_layer = max(columns * 2, int(total_bytes * table_fraction) // (2 * WIDTH * 4))
    config = EngramConfig(vocab_size=512, engram_layer_ids=[1, 3], engram_max_ngram_size=3,
                          engram_n_heads=4, engram_head_dim=WIDTH,
                          engram_vocab_size=rows_per_layer // columns)
    config = with_derived(config, tok)
    hasher = NgramHasher.for_tokenizer(config, tok)
    entries = [TensorEntry(table_name(i), "F32", (hasher.rows_per_layer[i], WIDTH))
               for i in config.engram_layer_ids]
    rest = total_bytes - sum(e.nbytes for e in entries)
    per = max(1, rest // (8 * BACKBONE_COLS * 4))
    entries += [TensorEntry(f"layers.{k}.mlp.weight", "F32", (per, BACKBONE_COLS))
                for k in range(8)]
    path.mkdir(parents=True)
    (path / "config.json").write_text(config.to_json())
    shutil.copyfile(TOKENIZER, path / "tokenizer.json")
    block = np.random.default_rng(0).bytes(CHUNK_BYTES)
    with SafetensorsWriter(path / "model.safetensors", entries, {"format": "pt"}) as w:
        stamp = 0
        for e in entries:
            done = 0
            while done < e.nbytes:
                n = min(CHUNK_BYTES, e.nbytes - done)
                stamp += 1  # every chunk differs: no dedup or compression can shortcut cp
                chunk = stamp.to_bytes(8, "little") + block[8:n] if n >= 8 else block[:n]
                done += w.write(e.name, done, chunk)
    return {"model_bytes": (path / "model.safetensors").stat().st_size,
            "table_bytes": sum(e.nbytes for e in entries[:2]), "tensors": len(entries)}


def run_child(argv: list[str]) -> tuple[float, str]:
    """Run ``argv``; return its wall time in seconds and its stdout."""
    t0 = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr}")
    return seconds, done.stdout


def fsync_seconds(path: Path) -> float:
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


SPLIT_CODE = """
import sys
from engram_edit.split import split_model
split_model(sys.argv[1], sys.argv[2], sys.argv[3])
assert "torch" not in sys.modules, "split imported torch"
with open("/proc/self/status") as f:
    print(next(line.split()[1] for line in f if line.startswith("VmHWM:")))  # kB
"""


def one_round(work: Path) -> dict[str, float]:
    model = work / "model"
    copy = work / "copy.safetensors"
    cp_s, _ = run_child([shutil.which("cp") or "/bin/cp", str(model / "model.safetensors"),
                         str(copy)])
    sync_s = fsync_seconds(copy)
    copy.unlink()
    split_s, peak_kb = run_child([sys.executable, "-c", SPLIT_CODE, str(model),
                                  str(work / "backbone"), str(work / "memory")])
    shutil.rmtree(work / "backbone")
    shutil.rmtree(work / "memory")
    return {"cp_s": cp_s, "cp_fsync_s": cp_s + sync_s, "split_s": split_s,
            "split_peak_rss_mb": int(peak_kb) / 1024}


def filesystem(path: Path) -> str:
    out = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def main() -> None:
    args = parse_args()
    total = int(args.gb * 1e9)
    if args.dir is None:
        work = Path(tempfile.mkdtemp(prefix="split-bench-"))
    else:
        work = args.dir
        work.mkdir(parents=True, exist_ok=False)
    try:
        free = shutil.disk_usage(work).free
        if free < 3 * total:
            raise SystemExit(f"{work}: {free / 1e9:.1f} GB free, need {3 * total / 1e9:.1f}")
        t0 = time.perf_counter()
        sizes = make_model(work / "model", total, args.table_fraction)
        write_s = time.perf_counter() - t0
        print(f"wrote {sizes['model_bytes'] / 1e9:.2f} GB model in {write_s:.1f} s",
              file=sys.stderr)
        runs = []
        for k in range(args.repeat):
            runs.append(one_round(work))
            print(f"round {k + 1}: " + ", ".join(f"{key} {v:.2f}" for key, v in runs[-1].items()),
                  file=sys.stderr)
        best = {key: min(r[key] for r in runs) for key in runs[0]}
        result = {
            "benchmark": "split vs cp",
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "gb": args.gb, **sizes, "table_fraction": args.table_fraction,
            "chunk_bytes": CHUNK_BYTES, "repeat": args.repeat, "runs": runs, "best": best,
            "split_over_cp": best["split_s"] / best["cp_s"],
            "split_over_cp_fsync": best["split_s"] / best["cp_fsync_s"],
            "goals": {"split_over_cp_max": 2.0, "peak_rss_mb_max": 512},
            "filesystem": filesystem(work), "cpu_count": os.cpu_count(),
            "loadavg_after": os.getloadavg(), "python": platform.python_version(),
            "platform": platform.platform(),
        }
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / f"split-{datetime.date.today().isoformat()}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["best"] | {"split_over_cp": result["split_over_cp"],
                                       "split_over_cp_fsync": result["split_over_cp_fsync"]}))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
