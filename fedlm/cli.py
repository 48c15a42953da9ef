"""The command line: `fedlm run CONFIG.yaml`, `fedlm demo`."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import click
import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from typer.core import TyperGroup

from fedlm.config import RunConfig, check_output_dir, load_config, parse_config
from fedlm.errors import ConfigError, FedlmError
from fedlm.runtime.rounds import check_run_folder, megabytes, privacy_line, round_line

DEBUG = "fedlm.debug"  # the --debug flag, in the click context's meta


class Commands(TyperGroup):
    """fedlm's commands: bad input (a FedlmError) exits 2 with its message on stderr; any other
    exception exits 1 with one line on stderr (its locals may hold clients' text), or, with
    --debug, its full traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except FedlmError as error:
            _fail(error)
        except Exception as error:
            if ctx.meta.get(DEBUG):
                raise
            error_console.print(
                f"[bold red]error:[/] internal error: {type(error).__name__}: {escape(str(error))} "
                "(run with --debug for the traceback)",
                soft_wrap=True,
            )
            raise typer.Exit(code=1) from None


app = typer.Typer(
    cls=Commands,
    add_completion=False,
    no_args_is_help=True,
    help="Federated fine-tuning of pretrained language models.",
    pretty_exceptions_enable=False,
    pretty_exceptions_show_locals=False,  # never print local variables: they hold clients' training text
)
console = Console()  # progress and results
error_console = Console(stderr=True)  # errors, warnings and log messages

# The demo: the bundled all-MiniLM-L6-v2 on BBC News, 5 IID clients, 3 rounds. 1,000 articles
# (200 held out to validate; of each client's 160, 144 train and 16 test) at 128 tokens keep it
# to a few minutes on 2 CPU cores.
DEMO_CONFIG: dict[str, Any] = {
    "seed": 0,
    "output_dir": "runs/demo",
    "model": {"name": "minilm"},
    "data": {
        "dataset": "bbc-news",
        "max_examples": 1000,
        "validation_fraction": 0.2,
        "client_test_fraction": 0.1,
        "partition": {"kind": "iid", "num_clients": 5},
    },
    "federation": {"rounds": 3},
    "training": {"local_epochs": 1, "batch_size": 16, "learning_rate": 1e-4, "max_length": 128},
}


def _run(config: RunConfig, resume: bool = False, overwrite: bool = False, allow_data_change: bool = False) -> None:
    from fedlm.runtime import build_simulation, run_federation

    check_run_folder(config, resume, overwrite, allow_data_change)  # before loading any model

    logging.basicConfig(
        level=logging.WARNING, handlers=[RichHandler(console=error_console, show_path=False)], format="%(message)s"
    )
    rounds = config.federation.rounds
    console.print(
        f"[bold]fedlm[/] model [cyan]{config.model.name}[/], dataset [cyan]{config.data.dataset}[/], "
        f"{config.data.partition.kind} partition, {rounds} rounds -> {config.output_dir}"
    )
    with console.status("loading data and model"):
        simulation = build_simulation(config)
    task = simulation.server.global_model.task
    console.print(
        partition_line(simulation.partition) + f"; {simulation.server.global_model.spec.numel:,} federated parameters"
    )
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )
    with progress:
        rounds_bar = progress.add_task("rounds", total=rounds)
        steps_bar = progress.add_task("local steps", total=1)

        def on_step(client_name: str, step: int, total: int) -> None:
            if step == 1:
                progress.reset(steps_bar, total=total, description=f"local steps {client_name}")
            progress.update(steps_bar, completed=step)

        for client in simulation.server.clients:
            client.step_callback = lambda step, total, name=client.name: on_step(name, step, total)

        def on_round_end(record: dict[str, Any]) -> None:
            progress.console.print(round_line(record, rounds, task))
            progress.update(rounds_bar, completed=record["round"])

        history = run_federation(simulation, on_round_end, resume, overwrite, allow_data_change)
    last = history[-1]
    reported = [metric for metric in task.metrics if last.get(f"val_{metric}") is not None]
    if reported:
        console.print("final validation " + ", ".join(f"{metric} {last[f'val_{metric}']:.3f}" for metric in reported))
    summary = json.loads((Path(config.output_dir) / "summary.json").read_text())
    console.print(bytes_table(summary))
    console.print(privacy_line(summary["privacy"]))
    console.print(f"model saved to {Path(config.output_dir) / 'model'}")


