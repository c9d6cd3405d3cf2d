"""`unicom demo`: the whole toolkit on real digits, offline, in a few minutes on a laptop CPU."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated, Optional

import typer

from unicom_cli.cli.options import BatchSizeOpt, OutputDirOpt, ProcsOpt

EXAMPLES = [
    "unicom demo",
    "unicom demo -o /tmp/unicom-demo --procs 2",
    "unicom demo --limit-per-class 20 --epochs 1",
]


def demo(
    output: OutputDirOpt = Path("unicom-demo"),
    procs: ProcsOpt = None,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Finetuning epochs over digits 0-4.")] = 3,
    batch_size: BatchSizeOpt = 64,
    limit_per_class: Annotated[Optional[int], typer.Option("--limit-per-class", min=2, help="Use fewer digits (quick trial).")] = None,
) -> None:
    """Evaluate a fresh tiny UNICOM ViT on real digits, finetune it, evaluate again, embed, visualise,
    then index the embedded digits and search them.

    Writes everything under --output; --batch-size is the finetuning batch per process.
    """
    from rich.table import Table

    from unicom_cli.pipelines.demo import DemoConfig, run_demo
    from unicom_cli.utils.console import console, print_table, status

    status(f"writing real digits to {output} …")

    def announce(step, number: int, total: int) -> None:
        console.rule(f"[bold]step {number}/{total}: {step.title}")
        console.print(f"$ unicom {shlex.join(step.argv)}", style="bold cyan", highlight=False,
                      soft_wrap=True)

    cfg = DemoConfig(output=output, procs=procs, epochs=epochs, batch_size=batch_size, limit_per_class=limit_per_class)
    result = run_demo(cfg, announce)
    table = Table()
    for column in ("metric", "before", "after", "gain"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for key, before in result.before.items():
        after = result.after[key]
        table.add_row(key, f"{before:.1f}", f"{after:.1f}", f"{after - before:+.1f}")
    console.rule("[bold]result")
    print_table(table, "Unseen digits 5-9: freshly initialised vs finetuned on 0-4")
    total = sum(step.seconds for step in result.steps)
    for path in result.written:
        console.print(f"wrote {path}", highlight=False, soft_wrap=True)
    console.print(f"{len(result.steps)} commands in {total:.0f} s. Everything is in "
                  f"[bold]{result.output}[/]; the retrieval picture is {result.visualisation}; "
                  f"open {result.output / 'search.html'} for the search results.")
