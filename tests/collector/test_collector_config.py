"""Config, flags and public API of the collector package."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import interposer.collector
import msgspec
import pytest
from interposer.collector import CollectorConfig, make_config, parse_listen
from interposer.collector.__main__ import config_from_args


def test_defaults() -> None:
    config = CollectorConfig()
    assert (config.listen_host, config.listen_port) == ("127.0.0.1", 9464)
    assert config.nats_servers == ["nats://127.0.0.1:4222"]
    assert config.port_file == ""


def test_unknown_and_invalid_fields_are_rejected() -> None:
    with pytest.raises(msgspec.ValidationError, match="unknown_field"):
        make_config(unknown_field=1)
    with pytest.raises(msgspec.ValidationError, match="listen_port"):
        make_config(listen_port=70000)
    with pytest.raises(msgspec.ValidationError, match="pending_msgs_limit"):
        make_config(pending_msgs_limit=0)
    with pytest.raises(msgspec.ValidationError, match="forget_stopped_after_s"):
        make_config(forget_stopped_after_s=0)


def test_config_is_frozen() -> None:
    with pytest.raises(AttributeError):
        CollectorConfig().listen_port = 1  # type: ignore[misc]


@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1:9464", ("127.0.0.1", 9464)),
    ("0.0.0.0:0", ("0.0.0.0", 0)),
    (":9000", ("0.0.0.0", 9000)),
    ("[::1]:9464", ("::1", 9464)),
])
def test_parse_listen(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize("text", ["9464", "host:port", "127.0.0.1:65536", "127.0.0.1:-1"])
def test_parse_listen_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="--listen"):
        parse_listen(text)


def test_flags_to_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NATS_URL", raising=False)
    config = config_from_args(["--listen", "127.0.0.1:0", "--port-file", "/tmp/collector-x.port",
                               "--nats-url", "nats://a:1,nats://b:2", "--pending-msgs-limit", "10"])
    assert config == make_config(listen_host="127.0.0.1", listen_port=0, port_file="/tmp/collector-x.port",
                                 nats_url="nats://a:1,nats://b:2", pending_msgs_limit=10)
    assert config.nats_servers == ["nats://a:1", "nats://b:2"]


def test_bad_flags_exit_with_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc_info:
        config_from_args(["--listen", "nope"])
    assert exc_info.value.code == 2
    assert "--listen 'nope'" in capsys.readouterr().err


def test_public_api() -> None:
    public = {name for name in dir(interposer.collector) if not name.startswith("_")}
    assert public >= {
        "Aggregator", "Snapshot", "CollectorConfig", "CollectorService", "MetricsCollector",
        "make_config", "make_registry", "parse_listen", "serve", "DURATION_BUCKETS_S",
    }
    for name in public:
        obj = getattr(interposer.collector, name)
        module = getattr(obj, "__module__", None)
        if module is not None and not isinstance(obj, (str, tuple)):
            assert module.startswith("interposer.collector"), (name, module)


def test_listen_address_in_use_exits_1(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "interposer.collector", "--listen", f"127.0.0.1:{port}",
             "--port-file", str(tmp_path / "port"), "--nats-url", "nats://127.0.0.1:1"],
            capture_output=True, text=True, timeout=30,
        )
    assert done.returncode == 1, done.stderr
    assert "cannot start" in done.stderr
    assert not (tmp_path / "port").exists()
