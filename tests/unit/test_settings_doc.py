"""docs/settings.md is generated from the Settings class and must not drift from it."""

from __future__ import annotations

from pathlib import Path

from pydantic import SecretStr

from deployflag import settings_doc
from deployflag.settings import Settings, env_name

DOC = Path(__file__).resolve().parents[2] / "docs" / "settings.md"


def test_docs_settings_md_is_up_to_date() -> None:
    # Given the committed page and the page generated from the code
    committed = DOC.read_text(encoding="utf-8") if DOC.exists() else ""
    # Then they are the same
    assert committed == settings_doc.render(), (
        "docs/settings.md is out of date: run "
        "`.venv/bin/python -m deployflag.settings_doc > docs/settings.md`"
    )


def test_every_setting_is_documented_once() -> None:
    text = settings_doc.render()
    for name in Settings.model_fields:
        assert text.count(f"| `{env_name(name)}` |") == 1, name


def test_legacy_names_and_redacted_secret_defaults() -> None:
    table = settings_doc.settings_table()
    row = next(line for line in table.splitlines() if "`DEPLOYFLAG_AMQP_URL`" in line)
    assert "`CELERY_BROKER_URL`" in row
    assert "guest:***@" in row
    assert "guest:guest" not in settings_doc.render()
    field = Settings.model_fields["amqp_url"]
    assert isinstance(field.default, SecretStr)


def test_machine_dependent_defaults_are_named_not_computed() -> None:
    table = settings_doc.settings_table()
    row = next(line for line in table.splitlines() if "`DEPLOYFLAG_WORKERS`" in line)
    assert "| CPU count |" in row
