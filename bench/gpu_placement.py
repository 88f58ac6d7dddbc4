"""Benchmark: forward tokens/s with the Engram tables on the GPU, in host memory, or read from
the memory file, side by side in one run.

Builds one random model directory: hidden 2048, 12 layers (16 heads, SwiGLU 5632, 4
hyper-connection streams), a 32768-token word-level vocabulary (every token its own compressed
id), Engram in layers 1 and 6 (orders 2-3 x 8 heads = 16 columns of 64 values); each table has
16 columns of ~2.1M rows, about 4.3 GB in bfloat16. Tables are written chunk by chunk and the
backbone is built without them, so building never holds a table in float32.
Then for each placement (gpu, host, mmap): build_model(files, device, placement), --warmup
forwards, then --iters timed forwards of --batch x --seq uniform random token ids (the same
batches for every placement; random ids make nearly every row unique, the worst case for
host's deduplication), under bf16 autocast, with torch.cuda.synchronize() around the timed
loop. tokens/s = iters * batch * seq / seconds. Also recorded: build time, peak GPU memory,
rows fetched per layer, and whether the last-position logits of the first batch are
bit-identical to gpu's.
Goal: host within 1% of gpu (the paper lost 1.9-2.8%). mmap is for tables larger
than RAM; its file is in the page cache here, so its figure is a best case.
Results: bench/results/gpu-placement-<date>-<gpu name>.json, rewritten after each placement so
a run cut short keeps what it measured. Needs ~12 GB of disk, ~45 GB of RAM, ~40 GB of GPU.

Run (from the repo root, venv active):
    python bench/gpu_placement.py                       # H200: about 3-4 minutes
    python bench/gpu_placement.py --placements host     # one placement again
    python bench/gpu_placement.py --tiny                # CPU or GPU, seconds: checks the script
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from engram_edit.checkpoint import (
    CONFIG_FILE,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    build_model,
    model_compression,
    open_model,
    table_name,
    with_derived,
)
from engram_edit.config import EngramConfig
from engram_edit.dtypes import storage_from_torch
from engram_edit.hashing import NgramHasher
from engram_edit.model import EngramModel
from engram_edit.model.placement import PLACEMENTS, RowSource
from engram_edit.tensorwrite import SafetensorsWriter, TensorEntry
from engram_edit.tokenizer import EngramTokenizer

ROOT = Path(__file__).resolve().parent.parent
FULL = dict(vocab_size=32768, hidden_size=2048, num_hidden_layers=12, num_attention_heads=16,
            intermediate_size=5632, max_position_embeddings=1024, engram_layer_ids=[1, 6],
            engram_max_ngram_size=3, engram_n_heads=8, engram_head_dim=64,
            engram_vocab_size=2_097_152)  # 16 columns x ~2.1M rows x 64 x 2 bytes: ~4.3 GB
TINY = dict(vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
            intermediate_size=128, max_position_embeddings=64, engram_layer_ids=[1, 3],
            engram_max_ngram_size=3, engram_n_heads=2, engram_head_dim=32,
            engram_vocab_size=1000)
CHUNK_ROWS = 1 << 20  # table rows generated and written at a time (128 MB of bf16 at width 64)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true",
                   help="a model of a few MB and batch 2 x 64 (runs on the CPU too); "
                        "checks the script, measures nothing")
    p.add_argument("--placements", nargs="+", choices=PLACEMENTS, default=list(PLACEMENTS),
                   help="placements to measure, in this order; default: gpu host mmap")
    p.add_argument("--batch", type=int, default=None, help="sequences per forward; default 16 "
                   "(2 with --tiny)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence; default 1024 "
                   "(64 with --tiny)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed forwards first; default 3 (1 with --tiny)")
    p.add_argument("--iters", type=int, default=None,
                   help="timed forwards for gpu and host; default 10 (2 with --tiny)")
    p.add_argument("--mmap-iters", type=int, default=None,
                   help="timed forwards for mmap, which is far slower; default 3 (1 with --tiny)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                   help="bfloat16: forward under bf16 autocast; float32: none; default bfloat16")
    p.add_argument("--device", default=None,
                   help="torch device; default cuda, or cpu with --tiny when there is no CUDA")
    p.add_argument("--dir", type=Path, default=None,
                   help="new work directory for the model (default: a temp dir); removed "
                        "afterwards unless --keep")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "results",
                   help="where the JSON goes; default bench/results")
    args = p.parse_args(argv)
    for name, full, tiny in (("batch", 16, 2), ("seq", 1024, 64), ("warmup", 3, 1),
                             ("iters", 10, 2), ("mmap_iters", 3, 1)):
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
    return args


class _NoTables(RowSource):
    """Geometry only: lets the backbone be built and saved without allocating the tables."""

    placement = "none"

    def __init__(self, shapes: dict[int, tuple[int, int]]) -> None:
        self.shapes = shapes

    @property
    def layer_ids(self) -> list[int]:
        return sorted(self.shapes)

    def shape(self, layer_id: int) -> tuple[int, int]:
        return self.shapes[layer_id]


def word_tokenizer(vocab_size: int) -> EngramTokenizer:
    """Tokens ``<unk>, w1, w2, ...``: distinct after compression, so ids hash like a big vocab."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return EngramTokenizer.from_tokenizer(tok)


