"""The provider-info dict: valid for Airflow's own schema, every class path real, and seen by Airflow itself."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import subprocess
import sys
from importlib import resources
from importlib.metadata import version

import jsonschema
import pytest
from airflow.sdk import BaseHook, BaseOperator, BaseOperatorLink, BaseSensorOperator, conf
from airflow.triggers.base import BaseTrigger

from airflow_provider_studio.get_provider_info import get_provider_info

PACKAGE = "airflow-provider-studio"

KIND_BASES = {
    "operators": BaseOperator,
    "sensors": BaseSensorOperator,
    "triggers": BaseTrigger,
    "hooks": BaseHook,
}


def _declared() -> list[tuple[str, str, str | None]]:
    """``(kind, module, class name or None)`` for every path the provider info names."""
    info = get_provider_info()
    found = [
        (kind, module, None)
        for kind in KIND_BASES
        for group in info.get(kind, [])
        for module in group["python-modules"]
    ]
    for connection in info["connection-types"]:
        module, _, name = connection["hook-class-name"].rpartition(".")
        found.append(("connection-types", module, name))
    for link in info["extra-links"]:
        module, _, name = link.rpartition(".")
        found.append(("extra-links", module, name))
    return found


def _import(module: str):
    return importlib.import_module(module)


def test_valid_against_airflows_schema():
    schema = json.loads((resources.files("airflow") / "provider_info.schema.json").read_text())
    jsonschema.validate(get_provider_info(), schema)


def test_every_section_uses_the_declared_integration():
    info = get_provider_info()
    integrations = {item["integration-name"] for item in info["integrations"]}
    for kind in KIND_BASES:
        assert {group["integration-name"] for group in info[kind]} <= integrations, kind


@pytest.mark.parametrize(
    ("kind", "module", "name"), _declared(), ids=[f"{k}:{m}.{n or '*'}" for k, m, n in _declared()]
)
def test_declared_path_imports(kind, module, name):
    loaded = _import(module)
    if name is not None:
        assert hasattr(loaded, name), f"{module} has no {name}"
        target = getattr(loaded, name)
        expected = BaseHook if kind == "connection-types" else BaseOperatorLink
        assert inspect.isclass(target) and issubclass(target, expected), (
            f"{module}.{name} is not a {expected}"
        )
        return
    base = KIND_BASES[kind]
    own = [
        obj
        for obj in vars(loaded).values()
        if inspect.isclass(obj) and issubclass(obj, base) and obj.__module__ == module
    ]
    assert own, f"{module} is listed under {kind} but defines no {base.__name__} subclass"


def _connection_type(info: dict, name: str) -> dict:
    (connection,) = [c for c in info["connection-types"] if c["connection-type"] == name]
    return connection


def test_connection_type_matches_the_hook():
    connection = _connection_type(get_provider_info(), "studio_rabbitmq")
    module, _, name = connection["hook-class-name"].rpartition(".")
    hook = getattr(importlib.import_module(module), name)
    assert connection["connection-type"] == hook.conn_type == "studio_rabbitmq"
    assert connection["hook-name"] == hook.hook_name
    assert hook.default_conn_name == "studio_rabbitmq_default"
    assert hook.conn_name_attr in inspect.signature(hook.__init__).parameters
    assert set(connection["conn-fields"]) == {"management_url", "ssl"}
    assert connection["ui-field-behaviour"]["relabeling"] == {"schema": "Virtual host"}


def test_message_keys_connection_type_matches_its_hook_and_hides_private_keys():
    connection = _connection_type(get_provider_info(), "studio_message_keys")
    module, _, name = connection["hook-class-name"].rpartition(".")
    hook = getattr(importlib.import_module(module), name)
    assert connection["connection-type"] == hook.conn_type
    assert connection["hook-name"] == hook.hook_name
    assert hook.conn_name_attr in inspect.signature(hook.__init__).parameters
    fields = connection["conn-fields"]
    assert fields["runner_public_key"]["schema"].get("format") is None  # public: shown
    for secret in ("signing_private_key", "runner_private_key", "runner_private_key_passphrase"):
        assert fields[secret]["schema"]["format"] == "password"  # masked in the UI and API


def test_connection_form_comes_from_the_declaration():
    from airflow.providers_manager import ProvidersManager

    manager = ProvidersManager()
    widgets = manager.connection_form_widgets
    assert widgets["extra__studio_rabbitmq__management_url"].hook_class_name.endswith("StudioRabbitMQHook")
    assert widgets["extra__studio_rabbitmq__ssl"].field["schema"]["type"] == ["boolean", "null"]
    behaviour = manager.field_behaviours["studio_rabbitmq"]
    assert behaviour["relabeling"] == {"schema": "Virtual host"}
    assert behaviour["placeholders"]["port"] == "5672"


def test_config_defaults_and_environment_override(monkeypatch):
    assert conf.get("studio", "execution_mode") == "kubernetes"
    assert conf.get("studio", "runner_image") == ""  # no published image: Kubernetes mode must name one
    template = conf.get("studio", "artifacts_link_template")
    assert "{bucket}" in template and "{prefix}" in template
    assert conf.get("studio", "local_working_dir") == ""
    assert conf.get("studio", "local_cache_dir") == ""
    monkeypatch.setenv("AIRFLOW__STUDIO__EXECUTION_MODE", "local")
    assert conf.get("studio", "execution_mode") == "local"


# --- what the airflow CLI sees (one process each, started together) -----------------------------------
CLI_COMMANDS = {
    "list": ["providers", "list", "-o", "json"],
    "get": ["providers", "get", PACKAGE, "--full", "-o", "json"],
    "hooks": ["providers", "hooks", "-o", "json"],
}


@pytest.fixture(scope="module")
def cli(airflow_db) -> dict[str, list[dict]]:
    running = {
        name: subprocess.Popen(
            [sys.executable, "-m", "airflow", *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, argv in CLI_COMMANDS.items()
    }
    answers = {}
    for name, process in running.items():
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, f"airflow {' '.join(CLI_COMMANDS[name])} failed:\n{stdout}\n{stderr}"
        answers[name] = _json_document(stdout)
    return answers


def _json_document(stdout: str) -> list[dict]:
    """The JSON the CLI prints, past any log lines before it."""
    for line in stdout.splitlines():
        if line.startswith("["):
            return json.loads(line)
    raise AssertionError(f"no JSON in CLI output:\n{stdout}")


def test_cli_lists_the_provider_with_its_distribution_version(cli):
    (entry,) = [item for item in cli["list"] if item["package_name"] == PACKAGE]
    assert entry["version"] == version(PACKAGE)


def test_cli_get_shows_the_connection_type(cli):
    (info,) = cli["get"]
    assert info["package-name"] == PACKAGE
    assert {c["connection-type"] for c in info["connection-types"]} == {
        "studio_rabbitmq",
        "studio_message_keys",
    }


def test_cli_hooks_registers_the_connection_type(cli):
    (entry,) = [item for item in cli["hooks"] if item["connection_type"] == "studio_rabbitmq"]
    assert entry["class"] == "airflow_provider_studio.hooks.rabbitmq.StudioRabbitMQHook"
    assert entry["package_name"] == PACKAGE
    assert entry["conn_id_attribute_name"] == "rabbitmq_conn_id"
