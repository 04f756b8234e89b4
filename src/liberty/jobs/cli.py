"""`nomaflow`: run jobs and steps, and read the history, from a terminal.

Exit codes: 0 succeeded, 1 failed or timed out, 2 bad usage or config,
130 cancelled.
"""

from __future__ import annotations

import datetime as _dt
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .config import Job, Settings, Step, parse_param
from .errors import ConfigError, NomaflowError
from .types import FINAL_STATUSES, Status

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_CANCELLED = 0, 1, 2, 130
_LEVEL_STYLE = {"DEBUG": "dim", "INFO": "cyan", "WARNING": "yellow", "ERROR": "bold red"}
_STATUS_STYLE = {
    "SUCCEEDED": "green",
    "FAILED": "bold red",
    "TIMED_OUT": "bold red",
    "CANCELLED": "yellow",
    "SKIPPED": "dim",
    "RUNNING": "cyan",
    "QUEUED": "dim",
}

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


class _Config:
    def __init__(self, settings: Settings, plugins: str | None, history: str | None, connectors: str | None) -> None:
        self.settings = settings
        self.plugins = plugins or settings.plugins
        self.history = history or settings.history
        self.connectors = connectors or settings.connectors
        self.connectors_explicit = connectors is not None


def _exit_code(status: str) -> int:
    return {
        Status.SUCCEEDED: EXIT_OK,
        Status.CANCELLED: EXIT_CANCELLED,
    }.get(Status(status), EXIT_FAILED)


def _fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    err.print(f"[bold red]error:[/] {escape(message)}")
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="Runner settings file. [default: ./nomaflow.toml if present]")
@click.option("--plugins", type=click.Path(file_okay=False), default=None, help="Plugins directory (overrides nomaflow.toml).")
@click.option("--history", type=str, default=None, help="History database path, or :memory: (overrides nomaflow.toml).")
@click.option("--connectors", type=click.Path(dir_okay=False), default=None, help="connectors.toml path (overrides nomaflow.toml).")
@click.version_option(package_name="nomaflow-runner", prog_name="nomaflow")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, plugins: str | None, history: str | None, connectors: str | None) -> None:
    """Run Nomaflow Python steps, each in its own supervised child interpreter.

    \b
    Examples:
      nomaflow run jobs/demo.toml
      nomaflow run jobs/demo.toml --param period=2026-05 --json
      nomaflow step reports.summary:generate_monthly --param period=2026-04 --param target_path=/tmp/x.pdf
      nomaflow runs
      nomaflow logs RUN_ID --follow
      nomaflow cancel RUN_ID
    """
    if config_path is not None and not Path(config_path).exists():
        raise ConfigError("settings file not found; check --config", file=config_path)
    ctx.obj = _Config(Settings.load(config_path), plugins, history, connectors)


def _params(values: tuple[str, ...]) -> dict[str, Any]:
    return dict(parse_param(v) for v in values)


def _connectors_path(cfg: _Config) -> str | None:
    path = Path(cfg.connectors)
    if path.exists():
        return str(path)
    if cfg.connectors_explicit:
        raise ConfigError("connectors file not found; check --connectors", file=str(path))
    return None


def _print_log_line(console: Console, line: Any, *, show_step: bool = True) -> None:
    ts = _dt.datetime.fromtimestamp(line.ts).strftime("%H:%M:%S.%f")[:-3]
    style = _LEVEL_STYLE.get(line.level, "")
    stream = "" if line.stream == "log" else f"[dim]{line.stream}[/] "
    step = f"[bold]{escape(line.step or '-')}[/] " if show_step else ""
    attempt = f"[dim]#{line.attempt}[/] " if line.attempt and line.attempt > 1 else ""
    console.print(f"[dim]{ts}[/] [{style}]{line.level:<7}[/] {step}{attempt}{stream}{escape(line.message)}")


