"""Runtime configuration: one ini file, every key overridable from the environment.

The ini file is baked into the images and holds no secrets; deployments change behaviour
with ``DATASTORE_<SECTION>_<KEY>`` variables, and credentials come only from the
environment.  A bad or missing key is reported at start-up by name, so a misconfigured
function fails loudly once instead of answering stations with errors for hours.
"""

from __future__ import annotations

import configparser
import contextlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_CONFIG_PATH = "/etc/hisparc-datastore/config.ini"
#: Where ``datastore local`` keeps its state; other commands find its config there.
DEFAULT_STATE_DIR = Path("local/state")
CONFIG_ENV = "DATASTORE_CONFIG"
ENV_PREFIX = "DATASTORE_"
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key and the reason."""


@dataclass(frozen=True)
class Settings:
    log: str
    loglevel: str
    station_list: Path
    data_dir: Path
    minimum_year: int
    writer_sleep: float
    bucket_endpoint: str
    bucket_name: str
    bucket_region: str
    max_body_bytes: int
    # Secrets: only ever from the environment.
    aws_access_key_id: str | None = None
    aws_secret_access_key: str | None = None
    writer_auth_token: str | None = None
    #: ``[Writer] anonymous_notifications``: serve the writer without a token (tests, a
    #: closed network).  Without it the writer refuses to start with no token set.
    writer_anonymous: bool = False
    #: ``[Writer] retry_delay``, ``retry_max_delay``, ``retry_attempts``: how an object
    #: that waits for its day file or for itself is retried (doubling delays), and after
    #: how many failed attempts it is quarantined (see retries.py).
    retry_delay: float = 10.0
    retry_max_delay: float = 600.0
    retry_attempts: int = 12
    #: ``[General] log_format``: ``text`` lines for people, or ``json``, one object a line.
    log_format: str = "text"


def _text(value: str) -> str:
    return value.strip()


def _positive_int(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise ValueError("must be a positive integer")
    return number


def _non_negative_float(value: str) -> float:
    number = float(value)
    if not number >= 0:
        raise ValueError("must be a number >= 0")
    return number


def _year(value: str) -> int:
    year = int(value)
    if not 1970 <= year <= 9999:
        raise ValueError("must be a year between 1970 and 9999")
    return year


def _boolean(value: str) -> bool:
    text = value.strip().lower()
    if text in ("true", "yes", "on", "1"):
        return True
    if text in ("false", "no", "off", "0", ""):
        return False
    raise ValueError(f"{value!r} is not true or false")


def _loglevel(value: str) -> str:
    level = value.strip().lower()
    if level not in LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
    return level


def _log_format(value: str) -> str:
    text = value.strip().lower()
    if text not in ("text", "json"):
        raise ValueError("must be text or json")
    return text


def _endpoint(value: str) -> str:
    endpoint = value.strip()
    if endpoint and not endpoint.startswith(("http://", "https://")):
        raise ValueError("must be an http:// or https:// URL, or empty for AWS")
    return endpoint


def _bucket_name(value: str) -> str:
    name = value.strip()
    if not 3 <= len(name) <= 63:
        raise ValueError("must be an S3 bucket name of 3 to 63 characters")
    return name


# (section, key) -> (Settings field, parser, default or None when required)
_KEYS: dict[tuple[str, str], tuple[str, Callable[[str], Any], str | None]] = {
    ("General", "log"): ("log", _text, ""),
    ("General", "loglevel"): ("loglevel", _loglevel, "info"),
    ("General", "log_format"): ("log_format", _log_format, "text"),
    ("General", "station_list"): ("station_list", lambda v: Path(v.strip()), None),
    ("General", "data_dir"): ("data_dir", lambda v: Path(v.strip()), None),
    ("General", "minimum_year"): ("minimum_year", _year, "2020"),
    ("Writer", "sleep"): ("writer_sleep", _non_negative_float, "10"),
    ("Writer", "anonymous_notifications"): ("writer_anonymous", _boolean, "false"),
    ("Writer", "retry_delay"): ("retry_delay", _non_negative_float, "10"),
    ("Writer", "retry_max_delay"): ("retry_max_delay", _non_negative_float, "600"),
    ("Writer", "retry_attempts"): ("retry_attempts", _positive_int, "12"),
    ("Bucket", "endpoint"): ("bucket_endpoint", _endpoint, ""),
    ("Bucket", "name"): ("bucket_name", _bucket_name, None),
    ("Bucket", "region"): ("bucket_region", _text, "us-east-1"),
    ("Upload", "max_body_bytes"): ("max_body_bytes", _positive_int, str(32 * 1024 * 1024)),
}

#: Keys that must never be written into an ini file (it is baked into images).
SECRET_KEYS = {("Writer", "auth_token")}


def env_name(section: str, key: str) -> str:
    """The environment variable that overrides ``[section] key``."""
    return f"{ENV_PREFIX}{section.upper()}_{key.upper()}"


def config_path(environ: Mapping[str, str] | None = None) -> Path:
    environ = os.environ if environ is None else environ
    return Path(environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH)


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read the ini file named by ``DATASTORE_CONFIG`` and apply environment overrides."""
    environ = os.environ if environ is None else environ
    path = config_path(environ)
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with path.open(encoding="utf-8") as handle:
            parser.read_file(handle)
    except FileNotFoundError:
        raise ConfigError(
            f"config file {path} not found (set {CONFIG_ENV} to the ini file's path)"
        ) from None
    except (OSError, configparser.Error) as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from None

    for section, key in SECRET_KEYS:
        if parser.has_option(section, key):
            raise ConfigError(
                f"[{section}] {key} is a secret and must not be in {path}; "
                f"set {env_name(section, key)} in the environment instead"
            )

    values: dict[str, Any] = {}
    for (section, key), (field, parse, default) in _KEYS.items():
        variable = env_name(section, key)
        if variable in environ:
            raw, origin = environ[variable], f"[{section}] {key} from {variable}"
        elif parser.has_option(section, key):
            raw, origin = parser.get(section, key), f"[{section}] {key} in {path}"
        elif default is not None:
            raw, origin = default, f"default of [{section}] {key}"
        else:
            raise ConfigError(
                f"[{section}] {key} is missing: set it in {path} or in {variable}"
            )
        if default is None and not raw.strip():
            raise ConfigError(f"{origin} is empty; it is required")
        try:
            values[field] = parse(raw)
        except ValueError as exc:
            raise ConfigError(f"{origin} = {raw!r} is invalid: {exc}") from None

    return Settings(
        **values,
        aws_access_key_id=environ.get("AWS_ACCESS_KEY_ID") or None,
        aws_secret_access_key=environ.get("AWS_SECRET_ACCESS_KEY") or None,
        writer_auth_token=environ.get(env_name("Writer", "auth_token")) or None,
    )


