"""`lbserver serve`'s configuration as Kubernetes runs it: service-link
variables, non-option LBSERVER_* variables, typos, bounds, tokens and YAML
errors."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lbserver.config import (
    DURATION_OPTIONS,
    MAX_MESSAGE_BYTES,
    Config,
    environment_options,
    is_kubernetes_service_link,
    load_config,
    option_names,
)
from lbserver.errors import ConfigError
from lbserver.security import load_token

# ---------------------------------------------------------------------------
# Kubernetes service links


def kubelet_env_name(name: str) -> str:
    """The kubelet's makeEnvVariableName: upper case, '-' as '_'."""
    return name.upper().replace("-", "_")


def service_link_variables(
    service: str, ports: list[tuple[str, int, str]], cluster_ip: str = "10.96.0.17"
) -> dict[str, str]:
    """The variables the kubelet injects for one Service (pkg/kubelet/envvars
    FromServices): ports are (name, number, protocol), name '' if unnamed."""
    prefix = kubelet_env_name(service)
    env = {
        f"{prefix}_SERVICE_HOST": cluster_ip,
        f"{prefix}_SERVICE_PORT": str(ports[0][1]),
    }
    for port_name, number, _ in ports:
        if port_name:
            env[f"{prefix}_SERVICE_PORT_{kubelet_env_name(port_name)}"] = str(number)
    for index, (_, number, protocol) in enumerate(ports):
        url = f"{protocol.lower()}://{cluster_ip}:{number}"
        if index == 0:
            env[f"{prefix}_PORT"] = url
        port_prefix = f"{prefix}_PORT_{number}_{protocol}"
        env[port_prefix] = url
        env[f"{port_prefix}_PROTO"] = protocol.lower()
        env[f"{port_prefix}_PORT"] = str(number)
        env[f"{port_prefix}_ADDR"] = cluster_ip
    return env


def test_the_chart_services_links_are_ignored() -> None:
    environ = {
        **service_link_variables("lbserver", [("grpclb", 11810, "TCP"), ("metrics", 11811, "TCP")]),
        **service_link_variables("lbserver-prod", [("grpclb", 11810, "TCP")]),
        **service_link_variables("lbserver-headless-x", [("", 53, "UDP"), ("s", 9, "SCTP")]),
        "LBSERVER_HEARTBEAT_INTERVAL": "2",
    }
    assert "LBSERVER_SERVICE_PORT_GRPCLB" in environ
    assert "LBSERVER_PORT_11810_TCP_ADDR" in environ
    assert "LBSERVER_PROD_SERVICE_HOST" in environ
    assert environment_options(environ) == {"heartbeat_interval": "2"}
    assert load_config(environ=environ) == Config(heartbeat_interval=2.0)


@pytest.mark.parametrize(
    "name",
    [
        "LBSERVER_SERVICE_HOST",
        "LBSERVER_SERVICE_PORT",
        "LBSERVER_SERVICE_PORT_GRPCLB",
        "LBSERVER_SERVICE_PORT_HTTP_METRICS",
        "LBSERVER_PORT",
        "LBSERVER_PORT_11810_TCP",
        "LBSERVER_PORT_11810_TCP_PROTO",
        "LBSERVER_PORT_11810_TCP_PORT",
        "LBSERVER_PORT_11810_TCP_ADDR",
        "LBSERVER_PORT_53_UDP_ADDR",
        "LBSERVER_PORT_9_SCTP",
        "LBSERVER_PROD_SERVICE_HOST",
        "LBSERVER_PROD_PORT_11810_TCP_ADDR",
        "LBSERVER_CONFIG_SERVICE_HOST",
    ],
)
def test_service_link_names_are_recognised(name: str) -> None:
    assert is_kubernetes_service_link(name)
    assert environment_options({name: "x"}) == {}


