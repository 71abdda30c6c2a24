"""The OpenAPI document and the server agree, and the document's VmConfig is config.py's."""

from __future__ import annotations

import inspect
import re
from typing import Any

import pytest

from nubis.api import openapi_document
from nubis.api.server import API_PREFIX, ROUTES
from nubis.vmm import config
from nubis.vmm.config import (
    ConsoleConfig,
    CpusConfig,
    DiskConfig,
    MemoryConfig,
    NetConfig,
    PayloadConfig,
    RngConfig,
    VmConfig,
)
from nubis.vmm.lifecycle import VmState

DOC = openapi_document()
SCHEMAS: dict[str, Any] = DOC["components"]["schemas"]
HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}

MODELS: dict[str, type[Any]] = {
    "VmConfig": VmConfig,
    "CpusConfig": CpusConfig,
    "MemoryConfig": MemoryConfig,
    "PayloadConfig": PayloadConfig,
    "DiskConfig": DiskConfig,
    "NetConfig": NetConfig,
    "RngConfig": RngConfig,
    "ConsoleConfig": ConsoleConfig,
}


def _resolve(node: Any) -> Any:
    """Follow ``$ref`` pointers inside the document."""
    while isinstance(node, dict) and "$ref" in node:
        pointer = node["$ref"]
        assert pointer.startswith("#/"), pointer
        node = DOC
        for part in pointer[2:].split("/"):
            node = node[part]
    return node


def _documented_operations() -> set[tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, item in DOC["paths"].items()
        for method in item
        if method in HTTP_METHODS
    }


def test_document_is_openapi_3_0_with_the_v1_base_path() -> None:
    assert DOC["openapi"].startswith("3.0.")
    assert DOC["servers"][0]["url"].endswith(API_PREFIX)


def test_every_route_is_documented_and_every_documented_operation_is_served() -> None:
    served = {(route.method, route.path) for route in ROUTES}
    assert _documented_operations() == served


def test_operation_ids_are_unique() -> None:
    ids = [
        operation["operationId"]
        for item in DOC["paths"].values()
        for method, operation in item.items()
        if method in HTTP_METHODS
    ]
    assert len(ids) == len(set(ids))


def test_every_ref_resolves() -> None:
    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "$ref" in node:
                _resolve(node)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(DOC)


def test_answers_follow_the_status_rules() -> None:
    for path, item in DOC["paths"].items():
        for method, operation in item.items():
            codes = set(operation["responses"])
            if method == "get":
                assert "200" in codes, path
            else:
                assert "204" in codes, path
            for code in codes - {"200", "204"}:
                response = _resolve(operation["responses"][code])
                schema = response["content"]["application/json"]["schema"]
                assert _resolve(schema) is SCHEMAS["ErrorResponse"], (path, code)
            if path.startswith("/vm."):
                assert "409" in codes, path
    create = DOC["paths"]["/vm.create"]["put"]
    assert {"400", "413"} <= set(create["responses"])
    assert create["requestBody"]["required"] is True


def _fields(cls: type[Any]) -> dict[str, inspect.Parameter]:
    """A model's fields: the parameters of its constructor, in order, with their defaults."""
    params = dict(inspect.signature(cls).parameters)
    assert list(params) == list(cls._field_names)
    return params


@pytest.mark.parametrize("name", sorted(MODELS))
def test_schema_fields_are_the_model_fields(name: str) -> None:
    schema = SCHEMAS[name]
    params = _fields(MODELS[name])
    assert schema["type"] == "object"
    assert schema["additionalProperties"] is False
    assert set(schema["properties"]) == set(params)
    required = {p.name for p in params.values() if p.default is inspect.Parameter.empty}
    assert set(schema.get("required", [])) == required


@pytest.mark.parametrize("name", sorted(MODELS))
def test_schema_defaults_are_the_model_defaults(name: str) -> None:
    for item in _fields(MODELS[name]).values():
        prop = SCHEMAS[name]["properties"][item.name]
        if "default" in prop:
            default = item.default
            if name == "ConsoleConfig" and item.name == "mode":
                default = config.ConsoleMode.NULL.value
            assert prop["default"] == default, (name, item.name)


def test_ranges_match_the_config_limits() -> None:
    props = {name: SCHEMAS[name]["properties"] for name in MODELS}
    boot = props["CpusConfig"]["boot_vcpus"]
    assert (boot["minimum"], boot["maximum"]) == (1, config.MAX_VCPUS_LIMIT)
    assert props["CpusConfig"]["max_vcpus"]["maximum"] == config.MAX_VCPUS_LIMIT
    size = props["MemoryConfig"]["size"]
    assert (size["minimum"], size["maximum"], size["multipleOf"]) == (
        config.MIN_MEMORY_SIZE,
        1 << 46,
        4096,
    )
    assert props["PayloadConfig"]["cmdline"]["maxLength"] == config.MAX_CMDLINE_SIZE - 1
    assert props["NetConfig"]["tap"]["maxLength"] == config.TAP_NAME_MAX
    mtu = props["NetConfig"]["mtu"]
    assert (mtu["minimum"], mtu["maximum"]) == (68, 65535)
    queues = props["NetConfig"]["num_queues"]
    assert (queues["minimum"], queues["maximum"], queues["multipleOf"]) == (2, 16, 2)
    assert props["DiskConfig"]["serial"]["maxLength"] == 20
    assert props["ConsoleConfig"]["mode"]["enum"] == [m.value for m in config.ConsoleMode]
    assert SCHEMAS["VmInfo"]["properties"]["state"]["enum"] == [s.value for s in VmState]


def test_the_mac_pattern_is_the_configs() -> None:
    pattern = re.compile(SCHEMAS["NetConfig"]["properties"]["mac"]["pattern"])
    for mac in ("12:34:56:78:9a:bc", "12:34:56:78:9A:BC", "123456789abc", "12:34:56:78:9a"):
        accepted = True
        try:
            NetConfig(mac=mac)
        except config.ConfigError:
            accepted = False
        assert bool(pattern.search(mac)) is accepted, mac


def _examples() -> list[tuple[str, Any]]:
    found = [("VmConfig.example", SCHEMAS["VmConfig"]["example"])]
    content = DOC["paths"]["/vm.create"]["put"]["requestBody"]["content"]["application/json"]
    found += [(f"vm.create {name}", ex["value"]) for name, ex in content["examples"].items()]
    return found


@pytest.mark.parametrize(("where", "example"), _examples(), ids=[w for w, _ in _examples()])
def test_examples_are_valid_configs(where: str, example: Any) -> None:
    parsed = VmConfig.from_dict(example)
    assert VmConfig.from_dict(parsed.to_dict()) == parsed


def test_every_config_section_appears_in_the_full_example() -> None:
    example = SCHEMAS["VmConfig"]["example"]
    assert set(example) == set(SCHEMAS["VmConfig"]["properties"])