def _execute(cfg: _Config, job: Job, params: dict[str, Any], as_json: bool, quiet: bool) -> NoReturn:
    import trio

    from .supervisor import Supervisor

    live = err if as_json else out
    result: dict[str, Any] = {}

    def on_log(line: Any) -> None:
        if not quiet:
            _print_log_line(live, line)

    async def main() -> None:
        async with Supervisor(
            plugins=cfg.plugins,
            history=cfg.history,
            connectors=_connectors_path(cfg),
            session_user="cli",
            on_log=on_log,
            start_mode=cfg.settings.start_mode,
            isolation=cfg.settings.isolation,
            spares=cfg.settings.warm_spares,
        ) as sup:
            handle = await sup.start(job, params, session_user="cli")
            if not quiet:
                live.print(f"[bold]run {handle.run_id}[/] · job [bold]{escape(job.name)}[/] · {len(job.steps)} step(s) "
                           f"[dim](cancel from another terminal: nomaflow cancel {handle.run_id})[/]")
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async with trio.open_nursery() as nursery:

                    async def on_signal() -> None:
                        async for _ in signals:
                            live.print("[yellow]interrupt: cancelling the run (waits for its grace period)…[/]")
                            await sup.cancel(handle.run_id)

                    nursery.start_soon(on_signal)
                    run = await handle.wait()
                    nursery.cancel_scope.cancel()
            result["run"] = run

    trio.run(main)
    run = result["run"]
    if as_json:
        out.print_json(json.dumps(run.to_json()))
    else:
        _print_summary(run)
    sys.exit(_exit_code(run.status))


def _print_summary(run: Any) -> None:
    """A table of steps and usage, then each step's output or error on its own line."""
    table = Table(title=f"run {run.run_id} · {escape(run.job)} · [{_STATUS_STYLE.get(run.status, '')}]{run.status}[/]",
                  title_justify="left")
    # Short headings so a plain 80-column terminal shows every column whole:
    # try = attempts, wall/cpu in seconds, MiB = peak memory, pids = peak tasks, limit = limit hit.
    for col in ("step", "status", "try", "wall", "cpu", "MiB", "pids", "limit"):
        table.add_column(col, no_wrap=True, overflow="ellipsis", max_width=20 if col == "step" else None)
    details = []
    for step in run.steps:
        usage = step.attempt_records[-1].usage if step.attempt_records else {}
        table.add_row(
            escape(step.name),
            f"[{_STATUS_STYLE.get(step.status, '')}]{step.status}[/]",
            str(step.attempts),
            f"{step.wall_s:.2f}",
            f"{step.cpu_s:.2f}",
            f"{step.peak_rss_mb:.1f}",
            str(usage.get("max_processes", "")),
            str(usage.get("limit_hit") or ""),
        )
        if step.error:
            details.append(f"[bold]{escape(step.name)}[/] [red]{escape(str(step.error.get('type', '')))}[/] "
                           f"({escape(str(step.error.get('reason')))}): {escape(str(step.error.get('message', '')))}")
        elif step.output is not None:
            text = json.dumps(step.output)
            details.append(f"[bold]{escape(step.name)}[/] → {escape(text if len(text) <= 300 else text[:297] + '...')}")
        elif step.status == "SUCCEEDED":
            details.append(f"[bold]{escape(step.name)}[/] → [dim]no output[/]")
    out.print(table)
    for line in details:
        out.print(line)


_param_option = click.option(
    "--param", "-p", "params", multiple=True, metavar="KEY=VALUE",
    help="Per-run override; VALUE parses as JSON, else is a string. Repeatable.",
)
_json_option = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (live log goes to stderr).")
_quiet_option = click.option("--quiet", "-q", is_flag=True, help="No live log, only the summary.")


@cli.command()
@click.argument("job_file", type=click.Path(dir_okay=False))
@_param_option
@_json_option
@_quiet_option
@click.pass_obj
def run(cfg: _Config, job_file: str, params: tuple[str, ...], as_json: bool, quiet: bool) -> None:
    """Run the job in JOB_FILE, with its live log on the terminal.

    Ctrl-C cancels the run (cooperatively, then by force after each step's grace period).
    """
    job = Job.load(job_file, defaults=cfg.settings.defaults)
    _execute(cfg, job, _params(params), as_json, quiet)


@cli.command()
@click.argument("function")
@_param_option
@click.option("--connector", "-c", "connectors", multiple=True, metavar="NAME", help="A connector the step may use. Repeatable.")
@click.option("--timeout", "timeout_seconds", type=float, default=None, help="timeout_seconds for the step.")
@click.option("--grace", "cancel_grace_seconds", type=float, default=None, help="cancel_grace_seconds for the step.")
@_json_option
@_quiet_option
@click.pass_obj
def step(cfg: _Config, function: str, params: tuple[str, ...], connectors: tuple[str, ...],
         timeout_seconds: float | None, cancel_grace_seconds: float | None, as_json: bool, quiet: bool) -> None:
    """Run one step, FUNCTION as module.path:function, as an ad-hoc job."""
    from ._strict import make_strict_converter

    fields: dict[str, Any] = {**cfg.settings.defaults, "name": function.rpartition(":")[2] or "step", "python": function}
    if connectors:
        fields["connectors"] = list(connectors)
    if timeout_seconds is not None:
        fields["timeout_seconds"] = timeout_seconds
    if cancel_grace_seconds is not None:
        fields["cancel_grace_seconds"] = cancel_grace_seconds
    try:
        one = make_strict_converter().structure(fields, Step)
    except Exception as exc:  # same shape of message as a job file's
        raise ConfigError(str(exc), key="step") from None
    job = Job(name=f"step:{function}", steps=[one])
    _execute(cfg, job, _params(params), as_json, quiet)


