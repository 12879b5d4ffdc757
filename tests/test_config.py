"""Settings parse every kind of value from the environment and refuse bad ones."""

from __future__ import annotations

import pytest

from wsrelay.config import Settings


def test_lists_booleans_and_seconds_parse_from_the_environment() -> None:
    settings = Settings.from_env(
        {
            "WSRELAY_API_KEY": " k1, k2 ,,",
            "WSRELAY_ALLOWED_ORIGIN": "https://a.test,https://*.b.test",
            "WSRELAY_INSECURE": "yes",
            "WSRELAY_PING_INTERVAL": "0.5",
            "WSRELAY_REQUEST_TIMEOUT": "12",
            "WSRELAY_MAX_CONNECTIONS": "2K",
            "WSRELAY_LOG_FORMAT": "json",
        }
    )
    assert settings.api_key == ("k1", "k2")
    assert settings.allowed_origin == ("https://a.test", "https://*.b.test")
    assert settings.insecure is True
    assert settings.ping_interval == 0.5 and settings.request_timeout == 12.0
    assert settings.max_connections == 2048
    assert settings.log_format == "json"
    assert Settings.from_env({"WSRELAY_INSECURE": "off"}).insecure is False


@pytest.mark.parametrize(
    ("variables", "fragment"),
    [
        ({"WSRELAY_INSECURE": "maybe"}, "WSRELAY_INSECURE"),
        ({"WSRELAY_PING_INTERVAL": "soon"}, "WSRELAY_PING_INTERVAL"),
        ({"WSRELAY_PING_INTERVAL": "-1"}, "ping_interval"),
        ({"WSRELAY_REQUEST_TIMEOUT": "0"}, "request_timeout"),
        ({"WSRELAY_LOG_FORMAT": "xml"}, "log_format"),
        ({"WSRELAY_MAX_CONNECTIONS": "0"}, "max_connections"),
        ({"WSRELAY_MAX_REGISTRATIONS_PER_USER": "-1"}, "WSRELAY_MAX_REGISTRATIONS_PER_USER"),
        ({"WSRELAY_JWT_PUBLIC_KEY_FILE": "/nonexistent.pem"}, "no such file"),
        ({"WSRELAY_BROKER_POOL_SIZE": "0"}, "broker_pool_size"),
        ({"WSRELAY_BROKER_TIMEOUT": "0"}, "broker_timeout"),
    ],
)
def test_bad_values_are_refused_naming_the_setting(variables: dict[str, str], fragment: str):
    with pytest.raises(ValueError, match=fragment):
        Settings.from_env(variables)


def test_registrations_per_user_default_to_100_and_zero_means_no_limit() -> None:
    assert Settings().max_registrations_per_user == 100
    assert (
        Settings.from_env({"WSRELAY_MAX_REGISTRATIONS_PER_USER": "0"}).max_registrations_per_user
        == 0
    )
    with pytest.raises(ValueError, match="max_registrations_per_user must be 0"):
        Settings(max_registrations_per_user=-1)


def test_secrets_stay_out_of_repr() -> None:
    settings = Settings(api_key=("top-secret-key",), jwt_secret="jwt-secret-value")
    assert "top-secret-key" not in repr(settings) and "jwt-secret-value" not in repr(settings)


def test_broker_pool_size_and_timeout_parse_and_reach_the_cli() -> None:
    from wsrelay.cli import build_parser

    assert (Settings().broker_pool_size, Settings().broker_timeout) == (10, 5.0)
    settings = Settings.from_env({"WSRELAY_BROKER_POOL_SIZE": "3", "WSRELAY_BROKER_TIMEOUT": "0.5"})
    assert (settings.broker_pool_size, settings.broker_timeout) == (3, 0.5)
    args = build_parser().parse_args(["serve", "--broker-pool-size", "7", "--broker-timeout", "2"])
    assert (args.broker_pool_size, args.broker_timeout) == (7, 2.0)
