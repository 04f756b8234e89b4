"""Jobs, steps and runner settings, loaded strictly from TOML.

Operators write these files by hand, so every mistake (unknown key, wrong type,
bad reference) is a `ConfigError` naming the file, the key and what was
expected; nothing is silently ignored or coerced.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, Literal

import attrs

from ._strict import describe_error, make_strict_converter
from .errors import ConfigError

MAX_WARM_SPARES = 64
_FUNCTION_REF = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")


@attrs.frozen(kw_only=True)
class Limits:
    """Per-step resource limits; `None` means "no limit of this kind"."""

    memory_mb: int | None = None
    cpu_seconds: float | None = None
    max_processes: int | None = None
    max_open_files: int | None = None
    max_file_mb: int | None = None
    max_output_kb: int = 64
    max_log_mb: int = 64
    network: bool = True
    writable: list[str] = attrs.field(factory=list)
    readable: list[str] = attrs.field(factory=list)


@attrs.frozen(kw_only=True)
class Retry:
    max_attempts: int = 1
    delay_seconds: float = 0.0
    backoff: float = 2.0

    def delay_before(self, attempt: int) -> float:
        """Delay before attempt number `attempt` (2 = first retry)."""
        return self.delay_seconds * self.backoff ** max(0, attempt - 2)


@attrs.frozen(kw_only=True)
class Step:
    name: str
    python: str
    timeout_seconds: float = 3600.0
    cancel_grace_seconds: float = 5.0
    connectors: list[str] = attrs.field(factory=list)
    op_kwargs: dict[str, Any] = attrs.field(factory=dict)
    limits: Limits = attrs.field(factory=Limits)
    retry: Retry = attrs.field(factory=Retry)


@attrs.frozen(kw_only=True)
class Job:
    name: str
    steps: list[Step]
    params: dict[str, Any] = attrs.field(factory=dict)
    log_level: Literal["INFO", "DEBUG"] = "INFO"

    def __attrs_post_init__(self) -> None:
        _validate_job(self, file=None)

    @classmethod
    def load(cls, path: str | Path, *, defaults: dict[str, Any] | None = None) -> Job:
        """Load a job file; `defaults` (nomaflow.toml's [defaults]) fill keys a step leaves out."""
        path = Path(path)
        raw = read_toml(path)
        steps = raw.get("steps")
        if isinstance(steps, list) and defaults:
            raw = {**raw, "steps": [_merge(defaults, s) if isinstance(s, dict) else s for s in steps]}
        return _structure(raw, Job, str(path))


@attrs.frozen(kw_only=True)
class Settings:
    """`nomaflow.toml`: where things are, and step defaults."""

    plugins: str = "plugins"
    history: str = ".nomaflow/history.db"
    connectors: str = "connectors.toml"
    start_mode: Literal["zygote", "spawn"] = "zygote"
    isolation: bool = True
    warm_spares: int = 4
    defaults: dict[str, Any] = attrs.field(factory=dict)

    def __attrs_post_init__(self) -> None:
        if not 0 <= self.warm_spares <= MAX_WARM_SPARES:
            raise ConfigError(
                f"must be a whole number from 0 (off) to {MAX_WARM_SPARES}, got {self.warm_spares}", key="warm_spares"
            )

    @classmethod
    def load(cls, path: str | Path | None = None) -> Settings:
        """Read `nomaflow.toml` if it exists; relative paths resolve against its folder."""
        path = Path(path) if path is not None else Path("nomaflow.toml")
        if not path.exists():
            return cls()
        raw = read_toml(path)
        settings = _structure(raw, Settings, str(path))
        _check_defaults(settings.defaults, str(path))
        base = path.resolve().parent
        return attrs.evolve(
            settings,
            plugins=str(base / settings.plugins),
            history=settings.history if settings.history == ":memory:" else str(base / settings.history),
            connectors=str(base / settings.connectors),
        )


_converter = make_strict_converter()


def read_toml(path: Path, *, what: str = "file") -> dict[str, Any]:
    """A TOML file's table, or a ConfigError naming the file and what is wrong with it."""
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{what} not found; check the path", file=str(path)) from None
    except IsADirectoryError:
        raise ConfigError("is a directory, expected a TOML file", file=str(path)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", file=str(path)) from None


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _structure(raw: dict[str, Any], cls: type, file: str) -> Any:
    try:
        obj = _converter.structure(raw, cls)
    except ConfigError:
        raise
    except Exception as exc:  # cattrs aggregates every field error into one exception group
        semantic = _find_config_error(exc)
        if semantic is not None:
            raise ConfigError(semantic.message, file=file, key=semantic.key) from None
        problems = describe_error(exc)
        key, message = problems[0]
        if len(problems) > 1:
            message += "; also " + "; ".join(f"{w or 'top level'}: {m}" for w, m in problems[1:])
        raise ConfigError(message, file=file, key=key or None) from None
    return obj


def _find_config_error(exc: BaseException) -> ConfigError | None:
    """A validation error raised while cattrs built the object (it wraps it in a group)."""
    if isinstance(exc, ConfigError):
        return exc
    for inner in getattr(exc, "exceptions", ()):
        found = _find_config_error(inner)
        if found is not None:
            return found
    return None


def _check_defaults(defaults: dict[str, Any], file: str) -> None:
    allowed = {f.name for f in attrs.fields(Step)} - {"name", "python"}
    for key in defaults:
        if key not in allowed:
            raise ConfigError(
                f"unknown step default {key!r}; expected one of {', '.join(sorted(allowed))}",
                file=file,
                key=f"defaults.{key}",
            )
    try:
        _structure({"name": "defaults", "python": "m:f", **defaults}, Step, file)
    except ConfigError as exc:
        raise ConfigError(exc.message, file=file, key=f"defaults.{exc.key}" if exc.key else "defaults") from None


def _validate_job(job: Job, *, file: str | None) -> None:
    def fail(key: str, message: str) -> None:
        raise ConfigError(message, file=file or f"job {job.name!r}", key=key)

    if not job.name.strip():
        fail("name", "the job name must not be empty")
    if not job.steps:
        fail("steps", "a job needs at least one [[steps]] entry")
    seen: set[str] = set()
    for i, step in enumerate(job.steps):
        where = f"steps[{i}]"
        if not step.name.strip():
            fail(f"{where}.name", "a step name must not be empty")
        if step.name in seen:
            fail(f"{where}.name", f"duplicate step name {step.name!r}; step names must be unique in a job")
        seen.add(step.name)
        if not _FUNCTION_REF.match(step.python):
            fail(f"{where}.python", f"{step.python!r} is not a 'module.path:function' reference")
        if step.timeout_seconds <= 0:
            fail(f"{where}.timeout_seconds", f"must be > 0, got {step.timeout_seconds}")
        if step.cancel_grace_seconds < 0:
            fail(f"{where}.cancel_grace_seconds", f"must be >= 0, got {step.cancel_grace_seconds}")
        if step.retry.max_attempts < 1:
            fail(f"{where}.retry.max_attempts", f"must be >= 1, got {step.retry.max_attempts}")
        if step.retry.delay_seconds < 0 or step.retry.backoff < 1:
            fail(f"{where}.retry", "delay_seconds must be >= 0 and backoff >= 1")
        for name, value in attrs.asdict(step.limits).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0:
                fail(f"{where}.limits.{name}", f"must be > 0, got {value}")


def parse_param(text: str) -> tuple[str, Any]:
    """`k=v` from the command line: the value parses as JSON, else stays a string."""
    import json

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"--param {text!r} is not of the form key=value", key="--param")
    def not_json(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    try:
        return key, json.loads(value, parse_constant=not_json)
    except ValueError:
        return key, value


__all__ = ["Job", "Limits", "Retry", "Settings", "Step", "parse_param"]
