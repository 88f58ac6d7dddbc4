"""engram-edit corpus: build the training text of the bundled model from fetched packages."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from commands._options import JsonOpt
from commands._output import Output
from engram_edit.corpus import build_corpus, read_corpus, train_tokenizer
from engram_edit.fileio import atomic_path


def corpus(
    sources: Annotated[Path, typer.Argument(
        help="Folder filled by fixtures/recipe/fetch_sources.sh (the unpacked packages).")],
    out: Annotated[Path, typer.Option("--out", help="Folder for train.jsonl, valid.jsonl, "
                                      "manifest.json and tokenizer.json.")],
    valid_fraction: Annotated[float, typer.Option(help="Share of documents held out.")] = 0.02,
    seed: Annotated[int, typer.Option(help="Seed of the train/valid split.")] = 0,
    vocab_size: Annotated[int, typer.Option(help="BPE tokenizer entries (0: no tokenizer).")
                          ] = 8192,
    json: JsonOpt = False,
) -> None:
    """Build the training corpus from fetched packages, and its tokenizer.

    Dedups documents, holds out a validation split, writes a manifest with the sha256 of every
    input, and trains a byte-level BPE tokenizer on the train split.

    Examples:
      bash fixtures/recipe/fetch_sources.sh ~/.cache/engram-edit/sources
      engram-edit corpus ~/.cache/engram-edit/sources --out build/corpus
    """
    output = Output(json)
    manifest = build_corpus(sources, out, valid_fraction=valid_fraction, seed=seed,
                            progress=None if json else output.note)
    if vocab_size:
        tok = train_tokenizer(read_corpus(out, "train"), vocab_size=vocab_size)
        with atomic_path(out / "tokenizer.json") as tmp:
            tok.save(str(tmp))
        output.note(f"wrote {out / 'tokenizer.json'} ({tok.get_vocab_size()} entries)")
    output.result(asdict(manifest), lambda console: console.print(
        f"corpus in {out}: {manifest.total('train').documents} train and "
        f"{manifest.total('valid').documents} valid documents"))


def register(app: typer.Typer) -> None:
    app.command("corpus")(corpus)
