"""Benchmark: what a model knows, and how much of it lives in the Engram memory.

For each model given (the bundled one by default; `--baseline DIR` runs a second one beside it
in the same process, on the same probes and text):
  facts      greedy top-1 (the whole answer, as `generate` would print it) on every probe of
             --probes, memory on and off, per relation and phrasing: "trained" wordings occur
             in the training text, "heldout" ones never do
  entities   the entity-name completions (relation "entity") in count bands of the corpus
  text       validation loss and next-token top-1 on the bundled held-out text (the plain
             corpus's validation split), memory on and off, over --windows windows of 256
Bars (memory on unless said): trained >= 0.8, heldout >= 0.5, memory off at most half of each;
validation loss no worse than the baseline's (or than --max-valid-loss); entity completions with
count >= 10 >= 0.7; held-out next-token top-1 with the memory off >= 0.8 x on.
Results go to bench/results/knowledge-<date>.json.

Run (from the repo root, venv active):
    python bench/knowledge_bench.py
    python bench/knowledge_bench.py --model build/new-model --baseline engram_edit/bundled/model
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from engram_edit import paths
from engram_edit.checkpoint import load_model
from engram_edit.eval import (
    AblationRow,
    fact_ablation,
    read_probes,
    relation_group,
    text_ablation,
)
from engram_edit.train import tokenize_texts

ROOT = Path(__file__).resolve().parent.parent
COUNT_BANDS = (5, 10, 20)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=paths.bundled_model_dir())
    p.add_argument("--baseline", type=Path, default=None,
                   help="a second model measured beside --model (e.g. the one it replaces)")
    p.add_argument("--probes", type=Path, default=paths.bundled_probes_file())
    p.add_argument("--heldout", type=Path, default=paths.bundled_heldout_file())
    p.add_argument("--windows", type=int, default=128, help="held-out windows of 256 tokens")
    p.add_argument("--max-valid-loss", type=float, default=4.08,
                   help="validation-loss bar when no --baseline is given (the earlier model's)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--no-write", action="store_true", help="print only; write no results file")
    return p.parse_args(argv)


def _row(r: AblationRow) -> dict:
    return {**asdict(r), "kept": r.kept}


def measure(model_dir: Path, probes_path: Path, heldout: Path, windows: int) -> dict:
    files, model = load_model(model_dir, device="cpu")
    probes = read_probes(probes_path)
    facts = [p for p in probes if p.relation != "entity"]
    out: dict = {"model": str(model_dir)}
    t0 = time.perf_counter()
    if facts:
        rows = fact_ablation(model, files.tokenizer, facts,
                             group_by=[lambda p: p.phrasing, relation_group])
        phrasings = {r.name: r for r in rows if r.name in ("trained", "heldout")}
        out.update({name: _row(r) for name, r in phrasings.items()})
        out["relations"] = [_row(r) for r in rows[1 + len(phrasings):]]
    entities = [p for p in probes if p.relation == "entity"]
    out["entities"] = {}
    for band in COUNT_BANDS:
        subset = [p for p in entities if (p.count or 0) >= band]
        if subset:
            out["entities"][f"count>={band}"] = _row(
                fact_ablation(model, files.tokenizer, subset)[0])
    stream = np.asarray(tokenize_texts(heldout, files.tokenizer))
    out["text"] = _row(text_ablation(model, stream, windows=windows))
    out["seconds"] = round(time.perf_counter() - t0, 1)
    training = model_dir / "training.json"
    if training.is_file():
        t = json.loads(training.read_text())
        out["training"] = {k: t.get(k) for k in ("steps", "tokens", "seconds", "valid_loss",
                                                 "valid_loss_no_memory")}
    return out


def bars(new: dict, valid_bar: float) -> dict[str, bool]:
    b: dict[str, bool] = {}
    for phrasing, need in (("trained", 0.8), ("heldout", 0.5)):
        row = new.get(phrasing)
        b[f"{phrasing} >= {need}"] = bool(row and row["top1_memory"] >= need)
        b[f"{phrasing} memory off <= half"] = bool(
            row and row["top1_no_memory"] <= row["top1_memory"] / 2)
    b[f"validation loss <= {valid_bar:.4f}"] = new["text"]["loss_memory"] <= valid_bar
    ent = new["entities"].get("count>=10")
    b["entities count>=10 >= 0.7"] = bool(ent and ent["top1_memory"] >= 0.7)
    text = new["text"]
    b["text top-1 memory off >= 0.8 x on"] = text["top1_no_memory"] >= 0.8 * text["top1_memory"]
    return b


def _print(name: str, m: dict) -> None:
    print(f"\n{name}: {m['model']}")
    rows = [("trained", m.get("trained")), ("heldout", m.get("heldout"))]
    rows += [(r["name"], r) for r in m.get("relations", [])]
    rows += [(f"entities {k}", v) for k, v in m["entities"].items()] + [("text", m["text"])]
    print(f"{'set':34} {'items':>6} {'on':>6} {'off':>6} {'loss on':>8} {'loss off':>8}")
    for label, r in rows:
        if r:
            print(f"{label:34} {r['items']:>6} {r['top1_memory']:6.3f} {r['top1_no_memory']:6.3f}"
                  f" {r['loss_memory']:8.3f} {r['loss_no_memory']:8.3f}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"date": datetime.date.today().isoformat(), "machine": platform.machine(),
              "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
              "model": measure(args.model, args.probes, args.heldout, args.windows)}
    valid_bar = args.max_valid_loss
    if args.baseline:
        result["baseline"] = measure(args.baseline, args.probes, args.heldout, args.windows)
        valid_bar = result["baseline"]["text"]["loss_memory"]
    result["bars"] = bars(result["model"], valid_bar)
    _print("model", result["model"])
    if args.baseline:
        _print("baseline", result["baseline"])
    print()
    for name, ok in result["bars"].items():
        print(f"{'met ' if ok else 'MISS'} {name}")
    if not args.no_write:
        args.results.mkdir(parents=True, exist_ok=True)
        path = args.results / f"knowledge-{result['date']}.json"
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
