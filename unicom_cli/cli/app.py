"""The Typer app: registers the subcommands and maps UnicomError to a one-line message.

Command modules import torch inside their functions only, so `unicom --help` stays instant.
"""

from __future__ import annotations

import os

import typer

from unicom_cli.cli import (
    demo,
    download,
    embed,
    eval_knn,
    eval_linear,
    eval_retrieval,
    export,
    finetune,
    index,
    models,
    prepare_gldv2,
    search,
    serve,
)
from unicom_cli.cli.help import UnicomGroup, command_settings
from unicom_cli.errors import InputError, UnicomError

app = typer.Typer(
    name="unicom",
    cls=UnicomGroup,
    help="Embed, evaluate and finetune UNICOM image-retrieval models, from a laptop to many GPUs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    epilog=command_settings(["unicom demo", "unicom embed photos/ -o feats/photos.npy",
                             "unicom eval-retrieval --dataset folder:photos/ --vis top5.jpg"])["epilog"],
)


def _show_version(value: bool) -> None:
    if value:
        from unicom_cli._version import __version__

        typer.echo(f"unicom-cli {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(False, "--version", help="Show the version and exit.",
                                 callback=_show_version, is_eager=True),
) -> None:
    """Embed, evaluate and finetune UNICOM image-retrieval models, from a laptop to many GPUs."""


# Each command module defines EXAMPLES: its --help ends with them (see cli/help.py).
app.command("models", **command_settings(models.EXAMPLES))(models.models)
app.command("download", **command_settings(download.EXAMPLES))(download.download)
app.command("embed", **command_settings(embed.EXAMPLES))(embed.embed)
app.command("eval-retrieval", **command_settings(eval_retrieval.EXAMPLES))(eval_retrieval.eval_retrieval)
app.command("eval-knn", **command_settings(eval_knn.EXAMPLES))(eval_knn.eval_knn)
app.command("eval-linear", **command_settings(eval_linear.EXAMPLES))(eval_linear.eval_linear)
app.command("prepare-gldv2", **command_settings(prepare_gldv2.EXAMPLES))(prepare_gldv2.prepare_gldv2)
app.command("finetune", **command_settings(finetune.EXAMPLES))(finetune.finetune)
app.command("demo", **command_settings(demo.EXAMPLES))(demo.demo)
app.command("export", **command_settings(export.EXAMPLES))(export.export)
app.command("index", **command_settings(index.EXAMPLES))(index.index)
app.command("search", **command_settings(search.EXAMPLES))(search.search)
app.command("serve", **command_settings(serve.EXAMPLES))(serve.serve)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app, turning known errors into one line and an exit code."""
    from unicom_cli.distributed.launch import forget_command, remember_command

    remember_command(argv)  # --gpus/--procs start this same command line again
    try:
        result = _run_app(argv)
    except UnicomError as exc:
        return _report(exc)
    except KeyboardInterrupt:
        from unicom_cli.utils.console import err_console

        err_console.print("[bold red]interrupted[/]")
        return 130
    except typer.Exit as exc:
        return exc.exit_code
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    except typer.Abort:
        return 130
    except Exception as exc:  # click usage errors (bad option, unknown command...)
        if isinstance(exc, _click_exceptions()):
            exc.show()
            return exc.exit_code
        from unicom_cli.utils.torch_stack import broken_torch_stack

        broken = broken_torch_stack()  # torch and torchvision from two indexes: one line, the repair
        if broken is None:
            raise
        return _report(broken)
    finally:
        forget_command()
    # Without standalone mode click returns typer.Exit(code) as the result instead of raising.
    return result if isinstance(result, int) else 0


def _report(exc: UnicomError) -> int:
    """Print ``exc`` as one line (the traceback only with UNICOM_DEBUG=1); return its exit code."""
    if os.environ.get("UNICOM_DEBUG") == "1":
        raise exc
    from rich.markup import escape

    from unicom_cli.utils.console import err_console

    # escape: messages quote paths and backend errors such as "[/src/pair.cc:545] …"
    err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
    return exc.exit_code


def _run_app(argv: list[str] | None) -> object:
    """The app, with a full or read-only disk anywhere turned into one line naming the folder."""
    from unicom_cli.utils.files import disk_error

    try:
        return app(args=argv, standalone_mode=False)
    except typer.Abort as exc:
        # click turns EOFError into Abort too; only Ctrl-C is an interruption (exit 130)
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, EOFError):
            raise InputError(f"unexpected end of a file: an input is empty or truncated ({cause or 'EOFError'})") from cause
        raise
    except OSError as exc:
        converted = disk_error(exc)
        if converted is None:
            raise
        raise converted from exc


def _click_exceptions() -> tuple[type[Exception], ...]:
    """ClickException of click itself and of the copy that typer ≥ 0.20 vendors as typer._click."""
    import importlib

    found = []
    for module in ("typer._click.exceptions", "click.exceptions"):
        try:
            found.append(importlib.import_module(module).ClickException)
        except (ImportError, AttributeError):
            pass
    return tuple(found)


def run() -> None:
    """Console-script entry point."""
    from unicom_cli.distributed.launch import exit_process

    exit_process(main())