# -- a local stack's state directory ------------------------------------------------------


def parse_env_file(text: str) -> dict[str, str]:
    """``NAME=value`` lines (``export`` allowed, ``#`` comments), as a shell would source them."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, value = line.removeprefix("export ").partition("=")
        values[name.strip()] = value.strip().strip("'\"")
    return values


def stack_environment(
    state_dir: Path, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment a CLI command should load its settings from.

    An explicit ``DATASTORE_CONFIG`` always wins.  Without one, a local stack's config and
    credentials in ``state_dir`` are used (credentials already in the environment win).
    """
    environment = dict(os.environ if environ is None else environ)
    config = Path(state_dir) / "config.ini"
    if environment.get(CONFIG_ENV) or not config.exists():
        return environment
    environment[CONFIG_ENV] = str(config)
    with contextlib.suppress(OSError):
        credentials = (Path(state_dir) / "credentials.env").read_text(encoding="utf-8")
        for name, value in parse_env_file(credentials).items():
            environment.setdefault(name, value)
    return environment


# -- S3 credentials -------------------------------------------------------------------------

#: Variables from which the S3 client (obstore) finds credentials without static keys:
#: a web identity token (Kubernetes service accounts, IRSA) and the ECS/EKS container
#: credentials endpoint.  On AWS itself the instance metadata service is one more source
#: that no variable announces.
DELEGATED_CREDENTIAL_VARIABLES = (
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)


def require_s3_credentials(settings: Settings, environ: Mapping[str, str] | None = None) -> None:
    """Refuse, naming the variables to set, when the bucket cannot be signed for.

    Without this an operator command gets as far as its first request and fails there
    with the S3 client's error, which does not say that a key is missing.  Only what is
    certainly wrong is refused: one static key without the other; or, for a bucket at a
    custom endpoint (a MinIO, the local stack), no key and no delegated source either.
    On AWS (no endpoint) the instance metadata may still hold credentials, so there the
    client is left to find them.  ``environ`` is the environment the settings came from.
    """
    environ = os.environ if environ is None else environ
    key, secret = settings.aws_access_key_id, settings.aws_secret_access_key
    if key and secret:
        return
    if key or secret:
        present, missing = (
            ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if key
            else ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID")
        )
        raise ConfigError(f"{present} is set but {missing} is not: set both, or neither")
    if not settings.bucket_endpoint:
        return
    if any(environ.get(name) for name in DELEGATED_CREDENTIAL_VARIABLES):
        return
    message = (
        f"no S3 credentials for the bucket at {settings.bucket_endpoint}: set "
        "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_WEB_IDENTITY_TOKEN_FILE, or "
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI or _FULL_URI) in the environment"
    )
    # A `datastore local` stack keeps its keys beside its station list.
    local_keys = settings.station_list.parent / "credentials.env"
    if local_keys.is_file():
        message += f"; this stack's keys are in {local_keys}: `source {local_keys}`"
    raise ConfigError(message)
