"""engram-edit generate: continue a prompt with the model, memory on or off."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from commands._options import DeviceOpt, JsonOpt, MemoryOpt, ModelOpt, PlacementOpt
from commands._output import Output
from engram_edit.paths import resolve_model


def generate(
    prompt: Annotated[str, typer.Argument(help="Text to continue (used exactly as given).")],
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.")] = 32,
    temperature: Annotated[float, typer.Option(help="0 = greedy; higher = more random.")] = 0.0,
    top_k: Annotated[int | None, typer.Option(help="Sample only from the K likeliest.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for sampling.")] = None,
    no_memory: Annotated[bool, typer.Option("--no-memory", help="Switch every Engram module "
                                            "off (ablation).")] = False,
    model: ModelOpt = None,
    memory: MemoryOpt = None,
    device: DeviceOpt = None,
    placement: PlacementOpt = None,
    json: JsonOpt = False,
) -> None:
    """Print the prompt followed by its completion, streamed as tokens come.

    Nothing else goes to stdout, so scripts can read it; --json prints {prompt, completion,
    tokens} instead. Greedy by default; generation stops at <eos> or --max-new-tokens.

    Examples:
      engram-edit generate "Alexander the"
      engram-edit generate "Alexander the" --no-memory
      engram-edit generate "The capital of France is" --temperature 0.8 --seed 1 --json
    """
    from engram_edit.checkpoint import load_model
    from engram_edit.generate import GenerationSettings, generate_text

    settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature,
                                  top_k=top_k, seed=seed, memory=not no_memory)
    problems = settings.problems()
    if problems:
        from engram_edit.errors import BadInputError

        raise BadInputError(problems)
    files, net = load_model(resolve_model(model).path, memory, device,
                            placement and placement.value)
    out = Output(json)
    pieces, tokens = [], []
    if not json:
        sys.stdout.write(prompt)
        sys.stdout.flush()
    for token, piece in generate_text(net, files.tokenizer, prompt, settings):
        tokens.append(token)
        pieces.append(piece)
        if not json and piece:
            sys.stdout.write(piece)
            sys.stdout.flush()
    completion = files.tokenizer.decode(tokens)
    if json:
        out.json({"prompt": prompt, "completion": completion, "tokens": tokens})
    else:
        sys.stdout.write(completion[len("".join(pieces)):] + "\n")


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)
