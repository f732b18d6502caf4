"""Settings: defaults < environment < command-line flags, and no password ever shown."""

from __future__ import annotations

import os

import pytest

from listener.errors import ConfigurationError
from listener.settings import DEFAULT_URL, Settings, get_settings, redact_url

SECRET = "s3cr3t"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    """No AMQP_* variable from the outside leaks in; the settings cache is fresh both ways."""
    for name in list(os.environ):
        if name == "AMQP_URL" or name.startswith("AMQP_LISTENER_"):
            monkeypatch.delenv(name)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


# -- failures ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [f"http://user:{SECRET}@x/", f"https://user:{SECRET}@rabbit/", f"user:{SECRET}@rabbit"],
)
def test_a_broker_url_with_another_scheme_is_a_configuration_error_without_the_password(
    monkeypatch, url
):
    monkeypatch.setenv("AMQP_URL", url)
    with pytest.raises(ConfigurationError) as caught:
        get_settings()
    text = str(caught.value)
    assert "AMQP_URL" in text
    assert "amqp://" in text
    assert SECRET not in text
    assert SECRET not in repr(caught.value)
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__


def test_a_bad_url_flag_is_a_configuration_error_without_the_password():
    with pytest.raises(ConfigurationError) as caught:
        Settings().with_url(f"http://user:{SECRET}@x/")
    assert "amqp://" in str(caught.value)
    assert SECRET not in str(caught.value)


#: URLs whose unencoded special characters in the password make urllib read part of the
#: password as a port: its error message would quote it.
UNENCODED_PASSWORD_URLS = [
    pytest.param("amqp://app:s3cr3t/Pa55@rabbit:5672/", ("s3cr3t", "Pa55"), id="slash"),
    pytest.param("amqp://app:hunter2#x@host/", ("hunter2",), id="hash"),
]


@pytest.mark.parametrize(("url", "secrets"), UNENCODED_PASSWORD_URLS)
def test_a_url_with_an_unencoded_password_is_refused_without_any_part_of_it(
    monkeypatch, url, secrets
):
    monkeypatch.setenv("AMQP_URL", url)
    with pytest.raises(ConfigurationError) as caught:
        get_settings()
    text = f"{caught.value} {caught.value!r}"
    for secret in secrets:
        assert secret not in text
    assert "AMQP_URL" in text
    assert "percent-encode" in text  # says what to do about it
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__


@pytest.mark.parametrize(("url", "secrets"), UNENCODED_PASSWORD_URLS)
def test_a_url_flag_with_an_unencoded_password_is_refused_without_any_part_of_it(url, secrets):
    with pytest.raises(ConfigurationError) as caught:
        Settings().with_url(url)
    text = f"{caught.value} {caught.value!r}"
    for secret in secrets:
        assert secret not in text
    assert "percent-encode" in text


def test_an_unknown_queue_type_is_refused(monkeypatch):
    monkeypatch.setenv("AMQP_LISTENER_QUEUE_TYPE", "bogus")
    with pytest.raises(ConfigurationError, match="queue_type"):
        get_settings()


@pytest.mark.parametrize(
    ("variable", "value", "field"),
    [
        ("AMQP_LISTENER_GRACE_PERIOD", "-1", "grace_period"),
        ("AMQP_LISTENER_CONNECT_ATTEMPTS", "0", "connect_attempts"),
        ("AMQP_LISTENER_CONFIRM_TIMEOUT", "0", "confirm_timeout"),
        ("AMQP_LISTENER_MAX_BODY_BYTES", "lots", "max_body_bytes"),
    ],
)
def test_an_unusable_environment_value_names_the_setting_not_the_value(
    monkeypatch, variable, value, field
):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError) as caught:
        get_settings()
    assert field in str(caught.value)
    assert repr(value) not in str(caught.value)


# -- precedence ----------------------------------------------------------------------------


def test_the_defaults_apply_without_environment():
    settings = get_settings()
    assert settings.url.get_secret_value() == DEFAULT_URL
    assert DEFAULT_URL == "amqp://guest:guest@localhost:5672/%2F"
    assert settings.queue_prefix == ""
    assert settings.queue_type == "quorum"
    assert settings.grace_period == 25.0
    assert settings.confirm_timeout == 10.0
    assert settings.connect_attempts == 5
    assert settings.heartbeat == 30
    assert settings.max_body_bytes == 16 * 1024 * 1024


