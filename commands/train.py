"""engram-edit train: train a small Engram model on a corpus built by `engram-edit corpus`."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from commands._options import DeviceOpt, JsonOpt
from commands._output import Output
from engram_edit.config import EngramConfig
from engram_edit.errors import BadInputError
from engram_edit.tokenizer import EngramTokenizer


def train_command(
    corpus: Annotated[Path, typer.Option("--corpus", metavar="DIR",
                                         help="Corpus folder (train.jsonl, valid.jsonl, "
                                              "tokenizer.json).")],
    out: Annotated[Path, typer.Option("--out", metavar="DIR", help="Model directory to write.")],
    config: Annotated[Path | None, typer.Option(
        "--config", metavar="FILE", help="config.json with the model's settings "
        "(default: EngramConfig's defaults, vocab size from the tokenizer).")] = None,
    tokenizer: Annotated[Path | None, typer.Option(
        metavar="FILE", help="tokenizer.json (default: the corpus folder's).")] = None,
    minutes: Annotated[float | None, typer.Option(help="Train for this much wall time.")] = None,
    tokens: Annotated[int | None, typer.Option(help="Train on this many tokens.")] = None,
    resume: Annotated[bool, typer.Option(help="Go on from the last checkpoint in --out.")
                      ] = False,
    init: Annotated[Path | None, typer.Option(
        "--init", metavar="DIR", help="Start from this model's weights (same config and "
        "tokenizer) instead of a random init: continued training on a new mix.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of init and data order.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Sequences per step.")] = 16,
    seq_len: Annotated[int, typer.Option(help="Tokens per sequence.")] = 256,
    lr: Annotated[float, typer.Option(help="Peak learning rate of the backbone.")] = 3e-3,
    table_lr: Annotated[float, typer.Option(help="Peak learning rate of the Engram tables.")
                        ] = 2e-2,
    warmup_steps: Annotated[int, typer.Option(help="Steps of linear learning-rate warm-up.")
                            ] = 100,
    eval_every: Annotated[int, typer.Option(help="Steps between validation runs.")] = 200,
    checkpoint_minutes: Annotated[float, typer.Option(help="Minutes between checkpoints.")
                                  ] = 5.0,
    dtype: Annotated[str, typer.Option(help="Storage dtype of the written weights: "
                                       "float32, bfloat16 or float16.")] = "float32",
    bf16: Annotated[bool, typer.Option(help="bf16 autocast for the forward pass.")] = True,
    memory_dropout: Annotated[float, typer.Option(
        help="Share of steps trained with every Engram module off, so the backbone stays "
             "usable without the memory.")] = 0.0,
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch.")] = None,
    compile: Annotated[bool, typer.Option(
        "--compile", help="torch.compile the training step: minutes to compile, faster after."
    )] = False,
    device: DeviceOpt = None,
    json: JsonOpt = False,
) -> None:
    """Train a small Engram model on a corpus.

    With --tokens and a seed the result is the same on the same machine; with
    --minutes the schedule follows wall time. Validation loss is logged with the
    memory on and off.

    Examples:
      engram-edit train --corpus build/corpus --out build/model --tokens 2000000
      engram-edit train --corpus build/corpus --out build/model --config cfg.json --minutes 40
      engram-edit train --corpus build/corpus --out build/model --minutes 40 --resume
      engram-edit train --corpus build/mix --out build/model2 --init build/model --minutes 30
    """
    from engram_edit.train import TrainProgress, TrainSettings, train

    output = Output(json)
    tok = EngramTokenizer.from_file(tokenizer or corpus / "tokenizer.json")
    if config is not None:
        cfg = EngramConfig.from_json_file(config)
    else:
        cfg = EngramConfig(vocab_size=tok.vocab_size)
    if cfg.vocab_size < tok.vocab_size:
        raise BadInputError(f"{config}: vocab_size {cfg.vocab_size} is smaller than the "
                            f"tokenizer's {tok.vocab_size}")
    settings = TrainSettings(tokens=tokens, minutes=minutes, batch_size=batch_size,
                             seq_len=seq_len, lr=lr, table_lr=table_lr, eval_every=eval_every,
                             warmup_steps=warmup_steps,
                             checkpoint_seconds=checkpoint_minutes * 60, seed=seed,
                             device=device, bf16=bf16, threads=threads, out_dtype=dtype,
                             compile=compile, memory_dropout=memory_dropout,
                             init=None if init is None else str(init))
    columns = [TextColumn("[bold]train"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"),
               TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]} tok/s"),
               TextColumn("valid {task.fields[valid]}"), TimeElapsedColumn(),
               TimeRemainingColumn()]
    with Progress(*columns, console=output.err, disable=json) as bar:
        task = bar.add_task("train", total=1.0, loss="-", speed="-", valid="-")

        def on_progress(p: TrainProgress) -> None:
            valid = bar.tasks[task].fields["valid"]
            if p.event == "eval":
                valid = f"{p.valid_loss:.3f} (no memory {p.valid_loss_no_memory:.3f})"
                bar.console.print(f"step {p.step}: train {p.loss:.3f}, valid {valid}, "
                                  f"{p.tokens_per_s:,.0f} tok/s")
            elif p.event == "checkpoint":
                bar.console.print(f"step {p.step}: checkpoint written")
            bar.update(task, completed=p.fraction, loss=f"{p.loss:.3f}",
                       speed=f"{p.tokens_per_s:,.0f}", valid=valid)

        result = train(corpus, out, cfg, tok, settings, resume=resume, on_progress=on_progress)
    record = asdict(result)
    record["out"] = str(result.out)
    output.result(record, lambda console: console.print(
        f"wrote {result.out}: {result.steps} steps, {result.tokens:,} tokens in "
        f"{result.seconds / 60:.1f} min; valid loss {result.valid_loss:.3f} with memory, "
        f"{result.valid_loss_no_memory:.3f} without"))


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)
