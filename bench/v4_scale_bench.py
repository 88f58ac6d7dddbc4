"""Benchmark: DeepSeek-V4.1-sized Engram tables (2 x ~384M FP8 rows, ~203 GB) as sparse files.

First probes --dir: a 1 GiB file made by truncate must take under 1 MB of disk (the filesystem
keeps holes), and --dir needs --min-free-gb free; otherwise it stops with a message and writes
a results file that says why. Then, in --dir:
  tokenizer.json  a WordLevel tokenizer of 129,280 entries that compresses to 99,092 ids, the
                  sizes of V4.1's (so the hash multipliers are V4.1's too)
  memory/         a split memory of V4.1's geometry: layers 1 and 14, rows 384,006,168 and
                  384,016,682 of 256 FP8 values + 8 E8M0 scales; memory.safetensors is sparse,
                  only the rows the probe text reads are written
  v4/             a V4.1-layout directory (config.json with text_config, index, one shard per
                  Engram layer with table, scales, wkv and q/k weights, one with the embedding,
                  final norm and head), sparse the same way
and times fresh processes (wall clock, median of --repeat; peak RSS is VmHWM read in the child,
against a bare `python -c` start; the import of the CLI alone is timed for reference, and the
load average is recorded, as a busy machine stretches every number):
  compression  the first `lookup --memory` with an empty cache (it builds the compression table
               and caches it under the tokenizer's sha256), then the cached ones
  lookup       engram-edit lookup TEXT --memory memory/ --json            goal < 1 s
  rows         engram-edit rows 1 R1 R2 R3 --memory memory/ --json        goal < 1 s
  overwrite    one n-gram of v4/ rewritten in place: rows located, new rows encoded to FP8 per
               docs/engram.md section 7, apply_patch under the journal    goal < 2 s
  lens         (no goal) the V4.1 logit lens of one row: wkv value rows, norm, the 1.3 GB head
RSS goal: every timed process within 300 MB of the bare start. Results go to
bench/results/v4-scale-<date>.json.

Run (from the repo root, venv active):
    python bench/v4_scale_bench.py
    python bench/v4_scale_bench.py --dir /tmp/v4-scale --repeat 5 --keep
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from engram_edit import dtypes
from engram_edit.checkpoint import (
    FINGERPRINT_KEY,
    fingerprint,
    scale_name,
    table_name,
    with_derived,
)
from engram_edit.config import EngramConfig
from engram_edit.hashing import NgramHasher
from engram_edit.layouts import v4
from engram_edit.split import memory_json
from engram_edit.tensorfile import pwrite_all
from engram_edit.tensorwrite import TensorEntry, safetensors_header
from engram_edit.tokenizer import EngramTokenizer

ROOT = Path(__file__).resolve().parent.parent
R = v4.RELEASE
SPECIALS = ["<unk>", "<bos>", "<pad>"]  # pad id 2, as V4.1's engram_pad_token_id
TEXT = "wba wbb wbc wbd wbe"

VMHWM = ("print('VmHWM', open('/proc/self/status').read().split('VmHWM:')[1].split()[0], "
         "file=sys.stderr)")
CLI_CODE = f"""
import sys
from commands.main import app
try:
    app(sys.argv[1:], standalone_mode=False)
finally:
    {VMHWM}
"""
OVERWRITE_CODE = f"""
import sys
import numpy as np
from engram_edit.checkpoint import open_model
from engram_edit.edit.journal import apply_patch
from engram_edit.edit.patch import LayerEdit, Patch
from engram_edit.hashing import explain

path, text, name = sys.argv[1:4]
files = open_model(path)
last = [g for g in explain(text, files.tokenizer, files.hasher,
                           files.config.engram_pad_token_id).ngrams
        if g.position == len(files.tokenizer.encode(text)) - 1
        and g.order == files.hasher.max_ngram]
rng = np.random.default_rng(abs(hash(name)) % 2**32)
edits = []
with files.table() as table:
    for g in last:
        rows = np.unique(np.asarray(g.rows, dtype=np.int64))
        values = rng.normal(0, 0.05, (len(rows), table.width(g.layer_id))).astype(np.float32)
        edits.append(LayerEdit(g.layer_id, rows, table.read_raw(g.layer_id, rows),
                               table.encode(g.layer_id, values)))
apply_patch(files, Patch(files.fingerprint(), edits, {{"method": "overwrite"}}), name)
{VMHWM}
"""
LENS_CODE = f"""
import sys
import numpy as np
from engram_edit.checkpoint import open_model
from engram_edit.layouts.lens import lens_probs

