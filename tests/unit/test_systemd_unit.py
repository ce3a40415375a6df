"""docker/deployflag.service: systemd accepts it, and it says what the service relies on."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "docker" / "deployflag.service"


def directives() -> dict[str, list[str]]:
    """``Key`` → every value it is given (systemd allows repeats), across all sections."""
    found: dict[str, list[str]] = {}
    for raw in UNIT.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        found.setdefault(key.strip(), []).append(value.strip())
    return found


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail(
            "systemd-analyze is not installed: `apt-get install systemd` "
            "(scripts/services.sh test-deps does it)"
        )
    # The unit's python lives in /opt/deployflag/venv on a real machine; verify checks that the
    # ExecStart binary exists, so point a copy at this interpreter.
    text = UNIT.read_text(encoding="utf-8").replace(
        "ExecStart=/opt/deployflag/venv/bin/python ", f"ExecStart={sys.executable} "
    )
    assert f"ExecStart={sys.executable} -m deployflag serve" in text
    copy = tmp_path / UNIT.name
    copy.write_text(text, encoding="utf-8")

    done = subprocess.run(
        [analyze, "verify", "--man=no", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    output = done.stdout + done.stderr
    about_unit = [line for line in output.splitlines() if UNIT.name in line]
    assert about_unit == [], "\n".join(about_unit)
    assert done.returncode == 0, output


def test_notify_watchdog_and_stop_timing() -> None:
    unit = directives()
    assert unit["Type"] == ["notify"]
    assert unit["NotifyAccess"] == ["main"]
    assert unit["ExecStart"] == ["/opt/deployflag/venv/bin/python -m deployflag serve"]
    assert unit["EnvironmentFile"] == ["-/etc/deployflag/deployflag.env"]
    assert "DEPLOYFLAG_DATA_DIR=%S/deployflag" in unit["Environment"]
    assert unit["KillSignal"] == ["SIGTERM"]
    # Only the main process gets SIGTERM; the workers must finish their requests.
    assert unit["KillMode"] == ["mixed"]
    # The stop timeout must exceed the 60 s default drain timeout.
    assert int(unit["TimeoutStopSec"][0]) > 60
    assert int(unit["WatchdogSec"][0]) > 0


def test_restart_policy_spares_configuration_errors() -> None:
    unit = directives()
    assert unit["Restart"] == ["on-failure"]
    assert unit["RestartPreventExitStatus"] == ["78"]


def test_hardening() -> None:
    unit = directives()
    assert unit["User"] == ["deployflag"]
    assert unit["StateDirectory"] == ["deployflag"]
    for key in (
        "NoNewPrivileges",
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "LockPersonality",
        "RestrictSUIDSGID",
    ):
        assert unit[key] == ["yes"], key
    assert unit["ProtectSystem"] == ["strict"]
    assert unit["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]
