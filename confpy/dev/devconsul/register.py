"""Decoding and validating `PUT /v1/agent/service/register` bodies the way Consul's agent does.

Consul's decoder matches keys case-insensitively and accepts snake_case; it turns type mistakes
into `Request decode failed: json: cannot unmarshal ...`, and validation failures into the
texts below. Keys inside Meta, TaggedAddresses and Header are user data and keep their case.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from confpy.durations import parse_go_duration

_META_KEY = re.compile(r"^[a-zA-Z0-9_-]+$")
VALID_STATUSES = ("passing", "warning", "critical")


class RegisterError(Exception):
    """A registration Consul would refuse: HTTP status and Consul's plain-text body."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


def _norm(key: str) -> str:
    return key.replace("_", "").replace("-", "").lower()


def _normalized(data: dict[str, Any]) -> dict[str, Any]:
    return {_norm(k): v for k, v in data.items()}


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return f"number {value}" if isinstance(value, float) else "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return "null"


def _decode_error(struct: str, field: str, value: Any, go_type: str) -> RegisterError:
    return RegisterError(
        400,
        f"Request decode failed: json: cannot unmarshal {_json_type(value)} into Go struct field {struct}.{field} of type {go_type}",
    )


def _top_level(raw: Any, go_type: str) -> dict[str, Any]:
    """A request body that must be a JSON object, its keys normalized as Consul's decoder matches them."""
    if not isinstance(raw, dict):
        raise RegisterError(
            400, f"Request decode failed: json: cannot unmarshal {_json_type(raw)} into Go value of type {go_type}"
        )
    return _normalized(raw)


def _string(data: dict[str, Any], key: str, struct: str, field: str) -> str:
    value = data.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _decode_error(struct, field, value, "string")
    return value


def _duration(data: dict[str, Any], key: str, struct: str, field: str) -> float:
    value = data.get(key)
    if value is None or value == "":
        return 0.0
    if isinstance(value, bool):
        raise _decode_error(struct, field, value, "time.Duration")
    if isinstance(value, (int, float)):
        return float(value) / 1e9  # a JSON number is nanoseconds, as Go's time.Duration
    if isinstance(value, str):
        try:
            return parse_go_duration(value)
        except ValueError:
            raise RegisterError(400, f'Request decode failed: time: invalid duration "{value}"') from None
    raise _decode_error(struct, field, value, "time.Duration")


def _string_map(data: dict[str, Any], key: str, struct: str, field: str) -> dict[str, str]:
    value = data.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _decode_error(struct, field, value, "map[string]string")
    for item in value.values():
        if not isinstance(item, str):
            raise _decode_error(struct, field, item, "string")
    return dict(value)


def validate_meta(meta: dict[str, str]) -> None:
    """Consul's structs.ValidateMetadata."""
    if len(meta) > 64:
        raise RegisterError(400, "Invalid Service Meta: Node metadata cannot contain more than 64 key/value pairs")
    for key, value in meta.items():
        if key == "":
            raise RegisterError(400, "Invalid Service Meta: Key cannot be blank")
        if not _META_KEY.match(key):
            raise RegisterError(400, f"Invalid Service Meta: Key contains invalid characters: {key}")
        if len(key) > 128:
            raise RegisterError(400, "Invalid Service Meta: Key is too long (limit: 128 characters)")
        if key.startswith("consul-"):
            raise RegisterError(400, "Invalid Service Meta: Key prefix 'consul-' is reserved for internal use")
        if len(value) > 512:
            raise RegisterError(400, "Invalid Service Meta: Value is too long (limit: 512 characters)")


def _is_any(address: str) -> bool:
    text = address.strip("[]")
    try:
        return ipaddress.ip_address(text).is_unspecified
    except ValueError:
        return False


SCRIPTS_DISABLED = (
    "Scripts are disabled on this agent from remote calls; to enable, configure 'enable_script_checks' to true"
)