files = open_model(sys.argv[1])
with files.table() as table:
    row = table.read_rows(1, np.array([int(sys.argv[2])]))
assert lens_probs(files, 1, [0], row[:, None, :]).shape == (1, files.config.vocab_size)
{VMHWM}
"""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dir", type=Path, default=Path("/tmp/engram-v4-scale-bench"),
                   help="work directory (created; must not exist); removed afterwards unless "
                        "--keep; default /tmp/engram-v4-scale-bench")
    p.add_argument("--repeat", type=int, default=3,
                   help="timed runs of each command; medians are reported; default 3")
    p.add_argument("--min-free-gb", type=float, default=2.0,
                   help="free disk --dir must have (only written rows take space); default 2")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "results",
                   help="where v4-scale-<date>.json is written; default bench/results")
    return p.parse_args()


def keeps_holes(directory: Path) -> tuple[bool, str]:
    """Whether a file made by truncate stays sparse here (apparent 1 GiB, ~0 bytes on disk)."""
    probe = directory / "hole-probe"
    with open(probe, "wb") as f:
        f.truncate(1 << 30)
    used = os.stat(probe).st_blocks * 512
    probe.unlink()
    return used < (1 << 20), f"a 1 GiB truncated file used {used} bytes on disk"


def make_tokenizer(path: Path) -> None:
    """129,280 entries: 3 special tokens, 99,089 lowercase words, and capitalised copies of the
    first 30,188 words, which compression merges into their lowercase forms."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    def word(i: int) -> str:
        s = ""
        while True:
            s, i = chr(97 + i % 26) + s, i // 26
            if i == 0:
                return "w" + s

    words = [word(i) for i in range(R["engram_compressed_vocab_size"] - len(SPECIALS))]
    caps = [w.capitalize() for w in words[:R["vocab_size"] - R["engram_compressed_vocab_size"]]]
    vocab = {t: i for i, t in enumerate(SPECIALS + words + caps)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIALS)
    tok.save(str(path))


def v4_config(tok: EngramTokenizer) -> EngramConfig:
    config = EngramConfig(vocab_size=tok.vocab_size, hidden_size=R["hidden_size"],
                          num_hidden_layers=43, num_attention_heads=64, hc_mult=R["hc_mult"],
                          engram_layer_ids=R["engram_layer_ids"],
                          engram_max_ngram_size=R["engram_max_ngram_size"],
                          engram_n_heads=R["engram_n_heads"], engram_head_dim=R["engram_head_dim"],
                          engram_vocab_size=R["engram_vocab_size"],
                          engram_pad_token_id=R["engram_pad_token_id"], engram_seed=0)
    return with_derived(config, tok)


def sparse_file(path: Path, entries: list[TensorEntry], metadata: dict[str, str]
                ) -> tuple[int, dict[str, int]]:
    """A safetensors file of ``entries`` whose data is one hole; returns (fd, data offsets)."""
    head, offsets = safetensors_header(entries, metadata)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    pwrite_all(fd, head, 0)
    os.ftruncate(fd, len(head) + sum(e.nbytes for e in entries))
    return fd, {name: len(head) + off for name, off in offsets.items()}


def write_probe_rows(fd: int, at: dict[str, int], layer: int, rows: np.ndarray) -> None:
    """Real FP8 rows (spec section 7) at ``rows`` of one layer's table and scales."""
    values = np.random.default_rng(layer).normal(0, 0.05, (len(rows), R["engram_head_dim"]))
    data, scale = dtypes.encode("float8_e4m3", values.astype(np.float32))
    for k, r in enumerate(rows.tolist()):
        pwrite_all(fd, data[k].tobytes(), at[table_name(layer)] + r * data.shape[1])
        pwrite_all(fd, scale[k].tobytes(), at[scale_name(layer)] + r * scale.shape[1])


