"""Secrets stay secret: credentials in URLs and secret-looking config values are masked wherever cpt prints them."""

from __future__ import annotations

import re
from typing import Any

MASK = "***"
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^/\s:@]+)(?::[^/\s@]*)?@")
_SECRET_KEY = re.compile(
    r"(?i)(^|[_.-])(secret|secrets|password|passwd|pwd|api[_-]?key|apikey|access[_-]?key|private[_-]?key|"
    r"credentials?|auth|authorization|session[_-]?token|access[_-]?token|auth[_-]?token|bearer)($|[_.-])"
)


def text(message: str) -> str:
    """``message`` with the user and password of every ``scheme://user:pass@host`` masked."""
    return _URL_CREDENTIALS.sub(lambda m: f"{m['scheme']}{MASK}@", str(message))


def is_secret_key(key: str) -> bool:
    return bool(_SECRET_KEY.search(str(key)))


def config(value: Any, key: str = "") -> Any:
    """A copy of a plain config (dicts, lists, scalars) with secret-looking keys' values masked, and URL
    credentials masked in every string."""
    if isinstance(value, dict):
        return {k: (MASK if is_secret_key(k) and v not in (None, "") else config(v, k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [config(v, key) for v in value]
    if isinstance(value, str):
        return text(value)
    return value