def _store(cfg: _Config) -> Any:
    from .history import HistoryStore

    if cfg.history != ":memory:" and not Path(cfg.history).exists():
        raise ConfigError("no run history here yet (run a job first, or pass --history)", file=cfg.history)
    return HistoryStore(cfg.history)


@cli.command()
@click.option("--limit", "-n", type=click.IntRange(1), default=20, show_default=True, help="How many runs.")
@click.option("--job", "job_name", default=None, help="Only runs of this job.")
@_json_option
@click.pass_obj
def runs(cfg: _Config, limit: int, job_name: str | None, as_json: bool) -> None:
    """List recent runs, newest first."""
    with _store(cfg) as store:
        items = store.list_runs(limit=limit, job=job_name)
    if as_json:
        out.print_json(json.dumps([r.to_json() for r in items]))
        return
    table = Table()
    for col in ("run id", "job", "status", "user", "started", "steps ok"):
        table.add_column(col)
    for r in items:
        started = _dt.datetime.fromtimestamp(r.created_at).strftime("%Y-%m-%d %H:%M:%S")
        table.add_row(r.run_id, r.job, f"[{_STATUS_STYLE.get(r.status, '')}]{r.status}[/]", r.session_user, started,
                      f"{r.steps_succeeded}/{r.steps_total}")
    out.print(table)


@cli.command()
@click.argument("run_id")
@_json_option
@click.pass_obj
def show(cfg: _Config, run_id: str, as_json: bool) -> None:
    """Show a run: steps, statuses, outputs, errors and usage."""
    with _store(cfg) as store:
        view = store.get_run(run_id)
    if as_json:
        out.print_json(json.dumps(view.to_json()))
        return
    _print_summary(view)
    for st in view.steps:
        if st.error and st.error.get("traceback"):
            out.print(f"\n[bold]{escape(st.name)}[/] traceback ({escape(str(st.error.get('reason')))}):")
            out.print(escape(st.error["traceback"].rstrip()), style="dim")
    if view.status not in FINAL_STATUSES:
        out.print(f"[cyan]still {view.status}[/]: follow it with `nomaflow logs {view.run_id} --follow`")


@cli.command()
@click.argument("run_id")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new lines until the run ends.")
@click.option("--step", "step_name", default=None, help="Only this step's lines.")
@_json_option
@click.pass_obj
def logs(cfg: _Config, run_id: str, follow: bool, step_name: str | None, as_json: bool) -> None:
    """Print a run's log (ctx.log lines, stdout/stderr of the step, runner notes)."""
    with _store(cfg) as store:
        full_id = store.resolve_run_id(run_id)
        last = 0

        def emit(lines: list[Any]) -> None:
            for line in lines:
                if as_json:
                    out.print(json.dumps({
                        "id": line.id, "ts": line.ts, "step": line.step, "attempt": line.attempt,
                        "level": line.level, "stream": line.stream, "message": line.message,
                    }, ensure_ascii=False), markup=False, highlight=False)
                else:
                    _print_log_line(out, line)

        while True:
            lines = store.logs(full_id, after_id=last, step=step_name)
            emit(lines)
            if lines:
                last = lines[-1].id
            if not follow:
                return
            if store.get_run(full_id).status in FINAL_STATUSES:
                emit(store.logs(full_id, after_id=last, step=step_name))
                return
            if not lines:
                time.sleep(0.25)


@cli.command()
@click.argument("run_id")
@_json_option
@click.pass_obj
def cancel(cfg: _Config, run_id: str, as_json: bool) -> None:
    """Cancel a running job (from any terminal); it stops within its step's grace period."""
    with _store(cfg) as store:
        full_id = store.resolve_run_id(run_id)
        requested = store.request_cancel(full_id)
        status = store.get_run(full_id).status
    if as_json:
        out.print_json(json.dumps({"run_id": full_id, "cancel_requested": requested, "status": status}))
    elif requested:
        out.print(f"cancel requested for run [bold]{full_id}[/]; it stops within its step's grace period "
                  f"(watch: nomaflow logs {full_id} --follow)")
    else:
        out.print(f"run [bold]{full_id}[/] already ended: {status}")
    sys.exit(EXIT_OK if requested else EXIT_FAILED)


