"""Option aliases shared by every command, defined once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

ModelOpt = Annotated[Path | None, typer.Option(
    "--model", "-m", metavar="DIR",
    help="Model directory. Default: $ENGRAM_EDIT_MODEL, else your working copy, "
         "else the bundled model.")]
MemoryOpt = Annotated[Path | None, typer.Option(
    "--memory", metavar="DIR",
    help="A split memory directory (from `split`) to plug into the model.")]
JsonOpt = Annotated[bool, typer.Option(
    "--json", help="Print one JSON object on stdout, nothing else.")]
DeviceOpt = Annotated[str | None, typer.Option(
    "--device", help="torch device (cpu, cuda, cuda:1). Default: cuda when available, else cpu.")]