def bytes_table(summary: dict[str, Any], max_rows: int = 20) -> Table:
    """Bytes each client received and sent over the whole run, and the totals."""
    title = f"sent down {megabytes(summary['bytes_down'])}, up {megabytes(summary['bytes_up'])} (measured on the wire)"
    table = Table(title=title, title_justify="left")
    for column in ("client", "down", "up"):
        table.add_column(column, justify="left" if column == "client" else "right")
    clients = list(summary["clients"].items())
    for name, moved in clients[:max_rows]:
        table.add_row(name, megabytes(moved["down"]), megabytes(moved["up"]))
    if len(clients) > max_rows:
        table.add_row(f"... {len(clients) - max_rows} more (see summary.json)")
    return table


def partition_line(summary: dict[str, Any]) -> str:
    sizes = summary["client_examples"]
    share = summary["mean_top_label_share"]
    shares = "" if share is None else f", mean top-label share {share:.2f}"
    return (
        f"{summary['num_clients']} clients hold {summary['train_examples']} training examples "
        f"({sizes['min']}-{sizes['max']} each{shares}), "
        f"{summary['test_examples']} client test examples; {summary['validation_examples']} validation examples"
    )


def partition_table(summary: dict[str, Any], max_rows: int = 40) -> Table:
    """The clients' sizes, and their label histograms when the task's targets are class labels."""
    table = Table(title=partition_line(summary), title_justify="left")
    by_label = bool(summary["labels"])
    label_columns = (*summary["labels"], "top label", "top share") if by_label else ()
    for column in ("client", "examples", "test", *label_columns):
        table.add_column(column, justify="left" if column in ("client", "top label") else "right")
    for client in summary["clients"][:max_rows]:
        cells = [client["client"], str(client["examples"]), str(client["test_examples"])]
        if by_label:
            cells += [str(client["label_counts"][label]) for label in summary["labels"]]
            cells += [client["top_label"], f"{client['top_label_share']:.2f}"]
        table.add_row(*cells)
    if len(summary["clients"]) > max_rows:
        table.add_row(f"... {len(summary['clients']) - max_rows} more (see partition.json)")
    return table


def _fail(error: FedlmError) -> None:
    error_console.print(f"[bold red]error:[/] {escape(str(error))}", soft_wrap=True)
    raise typer.Exit(code=2)


@app.callback()
def main(
    ctx: typer.Context,
    debug: bool = typer.Option(False, "--debug", help="show the full traceback of an unexpected error"),
) -> None:
    # the options every command takes, given before it: fedlm --debug run CONFIG
    ctx.meta[DEBUG] = debug


@app.command()
def run(
    config_path: Path = typer.Argument(..., metavar="CONFIG", help="the run config (YAML)"),
    output_dir: Path | None = typer.Option(None, help="overrides output_dir in the config"),
    resume: bool = typer.Option(False, help="continue from the checkpoint in the output folder"),
    backend: str = typer.Option(
        "local", help="local: simulate every client in this process; flower: run on a Flower SuperLink's SuperNodes"
    ),
    superlink: str | None = typer.Option(None, help="flower backend: the SuperLink's address, HOST:PORT"),
    root_certificates: Path | None = typer.Option(
        None, help="flower backend: the CA certificate that signed the SuperLink's (TLS)"
    ),
    insecure: bool = typer.Option(False, help="flower backend: no TLS, for a SuperLink on this laptop only"),
    overwrite: bool = typer.Option(
        False, help="start afresh in an output folder that holds an earlier fedlm run (deletes fedlm's outputs there)"
    ),
    allow_data_change: bool = typer.Option(
        False, help="with --resume: continue even though a client's data changed since the checkpoint"
    ),
) -> None:
    """Run the federated fine-tuning described by CONFIG, simulated here or on a Flower deployment."""
    try:
        config = load_config(config_path)
        if output_dir is not None:
            config = config.model_copy(update={"output_dir": output_dir})
        if backend == "local":
            _run(config, resume, overwrite, allow_data_change)
        elif backend == "flower":
            if superlink is None:
                raise ConfigError("--backend flower needs --superlink HOST:PORT (the SuperLink's address)")
            if config.homomorphic is not None:
                from fedlm.privacy.homomorphic import read_public_context

                read_public_context(config.homomorphic.public_context)  # before any node is asked to train
            from fedlm.runtime.flower.launch import launch_flower_run

            status = launch_flower_run(
                config, superlink, root_certificates, insecure, resume, overwrite, allow_data_change
            )
            if status:
                raise typer.Exit(code=status)
        else:
            raise ConfigError(f"--backend must be 'local' or 'flower', got {backend!r}")
    except FedlmError as error:
        _fail(error)


