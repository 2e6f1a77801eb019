"""The ``magpie-hub`` command line: thin wrappers that parse arguments and call :mod:`magpie_hub.pipeline`.

Each command imports the pipeline when it runs (it pulls in torch and transformers), so ``magpie-hub
--help`` and usage errors stay fast. A
:class:`~magpie_hub.errors.MagpieError` becomes one ``error: ...`` line on stderr and exit code 2.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from magpie_hub.errors import MagpieError, install_log_redaction, os_error, redact

app = typer.Typer(
    name="magpie-hub",
    help="Build, tag, filter, card and publish MAGPIE alignment datasets.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command()
def templates(
    model: Annotated[str, typer.Argument(help="Hub model id or local directory with a tokenizer")],
    system: Annotated[str | None, typer.Option(help="System prompt for pre_query_system")] = None,
    revision: Annotated[str | None, typer.Option(help="Model revision (Hub ids)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print exactly one JSON object")] = False,
) -> None:
    """Print the chat-format pieces derived from MODEL's own chat template."""
    from magpie_hub import pipeline  # heavy (transformers): only when a command runs

    fmt = pipeline.chat_format(model, revision=revision)
    data = fmt.to_dict(system=system)
    if as_json:
        typer.echo(json.dumps(data, ensure_ascii=False))
        return
    table = Table(title=Text(f"chat format of {model}"), show_lines=True)
    table.add_column("piece")
    table.add_column("value (repr)")
    for key, value in data.items():
        table.add_row(key, Text(repr(value)))  # Text: "[/INST]" is not rich markup
    Console().print(table)


def _quiet_weight_loading() -> None:
    """No "Loading weights" bar per model load (the build's model, each judge / reward step): the live progress
    and the step lines say what runs. Downloads keep huggingface_hub's own bars."""
    from huggingface_hub.utils import (  # light; with the command
        are_progress_bars_disabled,
        enable_progress_bars,
    )
    from transformers.utils import logging as transformers_logging  # loaded by the command anyway

    hub_bars = not are_progress_bars_disabled()
    transformers_logging.disable_progress_bar()   # (also turns huggingface_hub's bars off...)
    if hub_bars:
        enable_progress_bars()                    # (...which downloads keep)


@app.command()
def build(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML (see builders/)")],
    out: Annotated[Path | None, typer.Option(help="Output dataset directory")] = None,
    config: Annotated[list[str] | None, typer.Option("--config", help="Only build these configs")] = None,
    rows: Annotated[int | None, typer.Option(help="Override the row count of every config")] = None,
    model: Annotated[str | None, typer.Option(help="Override the recipe's model")] = None,
    backend: Annotated[str | None, typer.Option(help="transformers | tgi | openai (/v1/completions)")] = None,
    endpoint: Annotated[str | None, typer.Option(help="Server URL for the tgi / openai backends")] = None,
    fresh: Annotated[bool, typer.Option(help="Discard an existing output/checkpoint in --out")] = False,
    ray: Annotated[str | None, typer.Option(help="Run the rank shares as Ray tasks: local | auto | ray://HOST:PORT")] = None,
    ray_workers: Annotated[int | None, typer.Option(help="Ray shares (default: the cluster's GPUs for "
                                                          "transformers, else 1)", min=1)] = None,
) -> None:
    """Generate the recipe's configs into a Hub-shaped dataset directory (resumable)."""
    from magpie_hub import pipeline  # heavy (torch, transformers): only when a command runs

    _quiet_weight_loading()
    pipeline.build(recipe, out=out, configs=config or None, rows=rows, model=model, backend=backend,
              endpoint=endpoint, fresh=fresh, ray=ray, ray_workers=ray_workers)


