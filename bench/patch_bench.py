"""Benchmark: editing facts into the bundled model (issue 6 "Bars"), on the CPU.

Works on a copy of the model in a temp directory; the model itself is never written. Edits
run as `patch` runs them: with the bundled n-gram index (--rows auto leaves out crowded heads;
the locality term gets corpus text ending with the n-grams that share the touched rows, when
the corpus is built, else a note in the results).
  batch       --batch facts (default 200, spread over every relation of --facts) in one
              batch with the default method: seconds, edits/s and the metric set before and
              after; then the same facts with --method overwrite, for comparison.
  sequential  --patches patches of --per-patch facts each (default 10 x 100 = 1000 edits,
              disjoint from one another), each computed on the model with the earlier ones
              applied, keeping their facts solved (as `patch` does with the facts of applied
              patches), and applied to the copy through the journal; then efficacy on the first
              patch's facts, and retention: of the true facts the model gets right (--known,
              fixtures/facts/known_facts.jsonl) whose prompts were not edited, the share it
              still completes right (greedy) after all the patches.
  undo        every patch undone, last first; then the sha256 of every file of the copy
              (outside .engram/) against its value before the first patch.
Bars: efficacy >= 0.95, neighbourhood >= 0.95 x before, >= 20 edits/s, held-out loss rise
< 1% (batch); efficacy on the first 100 >= 0.9 and retention >= 0.95 (sequential); every
sha256 equal (undo). Results go to bench/results/patch-<date>.json.

Run (from the repo root, venv active):
    python bench/patch_bench.py
    python bench/patch_bench.py --batch 50 --patches 2 --per-patch 20 --threads 2
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from engram_edit import paths
from engram_edit.checkpoint import load_model
from engram_edit.edit.compute import EditSettings, Method, edit_facts, load_patch_rows
from engram_edit.edit.facts import Fact, read_facts
from engram_edit.edit.journal import apply_patch, undo_patch
from engram_edit.eval import fact_metrics, greedy_hits
from engram_edit.index import default_index_for
from engram_edit.train import tokenize_texts

ROOT = Path(__file__).resolve().parent.parent
FACTS = ROOT / "fixtures" / "facts" / "counterfact.jsonl"
KNOWN = ROOT / "fixtures" / "facts" / "known_facts.jsonl"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=paths.bundled_model_dir(),
                   help="model directory; default: the bundled model")
    p.add_argument("--facts", type=Path, default=FACTS,
                   help="counterfactual edits; default fixtures/facts/counterfact.jsonl")
    p.add_argument("--known", type=Path, default=KNOWN,
                   help="true facts the model gets right, for retention; default "
                        "fixtures/facts/known_facts.jsonl")
    p.add_argument("--batch", type=int, default=200, help="facts in the one-batch run")
    p.add_argument("--patches", type=int, default=10, help="sequential patches")
    p.add_argument("--per-patch", type=int, default=100, help="facts per sequential patch")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0, help="seed of the fact samples and edits")
    p.add_argument("--skip", nargs="*", default=[], choices=["batch", "overwrite",
                                                              "sequential"],
                   help="parts to leave out")
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "results",
                   help="where patch-<date>.json is written; default bench/results")
    return p.parse_args()


def spread(facts: list[Fact], n: int, seed: int) -> list[int]:
    """``n`` fact indices drawn evenly from every part of the file (it is sorted by relation)."""
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(len(facts), size=min(n, len(facts)), replace=False).tolist())


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and ".engram" not in p.parts}


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def batch_run(files, model, facts, stream, method: Method, seed: int) -> dict:
    settings = EditSettings(method=method)
    settings.distill.seed = seed
    report = edit_facts(files, model, facts, settings, stream, default_index_for(files))
    before, after = report.before, report.after
    out = {"method": method.value, "facts": report.facts, "rows_touched": report.rows_touched,
           "notes": report.notes,
           "seconds": report.seconds, "edits_per_s": report.edits_per_s,
           "unsolved": len(report.unsolved), "before": asdict(before), "after": asdict(after),
           "heldout_loss_rise": after.heldout_loss / before.heldout_loss - 1}
    if method is Method.DISTILL:
        out["bars"] = {
            "efficacy>=0.95": after.efficacy >= 0.95,
            "neighbourhood>=0.95*before": after.neighbourhood >= 0.95 * before.neighbourhood,
            "edits_per_s>=20": report.edits_per_s >= 20,
            "heldout_loss_rise<1%": out["heldout_loss_rise"] < 0.01}
    log(f"{method.value}: {report.facts} facts in {report.seconds:.1f} s "
        f"({report.edits_per_s:.1f}/s); efficacy {before.efficacy:.3f} -> {after.efficacy:.3f}, "
        f"paraphrase {before.paraphrase:.3f} -> {after.paraphrase:.3f}, neighbourhood "
        f"{before.neighbourhood:.3f} -> {after.neighbourhood:.3f}, held-out loss "
        f"{before.heldout_loss:.4f} -> {after.heldout_loss:.4f}")
    return out


def sequential_run(work: Path, facts: list[Fact], known_facts: list[Fact], stream, args,
                   partial=None) -> dict:
    files, model = load_model(work, device="cpu", placement="gpu")
    order = spread(facts, args.patches * args.per_patch, args.seed + 1)
    rng = np.random.default_rng(args.seed + 2)
    order = [order[i] for i in rng.permutation(len(order))]
    chunks = [[facts[i] for i in order[k * args.per_patch:(k + 1) * args.per_patch]]
              for k in range(args.patches)]
    edited = {facts[i].prompt for i in order}
    kept = [f for f in known_facts if f.prompt not in edited]
    right = greedy_hits(model, files.tokenizer, kept)
    known = [f for f, ok in zip(kept, right, strict=True) if ok]
    log(f"known true facts: {len(known_facts)}, not edited {len(kept)}, right at the start "
        f"{len(known)}")
    original = digests(work)
    index = default_index_for(files)
    settings = EditSettings(measure=False)
    settings.distill.seed = args.seed
    patches = []
    for k, chunk in enumerate(chunks):
        earlier = [f for c in chunks[:k] for f in c]
        report = edit_facts(files, model, chunk, settings, stream, index, keep=earlier)
        applied = apply_patch(files, report.patch, f"bench-{k:02d}")
        load_patch_rows(model, report.patch, "after")
        patches.append({"facts": len(chunk), "rows_touched": report.rows_touched,
                        "seconds": report.seconds, "edits_per_s": report.edits_per_s,
                        "unsolved": len(report.unsolved), "copy": applied.copy.name})
        log(f"patch {k + 1}/{len(chunks)}: {report.rows_touched} rows, {report.seconds:.1f} s, "
            f"{len(report.unsolved)} unsolved")
        if partial is not None:  # a run cut short still leaves its figures so far
            partial({"patches_so_far": patches})
    first = fact_metrics(model, files.tokenizer, chunks[0])
    retained = greedy_hits(model, files.tokenizer, known) if known else np.zeros(0)
    retention = float(retained.mean()) if len(retained) else None
    log(f"after {len(order)} edits: efficacy on the first {len(chunks[0])} {first.efficacy:.3f}, "
        f"known true facts still right {int(retained.sum())} of {len(retained)}")
    start = time.perf_counter()
    for _ in chunks:
        undo_patch(files)
    undo_s = time.perf_counter() - start
    restored = digests(work)
    same = {name: restored.get(name) == sha for name, sha in original.items()}
    log(f"undo of {len(chunks)} patches: {undo_s:.2f} s, every file equal: {all(same.values())}")
    return {"patches": patches, "edits": len(order), "first_patch": asdict(first),
            "known_facts_file": str(args.known), "known_right_before": len(known),
            "known_right_after": int(retained.sum()), "retention": retention,
            "undo_seconds": undo_s, "sha256_equal": same,
            "bars": {"efficacy_first>=0.9": first.efficacy >= 0.9,
                     "retention>=0.95": retention is not None and retention >= 0.95,
                     "undo_byte_identical": all(same.values())}}


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    facts = read_facts(args.facts)
    known_facts = read_facts(args.known)
    result: dict = {"benchmark": "patch", "date": datetime.datetime.now().isoformat(
        timespec="seconds"), "model": str(args.model), "facts_file": str(args.facts),
        "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "load_average": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="patch-bench-") as tmp:
        work = Path(tmp) / "model"
        shutil.copytree(args.model, work, ignore=shutil.ignore_patterns(".engram"))
        files, model = load_model(work, device="cpu", placement="gpu")
        stream = np.asarray(tokenize_texts(paths.bundled_heldout_file(), files.tokenizer))
        sample = [facts[i] for i in spread(facts, args.batch, args.seed)]
        if "batch" not in args.skip:
            result["batch"] = batch_run(files, model, sample, stream, Method.DISTILL, args.seed)
        if "overwrite" not in args.skip:
            result["overwrite"] = batch_run(files, model, sample, stream, Method.OVERWRITE,
                                            args.seed)
        del model
        args.results.mkdir(parents=True, exist_ok=True)
        out = args.results / f"patch-{datetime.date.today().isoformat()}.json"

        def save(part: dict | None = None) -> None:
            out.write_text(json.dumps({**result, **({"sequential": part} if part else {})},
                                      indent=2) + "\n")

        save()
        if "sequential" not in args.skip:
            result["sequential"] = sequential_run(work, facts, known_facts, stream, args, save)
    result["load_average_end"] = os.getloadavg()
    save()
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
