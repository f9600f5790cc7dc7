"""The flags the manifests pass are flags the services accept.

Strict once a service's ``__main__`` exists in this checkout; a service still being
written (no ``__main__.py`` yet) has nothing to compare with.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from deploy_support import REPO_ROOT, SERVICES, Manifest, containers_of

HELP_TIMEOUT_S = 60


def _help_text(service: str) -> str | None:
    package = SERVICES[service]
    main = REPO_ROOT / "services" / service / "src" / "interposer" / package / "__main__.py"
    if not main.is_file():
        return None
    proc = subprocess.run(
        [sys.executable, "-m", f"interposer.{package}", "--help"],
        capture_output=True,
        text=True,
        timeout=HELP_TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, (
        f"`python -m interposer.{package} --help` failed (is the package installed? `make python-deps`):\n"
        f"{proc.stderr[-2000:]}"
    )
    return proc.stdout


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_manifest_flags_are_accepted(service: str, all_rendered: dict[str, list[Manifest]]) -> None:
    image = f"interposer-{service}"
    flags = {
        arg.split("=", 1)[0]
        for objects in all_rendered.values()
        for c in containers_of(objects)
        if c.spec["image"] == image and "command" not in c.spec
        for arg in c.spec.get("args", [])
        if arg.startswith("--")
    }
    if not flags:
        return
    help_text = _help_text(service)
    if help_text is None:
        return
    accepted = set(re.findall(r"--[a-z][a-z0-9-]*", help_text))
    unknown = flags - accepted
    assert not unknown, f"manifests pass {sorted(unknown)} to {image}, which accepts {sorted(accepted)}"
