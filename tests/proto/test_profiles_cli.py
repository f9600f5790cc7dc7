"""``interposer profiles`` lists every profile with its source."""

from __future__ import annotations

import json

from click.testing import CliRunner

from interposer.cli.__main__ import main
from interposer.proto.profiles import PROFILES


def test_profiles_command_lists_every_profile_with_its_source() -> None:
    result = CliRunner().invoke(main, ["profiles"])
    assert result.exit_code == 0, result.output
    for name, profile in PROFILES.items():
        assert f"{name} " in result.output and profile.source in result.output
    assert "sizing: size_gib: volume size, 125..16384 GiB" in result.output  # st1's sizing field


def test_profiles_json_carries_the_layers() -> None:
    result = CliRunner().invoke(main, ["profiles", "--json"])
    assert result.exit_code == 0, result.output
    by_name = {p["name"]: p for p in json.loads(result.output)}
    assert by_name["gp3"]["layers"][0] == {**by_name["gp3"]["layers"][0], "type": "throttle", "iops": 3000}
