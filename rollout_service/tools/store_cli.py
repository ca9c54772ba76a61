"""`rollout-service store verify DIR` / `store repair DIR`: a weight store (--weights-dir) checked and
rolled back to its newest complete version offline (the logic is weights/repair.py)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

app = typer.Typer(help="Check or repair a weight store (a server's --weights-dir).", no_args_is_help=True, add_completion=False)
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


class _Bar:
    """weights/repair.py's progress, as a rich bar on a terminal (nothing in a pipe or a log)."""

    def __init__(self, bar: Progress):
        self._bar, self._task = bar, None

    def start(self, total_bytes: int) -> None:
        self._task = self._bar.add_task("verifying CRC-32s", total=total_bytes)

    def advance(self, nbytes: int) -> None:
        self._bar.advance(self._task, nbytes)


def _progress() -> Progress:
    return Progress(
        "[progress.description]{task.description}", BarColumn(), DownloadColumn(), TimeRemainingColumn(),
        console=err, transient=True, disable=not err.is_terminal,
    )


def _report(check) -> None:
    current = "torn" if check.current is None else str(check.current)
    out.print(f"weight store {check.root}: CURRENT {current}")
    for problem in check.problems:
        out.print(f"  [red]damaged[/red]  {problem}")
    for v in check.versions:
        size = f"{v.tensors} tensors, {_size(v.nbytes)}"
        state = "[green]ok[/green]     " if v.problem is None else "[red]damaged[/red]"
        out.print(f"  version {v.version:>6}  {state}  {v.problem or size}")
    for leftover in check.leftovers:
        out.print(f"  left over  {leftover}: deleted at the next start or by `store repair`")


def _size(nbytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} bytes"


def _fail(exc: Exception) -> None:
    err.print(f"[red]error:[/red] {exc}")
    raise typer.Exit(1) from None


def _directory(weights_dir: str) -> Path:
    """The store's directory; an object store's URL is refused, naming it (its versions are written
    whole or not at all, and a server opening it checks its current version)."""
    from rollout_service.errors import ConfigError
    from rollout_service.weights.versions import is_url

    if is_url(weights_dir):
        _fail(ConfigError(
            f"{weights_dir} is an object store: `store verify` and `store repair` work on a directory. On an object "
            "store no version is torn by a crash (each object is written whole; CURRENT moves by compare-and-set), "
            "and a server opening it checks its current version's shards"
        ))
    return Path(weights_dir)


@app.command("verify")
def verify_cmd(weights_dir: str = typer.Argument(..., metavar="DIRECTORY", help="The weight store: a server's --weights-dir.")) -> None:
    """Check CURRENT, each kept version's manifest and shards, every CRC-32; exit 1 if damaged."""
    from rollout_service.errors import ConfigError
    from rollout_service.weights import repair

    directory = _directory(weights_dir)
    try:
        with _progress() as bar:
            check = repair.verify(directory, _Bar(bar))
    except ConfigError as exc:
        _fail(exc)
    _report(check)
    if check.ok:
        out.print(f"[green]whole[/green]: version {check.current} and every kept version verify")
        return
    out.print(
        f"[red]damaged[/red]: with every server on it stopped, `rollout-service store repair {directory}` rolls it back "
        f"to version {check.newest_whole}, the newest that verifies whole"
    )
    raise typer.Exit(1)


@app.command("repair")
def repair_cmd(
    weights_dir: str = typer.Argument(..., metavar="DIRECTORY", help="The weight store: a server's --weights-dir."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would be done, do nothing."),
) -> None:
    """Roll back to the newest version that verifies whole (refused while a server uses the store)."""
    from rollout_service.errors import ConfigError
    from rollout_service.weights import repair

    directory = _directory(weights_dir)
    try:
        with _progress() as bar:
            check, done = repair.repair(directory, dry_run, _Bar(bar))
    except ConfigError as exc:
        _fail(exc)
    _report(check)
    prefix = "would have " if dry_run else ""
    for action in done:
        out.print(f"  {prefix}{action}")
    if not done:
        out.print(f"nothing to repair: the store serves version {check.current}")
    elif not dry_run:
        out.print(f"[green]repaired[/green]: the store serves version {check.newest_whole}")
