"""Job and settings files: strict loading, errors that name the file and the key, defaults, --param."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import pytest

from liberty.jobs.config import Job, Limits, Retry, Settings, Step, parse_param
from liberty.jobs.errors import ConfigError

GOOD_JOB = """
name = "monthly-report"
log_level = "DEBUG"
[params]
period = "2026-04"

[[steps]]
name = "generate"
python = "reports.summary:generate_monthly"
timeout_seconds = 120
cancel_grace_seconds = 3
connectors = ["reporting"]
[steps.op_kwargs]
target_path = "/tmp/out.pdf"
[steps.limits]
memory_mb = 512
cpu_seconds = 600
max_processes = 64
max_open_files = 1024
max_file_mb = 1024
max_output_kb = 16
max_log_mb = 8
network = false
writable = ["/exports"]
[steps.retry]
max_attempts = 3
delay_seconds = 0.5
backoff = 3.0

[[steps]]
name = "prune"
python = "housekeeping:prune_attachments"
"""

ONE_STEP = """
name = "j"
[[steps]]
name = "a"
python = "m:f"
"""


def write(tmp_path: Path, text: str, name: str = "job.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def load_error(path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        Job.load(path)
    return info.value


# --- good files -------------------------------------------------------------------


def test_good_job_file_loads_every_key(tmp_path: Path) -> None:
    job = Job.load(write(tmp_path, GOOD_JOB))
    assert job.name == "monthly-report"
    assert job.log_level == "DEBUG"
    assert job.params == {"period": "2026-04"}
    first, second = job.steps
    assert first == Step(
        name="generate",
        python="reports.summary:generate_monthly",
        timeout_seconds=120,
        cancel_grace_seconds=3,
        connectors=["reporting"],
        op_kwargs={"target_path": "/tmp/out.pdf"},
        limits=Limits(
            memory_mb=512,
            cpu_seconds=600,
            max_processes=64,
            max_open_files=1024,
            max_file_mb=1024,
            max_output_kb=16,
            max_log_mb=8,
            network=False,
            writable=["/exports"],
        ),
        retry=Retry(max_attempts=3, delay_seconds=0.5, backoff=3.0),
    )
    assert second == Step(name="prune", python="housekeeping:prune_attachments")


def test_step_defaults_apply_when_keys_are_left_out(tmp_path: Path) -> None:
    step = Job.load(write(tmp_path, ONE_STEP)).steps[0]
    assert (step.timeout_seconds, step.cancel_grace_seconds) == (3600, 5)
    assert step.limits == Limits() and step.retry == Retry()


def test_example_job_files_of_the_repository_load() -> None:
    jobs = sorted((Path(__file__).resolve().parents[1] / "jobs").glob("*.toml"))
    assert jobs
    for path in jobs:
        assert Job.load(path).steps


# --- errors name the file and the key ------------------------------------------------


def test_unknown_step_key_names_file_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, ONE_STEP + "bogus_key = 1\n")
    err = load_error(path)
    assert str(path) in str(err) and "bogus_key" in str(err)
    assert err.file == str(path) and err.key is not None and err.key.startswith("steps[0]")


def test_unknown_top_level_key_names_file_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, 'surprise = true\n' + ONE_STEP)
    err = load_error(path)
    assert str(path) in str(err) and "surprise" in str(err)


def test_unknown_limits_key_names_file_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, ONE_STEP + "[steps.limits]\nmemory_gb = 1\n")
    err = load_error(path)
    assert str(path) in str(err) and "memory_gb" in str(err)


@pytest.mark.parametrize(
    ("extra", "key", "expected"),
    [
        ('timeout_seconds = "5"\n', "steps[0].timeout_seconds", "number"),
        ("connectors = \"reporting\"\n", "steps[0].connectors", "list"),
        ("[steps.limits]\nmemory_mb = true\n", "steps[0].limits.memory_mb", "integer"),
        ("[steps.limits]\nnetwork = 1\n", "steps[0].limits.network", "true or false"),
        ("[steps.retry]\nmax_attempts = 2.5\n", "steps[0].retry.max_attempts", "integer"),
        ("op_kwargs = 3\n", "steps[0].op_kwargs", "table"),
    ],
)
def test_wrong_type_names_file_key_and_expected_type(tmp_path: Path, extra: str, key: str, expected: str) -> None:
    path = write(tmp_path, ONE_STEP + extra)
    err = load_error(path)
    assert err.file == str(path) and err.key == key
    assert str(path) in str(err) and key in str(err) and expected in str(err)


def test_wrong_type_of_log_level_names_the_key(tmp_path: Path) -> None:
    path = write(tmp_path, 'log_level = "TRACE"\n' + ONE_STEP)
    err = load_error(path)
    assert err.key == "log_level" and str(path) in str(err)


def test_missing_required_key_names_file_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, 'name = "j"\n[[steps]]\nname = "a"\n')
    err = load_error(path)
    assert err.key == "steps[0].python" and str(path) in str(err)


@pytest.mark.parametrize("ref", ["m.f", "m:", ":f", "m:f:g", "1m:f", "m:f()", "m/x:f", ""])
def test_bad_python_reference_names_file_and_key(tmp_path: Path, ref: str) -> None:
    path = write(tmp_path, f'name = "j"\n[[steps]]\nname = "a"\npython = "{ref}"\n')
    err = load_error(path)
    assert str(path) in str(err)
    assert err.key == "steps[0].python"
    assert "module.path:function" in str(err)


def test_duplicate_step_name_names_file_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, ONE_STEP + '[[steps]]\nname = "a"\npython = "m:g"\n')
    err = load_error(path)
    assert str(path) in str(err) and "duplicate" in str(err)
    assert err.key == "steps[1].name"


def test_job_without_steps_names_file_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, 'name = "j"\nsteps = []\n')
    err = load_error(path)
    assert str(path) in str(err) and err.key == "steps"


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ("timeout_seconds = 0\n", "steps[0].timeout_seconds"),
        ("cancel_grace_seconds = -1\n", "steps[0].cancel_grace_seconds"),
        ("[steps.retry]\nmax_attempts = 0\n", "steps[0].retry.max_attempts"),
        ("[steps.limits]\nmemory_mb = 0\n", "steps[0].limits.memory_mb"),
    ],
)
def test_out_of_range_value_names_file_and_key(tmp_path: Path, extra: str, key: str) -> None:
    path = write(tmp_path, ONE_STEP + extra)
    err = load_error(path)
    assert str(path) in str(err) and err.key == key


def test_missing_job_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    err = load_error(path)
    assert err.file == str(path) and str(path) in str(err) and "not found" in str(err)


def test_directory_instead_of_job_file_names_it(tmp_path: Path) -> None:
    err = load_error(tmp_path)
    assert str(tmp_path) in str(err)


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'name = "j"\n[[steps]\n')
    err = load_error(path)
    assert err.file == str(path) and str(path) in str(err) and "TOML" in str(err)


def test_job_built_in_python_is_validated_too() -> None:
    with pytest.raises(ConfigError, match="duplicate"):
        Job(name="j", steps=[Step(name="a", python="m:f"), Step(name="a", python="m:g")])


# --- nomaflow.toml --------------------------------------------------------------------


def test_settings_load_resolves_paths_against_its_folder(tmp_path: Path) -> None:
    path = write(tmp_path, 'plugins = "my_plugins"\nhistory = "h/runs.db"\nconnectors = "c.toml"\n', "nomaflow.toml")
    settings = Settings.load(path)
    assert settings.plugins == str(tmp_path.resolve() / "my_plugins")
    assert settings.history == str(tmp_path.resolve() / "h/runs.db")
    assert settings.connectors == str(tmp_path.resolve() / "c.toml")


def test_settings_keep_memory_history(tmp_path: Path) -> None:
    assert Settings.load(write(tmp_path, 'history = ":memory:"\n', "nomaflow.toml")).history == ":memory:"


def test_settings_without_a_file_are_the_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert Settings.load() == Settings()


def test_settings_unknown_key_names_file_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, 'plugin_dir = "p"\n', "nomaflow.toml")
    with pytest.raises(ConfigError) as info:
        Settings.load(path)
    assert str(path) in str(info.value) and "plugin_dir" in str(info.value)


def test_settings_wrong_type_names_file_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, "plugins = 3\n", "nomaflow.toml")
    with pytest.raises(ConfigError) as info:
        Settings.load(path)
    assert info.value.key == "plugins" and str(path) in str(info.value)


def test_settings_warm_spares_out_of_range_names_file_key_and_range(tmp_path: Path) -> None:
    path = write(tmp_path, "warm_spares = -1\n", "nomaflow.toml")
    with pytest.raises(ConfigError) as info:
        Settings.load(path)
    assert info.value.key == "warm_spares" and str(path) in str(info.value) and "from 0 (off) to 64" in str(info.value)


def test_settings_warm_spares_zero_is_allowed(tmp_path: Path) -> None:
    assert Settings.load(write(tmp_path, "warm_spares = 0\n", "nomaflow.toml")).warm_spares == 0


def test_settings_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "plugins = \n", "nomaflow.toml")
    with pytest.raises(ConfigError) as info:
        Settings.load(path)
    assert str(path) in str(info.value)


def test_unknown_step_default_names_file_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, "[defaults]\ntimeout = 5\n", "nomaflow.toml")
    with pytest.raises(ConfigError) as info:
        Settings.load(path)
    assert info.value.key == "defaults.timeout" and str(path) in str(info.value)


def test_wrong_type_of_step_default_names_file_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, '[defaults]\ntimeout_seconds = "soon"\n', "nomaflow.toml")
    with pytest.raises(ConfigError) as info:
        Settings.load(path)
    assert str(path) in str(info.value) and "timeout_seconds" in str(info.value)


def test_defaults_fill_keys_a_step_leaves_out(tmp_path: Path) -> None:
    settings = Settings.load(
        write(
            tmp_path,
            """
            [defaults]
            timeout_seconds = 7
            cancel_grace_seconds = 2
            [defaults.limits]
            memory_mb = 100
            max_output_kb = 4
            [defaults.retry]
            max_attempts = 2
            """,
            "nomaflow.toml",
        )
    )
    job = Job.load(
        write(
            tmp_path,
            ONE_STEP
            + """
            timeout_seconds = 30
            [steps.limits]
            max_output_kb = 8
            """,
        ),
        defaults=settings.defaults,
    )
    step = job.steps[0]
    assert step.timeout_seconds == 30  # the step's own value wins
    assert step.cancel_grace_seconds == 2  # from [defaults]
    assert step.limits.memory_mb == 100 and step.limits.max_output_kb == 8  # tables merge key by key
    assert step.retry.max_attempts == 2


def test_defaults_apply_to_every_step(tmp_path: Path) -> None:
    path = write(tmp_path, ONE_STEP + '[[steps]]\nname = "b"\npython = "m:g"\n')
    job = Job.load(path, defaults={"cancel_grace_seconds": 1.5})
    assert [s.cancel_grace_seconds for s in job.steps] == [1.5, 1.5]


def test_wrong_type_coming_from_defaults_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        Job.load(write(tmp_path, ONE_STEP), defaults={"timeout_seconds": "x"})


# --- --param ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("n=5", ("n", 5)),
        ("x=1.5", ("x", 1.5)),
        ("flag=true", ("flag", True)),
        ("nothing=null", ("nothing", None)),
        ('items=[1, "a"]', ("items", [1, "a"])),
        ('data={"a": {"b": 2}}', ("data", {"a": {"b": 2}})),
        ('quoted="5"', ("quoted", "5")),
        ("period=2026-04", ("period", "2026-04")),
        ("word=hello", ("word", "hello")),
        ("empty=", ("empty", "")),
        ("eq=a=b", ("eq", "a=b")),
        ("space= spaced ", ("space", " spaced ")),
    ],
)
def test_parse_param_parses_json_else_keeps_string(text: str, expected: tuple[str, object]) -> None:
    assert parse_param(text) == expected


@pytest.mark.parametrize("text", ["novalue", "=5", ""])
def test_parse_param_without_key_is_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError, match="key=value"):
        parse_param(text)


@pytest.mark.parametrize("text", ["x=NaN", "x=Infinity", "x=-Infinity"])
def test_parse_param_never_yields_a_non_finite_float(text: str) -> None:
    """NaN cannot cross the JSON protocol; it must stay a string (or be refused), never a float."""
    try:
        _, value = parse_param(text)
    except ConfigError:
        return
    assert not (isinstance(value, float) and not math.isfinite(value))