@pytest.mark.parametrize(
    "name",
    [
        "LBSERVER_SERVICE_HOSTS",
        "LBSERVER_SERVICE",
        "LBSERVER_SERVICE_PORT_123",  # a port name has a letter
        "LBSERVER_PORT_11810",
        "LBSERVER_PORT_11810_HTTP",
        "LBSERVER_PORT_011810_TCP",
        "LBSERVER_PORT_118100_TCP",
        "LBSERVER_PORT_11810_TCP_HOST",
        "LBSERVER_PORTS",
    ],
)
def test_near_misses_are_not_service_links(name: str) -> None:
    assert not is_kubernetes_service_link(name)
    with pytest.raises(ConfigError, match=name):
        load_config(environ={name: "x"})


def test_no_option_can_be_mistaken_for_a_service_link() -> None:
    """Otherwise setting that option in the environment would be ignored."""
    looking_like_links = [
        name for name in option_names() if is_kubernetes_service_link(f"LBSERVER_{name.upper()}")
    ]
    assert looking_like_links == []


# DNS-1035 labels (Service names) and IANA service names (port names).
_LABEL_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789-"
service_suffixes = st.text(_LABEL_CHARS, max_size=40).filter(
    lambda s: not s.endswith("-") and len(s) <= 63 - len("lbserver-")
)
service_names = st.one_of(
    st.just("lbserver"), service_suffixes.filter(bool).map(lambda s: f"lbserver-{s}")
)
port_names = (
    st.from_regex(r"[a-z0-9]([a-z0-9]|-(?=[a-z0-9]))*", fullmatch=True)
    .filter(lambda s: len(s) <= 15 and any(c.isalpha() for c in s))
    .filter(lambda s: "--" not in s)
)
service_ports = st.lists(
    st.tuples(
        st.one_of(st.just(""), port_names),
        st.integers(1, 65535),
        st.sampled_from(["TCP", "UDP", "SCTP"]),
    ),
    min_size=1,
    max_size=4,
    unique_by=lambda port: (port[1], port[2]),
)


@given(service=service_names, ports=service_ports)
def test_every_service_link_of_any_lbserver_service_is_ignored(
    service: str, ports: list[tuple[str, int, str]]
) -> None:
    environ = service_link_variables(service, ports)
    assert all(name.startswith("LBSERVER_") for name in environ)
    assert all(is_kubernetes_service_link(name) for name in environ)
    assert environment_options(environ) == {}


@given(
    service=st.from_regex(r"[a-z]([-a-z0-9]{0,40}[a-z0-9])?", fullmatch=True),
    ports=service_ports,
)
def test_any_services_links_have_the_shape(service: str, ports: list[tuple[str, int, str]]) -> None:
    assert all(is_kubernetes_service_link(name) for name in service_link_variables(service, ports))


