from __future__ import annotations

from pathlib import Path

import pytest

from lbserver.config import Config, load_config, option_help, option_names
from lbserver.errors import ConfigError


def test_defaults_need_no_file_or_environment() -> None:
    config = load_config(environ={})
    assert config == Config()
    assert config.listen == "0.0.0.0:11810"
    assert config.metrics_listen == "0.0.0.0:11811"


def test_precedence_file_then_environment_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "lbserver.yaml"
    path.write_text("heartbeat_interval: 2s\nlisten: 127.0.0.1:1\nname_aliases: {a: b}\n")
    config = load_config(
        path,
        environ={"LBSERVER_LISTEN": "127.0.0.1:2", "LBSERVER_MAX_LIST_LENGTH": "50"},
        overrides={"listen": "127.0.0.1:3", "metrics_listen": None},
    )
    assert config.heartbeat_interval == 2.0
    assert config.listen == "127.0.0.1:3"
    assert config.max_list_length == 50
    assert dict(config.name_aliases) == {"a": "b"}


def test_environment_parses_lists_maps_and_durations() -> None:
    config = load_config(
        environ={
            "LBSERVER_NAME_RULES": "exact, host",
            "LBSERVER_NAME_ALIASES": "skywalking-oap=oap,collector=oap",
            "LBSERVER_CLIENT_STATS_INTERVAL": "500ms",
            "LBSERVER_MAX_TTL": "2m",
        }
    )
    assert config.name_rules == ("exact", "host")
    assert dict(config.name_aliases) == {"skywalking-oap": "oap", "collector": "oap"}
    assert config.client_stats_interval == 0.5
    assert config.max_ttl == 120.0


def test_config_file_path_from_environment(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("empty_service: hold\n")
    assert load_config(environ={"LBSERVER_CONFIG": str(path)}).empty_service == "hold"


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"LBSERVER_HEARTBEAT_INTERVL": "1"}, "unknown option 'heartbeat_intervl'"),
        ({"LBSERVER_HEARTBEAT_INTERVAL": "soon"}, "heartbeat_interval: expected seconds"),
        ({"LBSERVER_HEARTBEAT_INTERVAL": "20"}, "shorter than default_ttl"),
        ({"LBSERVER_LISTEN": "nowhere"}, "listen: expected HOST:PORT"),
        ({"LBSERVER_MAX_LIST_LENGTH": "0"}, "max_list_length"),
        ({"LBSERVER_EMPTY_SERVICE": "drop"}, "empty_service: must be one of"),
        ({"LBSERVER_NAME_RULES": "exact,suffix"}, "name_rules"),
        ({"LBSERVER_NAME_ALIASES": "oops"}, "NAME=SERVICE"),
        ({"LBSERVER_DEFAULT_TTL": "100"}, "default_ttl: must lie between"),
    ],
)
def test_bad_values_name_the_option(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(environ=environ)


def test_bad_files_are_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml", environ={})
    broken = tmp_path / "broken.yaml"
    broken.write_text("listen: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken, environ={})
    listy = tmp_path / "list.yaml"
    listy.write_text("- listen\n")
    with pytest.raises(ConfigError, match="mapping of options"):
        load_config(listy, environ={})


def test_every_option_has_help() -> None:
    helps = option_help()
    assert set(helps) == set(option_names())
    assert all(len(text) > 10 for text in helps.values())


def test_every_option_is_in_the_configuration_reference() -> None:
    reference = (Path(__file__).parents[2] / "docs" / "configuration.md").read_text()
    missing = [
        name
        for name in option_names()
        if f"| `{name}` | `LBSERVER_{name.upper()}` |" not in reference
    ]
    assert missing == []


def test_kubernetes_services_from_yaml_and_json(tmp_path: Path) -> None:
    path = tmp_path / "k.yaml"
    path.write_text(
        "kubernetes_services:\n"
        "  - {service: oap, namespace: skywalking, kubernetes_service: oap-svc, port_name: grpc}\n"
    )
    watched = load_config(path, environ={}).kubernetes_services
    assert [
        (w.service, w.namespace, w.kubernetes_service, w.port_name, w.mode) for w in watched
    ] == [("oap", "skywalking", "oap-svc", "grpc", "both")]
    from_env = load_config(
        environ={"LBSERVER_KUBERNETES_SERVICES": '[{"service": "oap", "mode": "kubernetes"}]'}
    ).kubernetes_services
    assert from_env[0].mode == "kubernetes" and from_env[0].kubernetes_service == "oap"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('[{"service": "oap", "mode": "magic"}]', "mode must be"),
        ('[{"namespace": "x"}]', "'service' is required"),
        ('[{"service": "oap", "colour": "x"}]', "unknown keys"),
        ("[", "JSON"),
        ('[{"service": "a"}, {"service": "a"}]', "listed twice"),
    ],
)
def test_bad_kubernetes_services(value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(environ={"LBSERVER_KUBERNETES_SERVICES": value})
