"""The configuration model and what is generated from it: the option table of
docs/configuration.md and the chart's values schema for `config` must be
what scripts/gen-config-docs writes, and the model must hold the checks that
involve several options."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, get_args

import pytest
from pydantic import ValidationError

from lbserver.config import Config, load_config, option_names
from lbserver.config._values import LogLevel, NameRule
from lbserver.config.reference import (
    CHART_OWNED_OPTIONS,
    CHART_SCHEMA,
    DOC,
    chart_config_schema,
    main,
)
from lbserver.domain.naming import RULES
from lbserver.errors import ConfigError
from lbserver.logs import LOG_LEVELS

ROOT = Path(__file__).resolve().parents[2]

# The keywords of draft-07 the chart's schema may use (Helm validates with a
# draft-07 validator; an unknown keyword would be silently ignored).
JSON_SCHEMA_KEYWORDS = {
    "type",
    "description",
    "enum",
    "items",
    "properties",
    "additionalProperties",
    "required",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "minItems",
    "pattern",
}


def test_the_generated_reference_and_chart_schema_are_fresh() -> None:
    assert main(["--check"], ROOT) == 0, "run scripts/gen-config-docs and commit the result"


def test_the_script_checks_both_files(tmp_path: Path) -> None:
    for path in (DOC, CHART_SCHEMA):
        (tmp_path / path).parent.mkdir(parents=True)
        shutil.copy(ROOT / path, tmp_path / path)
    doc = tmp_path / DOC
    doc.write_text(doc.read_text().replace("| `max_ttl` |", "| `max_tll` |"))
    schema = tmp_path / CHART_SCHEMA
    values = json.loads(schema.read_text())
    del values["properties"]["config"]["properties"]["max_ttl"]
    schema.write_text(json.dumps(values, indent=2) + "\n")
    assert main(["--check"], tmp_path) == 1
    assert main([], tmp_path) == 0
    assert main(["--check"], tmp_path) == 0
    assert doc.read_text() == (ROOT / DOC).read_text()
    assert schema.read_text() == (ROOT / CHART_SCHEMA).read_text()


def test_the_script_runs_as_scripts_check_calls_it() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen-config-docs"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def _keywords(node: Any, path: str) -> list[str]:
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key not in JSON_SCHEMA_KEYWORDS:
                found.append(f"{path}.{key}")
            children = value.values() if key == "properties" else [value]
            found += [k for child in children for k in _keywords(child, f"{path}.{key}")]
    return found


def test_the_chart_schema_uses_only_draft_07_keywords() -> None:
    assert _keywords(chart_config_schema(), "config") == []


def test_the_chart_owns_only_real_options() -> None:
    assert set(option_names()) >= CHART_OWNED_OPTIONS
    assert set(chart_config_schema()["properties"]) == set(option_names()) - CHART_OWNED_OPTIONS


def test_choices_are_those_of_the_code_that_uses_them() -> None:
    assert get_args(NameRule) == RULES
    assert get_args(LogLevel) == LOG_LEVELS


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (3, 3.0),
        (2.5, 2.5),
        ("2.5", 2.5),
        ("500ms", 0.5),
        (" 3s ", 3.0),
        ("2m", 120.0),
        ("1h", 3600),
    ],
)
def test_durations_take_numbers_and_units(value: object, seconds: float) -> None:
    assert Config(shutdown_grace=value).shutdown_grace == seconds


@pytest.mark.parametrize("value", [True, "soon", "1d", "-1s", None])
def test_durations_refuse_anything_else(value: object) -> None:
    with pytest.raises(ConfigError, match=r"^shutdown_grace: expected seconds"):
        Config(shutdown_grace=value)


def test_keyword_construction_validates_and_ignores_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LBSERVER_MAX_SERVICES", "7")
    assert Config().max_services == 1000
    with pytest.raises(ConfigError, match=r"^max_services: must be 1-100000$"):
        Config(max_services=0)
    with pytest.raises(ConfigError, match=r"^colour: unknown option$"):
        Config(colour="red")


def test_config_is_immutable_and_replace_validates() -> None:
    config = Config()
    with pytest.raises(ValidationError):
        config.max_services = 5
    assert config.replace(max_services=5).max_services == 5
    assert config.max_services == 1000
    with pytest.raises(ConfigError, match="heartbeat_interval: must be shorter"):
        config.replace(heartbeat_interval=30)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"tls_client_ca_file": "ca.pem"}, "tls_client_ca_file needs tls_cert_file"),
        ({"tls_cert_file": "c.pem"}, "tls_cert_file and tls_key_file go together"),
        ({"tls_key_file": "k.pem"}, "tls_cert_file and tls_key_file go together"),
        (
            {"tls_cert_file": "c", "tls_key_file": "k", "tls_client_ca_file": "ca"},
            "needs registry_listen",
        ),
        ({"registry_listen": "127.0.0.1:0"}, "registry_listen is only used with"),
        (
            {
                "tls_cert_file": "c",
                "tls_key_file": "k",
                "tls_client_ca_file": "ca",
                "tls_client_auth": "all",
                "registry_listen": "127.0.0.1:0",
            },
            "registry_listen is only used with",
        ),
    ],
)
def test_tls_options_must_go_together(options: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Config(**options)


def test_a_consistent_tls_configuration_is_accepted() -> None:
    config = Config(
        tls_cert_file="c",
        tls_key_file="k",
        tls_client_ca_file="ca",
        registry_listen="127.0.0.1:0",
    )
    assert config.separate_registry
    assert not Config(tls_cert_file="c", tls_key_file="k").separate_registry


def test_a_value_that_cannot_be_read_names_where_it_was_set(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("max_streams: many\n")
    with pytest.raises(ConfigError, match=f"^config file {path}: max_streams: expected a whole"):
        load_config(path, environ={})
    with pytest.raises(ConfigError, match=r"^flag: listen: expected HOST:PORT"):
        load_config(environ={}, overrides={"listen": "anywhere"})
    with pytest.raises(ConfigError, match=r"^environment LBSERVER_\*: kubernetes_services\[1\]"):
        load_config(environ={"LBSERVER_KUBERNETES_SERVICES": '[{"service": "a"}, {}]'})


def test_every_bad_option_is_reported_once() -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(environ={"LBSERVER_MAX_STREAMS": "0", "LBSERVER_LOG_LEVEL": "loud"})
    assert str(raised.value).count("max_streams") == 1
    assert "log_level: must be one of debug, info, warning, error" in str(raised.value)
