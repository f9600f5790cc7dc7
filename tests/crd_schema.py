"""What an API server checks of a custom resource against its CRD, as far as it can be done offline.

Shared by the deploy tests (the CRD and the example resources) and the fake API
server of the reconciler tests (``kube_api_fake``), so both use the very schema in
``deploy/base/crd``. Covered: the OpenAPI v3 value validations (with
``jsonschema``'s draft 4 validator, whose ``exclusiveMinimum`` and ``format``
semantics are OpenAPI 3.0's), unknown fields where the schema does not keep them
(the API server prunes them, or refuses them with ``fieldValidation=Strict``),
and the structural-schema rules that can be checked without an API server. Not
covered: CEL rules (``x-kubernetes-validations``; the CRD has none), defaulting,
and the ``x-kubernetes-list-type: map`` uniqueness check.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import yaml

from interposer_testing import REPO_ROOT

#: The InterposerPolicy CRD.
CRD_PATH = REPO_ROOT / "deploy" / "base" / "crd" / "interposerpolicy.yaml"
#: Keywords a structural schema may not use inside ``allOf``/``anyOf``/``oneOf``/``not``.
_FORBIDDEN_IN_JUNCTORS = {"type", "description", "default", "additionalProperties", "nullable",
                          "x-kubernetes-preserve-unknown-fields", "x-kubernetes-int-or-string",
                          "x-kubernetes-embedded-resource"}
_JUNCTORS = ("allOf", "anyOf", "oneOf")
PRESERVE = "x-kubernetes-preserve-unknown-fields"


def load_crd(path: Path = CRD_PATH) -> dict[str, Any]:
    """The CRD object in ``path``."""
    return yaml.safe_load(path.read_text())


def storage_schema(crd: dict[str, Any]) -> dict[str, Any]:
    """``openAPIV3Schema`` of the CRD's storage version."""
    (version,) = [v for v in crd["spec"]["versions"] if v["storage"]]
    return version["schema"]["openAPIV3Schema"]


def structural_errors(schema: dict[str, Any], path: str = "") -> list[str]:
    """Ways ``schema`` is not a structural schema (empty = it is one, as far as checked).

    Every node states a ``type`` (or keeps unknown fields / is int-or-string);
    junctors hold value validations only; ``metadata`` at the root is a plain object.
    """
    errors = []
    where = path or "<root>"
    if "type" not in schema and not schema.get(PRESERVE) and not schema.get("x-kubernetes-int-or-string"):
        errors.append(f"{where}: no type")
    if "properties" in schema and "additionalProperties" in schema:
        errors.append(f"{where}: properties and additionalProperties together")
    for junctor in _JUNCTORS:
        for i, branch in enumerate(schema.get(junctor, [])):
            bad = sorted(_FORBIDDEN_IN_JUNCTORS & set(_walk_keys(branch)))
            if bad:
                errors.append(f"{where}.{junctor}[{i}]: may not use {bad}")
    if not path and set(schema.get("properties", {}).get("metadata", {})) - {"type"}:
        errors.append("metadata: only `type: object` is allowed at the root")
    for name, child in schema.get("properties", {}).items():
        errors += structural_errors(child, f"{path}.{name}" if path else name)
    if isinstance(schema.get("items"), dict):
        errors += structural_errors(schema["items"], f"{where}[]")
    return errors


def _walk_keys(schema: dict[str, Any]) -> list[str]:
    keys = list(schema)
    for child in schema.get("properties", {}).values():
        keys += _walk_keys(child)
    if isinstance(schema.get("items"), dict):
        keys += _walk_keys(schema["items"])
    return keys


def unknown_fields(schema: dict[str, Any], value: Any, path: str = "") -> list[str]:
    """Fields of ``value`` the schema neither declares nor keeps (``x-kubernetes-preserve-unknown-fields``).

    ``metadata`` at the root is left to the API server's own ObjectMeta checks.
    """
    found = []
    if isinstance(value, dict) and schema.get("type") == "object":
        declared = schema.get("properties", {})
        for key, child in value.items():
            where = f"{path}.{key}" if path else key
            if where == "metadata":
                continue  # ObjectMeta: checked by the API server itself, not by the CRD
            if key in declared:
                found += unknown_fields(declared[key], child, where)
            elif not schema.get(PRESERVE) and "additionalProperties" not in schema:
                found.append(where)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            found += unknown_fields(schema["items"], item, f"{path}[{i}]")
    return found


def validation_errors(schema: dict[str, Any], obj: dict[str, Any]) -> list[str]:
    """Why the API server would refuse ``obj`` (empty = it would store it).

    Returns:
        ``"<field path>: <message>"`` per value error, and one per unknown field.
    """
    validator = jsonschema.Draft4Validator(schema, format_checker=jsonschema.Draft4Validator.FORMAT_CHECKER)
    errors = [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
              for e in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))]
    errors += [f"{field}: unknown field" for field in unknown_fields(schema, obj)]
    return errors
