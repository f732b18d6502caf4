"""Settings: one typed object, read from the environment, overridden by CLI flags.

Precedence, lowest first: the defaults below < environment variables (`AMQP_URL`, then
`AMQP_LISTENER_<FIELD>`) < command-line flags (`--url`, `--grace`, ...).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from listener.errors import ConfigurationError

__all__ = ["DEFAULT_URL", "Settings", "get_settings", "redact_url", "split_urls"]

DEFAULT_URL = "amqp://guest:guest@localhost:5672/%2F"


class Settings(BaseSettings):
    """What the runner, the publishers and the CLI read.

    The broker URL is kept as a `SecretStr`: printing or logging a Settings object never
    shows the password. Use `redacted_url` for logs and error messages.
    """

    model_config = SettingsConfigDict(env_prefix="AMQP_LISTENER_", extra="ignore", frozen=True)

    url: SecretStr = Field(
        default=SecretStr(DEFAULT_URL),
        validation_alias=AliasChoices("AMQP_URL", "AMQP_LISTENER_URL", "url"),
        description="Broker URL (amqp:// or amqps://); several, comma-separated, for the "
        "nodes of a cluster: each connection tries them in a random order.",
    )
    queue_prefix: str = Field(
        default="",
        description="Application prefix put before every derived queue name ('billing' gives "
        "'billing.file_copier').",
    )
    queue_type: Literal["quorum", "classic"] = Field(
        default="quorum", description="Type of the queues the framework declares."
    )
    grace_period: float = Field(
        default=25.0,
        ge=0,
        description="Seconds in-flight messages get to finish after SIGTERM/SIGINT.",
    )
    confirm_timeout: float = Field(
        default=10.0,
        gt=0,
        description="Seconds a publish waits for the broker's confirm before PublishTimeout.",
    )
    connect_timeout: float = Field(
        default=10.0,
        gt=0,
        description="Seconds opening one connection (TCP and the AMQP handshake) may take.",
    )
    connect_attempts: int = Field(
        default=5, ge=1, description="Tries to reach the broker at start-up before giving up."
    )
    heartbeat: int = Field(default=30, ge=0, description="AMQP heartbeat interval in seconds.")
    max_stuck_threads: int = Field(
        default=1,
        ge=0,
        description="Sync handler threads abandoned past their timeout that a worker may "
        "carry before it drains and exits to be replaced (0: never recycle).",
    )
    management_url: str | None = Field(
        default=None,
        description="Base URL of the management HTTP API (default: the broker's host, port "
        "15672); used by `status` for unacked counts when it answers.",
    )
    max_body_bytes: int = Field(
        default=16 * 1024 * 1024,
        gt=0,
        description="Largest message body the framework publishes or decodes.",
    )
    consumer_timeout: float = Field(
        default=1800.0,
        ge=0,
        description="The broker's consumer timeout in seconds (RabbitMQ's `consumer_timeout`, "
        "30 minutes by default; AMQP gives no way to read it): `run` warns at start-up about "
        "each listener whose `timeout` is not below it. 0: the broker has none.",
    )
    event_loop: Literal["auto", "uvloop", "asyncio"] = Field(
        default="auto",
        description="The worker's event loop: auto (uvloop when installed), uvloop or asyncio.",
    )
    schedule_timezone: str = Field(
        default="UTC",
        description="The time zone cron schedules are read in (an IANA name such as "
        "'Europe/Paris'); `every` schedules do not depend on it.",
    )
    health_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="Serve /livez and /readyz on this port, all interfaces (0: a free port, "
        "logged); `run --health-port`. Default: off.",
    )
    # -- the database edge (ledger, outbox, inbox) -------------------------------------------
    database_url: SecretStr | None = Field(
        default=None,
        description="The framework's database: postgresql://user@host/db (psycopg 3) or "
        "sqlite:///path/to/file.db. Default: none (no ledger).",
    )
    ledger_keep_handled_days: float = Field(
        default=3.0, gt=0, description="Days the ledger keeps a handled message's records."
    )
    ledger_keep_failed_days: float = Field(
        default=30.0,
        gt=0,
        description="Days the ledger keeps the records of parked, failed and unfinished messages.",
    )
    ledger_buffer: int = Field(
        default=10_000,
        ge=100,
        description="Ledger records a process holds while the database is away; past that, "
        "new records are dropped, counted, and reported as a gap.",
    )
    # -- the outbox and the inbox -----------------------------------------------------------
    outbox_relay: bool = Field(
        default=False,
        description="`run` also starts an outbox relay, a supervised process (`run --outbox`).",
    )
    inbox_retention_days: float = Field(
        default=7.0,
        gt=0,
        description="Days an idempotent listener remembers a handled message id; a delivery "
        "after that runs again. Must exceed the longest retry span.",
    )

    @property
    def redacted_database_url(self) -> str | None:
        """The database URL with its password replaced by `***`, or None."""
        from listener.database import redact_database_url

        if self.database_url is None:
            return None
        return redact_database_url(self.database_url.get_secret_value())

    def with_database_url(self, url: str | None) -> Settings:
        """A copy whose database URL is `url` (a CLI flag), or this object when `url` is None."""
        if url is None:
            return self
        return self.model_copy(update={"database_url": SecretStr(url)})

    # The web console (`amqp-listener web`).
    web_token: SecretStr | None = Field(
        default=None,
        description="Bearer token the web console requires (`Authorization: Bearer ...`); "
        "with it, the console may bind a non-loopback address.",
    )
    # -- TLS, for amqps:// URLs --------------------------------------------------------------
    tls_ca_file: Path | None = Field(
        default=None,
        description="PEM file of the CA(s) that sign the brokers' certificates (default: the "
        "system's trusted CAs).",
    )
    tls_cert_file: Path | None = Field(
        default=None,
        description="PEM client certificate presented to the broker (with tls_key_file).",
    )
    tls_key_file: Path | None = Field(default=None, description="PEM private key of tls_cert_file.")

    @field_validator("url")
    @classmethod
    def _check_scheme(cls, value: SecretStr) -> SecretStr:
        urls = split_urls(value.get_secret_value())
        for number, url in enumerate(urls, 1):
            # Which one, when there are several; never its text, which holds a password.
            which = f"the broker URL {number} of {len(urls)}" if len(urls) > 1 else "the broker URL"
            _check_url(url, which)
        return value

    @property
    def redacted_url(self) -> str:
        """The broker URL (each of a list) with its password replaced by `***`."""
        return redact_url(self.url.get_secret_value())

    @property
    def urls(self) -> list[str]:
        """The broker URLs, in the order given (they hold passwords: never print them)."""
        return split_urls(self.url.get_secret_value())

    def with_url(self, url: str | None) -> Settings:
        """A copy whose URL is `url` (a CLI flag), or this object when `url` is None."""
        if url is None:
            return self
        return _validated(
            lambda: Settings.model_validate({**self.model_dump(), "url": SecretStr(url)})
        )


def split_urls(text: str) -> list[str]:
    """`"amqp://a/, amqp://b/"` -> `["amqp://a/", "amqp://b/"]` (a comma inside a password
    must be percent-encoded, as `%2C`)."""
    return [url.strip() for url in text.split(",")]


def _check_url(url: str, which: str) -> None:
    if not url:
        raise ValueError(f"{which} is empty: separate several URLs with single commas")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - urlsplit checks the port only when it is read
    except ValueError:
        # urllib's own message may quote a piece of the password: say nothing of it.
        raise ValueError(
            f"{which} cannot be parsed; check the port, and percent-encode special "
            "characters (like / # @ : ,) in the user name and password"
        ) from None
    if parts.scheme not in ("amqp", "amqps"):
        raise ValueError(
            f"{which} must start with amqp:// or amqps://, not {parts.scheme or 'nothing'}://"
        )
    mechanisms = [v.lower() for k, v in parse_qsl(parts.query) if k == "auth_mechanism"]
    if mechanisms and (len(mechanisms) > 1 or mechanisms[0] not in ("plain", "external")):
        raise ValueError(f"{which}: auth_mechanism must be plain or external, once")
    if mechanisms == ["external"] and parts.scheme != "amqps":
        raise ValueError(
            f"{which}: auth_mechanism=external logs in with a TLS client certificate, so the "
            "URL must start with amqps://"
        )


def redact_url(url: str) -> str:
    """`amqp://user:secret@host/vhost` -> `amqp://user:***@host/vhost`; each URL of a
    comma-separated list likewise."""
    if "," in url:
        return ", ".join(redact_url(one) for one in split_urls(url))
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - urlsplit checks the port only when it is read
        if parts.password is None:
            return url
    except ValueError:
        return "<unparseable broker URL>"
    # Rebuild from the raw netloc so that IPv6 brackets and the port stay as written.
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hostport}"))


@functools.cache
def get_settings() -> Settings:
    """The process-wide settings, read from the environment once.

    Raises:
        ConfigurationError: an environment variable holds an unusable value (the text names
            the variable, never its value, which may be a URL with a password).
    """
    return _validated(Settings)


def _validated(make: Callable[[], Settings]) -> Settings:
    try:
        return make()
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or 'settings'}: {error['msg']}"
            for error in exc.errors(include_input=False, include_url=False, include_context=False)
        )
        raise ConfigurationError(f"invalid settings ({problems})") from None
