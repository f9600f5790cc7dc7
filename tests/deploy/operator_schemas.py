"""Schemas of the Prometheus Operator's ServiceMonitor and PrometheusRule (monitoring.coreos.com/v1).

Neither ``kubernetes-validate`` nor this machine has the operator's CRDs (no
network at test time), so these are the subsets of their ``openAPIV3Schema`` that
the prometheus-operator overlay uses, with the CRDs' field names, types, required
fields and duration pattern (``servicemonitors.monitoring.coreos.com``,
``prometheusrules.monitoring.coreos.com``, v1). Fields outside the subset count as
unknown, which is stricter than the API server: widen the subset when a manifest
needs another field.
"""

from __future__ import annotations

from typing import Any

#: The operator's ``Duration`` (Prometheus duration syntax), e.g. ``15s``, ``2m``, ``1h30m``.
DURATION: dict[str, Any] = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
}
_STRING_MAP: dict[str, Any] = {"type": "object", "additionalProperties": {"type": "string"}}
_LABEL_SELECTOR: dict[str, Any] = {
    "type": "object",
    "properties": {
        "matchLabels": _STRING_MAP,
        "matchExpressions": {"type": "array", "items": {
            "type": "object", "required": ["key", "operator"],
            "properties": {"key": {"type": "string"}, "operator": {"type": "string"},
                           "values": {"type": "array", "items": {"type": "string"}}},
        }},
    },
}
_OBJECT_HEADER: dict[str, Any] = {
    "apiVersion": {"type": "string"},
    "kind": {"type": "string"},
    "metadata": {"type": "object"},
}

SERVICE_MONITOR: dict[str, Any] = {
    "type": "object",
    "required": ["spec"],
    "properties": {
        **_OBJECT_HEADER,
        "spec": {
            "type": "object",
            "required": ["selector"],
            "properties": {
                "jobLabel": {"type": "string"},
                "targetLabels": {"type": "array", "items": {"type": "string"}},
                "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                "namespaceSelector": {"type": "object", "properties": {
                    "any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}}},
                "selector": _LABEL_SELECTOR,
                "sampleLimit": {"type": "integer", "minimum": 0},
                "endpoints": {"type": "array", "items": {
                    "type": "object",
                    "properties": {
                        "port": {"type": "string"},
                        "path": {"type": "string"},
                        "scheme": {"type": "string", "enum": ["http", "https"]},
                        "interval": DURATION,
                        "scrapeTimeout": DURATION,
                        "honorLabels": {"type": "boolean"},
                        "honorTimestamps": {"type": "boolean"},
                    },
                }},
            },
        },
    },
}

PROMETHEUS_RULE: dict[str, Any] = {
    "type": "object",
    "properties": {
        **_OBJECT_HEADER,
        "spec": {
            "type": "object",
            "properties": {
                "groups": {"type": "array", "items": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {
                        "name": {"type": "string", "minLength": 1},
                        "interval": DURATION,
                        "limit": {"type": "integer"},
                        "rules": {"type": "array", "items": {
                            "type": "object",
                            "required": ["expr"],
                            "properties": {
                                "alert": {"type": "string"},
                                "record": {"type": "string"},
                                "expr": {"type": "string"},
                                "for": DURATION,
                                "keep_firing_for": DURATION,
                                "labels": _STRING_MAP,
                                "annotations": _STRING_MAP,
                            },
                        }},
                    },
                }},
            },
        },
    },
}

#: (apiVersion, kind) → schema, as ``test_deploy_schemas.CUSTOM_SCHEMAS`` takes them.
SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR,
    ("monitoring.coreos.com/v1", "PrometheusRule"): PROMETHEUS_RULE,
}