@cli.command()
@_json_option
@click.pass_obj
def doctor(cfg: _Config, as_json: bool) -> None:
    """Which protections this host gives a step (cgroups, Landlock, namespaces, rlimits…) and why any is missing."""
    from .supervisor.doctor import diagnose

    found = diagnose(cfg.plugins)
    if as_json:
        out.print_json(json.dumps([{"name": p.name, "active": p.active, "detail": p.detail} for p in found]))
        return
    table = Table(title="protections on this host", title_justify="left")
    for col in ("protection", "active", "detail"):
        table.add_column(col, overflow="fold")
    for p in found:
        table.add_row(p.name, "[green]yes[/]" if p.active else "[bold red]no[/]", escape(p.detail))
    out.print(table)
    missing = [p.name for p in found if not p.active]
    if missing:
        out.print(f"[yellow]missing: {', '.join(missing)}[/] — steps still run, with the fallbacks named above")


@cli.group()
def connectors() -> None:
    """Inspect connectors.toml, check connectivity, encrypt secrets."""


def _load_connector_configs(cfg: _Config) -> dict[str, Any]:
    import os

    from .connectors import load_connectors

    path = Path(cfg.connectors)
    if not path.exists():
        raise ConfigError("connectors file not found; create it or pass --connectors", file=str(path))
    return load_connectors(path, environ=os.environ)


@connectors.command("list")
@_json_option
@click.pass_obj
def connectors_list(cfg: _Config, as_json: bool) -> None:
    """List the declared connectors (never their secrets)."""
    configs = _load_connector_configs(cfg)
    if as_json:
        out.print_json(json.dumps([{"name": n, "type": c.type, "summary": c.summary} for n, c in configs.items()]))
        return
    table = Table()
    for col in ("name", "type", "where"):
        table.add_column(col)
    for name, c in configs.items():
        table.add_row(name, c.type, escape(c.summary))
    out.print(table)


@connectors.command("test")
@click.argument("name")
@click.pass_obj
def connectors_test(cfg: _Config, name: str) -> None:
    """Connect to NAME and run a trivial check; prints no secret."""
    import trio

    from .connectors import ConnectorRegistry

    configs = _load_connector_configs(cfg)
    if name not in configs:
        raise ConfigError(f"no connector named {name!r}; declared: {', '.join(configs) or 'none'}", file=cfg.connectors)

    async def check() -> str:
        async with ConnectorRegistry(configs) as registry:
            return await registry.check(name)

    try:
        result = trio.run(check)
    except Exception as exc:  # the driver's own error, shown to the operator
        err.print(f"[bold red]{escape(name)}: FAILED[/] {type(exc).__name__}: {escape(str(exc))}")
        sys.exit(EXIT_FAILED)
    out.print(f"[green]{escape(name)}: OK[/] {escape(result)}")


@connectors.command("encrypt")
@click.option("--generate-key", is_flag=True, help="Print a new NOMAFLOW_SECRET_KEY instead.")
def connectors_encrypt(generate_key: bool) -> None:
    """Encrypt a secret (read from stdin) with $NOMAFLOW_SECRET_KEY, for a `*_encrypted` value."""
    import os

    from .connectors import SECRET_KEY_ENV, encrypt_secret
    from .connectors import generate_key as new_key

    if generate_key:
        out.print(new_key(), markup=False)
        return
    key = os.environ.get(SECRET_KEY_ENV)
    if not key:
        raise ConfigError(f"set {SECRET_KEY_ENV} first (generate one with `nomaflow connectors encrypt --generate-key`)",
                          key=SECRET_KEY_ENV)
    secret = click.get_text_stream("stdin").read().rstrip("\n") if not sys.stdin.isatty() else click.prompt(
        "secret", hide_input=True)
    if not secret:
        raise ConfigError("empty secret on stdin", key="stdin")
    out.print(encrypt_secret(secret, key), markup=False)


def _runner_error(exc: BaseException) -> NomaflowError | None:
    """The runner's own error, also when trio wrapped it in an exception group."""
    if isinstance(exc, NomaflowError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _runner_error(inner)
            if found is not None:
                return found
    return None


def main() -> None:
    """Console-script entry point: runner errors become exit 2 with one clear line."""
    try:
        code = cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        _fail("aborted", EXIT_CANCELLED)
    except click.ClickException as exc:
        exc.show()
        sys.exit(EXIT_USAGE if isinstance(exc, click.UsageError) else exc.exit_code)
    except (NomaflowError, BaseExceptionGroup) as exc:
        found = _runner_error(exc)
        if found is None:
            raise
        _fail(str(found))
    sys.exit(code if isinstance(code, int) else EXIT_OK)
