"""Keep secrets out of anything a person or a log collector reads."""

from __future__ import annotations

import re

# scheme://user:password@host → scheme://user:***@host; matches inside longer text too.
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s]*:)[^@\s]+@")


def redact(text: str) -> str:
    """Replace every password embedded in a URL within ``text`` with ``***``."""
    return _URL_PASSWORD.sub(r"\g<head>***@", text)
