"""The engram-edit command line: wiring only. Each verb lives in its own module."""

from __future__ import annotations

import sys

import typer

from commands import corpus, eval, generate, history, index, info, interop, lookup, split, train
from commands._errors import ErrorMappingGroup

app = typer.Typer(
    name="engram-edit",
    cls=ErrorMappingGroup,
    help="See, fix and ship the knowledge in the hashed n-gram tables of Engram models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

for module in (info, lookup, generate, eval, split, corpus, train, history, interop, index):
    module.register(app)


def main() -> None:
    sys.exit(app())
