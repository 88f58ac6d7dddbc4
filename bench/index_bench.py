"""Benchmark: n-gram index build throughput, and row search latency, faiss against numpy.

Three measurements, each written to bench/results/index-<date>.json:
  build      engram_edit.index_build.build_index over --corpus with the --model's tokenizer and
             orders: n-gram occurrences counted per second, whole run (read, tokenize, count,
             write); --repeat rounds, the best kept.
  model      RowSearch over every row of the --model: per-query latency of the exact faiss
             IndexFlatIP search (RowSearch.top_rows) and of a plain numpy matrix product plus
             argpartition over the same rows and queries, for --queries random tokens.
  synthetic  the same two on a random table of --rows rows (8 columns, --width wide, hidden
             --hidden, vocab 4096), standing in for a large memory.
Both searchers must return the same rows (checked on every query).

Run (from the repo root, venv active; after the bundled model and corpus exist):
    python bench/index_bench.py
    python bench/index_bench.py --corpus build/corpus/train.jsonl --rows 1000000 --queries 200
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from engram_edit.checkpoint import load_model
from engram_edit.index_build import build_index
from engram_edit.paths import bundled_model_dir
from engram_edit.search import RowSearch

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = 8  # columns of the synthetic table: orders 2..3 x 4 heads, as in the bundled model


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=bundled_model_dir(),
                   help="model directory; default the bundled model")
    p.add_argument("--corpus", type=Path, nargs="+",
                   default=[ROOT / "build" / "corpus" / "train.jsonl"],
                   help="corpus files to index; default build/corpus/train.jsonl")
    p.add_argument("--repeat", type=int, default=1, help="build rounds; default 1")
    p.add_argument("--queries", type=int, default=100,
                   help="random query tokens per search measurement; default 100")
    p.add_argument("--top", type=int, default=10, help="rows per query; default 10")
    p.add_argument("--rows", type=int, default=1_000_000,
                   help="rows of the synthetic table; default 1,000,000")
    p.add_argument("--width", type=int, default=64,
                   help="row width of the synthetic table; default 64 (the official demo's)")
    p.add_argument("--hidden", type=int, default=1024,
                   help="hidden size behind the synthetic table; default 1024")
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "results",
                   help="where index-<date>.json is written; default bench/results")
    return p.parse_args()


def numpy_top_rows(s: RowSearch, token: int, top_k: int) -> list[tuple[float, int, int, int]]:
    """What RowSearch.top_rows returns, by a dense matrix product per column."""
    found = []
    for lid, table in s.rows.items():
        q = s.queries(lid, token).astype(np.float32)
        for c, (a, p) in enumerate(zip(s.offsets[lid], s.primes[lid], strict=True)):
            scores = table[a:a + p] @ q[c]
            k = min(top_k, p)
            best = np.argpartition(-scores, k - 1)[:k]
            found += [(float(scores[i]), lid, c, int(i)) for i in best]
    found.sort(key=lambda f: -f[0])
    return found[:top_k]


def latency(s: RowSearch, tokens: np.ndarray, top_k: int) -> dict[str, float]:
    """Per-query seconds of faiss and numpy (median and 90th percentile) on the same queries."""
    times: dict[str, list[float]] = {"faiss": [], "numpy": []}
    for token in tokens.tolist():
        t0 = time.perf_counter()
        a = s.top_rows(token, top_k)
        t1 = time.perf_counter()
        b = numpy_top_rows(s, token, top_k)
        t2 = time.perf_counter()
        times["faiss"].append(t1 - t0)
        times["numpy"].append(t2 - t1)
        same = {x[1:] for x in a} == {x[1:] for x in b}
        close = np.allclose([x[0] for x in a], [x[0] for x in b], rtol=1e-4, atol=1e-5)
        if not (same or close):
            raise SystemExit(f"token {token}: faiss and numpy disagree")
    out = {}
    for name, t in times.items():
        out[f"{name}_median_ms"] = 1000 * float(np.median(t))
        out[f"{name}_p90_ms"] = 1000 * float(np.percentile(t, 90))
    out["numpy_over_faiss"] = out["numpy_median_ms"] / out["faiss_median_ms"]
    return out


def synthetic(rows: int, width: int, hidden: int) -> RowSearch:
    rng = np.random.default_rng(0)
    per = rows // COLUMNS
    primes = np.full(COLUMNS, per, np.int64)
    offsets = np.arange(COLUMNS, dtype=np.int64) * per
    table = rng.standard_normal((per * COLUMNS, width), dtype=np.float32)
    proj = rng.standard_normal((COLUMNS, width, hidden), dtype=np.float32) / hidden ** 0.5
    head = rng.standard_normal((4096, hidden), dtype=np.float32)
    return RowSearch({0: table}, {0: offsets}, {0: primes}, {0: proj},
                     head - head.mean(0, keepdims=True), 1.0, 4)


def main() -> None:
    args = parse_args()
    rng = np.random.default_rng(0)
    result: dict = {"benchmark": "index build and row search",
                    "date": datetime.datetime.now().isoformat(timespec="seconds")}
    files, model = load_model(args.model, device="cpu")
    with tempfile.TemporaryDirectory(prefix="index-bench-") as work:
        runs = []
        for k in range(args.repeat):
            report = build_index(args.corpus, files, Path(work) / "index.safetensors")
            runs.append({"seconds": report.seconds, "ngrams_per_second": report.ngrams_per_second,
                         "tokens_per_second": report.info.tokens / report.seconds})
            print(f"build round {k + 1}: {report.seconds:.1f} s, "
                  f"{report.ngrams_per_second:,.0f} n-grams/s", file=sys.stderr)
        info = report.info
        result["build"] = {
            "corpus": [str(p) for p in args.corpus], "documents": info.documents,
            "tokens": info.tokens, "occurrences": info.occurrences, "distinct": info.distinct,
            "index_bytes": info.nbytes, "runs": runs,
            "best_ngrams_per_second": max(r["ngrams_per_second"] for r in runs)}
    t0 = time.perf_counter()
    searcher = RowSearch.build(model, tokenizer=files.tokenizer)
    build_s = time.perf_counter() - t0
    tokens = rng.integers(0, files.tokenizer.vocab_size, args.queries)
    result["model"] = {"model": str(args.model),
                       "rows": sum(len(t) for t in searcher.rows.values()),
                       "width": files.config.engram_head_dim, "build_s": build_s,
                       **latency(searcher, tokens, args.top)}
    print(f"model search: {result['model']}", file=sys.stderr)
    t0 = time.perf_counter()
    big = synthetic(args.rows, args.width, args.hidden)
    build_s = time.perf_counter() - t0
    tokens = rng.integers(0, len(big.head), args.queries)
    result["synthetic"] = {"rows": sum(len(t) for t in big.rows.values()), "width": args.width,
                           "hidden": args.hidden, "columns": COLUMNS, "build_s": build_s,
                           **latency(big, tokens, args.top)}
    print(f"synthetic search: {result['synthetic']}", file=sys.stderr)
    import faiss

    result |= {"top_k": args.top, "queries": args.queries, "faiss": faiss.__version__,
               "faiss_gpus": faiss.get_num_gpus(), "numpy": np.__version__,
               "cpu_count": os.cpu_count(), "loadavg_after": os.getloadavg(),
               "python": platform.python_version(), "platform": platform.platform()}
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / f"index-{datetime.date.today().isoformat()}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"build_ngrams_per_second": result["build"]["best_ngrams_per_second"],
                      "model": result["model"], "synthetic": result["synthetic"]}))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