def decode_check(raw: Any, scripts: bool = False) -> dict[str, Any] | None:
    """One check definition -> the agent's fields; None for an empty definition.

    `scripts` is the agent's `enable_script_checks`: without it a script check is refused, as Consul does.
    """
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise _decode_error("ServiceDefinition", "Check", raw, "structs.CheckType")
    data = _normalized(raw)
    s = "CheckType"
    check: dict[str, Any] = {
        "check_id": _string(data, "checkid", s, "CheckID") or _string(data, "id", s, "CheckID"),
        "name": _string(data, "name", s, "Name"),
        "status": _string(data, "status", s, "Status"),
        "notes": _string(data, "notes", s, "Notes"),
        "http": _string(data, "http", s, "HTTP"),
        "tcp": _string(data, "tcp", s, "TCP"),
        "method": _string(data, "method", s, "Method"),
        "ttl": _duration(data, "ttl", s, "TTL"),
        "interval": _duration(data, "interval", s, "Interval"),
        "timeout": _duration(data, "timeout", s, "Timeout"),
        "deregister_after": _duration(data, "deregistercriticalserviceafter", s, "DeregisterCriticalServiceAfter"),
    }
    header = data.get("header") or {}
    if not isinstance(header, dict) or not all(
        isinstance(v, list) and all(isinstance(i, str) for i in v) for v in header.values()
    ):
        raise _decode_error(s, "Header", header, "map[string][]string")
    check["header"] = header
    args = data.get("args")
    if args is not None and (not isinstance(args, list) or not all(isinstance(a, str) for a in args)):
        raise _decode_error(s, "ScriptArgs", args, "[]string")
    check["args"] = list(args or [])
    if check["args"] and not scripts:
        raise RegisterError(500, SCRIPTS_DISABLED)
    unsupported = [
        k
        for k in (
            "script",
            "grpc",
            "h2ping",
            "udp",
            "dockercontainerid",
            "aliasservice",
            "aliasnode",
            "osservice",
        )
        if data.get(k)
    ]
    if (
        not any(check[k] for k in ("http", "tcp", "ttl", "interval"))
        and not unsupported
        and not any(check[k] for k in ("name", "check_id"))
    ):
        return None
    if unsupported:
        raise RegisterError(
            400, f"Invalid check: confpy dev-consul supports script, TTL, HTTP and TCP checks, not {unsupported[0]}"
        )
    interval_check = bool(check["http"] or check["tcp"] or check["args"])
    if check["interval"] > 0 and check["ttl"] > 0:
        raise RegisterError(400, "Invalid check: Interval and TTL cannot both be specified")
    if interval_check and check["interval"] <= 0:
        raise RegisterError(
            400, "Invalid check: Interval must be > 0 for Script, HTTP, H2PING, TCP, UDP or OS Service checks"
        )
    if not interval_check and check["ttl"] <= 0:
        raise RegisterError(400, "Invalid check: TTL must be > 0 for TTL checks")
    if check["status"] and check["status"] not in VALID_STATUSES:
        raise RegisterError(400, "Status for checks must 'passing', 'warning', 'critical'")
    if check["deregister_after"]:
        # Consul raises DeregisterCriticalServiceAfter to its one-minute minimum.
        check["deregister_after"] = max(check["deregister_after"], 60.0)
    check["type"] = "http" if check["http"] else "tcp" if check["tcp"] else "script" if check["args"] else "ttl"
    return check


def decode_agent_check(raw: Any, scripts: bool = False) -> dict[str, Any]:
    """A `PUT /v1/agent/check/register` body: a check definition with its name, ID and service."""
    data = _top_level(raw, "structs.CheckDefinition")
    name = _string(data, "name", "CheckDefinition", "Name")
    service_id = _string(data, "serviceid", "CheckDefinition", "ServiceID")
    check = decode_check(raw, scripts) or {}
    if not name:
        raise RegisterError(400, "Missing check name")
    if not check:
        raise RegisterError(
            400,
            "Must provide TTL or Script/DockerContainerID/HTTP/TCP/UDP/H2PING/GRPC/AliasNode/AliasService/OSService and Interval",
        )
    return {**check, "name": name, "service_id": service_id}


def decode_tagged_addresses(value: Any, struct: str) -> dict[str, dict[str, Any]]:
    """A service's TaggedAddresses, keys as Consul writes them back: {"lan": {"Address": ..., "Port": ...}}."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _decode_error(struct, "TaggedAddresses", value, "map[string]structs.ServiceAddress")
    out: dict[str, dict[str, Any]] = {}
    for tag, item in value.items():
        if not isinstance(item, dict):
            raise _decode_error(struct, "TaggedAddresses", item, "structs.ServiceAddress")
        fields = _normalized(item)
        port = fields.get("port", 0)
        if isinstance(port, bool) or not isinstance(port, int):
            raise _decode_error("ServiceAddress", "Port", port, "int")
        out[tag] = {"Address": _string(fields, "address", "ServiceAddress", "Address"), "Port": port}
    return out


def decode_catalog_register(raw: Any) -> tuple[dict[str, Any], dict[str, Any] | None, list[dict[str, Any]]]:
    """A `PUT /v1/catalog/register` body -> (node, service or None, checks), with Consul's checks and texts."""
    data = _top_level(raw, "structs.RegisterRequest")
    r = "RegisterRequest"
    node = {
        "name": _string(data, "node", r, "Node"),
        "id": _string(data, "id", r, "ID"),
        "address": _string(data, "address", r, "Address"),
        "datacenter": _string(data, "datacenter", r, "Datacenter"),
        "tagged_addresses": _string_map(data, "taggedaddresses", r, "TaggedAddresses"),
        "meta": _string_map(data, "nodemeta", r, "NodeMeta"),
        "skip_node_update": bool(data.get("skipnodeupdate")),
    }
    if not node["name"]:
        raise RegisterError(400, "Must provide node")
    if not node["address"] and not node["skip_node_update"]:
        raise RegisterError(400, "Must provide address if SkipNodeUpdate is not set")
    service: dict[str, Any] | None = None
    raw_service = data.get("service")
    if raw_service is not None:
        if not isinstance(raw_service, dict):
            raise _decode_error(r, "Service", raw_service, "structs.NodeService")
        fields = _normalized(raw_service)
        sn = "NodeService"
        name = _string(fields, "service", sn, "Service")
        if not name:
            raise RegisterError(400, "Must provide service name with ID")
        port = fields.get("port", 0) or 0
        if isinstance(port, bool) or not isinstance(port, int):
            raise _decode_error(sn, "Port", port, "int")
        tags = fields.get("tags") or []
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise _decode_error(sn, "Tags", tags, "[]string")
        service = {
            "id": _string(fields, "id", sn, "ID") or name,
            "name": name,
            "tags": tags,
            "address": _string(fields, "address", sn, "Address"),
            "tagged_addresses": decode_tagged_addresses(fields.get("taggedaddresses"), sn),
            "meta": _string_map(fields, "meta", sn, "Meta"),
            "port": port,
            "kind": _string(fields, "kind", sn, "Kind"),
        }
        validate_meta(service["meta"])
    raw_checks = ([data["check"]] if data.get("check") is not None else []) + list(data.get("checks") or [])
    checks = []
    for raw_check in raw_checks:
        if not isinstance(raw_check, dict):
            raise _decode_error(r, "Check", raw_check, "structs.HealthCheck")
        fields = _normalized(raw_check)
        hc = "HealthCheck"
        status = _string(fields, "status", hc, "Status")
        if status and status not in VALID_STATUSES:
            raise RegisterError(400, "Status for checks must 'passing', 'warning', 'critical'")
        check = {
            "check_id": _string(fields, "checkid", hc, "CheckID") or _string(fields, "name", hc, "Name"),
            "name": _string(fields, "name", hc, "Name"),
            "status": status,
            "notes": _string(fields, "notes", hc, "Notes"),
            "output": _string(fields, "output", hc, "Output"),
            "service_id": _string(fields, "serviceid", hc, "ServiceID"),
        }
        if not check["check_id"]:
            raise RegisterError(400, "Missing check ID")
        checks.append(check)
    return node, service, checks


