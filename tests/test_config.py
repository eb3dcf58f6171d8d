"""Configuration: ini file, environment overrides, secrets only from the environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from hisparc_datastore.config import (
    DEFAULT_CONFIG_PATH,
    DELEGATED_CREDENTIAL_VARIABLES,
    ConfigError,
    Settings,
    config_path,
    env_name,
    load_settings,
    require_s3_credentials,
)

REPO = Path(__file__).resolve().parents[1]

MINIMAL = """\
[General]
station_list = /tmp/stations.csv
data_dir = /tmp/data

[Bucket]
name = hisparc-test
"""


def write(tmp_path: Path, text: str) -> dict[str, str]:
    path = tmp_path / "config.ini"
    path.write_text(text)
    return {"DATASTORE_CONFIG": str(path)}


def test_defaults_apply_to_optional_keys(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, MINIMAL))
    assert settings.minimum_year == 2020
    assert settings.max_body_bytes == 32 * 1024 * 1024
    assert settings.writer_sleep == 10
    assert settings.bucket_endpoint == ""
    assert settings.bucket_region == "us-east-1"
    assert settings.loglevel == "info"
    assert settings.log == ""
    assert settings.station_list == Path("/tmp/stations.csv")


def test_every_key_is_overridden_by_its_environment_variable(tmp_path: Path) -> None:
    env = write(tmp_path, MINIMAL)
    env |= {
        "DATASTORE_GENERAL_LOG": "/tmp/x.log",
        "DATASTORE_GENERAL_LOGLEVEL": "DEBUG",
        "DATASTORE_GENERAL_STATION_LIST": "/srv/s.csv",
        "DATASTORE_GENERAL_DATA_DIR": "/srv/data",
        "DATASTORE_GENERAL_MINIMUM_YEAR": "2021",
        "DATASTORE_WRITER_SLEEP": "2.5",
        "DATASTORE_BUCKET_ENDPOINT": "http://127.0.0.1:9000",
        "DATASTORE_BUCKET_NAME": "other-bucket",
        "DATASTORE_BUCKET_REGION": "eu-west-1",
        "DATASTORE_UPLOAD_MAX_BODY_BYTES": "1000",
    }
    settings = load_settings(env)
    assert settings.log == "/tmp/x.log"
    assert settings.loglevel == "debug"
    assert settings.station_list == Path("/srv/s.csv")
    assert settings.data_dir == Path("/srv/data")
    assert settings.minimum_year == 2021
    assert settings.writer_sleep == 2.5
    assert settings.bucket_endpoint == "http://127.0.0.1:9000"
    assert settings.bucket_name == "other-bucket"
    assert settings.bucket_region == "eu-west-1"
    assert settings.max_body_bytes == 1000


def test_credentials_come_from_the_environment_only(tmp_path: Path) -> None:
    env = write(tmp_path, MINIMAL) | {
        "AWS_ACCESS_KEY_ID": "key",
        "AWS_SECRET_ACCESS_KEY": "secret",
        "DATASTORE_WRITER_AUTH_TOKEN": "token",
    }
    settings = load_settings(env)
    assert (settings.aws_access_key_id, settings.aws_secret_access_key) == ("key", "secret")
    assert settings.writer_auth_token == "token"


def test_a_secret_in_the_ini_file_is_refused(tmp_path: Path) -> None:
    env = write(tmp_path, MINIMAL + "\n[Writer]\nauth_token = oops\n")
    with pytest.raises(ConfigError, match=r"auth_token is a secret.*DATASTORE_WRITER_AUTH_TOKEN"):
        load_settings(env)


def test_missing_required_key_is_named(tmp_path: Path) -> None:
    env = write(tmp_path, MINIMAL.replace("name = hisparc-test\n", ""))
    with pytest.raises(ConfigError, match=r"\[Bucket\] name is missing.*DATASTORE_BUCKET_NAME"):
        load_settings(env)


def test_empty_required_key_is_named(tmp_path: Path) -> None:
    env = write(tmp_path, MINIMAL) | {"DATASTORE_GENERAL_DATA_DIR": " "}
    with pytest.raises(ConfigError, match="DATASTORE_GENERAL_DATA_DIR is empty"):
        load_settings(env)


@pytest.mark.parametrize(
    ("variable", "value", "words"),
    [
        ("DATASTORE_UPLOAD_MAX_BODY_BYTES", "lots", "max_body_bytes"),
        ("DATASTORE_UPLOAD_MAX_BODY_BYTES", "0", "positive"),
        ("DATASTORE_GENERAL_MINIMUM_YEAR", "20x0", "MINIMUM_YEAR"),
        ("DATASTORE_GENERAL_LOGLEVEL", "verbose", "one of debug"),
        ("DATASTORE_WRITER_SLEEP", "-1", "WRITER_SLEEP"),
        ("DATASTORE_BUCKET_ENDPOINT", "minio:9000", "http://"),
        ("DATASTORE_BUCKET_NAME", "x", "bucket name"),
    ],
)
def test_bad_values_are_named(tmp_path: Path, variable: str, value: str, words: str) -> None:
    env = write(tmp_path, MINIMAL) | {variable: value}
    with pytest.raises(ConfigError, match=words) as info:
        load_settings(env)
    assert variable in str(info.value)


def test_missing_file_says_which_variable_to_set(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="DATASTORE_CONFIG"):
        load_settings({"DATASTORE_CONFIG": str(tmp_path / "absent.ini")})


def test_default_path_is_the_baked_in_file() -> None:
    assert config_path({}) == Path(DEFAULT_CONFIG_PATH)
    assert env_name("Upload", "max_body_bytes") == "DATASTORE_UPLOAD_MAX_BODY_BYTES"


def test_the_shipped_config_loads_and_holds_no_secret() -> None:
    settings = load_settings({"DATASTORE_CONFIG": str(REPO / "functions" / "config.ini")})
    assert settings.data_dir == Path("/data")
    assert settings.max_body_bytes == 32 * 1024 * 1024
    assert settings.aws_access_key_id is None
    text = (REPO / "functions" / "config.ini").read_text().lower()
    assert "secret" not in text.replace("no secrets", "").replace("aws_secret_access_key", "")


def test_anonymous_notifications_is_a_boolean_off_by_default(tmp_path: Path) -> None:
    env = write(tmp_path, MINIMAL)
    assert load_settings(env).writer_anonymous is False
    assert load_settings(env | {"DATASTORE_WRITER_ANONYMOUS_NOTIFICATIONS": "yes"}
                         ).writer_anonymous is True
    with pytest.raises(ConfigError, match=r"anonymous_notifications"):
        load_settings(env | {"DATASTORE_WRITER_ANONYMOUS_NOTIFICATIONS": "maybe"})


# -- S3 credentials: refused early, by name, only where they are certainly missing ------


def _settings(
    tmp_path: Path, environ: dict[str, str], endpoint: str = "http://127.0.0.1:9000"
) -> tuple[Settings, dict[str, str]]:
    """Settings with the station list in ``tmp_path`` (where a stack's keys would be)."""
    env = write(tmp_path, MINIMAL.replace("/tmp/stations.csv", str(tmp_path / "stations.csv")))
    env |= {"DATASTORE_BUCKET_ENDPOINT": endpoint} | environ
    return load_settings(env), env


def test_static_keys_are_enough(tmp_path: Path) -> None:
    settings, env = _settings(
        tmp_path, {"AWS_ACCESS_KEY_ID": "key", "AWS_SECRET_ACCESS_KEY": "secret"}
    )
    require_s3_credentials(settings, env)


def test_no_credentials_at_a_custom_endpoint_names_the_variables(tmp_path: Path) -> None:
    settings, env = _settings(tmp_path, {})
    with pytest.raises(ConfigError) as info:
        require_s3_credentials(settings, env)
    message = str(info.value)
    assert "http://127.0.0.1:9000" in message
    for variable in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                     "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"):
        assert variable in message
    assert "credentials.env" not in message  # no local stack here