def test_amqp_url_in_the_environment_overrides_the_default(monkeypatch):
    monkeypatch.setenv("AMQP_URL", "amqp://app:pw@rabbit.internal:5673/prod")
    assert get_settings().url.get_secret_value() == "amqp://app:pw@rabbit.internal:5673/prod"


def test_prefixed_environment_variables_override_the_defaults(monkeypatch):
    monkeypatch.setenv("AMQP_LISTENER_GRACE_PERIOD", "3.5")
    monkeypatch.setenv("AMQP_LISTENER_CONNECT_ATTEMPTS", "2")
    monkeypatch.setenv("AMQP_LISTENER_QUEUE_PREFIX", "billing")
    settings = get_settings()
    assert (settings.grace_period, settings.connect_attempts, settings.queue_prefix) == (
        3.5,
        2,
        "billing",
    )


def test_the_url_flag_overrides_the_environment(monkeypatch):
    monkeypatch.setenv("AMQP_URL", "amqp://env:pw@env-host/")
    monkeypatch.setenv("AMQP_LISTENER_GRACE_PERIOD", "3")
    from_env = get_settings()
    flagged = from_env.with_url("amqps://flag:pw@flag-host:5671/")
    assert flagged.url.get_secret_value() == "amqps://flag:pw@flag-host:5671/"
    assert flagged.grace_period == 3.0  # the other environment values stay
    assert from_env.url.get_secret_value() == "amqp://env:pw@env-host/"  # not changed in place


def test_no_url_flag_keeps_the_settings_as_they_are(monkeypatch):
    monkeypatch.setenv("AMQP_URL", "amqp://env:pw@env-host/")
    settings = get_settings()
    assert settings.with_url(None) is settings


def test_get_settings_is_read_once_until_the_cache_is_cleared(monkeypatch):
    first = get_settings()
    monkeypatch.setenv("AMQP_LISTENER_QUEUE_PREFIX", "later")
    assert get_settings() is first
    get_settings.cache_clear()
    assert get_settings().queue_prefix == "later"


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
def test_both_queue_types_are_accepted(monkeypatch, queue_type):
    monkeypatch.setenv("AMQP_LISTENER_QUEUE_TYPE", queue_type)
    assert get_settings().queue_type == queue_type


# -- never showing the password ------------------------------------------------------------


def test_printing_settings_never_shows_the_password():
    settings = Settings(url=f"amqp://app:{SECRET}@rabbit:5672/prod")
    for text in (repr(settings), str(settings), f"{settings}", settings.redacted_url):
        assert SECRET not in text
    assert SECRET not in repr(settings.model_dump())
    assert settings.redacted_url == "amqp://app:***@rabbit:5672/prod"


def test_a_url_flag_never_shows_the_password_either():
    settings = Settings().with_url(f"amqp://app:{SECRET}@rabbit/")
    assert SECRET not in repr(settings)
    assert SECRET not in str(settings)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("amqp://rabbit/", "amqp://rabbit/"),
        ("amqp://guest@rabbit:5672/%2F", "amqp://guest@rabbit:5672/%2F"),
        (f"amqp://guest:{SECRET}@rabbit/%2F", "amqp://guest:***@rabbit/%2F"),
        (f"amqps://app:{SECRET}@rabbit:5671/prod", "amqps://app:***@rabbit:5671/prod"),
        (f"amqp://:{SECRET}@rabbit/", "amqp://:***@rabbit/"),
        (f"amqp://app:{SECRET}@rabbit/v?heartbeat=5", "amqp://app:***@rabbit/v?heartbeat=5"),
        (f"amqp://app:{SECRET}@[::1]:5672/", "amqp://app:***@[::1]:5672/"),
    ],
)
def test_redact_url_hides_only_the_password(url, expected):
    assert redact_url(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        f"amqp://app:{SECRET}@[::1/",
        f"amqp://app:{SECRET}@rabbit:notaport/",
        f"amqp://app:{SECRET}@rabbit:99999/",
    ],
)
def test_an_unparseable_url_is_redacted_whole(url):
    redacted = redact_url(url)
    assert SECRET not in redacted
    assert redacted == "<unparseable broker URL>"


@pytest.mark.parametrize("port", ["notaport", "99999"])
def test_a_url_with_an_unusable_port_is_refused_or_at_least_redactable(monkeypatch, port):
    # The redacted URL is what every connection error shows: it must never itself crash.
    monkeypatch.setenv("AMQP_URL", f"amqp://app:{SECRET}@rabbit:{port}/")
    try:
        settings = get_settings()
    except ConfigurationError as refused:
        assert SECRET not in str(refused)
    else:
        assert SECRET not in settings.redacted_url
