"""docs/settings.md, generated from :class:`deployflag.settings.Settings`.

``python -m deployflag.settings_doc > docs/settings.md`` rewrites it; a unit test fails when the
file and the class disagree, so the page cannot drift from the code.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from pydantic import AliasChoices, ByteSize, SecretStr
from pydantic.fields import FieldInfo

from deployflag.redaction import redact
from deployflag.settings import ENV_PREFIX, Settings, env_name

# Defaults computed on the machine that runs the service; the docs must not show this machine's.
_MACHINE_DEFAULTS = {"workers": "CPU count"}

_BINARY_UNITS = (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024))

HEADER = """\
# Settings

Every setting is an environment variable (also read from a `.env` file in the working
directory). Where a legacy name is given, the original service's variable is read when the new one
is unset. A bad value stops start-up with exit code 78 and a message naming the variable.

This page is generated from `src/deployflag/settings.py`:
`python -m deployflag.settings_doc > docs/settings.md`.

"""

LEGACY_HEADER = """
## The original service's variables without a new name

The database parts are read only when `DEPLOYFLAG_DATABASE_URL` is unset, so an old `.env` keeps
working:
`USE_DB=postgresql` with the `PG_DEPLOY_FLAG_DB_*` parts, or `USE_DB=sqlite3` with
`SQLITE_DB_PATH`. Prefer `DEPLOYFLAG_DATABASE_URL`.

"""


def _legacy_names(name: str, info: FieldInfo) -> list[str]:
    alias = info.validation_alias
    if not isinstance(alias, AliasChoices):
        return []
    primary = env_name(name)
    return [choice for choice in alias.choices if isinstance(choice, str) and choice != primary]


def _format_bytes(value: int) -> str:
    for unit, size in _BINARY_UNITS:
        if value and value % size == 0:
            return f"{value // size}{unit}"
    return str(value)


def _format_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, SecretStr):
        return redact(value.get_secret_value())
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, ByteSize):
        return _format_bytes(int(value))
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def _default(name: str, info: FieldInfo) -> str:
    if name in _MACHINE_DEFAULTS:
        return _MACHINE_DEFAULTS[name]
    if info.is_required():
        return "(required)"
    text = _format_value(info.get_default(call_default_factory=True, validated_data={}))
    return f"`{text}`" if text else "—"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _rows(*, legacy_only: bool) -> list[str]:
    rows = []
    for name, info in Settings.model_fields.items():
        variable = env_name(name)
        if variable.startswith(ENV_PREFIX) == legacy_only:
            continue
        cells = [f"`{variable}`", _default(name, info), info.description or ""]
        if not legacy_only:
            cells.insert(1, ", ".join(f"`{alias}`" for alias in _legacy_names(name, info)) or "—")
        rows.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    return rows


_TABLE_HEAD = ["| variable | legacy names | default | description |", "|---|---|---|---|"]
_LEGACY_HEAD = ["| variable | default | description |", "|---|---|---|"]


def settings_table() -> str:
    """One markdown table row per ``DEPLOYFLAG_*`` setting: variable, legacy names, default,
    description."""
    return "\n".join(_TABLE_HEAD + _rows(legacy_only=False)) + "\n"


def legacy_table() -> str:
    """The original service's variables that have no ``DEPLOYFLAG_*`` name of their own."""
    return "\n".join(_LEGACY_HEAD + _rows(legacy_only=True)) + "\n"


def render() -> str:
    """The whole of docs/settings.md."""
    return HEADER + settings_table() + LEGACY_HEADER + legacy_table()


if __name__ == "__main__":
    sys.stdout.write(render())
