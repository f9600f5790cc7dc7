"""Write prometheusrule.yaml: the monitoring overlay's alerts.yml as a PrometheusRule.

    python deploy/overlays/prometheus-operator/render_rules.py          # rewrite it
    python deploy/overlays/prometheus-operator/render_rules.py --check  # exit 1 if stale

Prometheus reads a rule file (``groups:`` at the top); the Prometheus Operator wants
the same groups under ``spec`` of a PrometheusRule. The text of alerts.yml, comments
included, is copied under ``spec:``, so alerts.yml stays the one file to edit
(``make prometheus-rule``; a test fails when this file is stale).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ALERTS = HERE.parent / "monitoring" / "alerts.yml"
OUTPUT = HERE / "prometheusrule.yaml"

HEADER = """\
# Generated from ../monitoring/alerts.yml by render_rules.py (`make prometheus-rule`):
# edit alerts.yml, not this file.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: interposer
  labels:
    app.kubernetes.io/name: interposer
    app.kubernetes.io/component: monitoring
spec:
"""


def rendered(alerts_text: str) -> str:
    """The PrometheusRule manifest for the rule file text ``alerts_text``.

    Raises:
        ValueError: the text has no top-level ``groups:`` line.
    """
    lines = alerts_text.splitlines()
    try:
        start = lines.index("groups:")
    except ValueError:
        raise ValueError(f"{ALERTS}: no top-level `groups:` line") from None
    body = "".join(f"  {line}\n" if line else "\n" for line in lines[start:])
    return HEADER + body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if prometheusrule.yaml is stale, write nothing")
    args = parser.parse_args(argv)
    text = rendered(ALERTS.read_text())
    if args.check:
        if not OUTPUT.exists() or OUTPUT.read_text() != text:
            print(f"{OUTPUT} is stale: run `make prometheus-rule`", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