def decode_service(raw: Any, scripts: bool = False) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A register body -> (service fields, check definitions), or RegisterError with Consul's text."""
    data = _top_level(raw, "structs.ServiceDefinition")
    s = "ServiceDefinition"
    name = _string(data, "name", s, "Name")
    tags = data.get("tags")
    if tags is not None and (not isinstance(tags, list) or not all(isinstance(t, str) for t in tags)):
        bad = tags if not isinstance(tags, list) else next(t for t in tags if not isinstance(t, str))
        raise _decode_error(s, "Tags", bad, "string" if isinstance(tags, list) else "[]string")
    port = data.get("port", 0)
    if port is None:
        port = 0
    if (
        isinstance(port, bool)
        or not isinstance(port, (int, float))
        or (isinstance(port, float) and not port.is_integer())
    ):
        raise _decode_error(s, "Port", port, "int")
    weights_raw = data.get("weights")
    weights = {"Passing": 1, "Warning": 1}
    if weights_raw is not None:
        if not isinstance(weights_raw, dict):
            raise _decode_error(s, "Weights", weights_raw, "structs.Weights")
        w = _normalized(weights_raw)
        for key, field in (("passing", "Passing"), ("warning", "Warning")):
            value = w.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, int):
                raise _decode_error("Weights", field, value, "int")
        weights = {"Passing": int(w.get("passing", 0)), "Warning": int(w.get("warning", 0))}
    enable_tag_override = data.get("enabletagoverride", False)
    if not isinstance(enable_tag_override, bool):
        raise _decode_error(s, "EnableTagOverride", enable_tag_override, "bool")
    service: dict[str, Any] = {
        "id": _string(data, "id", s, "ID"),
        "name": name,
        "tags": list(tags or []),
        "address": _string(data, "address", s, "Address"),
        "tagged_addresses": decode_tagged_addresses(data.get("taggedaddresses"), s),
        "meta": _string_map(data, "meta", s, "Meta"),
        "port": int(port),
        "weights": weights,
        "enable_tag_override": enable_tag_override,
        "kind": _string(data, "kind", s, "Kind"),
    }
    raw_checks: list[Any] = []
    if data.get("check") is not None:
        raw_checks.append(data["check"])
    checks_value = data.get("checks")
    if checks_value is not None:
        if not isinstance(checks_value, list):
            raise _decode_error(s, "Checks", checks_value, "structs.CheckTypes")
        raw_checks.extend(checks_value)
    if not name:
        raise RegisterError(400, "Missing service name")
    if _is_any(service["address"]):
        raise RegisterError(400, "Invalid service address")
    if weights_raw is not None:
        if weights["Passing"] < 1:
            raise RegisterError(400, "Invalid Weights: Passing must be greater than 0")
        if weights["Warning"] < 0:
            raise RegisterError(400, "Invalid Weights: Warning must be greater or equal than 0")
    validate_meta(service["meta"])
    service["id"] = service["id"] or name
    checks = [c for c in (decode_check(r, scripts) for r in raw_checks) if c is not None]
    return service, checks
