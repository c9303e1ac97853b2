"""The ``gradexp`` command line."""

from __future__ import annotations

import datetime
import sys
import time
from pathlib import Path

import click

from ._version import __version__

_DIR_OPTION = click.option("--dir", "base_dir", type=click.Path(file_okay=False, path_type=Path),
                           default=None, help="Folder of runs (default: $GRADEXP_DIR or ./gradexp-runs).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gradexp")
def main() -> None:
    """gradexp: experiment tracking that keeps the tensors."""


@main.command()
@click.argument("run")
@click.option("--parquet", "fmt", flag_value="parquet", default=True,
              help="Write Parquet (the default, and for now the only format).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="History file to write (default: ./<project>-<run id>.parquet).")
@click.option("--tensors", is_flag=True,
              help="Also write every tensor, one Parquet file per key, to <output stem>.tensors/.")
@_DIR_OPTION
def export(run: str, fmt: str, output: Path | None, tensors: bool, base_dir: Path | None) -> None:
    """Export RUN (a run folder, project/run_id, or run id) to Parquet."""
    from . import _export
    from ._errors import RunNotFoundError
    from .api import Api

    try:
        stored = Api(dir=base_dir).run(run)
    except RunNotFoundError as e:
        raise click.ClickException(str(e)) from None
    out = output or Path(f"{stored.project}-{stored.id}.parquet")
    t0 = time.perf_counter()
    table = _export.export_history(stored, out)
    click.echo(f"history: {table.num_rows} steps x {table.num_columns} columns -> {out} "
               f"({out.stat().st_size / 1e6:.2f} MB, {time.perf_counter() - t0:.2f} s)", err=True)
    if tensors:
        folder = out.with_name(out.stem + ".tensors")
        total = _export.tensor_bytes(stored)
        with click.progressbar(length=total, label="tensors", file=sys.stderr,
                               show_pos=False, show_percent=True) as bar:
            paths = _export.export_tensors(stored, folder, progress=bar.update)
        click.echo(f"tensors: {len(paths)} files, {total / 1e6:.1f} MB raw -> {folder}/", err=True)


@main.command("runs")
@click.argument("project", required=False)
@_DIR_OPTION
def runs_(project: str | None, base_dir: Path | None) -> None:
    """List runs (of PROJECT, if given), newest first."""
    from .api import Api

    api = Api(dir=base_dir)
    found = api.runs(project)
    if not found:
        click.echo(f"no runs under {api.dir}", err=True)
        return
    for r in found:
        created = datetime.datetime.fromtimestamp(r.meta.get("created_at", 0)).strftime("%Y-%m-%d %H:%M")
        click.echo(f"{r.project}/{r.id}\t{r.status:<9}\t{created}\t{r.name}")


if __name__ == "__main__":  # pragma: no cover
    main()
