"""connectors.toml: structure, secrets by reference or encrypted, and errors that say where."""

from __future__ import annotations

from pathlib import Path

import pytest

from liberty.jobs.connectors import (
    SECRET_KEY_ENV,
    HttpConfig,
    PostgresConfig,
    SqliteConfig,
    decrypt_secret,
    encrypt_secret,
    generate_key,
    load_connectors,
)
from liberty.jobs.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "connectors.toml"
    path.write_text(text)
    return path


def config_error(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> ConfigError:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_connectors(path, environ=environ or {})
    assert str(path) in str(info.value)
    return info.value


def test_no_file_configured_means_no_connectors() -> None:
    assert load_connectors(None, environ={}) == {}


def test_sqlite_relative_path_resolves_against_the_files_folder(tmp_path: Path) -> None:
    path = write(tmp_path, '[local]\ntype = "sqlite"\npath = "data/app.db"\n')
    cfg = load_connectors(path, environ={})["local"]
    assert isinstance(cfg, SqliteConfig)
    assert cfg.path == str(tmp_path.resolve() / "data" / "app.db")
    assert cfg.call_timeout_seconds == 30


def test_sqlite_memory_path_is_kept(tmp_path: Path) -> None:
    path = write(tmp_path, '[mem]\ntype = "sqlite"\npath = ":memory:"\ntimeout_seconds = 2\ncall_timeout_seconds = 5\n')
    cfg = load_connectors(path, environ={})["mem"]
    assert (cfg.path, cfg.timeout_seconds, cfg.call_timeout_seconds) == (":memory:", 2, 5)


def test_postgres_password_comes_from_the_named_environment_variable(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[reporting]\ntype = "postgres"\nhost = "db"\nport = 5433\ndbname = "rep"\nuser = "etl"\n'
        'password_env = "REPORTING_PW"\npool_min = 0\npool_max = 3\n[reporting.options]\nsslmode = "disable"\n',
    )
    cfg = load_connectors(path, environ={"REPORTING_PW": "s3cret-pw"})["reporting"]
    assert isinstance(cfg, PostgresConfig)
    assert cfg.params["password"] == "s3cret-pw" and cfg.params["sslmode"] == "disable"
    assert (cfg.params["host"], cfg.params["port"], cfg.pool_min, cfg.pool_max) == ("db", 5433, 0, 3)
    assert cfg.secrets == {"s3cret-pw"}
    assert "s3cret-pw" not in repr(cfg) and "s3cret-pw" not in cfg.summary
    assert cfg.summary == "postgres etl@db:5433/rep"


def test_postgres_dsn_from_environment(tmp_path: Path) -> None:
    path = write(tmp_path, '[pg]\ntype = "postgres"\ndsn_env = "PG_DSN"\n')
    cfg = load_connectors(path, environ={"PG_DSN": "host=h dbname=d user=u password=pw"})["pg"]
    assert cfg.conninfo == "host=h dbname=d user=u password=pw" and cfg.secrets == {"host=h dbname=d user=u password=pw"}


def test_invalid_dsn_is_reported_without_echoing_it(tmp_path: Path) -> None:
    err = config_error(tmp_path, '[pg]\ntype = "postgres"\ndsn_env = "PG_DSN"\n', {"PG_DSN": "password=hunter2 ==="})
    assert "pg.dsn_env" in str(err) and "hunter2" not in str(err)


def test_encrypted_password_is_decrypted_with_the_secret_key(tmp_path: Path) -> None:
    key = generate_key()
    token = encrypt_secret("enc-pw", key)
    path = write(tmp_path, f'[pg]\ntype = "postgres"\nhost = "h"\npassword_encrypted = "{token}"\n')
    cfg = load_connectors(path, environ={SECRET_KEY_ENV: key})["pg"]
    assert cfg.params["password"] == "enc-pw" and cfg.secrets == {"enc-pw"}


def test_http_secret_headers_come_from_environment_and_token_becomes_bearer(tmp_path: Path) -> None:
    key = generate_key()
    path = write(
        tmp_path,
        '[api]\ntype = "http"\nbase_url = "https://api.example.com/v1/"\ntoken_env = "API_TOKEN"\n'
        'headers = { "Accept" = "application/json" }\nheaders_env = { "X-Api-Key" = "API_KEY" }\n'
        f'headers_encrypted = {{ "X-Other-Secret" = "{encrypt_secret("other", key)}" }}\n'
        "verify = false\n",
    )
    cfg = load_connectors(path, environ={"API_TOKEN": "tok", "API_KEY": "key-1", SECRET_KEY_ENV: key})["api"]
    assert isinstance(cfg, HttpConfig)
    assert cfg.headers == {
        "Accept": "application/json",
        "X-Api-Key": "key-1",
        "X-Other-Secret": "other",
        "Authorization": "Bearer tok",
    }
    assert cfg.secrets == {"tok", "key-1", "other"} and cfg.verify is False
    assert "tok" not in repr(cfg).replace("type", "")


@pytest.mark.parametrize(
    ("table", "key", "hint"),
    [
        ('type = "postgres"\npassword = "pw"\n', "pg.password", "password_env"),
        ('type = "postgres"\ndsn = "host=x password=pw"\n', "pg.dsn", "dsn_env"),
        ('type = "http"\nbase_url = "http://x"\ntoken = "t"\n', "pg.token", "token_env"),
        ('type = "postgres"\n[pg.options]\npassword = "pw"\n', "pg.options.password", "password_env"),
        ('type = "http"\nbase_url = "http://x"\nheaders = { Authorization = "Bearer t" }\n', "pg.headers.Authorization", "headers_env"),
        ('type = "http"\nbase_url = "http://x"\nheaders = { "X-Api-Key" = "k" }\n', "pg.headers.X-Api-Key", "headers_env"),
    ],
)
def test_plain_text_secret_is_refused_with_the_proper_way(tmp_path: Path, table: str, key: str, hint: str) -> None:
    err = config_error(tmp_path, f"[pg]\n{table}")
    assert key in str(err) and hint in str(err) and "plain-text" in str(err)


def test_unknown_key_names_connector_and_key(tmp_path: Path) -> None:
    err = config_error(tmp_path, '[local]\ntype = "sqlite"\npath = "x.db"\nflavour = "mint"\n')
    assert "local" in str(err) and "unknown key(s) flavour" in str(err)


def test_wrong_type_names_key_and_expected_type(tmp_path: Path) -> None:
    err = config_error(tmp_path, '[pg]\ntype = "postgres"\nport = "5432"\n')
    assert "pg.port" in str(err) and "expected an integer" in str(err)


def test_wrong_type_inside_a_header_table(tmp_path: Path) -> None:
    err = config_error(tmp_path, '[api]\ntype = "http"\nbase_url = "http://x"\nheaders = { Accept = 1 }\n')
    assert "api.headers['Accept']" in str(err) and "expected a string" in str(err)


def test_verify_ca_bundle_path_resolves_against_the_files_folder(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    path = write(tmp_path, '[api]\ntype = "http"\nbase_url = "https://x"\nverify = "ca.pem"\n')
    assert load_connectors(path, environ={})["api"].verify == str(tmp_path.resolve() / "ca.pem")


def test_verify_accepts_a_bool_or_a_ca_path_only(tmp_path: Path) -> None:
    err = config_error(tmp_path, '[api]\ntype = "http"\nbase_url = "http://x"\nverify = 1\n')
    assert "api.verify" in str(err) and "true or false or a string" in str(err)


def test_missing_environment_variable_names_it(tmp_path: Path) -> None:
    err = config_error(tmp_path, '[pg]\ntype = "postgres"\npassword_env = "PG_PASSWORD"\n')
    assert "pg.password_env" in str(err) and "PG_PASSWORD is not set" in str(err)


def test_missing_header_environment_variable_names_the_header(tmp_path: Path) -> None:
    err = config_error(tmp_path, '[api]\ntype = "http"\nbase_url = "http://x"\nheaders_env = { "X-Key" = "NOPE" }\n')
    assert "api.headers_env.X-Key" in str(err) and "NOPE is not set" in str(err)


def test_encrypted_value_without_the_key_says_to_set_it(tmp_path: Path) -> None:
    token = encrypt_secret("pw", generate_key())
    err = config_error(tmp_path, f'[pg]\ntype = "postgres"\npassword_encrypted = "{token}"\n')
    assert "pg.password_encrypted" in str(err) and f"{SECRET_KEY_ENV} is not set" in str(err)


def test_encrypted_value_with_the_wrong_key_cannot_be_decrypted(tmp_path: Path) -> None:
    token = encrypt_secret("pw", generate_key())
    err = config_error(tmp_path, f'[pg]\ntype = "postgres"\npassword_encrypted = "{token}"\n', {SECRET_KEY_ENV: generate_key()})
    assert "pg.password_encrypted" in str(err) and "cannot decrypt" in str(err)


def test_malformed_secret_key_is_reported(tmp_path: Path) -> None:
    err = config_error(tmp_path, '[pg]\ntype = "postgres"\npassword_encrypted = "abc"\n', {SECRET_KEY_ENV: "short"})
    assert "pg.password_encrypted" in str(err) and "not a valid key" in str(err)


def test_env_and_encrypted_together_is_ambiguous(tmp_path: Path) -> None:
    err = config_error(
        tmp_path, '[pg]\ntype = "postgres"\npassword_env = "A"\npassword_encrypted = "b"\n', {"A": "x"}
    )
    assert "pg.password_encrypted" in str(err) and "not both" in str(err)


def test_unknown_type_lists_the_valid_ones(tmp_path: Path) -> None:
    err = config_error(tmp_path, '[x]\ntype = "mysql"\n')
    assert "x.type" in str(err) and "'sqlite', 'postgres', 'http'" in str(err)


def test_a_connector_must_be_a_table(tmp_path: Path) -> None:
    err = config_error(tmp_path, 'x = "sqlite"\n')
    assert "x" in str(err) and "expected a table" in str(err)


def test_required_key_missing(tmp_path: Path) -> None:
    err = config_error(tmp_path, '[local]\ntype = "sqlite"\n')
    assert "local.path" in str(err) and "missing" in str(err)


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ('type = "sqlite"\npath = "x"\ncall_timeout_seconds = 0\n', "c.call_timeout_seconds"),
        ('type = "sqlite"\npath = "x"\npool_max = 0\n', "c.pool_max"),
        ('type = "postgres"\npool_min = 5\npool_max = 2\n', "c.pool_min"),
        ('type = "postgres"\nport = 70000\n', "c.port"),
        ('type = "http"\nbase_url = "ftp://x"\n', "c.base_url"),
        ('type = "http"\nbase_url = "/relative"\n', "c.base_url"),
        ('type = "http"\nbase_url = "http://x"\ntoken_env = "not a var"\n', "c.token_env"),
        ('type = "http"\nbase_url = "http://x"\nverify = "no-such-ca.pem"\n', "c.verify"),
    ],
)
def test_out_of_range_values_name_the_key(tmp_path: Path, table: str, key: str) -> None:
    assert key in str(config_error(tmp_path, f"[c]\n{table}", {"X": "1"}))


def test_missing_file_and_bad_toml_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_connectors(tmp_path / "nope.toml", environ={})
    assert "not valid TOML" in str(config_error(tmp_path, "[x\n"))


def test_encrypt_then_decrypt_round_trips_and_the_token_hides_the_value() -> None:
    key = generate_key()
    token = encrypt_secret("hunter2", key)
    assert "hunter2" not in token and decrypt_secret(token, key) == "hunter2"


def test_encrypting_with_a_bad_key_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=SECRET_KEY_ENV):
        encrypt_secret("x", "not-a-key")
