"""Benchmark: `engram-edit lookup` start-up, with a split memory alone and with the bundled model.

1. Memory alone. Builds two synthetic split memories with the same tokenizer and geometry
   (two Engram layers, orders 2..3 x 4 heads, float32 rows of --width values) but tables of
   --big-gb GB and --small-mb MB, real (not sparse) bytes, in --dir. Then, --repeat rounds, side
   by side: evict memory.safetensors from the page cache (fsync, then
   posix_fadvise(POSIX_FADV_DONTNEED)) and time a fresh `engram-edit lookup TEXT --memory DIR
   --json` process, wall clock. One untimed extra run per memory, in a `python -c` child, checks
   that torch was never imported and reports the bytes it read from storage (/proc/self/io
   read_bytes) after the same eviction. Goals: both medians < 0.5 s, big / small <= 1.5.
2. With a backbone. Side by side, --repeat rounds: a fresh `engram-edit lookup TEXT --model
   MODEL` (the bundled model by default) against a bare `python -c "import torch"`.
   Goal: lookup median < import-torch median + 1 s. CPU seconds (user + system) of every
   timed child are recorded too: on a busy machine they separate the work from the wait.

One warm-up run of each command goes first (it also fills the tokenizer's compression cache).
Results go to bench/results/lookup-<date>.json. Needs --big-gb plus a little free disk in --dir.

Run (from the repo root, venv active):
    python bench/lookup_bench.py
    python bench/lookup_bench.py --big-gb 0.2 --repeat 3 --skip-backbone
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from engram_edit.checkpoint import FINGERPRINT_KEY, fingerprint, table_name, with_derived
from engram_edit.config import EngramConfig
from engram_edit.hashing import NgramHasher
from engram_edit.paths import bundled_model_dir
from engram_edit.split import memory_json
from engram_edit.tensorwrite import CHUNK_BYTES, SafetensorsWriter, TensorEntry
from engram_edit.tokenizer import EngramTokenizer

ROOT = Path(__file__).resolve().parent.parent
LAYERS = [0, 2]
ORDERS, HEADS = 2, 4  # n-gram orders 2..3, hash heads per order: 8 columns per layer
ENGRAM_EDIT = str(Path(sys.executable).parent / "engram-edit")

CHECK_CODE = """
import sys
from commands.main import app
app(sys.argv[1:], standalone_mode=False)
assert "torch" not in sys.modules, "lookup --memory imported torch"
with open("/proc/self/io") as f:
    io = dict(line.split(": ") for line in f.read().splitlines())