def test_one_key_without_the_other_is_refused_anywhere(tmp_path: Path) -> None:
    for endpoint in ("", "http://127.0.0.1:9000"):
        settings, env = _settings(tmp_path, {"AWS_ACCESS_KEY_ID": "key"}, endpoint)
        with pytest.raises(ConfigError, match="AWS_ACCESS_KEY_ID is set but "
                                              "AWS_SECRET_ACCESS_KEY is not"):
            require_s3_credentials(settings, env)
        settings, env = _settings(tmp_path, {"AWS_SECRET_ACCESS_KEY": "s"}, endpoint)
        with pytest.raises(ConfigError, match="AWS_SECRET_ACCESS_KEY is set but "
                                              "AWS_ACCESS_KEY_ID is not"):
            require_s3_credentials(settings, env)


@pytest.mark.parametrize("variable", list(DELEGATED_CREDENTIAL_VARIABLES))
def test_delegated_sources_are_left_to_the_client(tmp_path: Path, variable: str) -> None:
    settings, env = _settings(tmp_path, {variable: "/var/run/secrets/token"})
    require_s3_credentials(settings, env)


def test_on_aws_the_instance_metadata_may_hold_credentials(tmp_path: Path) -> None:
    settings, env = _settings(tmp_path, {}, endpoint="")
    require_s3_credentials(settings, env)


def test_a_local_stacks_keys_are_pointed_at(tmp_path: Path) -> None:
    keys = tmp_path / "credentials.env"
    keys.write_text("export AWS_ACCESS_KEY_ID=local\n")
    settings, env = _settings(tmp_path, {})
    with pytest.raises(ConfigError) as info:
        require_s3_credentials(settings, env)
    assert f"`source {keys}`" in str(info.value)


def test_json_log_lines_carry_their_fields(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json
    import logging

    from hisparc_datastore.logs import JsonFormatter

    record = logging.LogRecord("hisparc_datastore.upload.protocol", logging.INFO, __file__, 1,
                               "upload station=%s", (501,), None)
    record.fields = {"station": 501, "code": "100", "bytes": 1700, "events": 1, "ms": 2.5}
    line = JsonFormatter().format(record)
    document = json.loads(line)
    assert "\n" not in line
    assert document["message"] == "upload station=501" and document["level"] == "INFO"
    assert {k: document[k] for k in ("station", "code", "bytes", "events", "ms")} == {
        "station": 501, "code": "100", "bytes": 1700, "events": 1, "ms": 2.5}