@app.command()
def certs(
    folder: Path = typer.Argument(..., help="where to write the certificates and keys"),
    host: list[str] = typer.Option(
        ["127.0.0.1", "localhost"], help="a name or IP address SuperNodes use to reach the SuperLink (repeat)"
    ),
    node: list[str] = typer.Option([], help="also write an authentication key pair for this SuperNode (repeat)"),
    force: bool = typer.Option(False, help="replace existing certificates and keys in FOLDER (the old ones are lost)"),
) -> None:
    """TLS certificates for a SuperLink (and SuperNode authentication keys) for a Flower deployment."""
    from fedlm.runtime.flower.certs import check_node_name, make_certificates, make_node_keys

    try:
        for name in node:  # before anything is written
            check_node_name(name)
        paths = make_certificates(folder, host, force=force)
        for name in node:
            paths.update(make_node_keys(folder, name, force=force))
    except FedlmError as error:
        _fail(error)
    for path in paths.values():
        console.print(f"wrote {path}")


@app.command("he-keys")
def he_keys(
    folder: Path = typer.Argument(..., help="where to write he-secret.ctx and he-public.ctx"),
    poly_modulus_degree: int = typer.Option(8192, help="CKKS ring degree: 8192 or 16384"),
    force: bool = typer.Option(False, help="replace existing keys in FOLDER (the old ones are lost)"),
) -> None:
    """CKKS keys for homomorphic aggregation: he-secret.ctx for every SuperNode (--node-config
    he-secret-context=...), never the server; he-public.ctx for the server (homomorphic.public_context)."""
    from fedlm.privacy.homomorphic import HomomorphicKeys

    if poly_modulus_degree not in (8192, 16384):
        _fail(ConfigError(f"--poly-modulus-degree must be 8192 or 16384, got {poly_modulus_degree}"))
    try:
        paths = HomomorphicKeys(poly_modulus_degree).save(folder, force=force)
    except FedlmError as error:
        _fail(error)
    for path in paths.values():
        console.print(f"wrote {path}")


@app.command()
def partition(
    config_path: Path = typer.Argument(..., metavar="CONFIG", help="the run config (YAML)"),
    output_dir: Path | None = typer.Option(
        None, help="where partition.json and partition.png go (default: the config's output_dir)"
    ),
) -> None:
    """Show how CONFIG splits its data into clients; writes partition.json and partition.png."""
    from fedlm.data.report import partition_summary, write_partition_report
    from fedlm.runtime.federated_data import build_task, prepare_federated_data

    try:
        config = load_config(config_path)
        folder = output_dir or config.output_dir
        check_output_dir(folder)
        task = build_task(config)
        summary = partition_summary(prepare_federated_data(config, task), task.class_labels, config.data.group_column)
    except FedlmError as error:
        _fail(error)
    write_partition_report(summary, folder)
    table = partition_table(summary)
    needed = Console(width=500).measure(table).maximum
    wide_enough = console if console.is_terminal else Console(width=max(console.width, needed))
    wide_enough.print(table)
    heatmap = f" and {Path(folder) / 'partition.png'}" if summary["labels"] else ""
    console.print(f"wrote {Path(folder) / 'partition.json'}{heatmap}")


@app.command()
def demo(
    output_dir: Path = typer.Option(Path("runs/demo"), help="where the run folder goes"),
    rounds: int = typer.Option(3, min=1, help="federated rounds"),
    print_config: bool = typer.Option(False, help="print the demo's config and exit"),
    overwrite: bool = typer.Option(False, help="replace an earlier demo run in the output folder"),
) -> None:
    """Federated fine-tuning of all-MiniLM-L6-v2 on BBC News topics with 5 simulated clients."""
    try:
        config = parse_config(
            {
                **DEMO_CONFIG,
                "output_dir": str(output_dir),
                "federation": {**DEMO_CONFIG["federation"], "rounds": rounds},
            },
            source="demo",
        )
        if print_config:
            console.print(config.to_yaml(), end="", markup=False, highlight=False)
            return
        _run(config, overwrite=overwrite)
    except FedlmError as error:
        _fail(error)


if __name__ == "__main__":
    app()