print(int(io["read_bytes"]), file=sys.stderr)
"""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--big-gb", type=float, default=2.0,
                   help="table bytes of the big memory in GB (1e9 bytes); default 2")
    p.add_argument("--small-mb", type=float, default=20.0,
                   help="table bytes of the small memory in MB (1e6 bytes); default 20")
    p.add_argument("--width", type=int, default=32,
                   help="float32 values per row (the bundled model's row width); default 32")
    p.add_argument("--text", default="Princess of Wales", help="the text looked up")
    p.add_argument("--repeat", type=int, default=5,
                   help="timed rounds of each command; medians are reported; default 5")
    p.add_argument("--model", type=Path, default=bundled_model_dir(),
                   help="model for part 2, and whose tokenizer.json the memories use; "
                        "default: the bundled model")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="tokenizer.json of the synthetic memories; default: --model's")
    p.add_argument("--skip-backbone", action="store_true", help="run part 1 only")
    p.add_argument("--dir", type=Path, default=Path("/tmp/engram-lookup-bench"),
                   help="work directory for the two memories (created; must not exist); "
                        "removed afterwards unless --keep")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "results",
                   help="where lookup-<date>.json is written; default bench/results")
    return p.parse_args()


def make_memory(path: Path, tokenizer_file: Path, table_bytes: int, width: int) -> int:
    """Write a split memory directory whose two tables hold about ``table_bytes`` together."""
    tok = EngramTokenizer.from_file(tokenizer_file)
    columns = ORDERS * HEADS
    rows_per_column = max(16, table_bytes // (len(LAYERS) * columns * width * 4))
    config = EngramConfig(vocab_size=tok.vocab_size, num_hidden_layers=max(LAYERS) + 1,
                          engram_layer_ids=LAYERS, engram_max_ngram_size=ORDERS + 1,
                          engram_n_heads=HEADS, engram_head_dim=width,
                          engram_vocab_size=rows_per_column)
    config = with_derived(config, tok)
    hasher = NgramHasher.for_tokenizer(config, tok)
    fp = fingerprint(config, tok)
    entries = [TensorEntry(table_name(i), "F32", (hasher.rows_per_layer[i], width))
               for i in LAYERS]
    path.mkdir(parents=True)
    (path / "memory.json").write_text(memory_json(config, tok, fp, "float32"))
    shutil.copyfile(tokenizer_file, path / "tokenizer.json")
    block = np.random.default_rng(0).normal(0, 0.02, CHUNK_BYTES // 4).astype(np.float32)
    with SafetensorsWriter(path / "memory.safetensors", entries, {FINGERPRINT_KEY: fp}) as w:
        stamp = 0
        for e in entries:
            done = 0
            while done < e.nbytes:
                n = min(CHUNK_BYTES, e.nbytes - done)
                stamp += 1
                block[0] = stamp  # every chunk differs: nothing can dedup the file
                done += w.write(e.name, done, block.view(np.uint8)[:n])
    file = path / "memory.safetensors"
    fd = os.open(file, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return file.stat().st_size


def evict(file: Path) -> None:
    """Drop ``file``'s pages from the page cache (they are clean after the fsync)."""
    fd = os.open(file, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident(file: Path) -> str:
    """fincore's count of the file's cached pages, where fincore exists."""
    tool = shutil.which("fincore")
    if tool is None:
        return "unknown"
    out = subprocess.run([tool, "--noheadings", "--output", "PAGES", str(file)],
                         capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


CPU_SECONDS: list[float] = []  # user + system CPU of each timed child, in order


def timed(argv: list[str]) -> float:
    """Wall seconds of a fresh process running ``argv``; exits the benchmark if it fails.

    Its CPU seconds go to CPU_SECONDS: on a busy machine they show the work apart from the wait.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU_SECONDS.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr}")
    return seconds


def memory_part(args: argparse.Namespace, tokenizer_file: Path) -> dict:
    sizes = {"big": int(args.big_gb * 1e9), "small": int(args.small_mb * 1e6)}
    dirs = {name: args.dir / name for name in sizes}
    made = {}
    for name, size in sizes.items():
        t0 = time.perf_counter()
        made[name] = make_memory(dirs[name], tokenizer_file, size, args.width)
        print(f"wrote {name} memory: {made[name] / 1e6:,.1f} MB in "
              f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
    argv = {name: [ENGRAM_EDIT, "lookup", args.text, "--memory", str(d), "--json"]
            for name, d in dirs.items()}
    checks = {}
    for name, d in dirs.items():
        timed(argv[name])  # warm-up: interpreter, packages, compression cache
        file = d / "memory.safetensors"
        evict(file)
        cached_after_evict = resident(file)
        done = subprocess.run([sys.executable, "-c", CHECK_CODE, *argv[name][1:]],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"check run of the {name} memory failed: {done.stderr}")
        checks[name] = {"torch_imported": False, "pages_cached_after_evict": cached_after_evict,
                        "read_bytes_from_storage": int(done.stderr.strip().splitlines()[-1]),
                        "pages_cached_after_lookup": resident(file)}
    runs: dict[str, list[float]] = {name: [] for name in sizes}
    cpu: dict[str, list[float]] = {name: [] for name in sizes}
    for k in range(args.repeat):
        order = list(sizes) if k % 2 == 0 else list(reversed(sizes))  # alternate who goes first
        for name in order:
            evict(dirs[name] / "memory.safetensors")
            runs[name].append(timed(argv[name]))
            cpu[name].append(CPU_SECONDS[-1])
        print(f"round {k + 1}: " + ", ".join(f"{n} {runs[n][-1]:.3f} s" for n in sizes),
              file=sys.stderr)
    median = {name: statistics.median(r) for name, r in runs.items()}
    ratio = median["big"] / median["small"]
    return {
        "memory_file_bytes": made, "row_width": args.width, "runs_s": runs, "median_s": median,
        "cpu_s": cpu, "median_cpu_s": {name: statistics.median(c) for name, c in cpu.items()},
        "big_over_small": ratio, "checks": checks,
        "goals": {"median_s_max": 0.5, "big_over_small_max": 1.5},
        "goals_met": max(median.values()) < 0.5 and ratio <= 1.5,
    }


def backbone_part(args: argparse.Namespace) -> dict:
    lookup = [ENGRAM_EDIT, "lookup", args.text, "--model", str(args.model)]
    bare = [sys.executable, "-c", "import torch"]
    timed(lookup)
    timed(bare)
    runs: dict[str, list[float]] = {"lookup": [], "import_torch": []}
    cpu: dict[str, list[float]] = {"lookup": [], "import_torch": []}
    for k in range(args.repeat):
        pairs = [("lookup", lookup), ("import_torch", bare)]
        for name, argv in pairs if k % 2 == 0 else reversed(pairs):
            runs[name].append(timed(argv))
            cpu[name].append(CPU_SECONDS[-1])
        print(f"round {k + 1}: lookup {runs['lookup'][-1]:.2f} s, import torch "
              f"{runs['import_torch'][-1]:.2f} s", file=sys.stderr)
    median = {name: statistics.median(r) for name, r in runs.items()}
    return {"model": str(args.model), "runs_s": runs, "median_s": median, "cpu_s": cpu,
            "median_cpu_s": {name: statistics.median(c) for name, c in cpu.items()},
            "lookup_minus_import_torch_s": median["lookup"] - median["import_torch"],
            "goal": "lookup < import torch + 1 s",
            "goal_met": median["lookup"] < median["import_torch"] + 1.0}


def main() -> None:
    args = parse_args()
    tokenizer_file = args.tokenizer or args.model / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise SystemExit(f"{tokenizer_file}: no tokenizer (give --tokenizer or --model)")
    need = int(args.big_gb * 1e9 + args.small_mb * 1e6) + (1 << 30)
    args.dir.mkdir(parents=True, exist_ok=False)
    try:
        free = shutil.disk_usage(args.dir).free
        if free < need:
            raise SystemExit(f"{args.dir}: {free / 1e9:.1f} GB free, need {need / 1e9:.1f}")
        result = {
            "benchmark": "lookup start-up", "loadavg_before": os.getloadavg(),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "text": args.text, "repeat": args.repeat, "tokenizer": str(tokenizer_file),
            "memory_alone": memory_part(args, tokenizer_file),
        }
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
    if not args.skip_backbone:
        result["with_backbone"] = backbone_part(args)
    result |= {"cpu_count": os.cpu_count(), "loadavg_after": os.getloadavg(),
               "python": platform.python_version(), "platform": platform.platform()}
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / f"lookup-{datetime.date.today().isoformat()}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    summary = {"memory_median_s": result["memory_alone"]["median_s"],
               "memory_median_cpu_s": result["memory_alone"]["median_cpu_s"],
               "big_over_small": result["memory_alone"]["big_over_small"]}
    if "with_backbone" in result:
        summary["backbone_median_s"] = result["with_backbone"]["median_s"]
        summary["backbone_median_cpu_s"] = result["with_backbone"]["median_cpu_s"]
    print(json.dumps(summary))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