@app.command()
def tag(
    directory: Annotated[Path, typer.Argument(help="Built dataset directory")],
    step: Annotated[list[str] | None, typer.Option("--step", help="Only run these tag steps")] = None,
    force: Annotated[bool, typer.Option(help="Recompute steps whose columns already exist")] = False,
) -> None:
    """Compute metadata columns (lengths, language, near-duplicates, judge tags) in place."""
    from magpie_hub import pipeline  # heavy (torch, transformers): only when a command runs

    _quiet_weight_loading()
    pipeline.tag(directory, steps=step or None, force=force)


@app.command(name="filter")
def filter_(
    directory: Annotated[Path, typer.Argument(help="Tagged dataset directory")],
    preset: Annotated[str, typer.Option(help="pro | air | path to a filter YAML")],
    out: Annotated[Path, typer.Option(help="Output directory (same config layout)")],
) -> None:
    """Apply a declarative filter recipe, keeping the config layout; report what each rule removed."""
    from magpie_hub import pipeline  # heavy (torch, transformers): only when a command runs

    pipeline.filter(directory, preset=preset, out=out)


@app.command()
def card(
    directory: Annotated[Path, typer.Argument(help="Dataset directory")],
    repo: Annotated[str | None, typer.Option(help="ORG/NAME for the pinned load_dataset snippet")] = None,
    version: Annotated[str | None, typer.Option(help="vX.Y.Z for the pinned load_dataset snippet")] = None,
) -> None:
    """Render DIR/README.md (dataset card) from the templates in cards/ and validate its YAML."""
    from magpie_hub import pipeline  # heavy (torch, transformers): only when a command runs

    path = pipeline.card(directory, repo=repo, version=version)
    typer.echo(f"wrote {path}")


@app.command()
def publish(
    directory: Annotated[Path, typer.Argument(help="Dataset directory")],
    repo: Annotated[str, typer.Option(help="ORG/NAME on the Hub")],
    version: Annotated[str, typer.Option(help="Version tag vX.Y.Z")],
    private: Annotated[bool, typer.Option(help="Create the repo private")] = False,
    branch: Annotated[str, typer.Option(help="Branch to commit to")] = "main",
    message: Annotated[str | None, typer.Option(help="Commit message")] = None,
    dry_run: Annotated[bool, typer.Option(help="Print the operations, write nothing")] = False,
) -> None:
    """Push DIR as one atomic commit, then tag it VERSION."""
    from magpie_hub import pipeline  # heavy (torch, transformers): only when a command runs

    pipeline.publish(directory, repo=repo, version=version, private=private, branch=branch,
               message=message, dry_run=dry_run)


@app.command()
def versions(repo: Annotated[str, typer.Argument(help="ORG/NAME")]) -> None:
    """List the version tags of a published dataset with commit, date and rows per config."""
    from magpie_hub.hub.versions import list_versions  # the Hub client only: no torch for a listing

    list_versions(repo)


@app.command()
def diff(
    repo: Annotated[str, typer.Argument(help="ORG/NAME")],
    a: Annotated[str, typer.Argument(help="Old version tag")],
    b: Annotated[str, typer.Argument(help="New version tag")],
) -> None:
    """Compare two published versions: configs, rows, columns and tag distributions."""
    from magpie_hub.hub.versions import diff_versions  # the Hub client only: no torch for a diff

    diff_versions(repo, a, b)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the app, turning MagpieError into one line + exit 2."""
    install_log_redaction()
    try:
        app(args=argv, standalone_mode=False)
    except MagpieError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except OSError as exc:  # disk full, permissions... met outside a stage's own handling: still one line
        err = os_error(exc, "file system error")
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        print("error: interrupted (re-run the same command to resume)", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # click (typer vendors it) usage errors, Exit and Abort, by duck typing
        kind = type(exc).__name__
        if kind == "Exit":
            sys.exit(getattr(exc, "exit_code", 0))
        if kind == "Abort":
            sys.exit(130)
        if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):
            print(f"error: {redact(exc.format_message())}", file=sys.stderr)
            sys.exit(2)
        print(redact(traceback.format_exc()), file=sys.stderr, end="")   # a bug: its traceback, no secret
        sys.exit(1)

if __name__ == "__main__":
    main()
