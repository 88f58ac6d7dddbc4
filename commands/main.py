"""The engram-edit command line: wiring only. Each verb lives in its own module.

A run imports only the module of the verb it names (so `lookup --memory` starts without
importing torch or the other verbs); `--help` and the test suite's ``app`` load them all.
"""

from __future__ import annotations

import importlib
import sys

import typer

from commands._errors import ErrorMappingGroup

# verb -> the commands module that registers it, in the order `--help` lists them
VERBS: dict[str, str] = {
    "lookup": "lookup", "gates": "lookup", "rows": "lookup", "info": "info",
    "search": "index", "generate": "generate", "eval": "eval",
    "patch": "patch", "overwrite": "patch", "apply": "history", "undo": "history",
    "history": "history", "verify": "history", "reset": "history",
    "split": "split", "join": "split", "convert-memory": "split",
    "import": "interop", "export": "interop",
    "index": "index", "corpus": "corpus", "train": "train",
}


def _root() -> None:
    """See, fix and ship the knowledge in the hashed n-gram tables of Engram models."""


def build_app(verb: str | None = None) -> typer.Typer:
    """The typer app with every verb, or only ``verb``'s module when it names one."""
    app = typer.Typer(
        name="engram-edit",
        cls=ErrorMappingGroup,
        help="See, fix and ship the knowledge in the hashed n-gram tables of Engram models.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode="rich",
    )
    # A callback keeps the group a group even when only one verb is registered.
    app.callback()(_root)
    modules = [VERBS[verb]] if verb in VERBS else list(dict.fromkeys(VERBS.values()))
    for name in modules:
        importlib.import_module(f"commands.{name}").register(app)
    return app


def __getattr__(name: str) -> typer.Typer:
    if name == "app":  # the whole app, built on first use (tests drive it with CliRunner)
        app = build_app()
        globals()["app"] = app
        return app
    raise AttributeError(name)


def main() -> None:
    verb = sys.argv[1] if len(sys.argv) > 1 else None
    sys.exit(build_app(verb)())
