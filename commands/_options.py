"""Option aliases shared by every command, defined once."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from engram_edit.errors import BadInputError

ModelOpt = Annotated[Path | None, typer.Option(
    "--model", "-m", metavar="DIR",
    help="Model directory. Default: $ENGRAM_EDIT_MODEL, else your working copy, "
         "else the bundled model.")]
MemoryOpt = Annotated[Path | None, typer.Option(
    "--memory", metavar="DIR",
    help="A split memory directory (from `split`) to plug into the model.")]
JsonOpt = Annotated[bool, typer.Option(
    "--json", help="Print one JSON object on stdout, nothing else.")]
ForceOpt = Annotated[bool, typer.Option(
    "--force", help="Replace outputs that exist (model, memory or empty directories only).")]
DeviceOpt = Annotated[str | None, typer.Option(
    "--device", help="torch device (cpu, cuda, cuda:1). Default: cuda when available, else cpu.")]


class Placement(str, Enum):
    """The choices of --placement (engram_edit.model.placement.PLACEMENTS)."""

    gpu = "gpu"
    host = "host"
    mmap = "mmap"


PlacementOpt = Annotated[Placement | None, typer.Option(
    "--placement",
    help="Where the Engram tables live while the model runs: gpu (on the model's device, "
         "float32), host (CPU memory; the rows a batch needs are copied to the device), mmap "
         "(read from the memory file on demand, for tables larger than RAM). Default: gpu if "
         "the model runs on CUDA and fits in free GPU memory, else host; gpu on a CPU-only "
         "machine.")]


def one_path(argument: Path | None, option: Path | None, name: str, flag: str) -> Path | None:
    """The path given as the positional ``argument`` or as the option ``flag`` (the same path
    twice is fine); ``name`` is the argument's metavar, for the error."""
    if argument is not None and option is not None and argument != option:
        raise BadInputError(f"{name} is given twice ({argument} and {flag} {option}); "
                            f"give one")
    return argument if argument is not None else option