def make_model(path: Path, settings: dict, device: torch.device) -> dict[str, int]:
    """Write config.json, tokenizer.json and model.safetensors (bf16) of a random model."""
    tokenizer = word_tokenizer(settings["vocab_size"])
    config = with_derived(EngramConfig(**settings, engram_pad_token_id=0), tokenizer)
    hasher = NgramHasher.for_tokenizer(config, tokenizer)
    shapes = {i: (hasher.rows_per_layer[i], config.engram_head_dim)
              for i in config.engram_layer_ids}
    torch.manual_seed(0)
    with torch.device(device):
        backbone = EngramModel(config, model_compression(config, tokenizer), _NoTables(shapes))
    state = {k: v.detach().to(torch.bfloat16) for k, v in backbone.state_dict().items()}
    del backbone
    entries = [TensorEntry(k, "BF16", tuple(v.shape)) for k, v in state.items()]
    entries += [TensorEntry(table_name(i), "BF16", s) for i, s in shapes.items()]
    path.mkdir(parents=True)
    (path / CONFIG_FILE).write_text(config.to_json(), encoding="utf-8")
    tokenizer.tokenizer.save(str(path / TOKENIZER_FILE))
    gen = torch.Generator(device).manual_seed(1)
    with SafetensorsWriter(path / WEIGHTS_FILE, entries, {"format": "pt"}) as w:
        for name, tensor in state.items():
            w.write(name, 0, storage_from_torch(tensor))
        for i, (rows, width) in shapes.items():
            done = 0
            for first in range(0, rows, CHUNK_ROWS):
                n = min(CHUNK_ROWS, rows - first)
                chunk = torch.randn(n, width, generator=gen, device=device) * 0.02
                done += w.write(table_name(i), done, storage_from_torch(chunk.bfloat16()))
    return {"table_rows": sum(r for r, _ in shapes.values()),
            "table_bytes": sum(r * w * 2 for r, w in shapes.values()),
            "backbone_parameters": sum(v.numel() for v in state.values()),
            "model_file_bytes": (path / WEIGHTS_FILE).stat().st_size}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(files, device: torch.device, placement: str, batches: list[torch.Tensor],
            args: argparse.Namespace) -> tuple[dict, torch.Tensor, dict]:
    """Build with ``placement`` and time its forwards; returns the record, the first batch's
    last-position logits and rows fetched per layer."""
    t0 = time.perf_counter()
    model = build_model(files, device, placement)
    synchronize(device)
    build_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bfloat16"
                else contextlib.nullcontext())
    iters = args.mmap_iters if placement == "mmap" else args.iters
    with torch.no_grad(), autocast:
        rows = model.compute_rows(batches[0])
        fetched = {str(i): {"ids": r.numel(), "unique": int(r.unique().numel())}
                   for i, r in rows.items()}
        first = model(batches[0]).logits[:, -1].float().cpu()
        for k in range(args.warmup):
            model(batches[k % len(batches)])
        synchronize(device)
        t0 = time.perf_counter()
        for k in range(iters):
            model(batches[k % len(batches)])
        synchronize(device)
        seconds = time.perf_counter() - t0
    record = {"placement": placement, "build_s": round(build_s, 2), "iters": iters,
              "seconds": seconds, "tokens_per_s": iters * args.batch * args.seq / seconds,
              "ms_per_forward": 1000 * seconds / iters}
    if device.type == "cuda":
        record["peak_gpu_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return record, first, fetched


def device_name(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def summary(runs: dict[str, dict]) -> dict:
    out = {}
    gpu = runs.get("gpu")
    for p, r in runs.items():
        if gpu and p != "gpu":
            out[f"{p}_vs_gpu"] = r["tokens_per_s"] / gpu["tokens_per_s"]
    if "host_vs_gpu" in out:
        out["host_within_1pct"] = out["host_vs_gpu"] >= 0.99
    return out


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() or not args.tiny else "cpu"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: this benchmark is for a GPU (use --tiny to check "
                         "the script on the CPU)")
    settings = TINY if args.tiny else FULL
    work = Path(tempfile.mkdtemp(prefix="placement-bench-")) if args.dir is None else args.dir
    if args.dir is not None:
        work.mkdir(parents=True, exist_ok=False)
    started = datetime.datetime.now()
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / f"gpu-placement-{started.date().isoformat()}-{device_name(device)}.json"
    try:
        t0 = time.perf_counter()
        sizes = make_model(work / "model", settings, device)
        write_s = time.perf_counter() - t0
        print(f"wrote the model ({sizes['model_file_bytes'] / 1e9:.2f} GB) in {write_s:.1f} s",
              file=sys.stderr)
        files = open_model(work / "model")
        gen = torch.Generator().manual_seed(2)
        batches = [torch.randint(0, settings["vocab_size"], (args.batch, args.seq),
                                 generator=gen).to(device) for _ in range(4)]
        result = {
            "benchmark": "forward tokens/s by table placement", "date": started.isoformat(
                timespec="seconds"), "tiny": args.tiny, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
            platform.processor() or "cpu", "batch": args.batch, "seq": args.seq,
            "dtype": args.dtype, "warmup": args.warmup, "model": settings, **sizes,
            "model_write_s": round(write_s, 1), "goal": "host tokens/s >= 0.99 x gpu",
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "runs": {},
        }
        reference = None
        for p in args.placements:
            record, first, fetched = measure(files, device, p, batches, args)
            if reference is None:
                reference = (p, first)
                result["rows_fetched_first_batch"] = fetched
            else:
                record[f"logits_equal_{reference[0]}"] = bool(torch.equal(first, reference[1]))
            result["runs"][p] = record
            result["summary"] = summary(result["runs"])
            out.write_text(json.dumps(result, indent=2) + "\n")
            print(f"{p}: {record['tokens_per_s']:,.0f} tokens/s "
                  f"({record['ms_per_forward']:.1f} ms per forward, built in "
                  f"{record['build_s']} s)", file=sys.stderr)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result["summary"]))
    print(f"wrote {out}", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