def test_token_and_config_variables_are_not_options(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("empty_service: hold\n")
    environ = {"LBSERVER_TOKEN": "client-side-token", "LBSERVER_CONFIG": str(path)}
    assert environment_options(environ) == {}
    config = load_config(environ=environ)
    assert config.empty_service == "hold" and config.auth_token == ""


def test_an_unknown_variable_is_named_as_set_with_a_hint() -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(environ={"LBSERVER_HEARTBEAT_INTERVL": "1", "LBSERVER_SERVICE_HOST": "x"})
    message = str(raised.value)
    assert "LBSERVER_HEARTBEAT_INTERVL" in message
    assert "did you mean LBSERVER_HEARTBEAT_INTERVAL" in message
    assert "SERVICE_HOST" not in message


def test_every_unknown_variable_is_reported() -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(environ={"LBSERVER_METRIC_LISTEN": "x", "LBSERVER_SHUTDOWN": "1"})
    assert "LBSERVER_METRIC_LISTEN" in str(raised.value)
    assert "LBSERVER_METRICS_LISTEN" in str(raised.value)
    assert "LBSERVER_SHUTDOWN:" in str(raised.value)


# ---------------------------------------------------------------------------
# Bounds

INT_OPTIONS = [name for name, f in Config.model_fields.items() if f.annotation is int]


def test_the_int_options_are_known() -> None:
    assert sorted(INT_OPTIONS) == sorted(
        [
            "max_list_length",
            "max_services",
            "max_backends_per_service",
            "max_streams",
            "max_streams_per_peer",
            "max_pending_streams",
            "max_message_bytes",
            "xds_max_resource_names",
        ]
    )


@pytest.mark.parametrize("option", INT_OPTIONS)
def test_every_int_option_has_an_upper_bound(option: str) -> None:
    with pytest.raises(ConfigError, match=f"^{option}: must be"):
        load_config(environ={f"LBSERVER_{option.upper()}": "99999999999"})


def test_subset_sizes_have_an_upper_bound() -> None:
    with pytest.raises(ConfigError, match="subset_sizes"):
        load_config(environ={"LBSERVER_SUBSET_SIZES": "oap=99999999999"})
    assert dict(load_config(environ={"LBSERVER_SUBSET_SIZES": "oap=1000"}).subset_sizes) == {
        "oap": 1000
    }


@pytest.mark.parametrize("option", DURATION_OPTIONS)
def test_every_duration_has_an_upper_bound(option: str) -> None:
    with pytest.raises(ConfigError, match=f"^{option}: must be at most"):
        load_config(environ={f"LBSERVER_{option.upper()}": "99999999999"})


async def test_max_message_bytes_bound_is_one_grpc_takes() -> None:
    config = load_config(environ={"LBSERVER_MAX_MESSAGE_BYTES": str(MAX_MESSAGE_BYTES)})
    server = grpc.aio.server(
        options=(("grpc.max_receive_message_length", config.max_message_bytes),)
    )
    await server.stop(None)
    with pytest.raises(ConfigError, match="max_message_bytes"):
        load_config(environ={"LBSERVER_MAX_MESSAGE_BYTES": str(MAX_MESSAGE_BYTES + 1)})


# ---------------------------------------------------------------------------
# Registration token


@pytest.mark.parametrize("token", [" ", "\t", " \n "])
def test_a_blank_auth_token_is_an_error(token: str) -> None:
    with pytest.raises(ConfigError, match="auth_token"):
        load_token(token, "")


def test_a_blank_token_file_is_an_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("  \n\n")
    with pytest.raises(ConfigError, match=f"auth_token_file: {path}"):
        load_token("", str(path))


@pytest.mark.parametrize(
    "token", ["two words", "tab\there", "bell\x07", "del\x7f", "t\u00f6ken", "nbsp\u00a0x"]
)
def test_a_token_a_client_cannot_send_is_an_error(token: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="auth_token: character") as raised:
        load_token(token, "")
    assert token not in str(raised.value)
    path = tmp_path / "token"
    path.write_bytes(token.encode() + b"\n")
    with pytest.raises(ConfigError, match=f"auth_token_file: the token in {path}"):
        load_token("", str(path))


def test_usable_tokens_lose_surrounding_whitespace(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("let-me-in\n")
    assert load_token("", str(path)) == "let-me-in"
    assert load_token(" s3cr3t~!#$%&'*+.^_`|= ", "") == "s3cr3t~!#$%&'*+.^_`|="
    assert load_token("", "") is None


# ---------------------------------------------------------------------------
# YAML errors


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("listen: 127.0.0.1:1\nmax_ttl: 20\n bad: 3\n", "line 3, column 5"),
        ("listen: [\n", "line 2, column 1"),
        ("listen: 127.0.0.1:1\nkubeconfig: \x07\n", "line 2, column 13"),
    ],
)
def test_invalid_yaml_names_the_file_line_and_column(tmp_path: Path, text: str, where: str) -> None:
    path = tmp_path / "lbserver.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as raised:
        load_config(path, environ={})
    message = str(raised.value)
    assert message.startswith(f"config file {path} is not valid YAML: {where}:")
    assert "<unicode string>" not in message
    assert "\n" not in message


def test_a_config_file_that_is_not_text_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "lbserver.yaml"
    path.write_bytes(b"listen: \xff\xfe\n")
    with pytest.raises(ConfigError, match=f"config file {path} is not UTF-8"):
        load_config(path, environ={})