def table_entries(config: EngramConfig, layer: int) -> list[TensorEntry]:
    rows, w = config.engram_num_embeddings[config.engram_layer_ids.index(layer)], \
        config.engram_head_dim
    return [TensorEntry(table_name(layer), v4.TABLE_DTYPE, (rows, w)),
            TensorEntry(scale_name(layer), v4.SCALE_DTYPE, (rows, w // 32))]


def make_memory(path: Path, tok_file: Path, tok: EngramTokenizer, config: EngramConfig,
                probe: dict[int, np.ndarray]) -> int:
    fp = fingerprint(config, tok)
    path.mkdir()
    shutil.copyfile(tok_file, path / "tokenizer.json")
    (path / "memory.json").write_text(memory_json(config, tok, fp, "float8_e4m3"))
    entries = [e for i in config.engram_layer_ids for e in table_entries(config, i)]
    fd, at = sparse_file(path / "memory.safetensors", entries,
                         {"format": "pt", FINGERPRINT_KEY: fp})
    try:
        for layer, rows in probe.items():
            write_probe_rows(fd, at, layer, rows)
    finally:
        os.close(fd)
    return (path / "memory.safetensors").stat().st_size


def make_v4_dir(path: Path, tok_file: Path, config: EngramConfig,
                probe: dict[int, np.ndarray]) -> int:
    d, n, v = config.hidden_size, config.hc_mult, config.vocab_size
    cols = config.engram_input_dim
    text = {"model_type": "deepseek_v41_text", "vocab_size": v, "hidden_size": d,
            "num_hidden_layers": config.num_hidden_layers, "rms_norm_eps": 1e-6,
            "hc_mult": n, "tie_word_embeddings": False,
            **{k: R[k] for k in R if k.startswith("engram_")}}
    text["engram_compressed_vocab_size"] = config.engram_compressed_vocab_size
    path.mkdir()
    shutil.copyfile(tok_file, path / "tokenizer.json")
    (path / "config.json").write_text(json.dumps(
        {"architectures": ["DeepseekV41ForCausalLM"], "model_type": v4.MODEL_TYPE,
         "quantization_config": {"quant_method": "fp8", "weight_block_size": [32, 32]},
         "text_config": text}, indent=2))
    shards = {"model-00001-of-00003.safetensors": [
        TensorEntry("embed.weight", "BF16", (v, d)), TensorEntry("norm.weight", "BF16", (d,)),
        TensorEntry("head.weight", "BF16", (v, d))]}
    for k, layer in enumerate(config.engram_layer_ids, start=2):
        p = v4.LAYER_PREFIX.format(i=layer)
        shards[f"model-0000{k}-of-00003.safetensors"] = table_entries(config, layer) + [
            TensorEntry(p + "wkv.weight", v4.TABLE_DTYPE, ((n + 1) * d, cols)),
            TensorEntry(p + "wkv.scale", v4.SCALE_DTYPE, ((n + 1) * d // 32, cols // 32)),
            TensorEntry(p + "q_weight", "BF16", (n, d)), TensorEntry(p + "k_weight", "BF16",
                                                                     (n, d))]
    weight_map, total = {}, 0
    for name, entries in shards.items():
        fd, at = sparse_file(path / name, entries, {"format": "pt"})
        try:
            if "norm.weight" in at:  # ones: a plain final norm
                pwrite_all(fd, np.full(d, 0x3F80, np.uint16).tobytes(), at["norm.weight"])
            for layer, rows in probe.items():
                if table_name(layer) in at:
                    write_probe_rows(fd, at, layer, rows)
        finally:
            os.close(fd)
        weight_map.update(dict.fromkeys((e.name for e in entries), name))
        total += (path / name).stat().st_size
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return total


def run(argv: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MB, stdout) of a fresh ``python -c`` child."""
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", *argv], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{argv[1:]} failed ({done.returncode}): {done.stderr[-2000:]}")
    kb = [ln.split()[1] for ln in done.stderr.splitlines() if ln.startswith("VmHWM ")]
    return seconds, int(kb[-1]) / 1024, done.stdout


def timed(name: str, argv: list[str], env: dict[str, str], repeat: int) -> dict:
    runs = [run(argv, env) for _ in range(repeat)]
    out = {"runs_s": [r[0] for r in runs], "median_s": statistics.median(r[0] for r in runs),
           "peak_rss_mb": max(r[1] for r in runs)}
    print(f"{name}: median {out['median_s']:.3f} s, peak RSS {out['peak_rss_mb']:.0f} MB",
          file=sys.stderr)
    return out


def du(path: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file())


def main() -> None:
    args = parse_args()
    args.results.mkdir(parents=True, exist_ok=True)
    result_file = args.results / f"v4-scale-{datetime.date.today().isoformat()}.json"
    record: dict = {"benchmark": "V4.1-sized sparse Engram tables",
                    "date": datetime.datetime.now().isoformat(timespec="seconds"),
                    "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                                "platform": platform.platform()}}
    args.dir.mkdir(parents=True)
    try:
        holes, why = keeps_holes(args.dir)
        free = shutil.disk_usage(args.dir).free
        if not holes or free < args.min_free_gb * 1e9:
            reason = why if not holes else f"only {free / 1e9:.1f} GB free in {args.dir}"
            record["skipped"] = reason
            result_file.write_text(json.dumps(record, indent=2) + "\n")
            print(f"skipped: {reason}", file=sys.stderr)
            return
        record["hole_probe"] = why
        env = {**os.environ, "XDG_CACHE_HOME": str(args.dir / "cache")}
        tok_file = args.dir / "tokenizer.json"
        t0 = time.perf_counter()
        make_tokenizer(tok_file)
        tok = EngramTokenizer.from_file(tok_file, use_cache=False)
        config = v4_config(tok)
        assert config.engram_num_embeddings == R["engram_num_embeddings"], "release geometry"
        hasher = NgramHasher.for_tokenizer(config, tok)
        ids = tok.compress(tok.encode(TEXT))[None, :]
        probe = {i: np.unique(r) for i, r in hasher.rows(ids).items()}
        mem_bytes = make_memory(args.dir / "memory", tok_file, tok, config, probe)
        v4_bytes = make_v4_dir(args.dir / "v4", tok_file, config, probe)
        record["setup"] = {
            "seconds": time.perf_counter() - t0, "tokenizer_entries": tok.vocab_size,
            "compressed_vocab": tok.compressed_vocab_size,
            "rows_per_layer": config.engram_num_embeddings,
            "memory_file_apparent_bytes": mem_bytes, "v4_apparent_bytes": v4_bytes,
            "disk_used_bytes": du(args.dir), "probe_rows_per_layer": len(probe[1])}
        print(f"built in {record['setup']['seconds']:.1f} s: memory {mem_bytes / 1e9:.1f} GB and "
              f"v4 {v4_bytes / 1e9:.1f} GB apparent, {du(args.dir) / 1e6:.1f} MB on disk",
              file=sys.stderr)
        mem = str(args.dir / "memory")
        rows = [str(r) for r in probe[1][:3].tolist()]
        bare = timed("bare python", [f"import sys\n{VMHWM}"], env, args.repeat)
        cli_import = timed("import of the CLI (reference)",
                           [f"import sys\nimport commands.main\n{VMHWM}"], env, args.repeat)
        lookup_argv = [CLI_CODE, "lookup", TEXT, "--memory", mem, "--json"]
        first = run(lookup_argv, env)
        print(f"first lookup (builds the compression table): {first[0]:.3f} s", file=sys.stderr)
        lookup = timed("lookup --memory", lookup_argv, env, args.repeat)
        assert json.loads(run(lookup_argv, env)[2])["layers"], "lookup shows the layers"
        rows_run = timed("rows --memory", [CLI_CODE, "rows", "1", *rows, "--memory", mem,
                                           "--json"], env, args.repeat)
        overwrite = {"runs_s": [], "peak_rss_mb": 0.0}
        for k in range(args.repeat):
            s, rss, _ = run([OVERWRITE_CODE, str(args.dir / "v4"), TEXT, f"bench-{k}"], env)
            overwrite["runs_s"].append(s)
            overwrite["peak_rss_mb"] = max(overwrite["peak_rss_mb"], rss)
        overwrite["median_s"] = statistics.median(overwrite["runs_s"])
        print(f"overwrite: median {overwrite['median_s']:.3f} s, peak RSS "
              f"{overwrite['peak_rss_mb']:.0f} MB", file=sys.stderr)
        lens = timed("lens (no goal)", [LENS_CODE, str(args.dir / "v4"), rows[0]], env, 1)
        limit = bare["peak_rss_mb"] + 300
        record.update({
            "text": TEXT, "bare_python": bare, "cli_import": cli_import,
            "load_average": os.getloadavg(),
            "compression": {"first_lookup_s": first[0], "cached_lookup_median_s":
                            lookup["median_s"]},
            "lookup_memory": lookup, "rows_memory": rows_run, "overwrite_v4": overwrite,
            "lens_v4": lens,
            "goals": {"lookup_s_max": 1.0, "rows_s_max": 1.0, "overwrite_s_max": 2.0,
                      "peak_rss_mb_max": limit},
            "goals_met": {
                "lookup": lookup["median_s"] < 1.0, "rows": rows_run["median_s"] < 1.0,
                "overwrite": overwrite["median_s"] < 2.0,
                "rss": max(lookup["peak_rss_mb"], rows_run["peak_rss_mb"],
                           overwrite["peak_rss_mb"]) <= limit},
            "disk_used_bytes_after": du(args.dir),
        })
        result_file.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {result_file}", file=sys.stderr)
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
