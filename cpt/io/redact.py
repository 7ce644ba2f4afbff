"""Secrets stay secret: credentials in URLs and secret-looking config values are masked wherever cpt prints them.

A key is secret-looking when it holds one of the common families (``token``, ``key``, ``secret``, ``passw``,
``credential``, ``auth``, ``signature``, ``passphrase``), whatever its prefix or suffix: ``hf_token``,
``wandb_api_key``, ``mlflow_tracking_token``. Numbers and booleans are never secrets (``tokens_per_domain``
stays readable), nor are a tokenizer's special tokens (``pad_token``). In URLs the whole user-info (up to the
last ``@`` before the host) and secret-looking query parameters are masked.
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/\s?#]*)@")
_QUERY = re.compile(r"(?P<lead>[?&;])(?P<name>[^=&;\s#/?]+)=(?P<value>[^&;\s#]*)")
_SECRET_KEY = re.compile(r"(?i)(token|key|secret|passw|passphrase|pwd|credential|auth|signature|bearer|\bsig\b)")
_NOT_SECRET = re.compile(r"(?i)^(pad|eos|bos|unk|sep|cls|mask|additional_special)_tokens?$|^domain_key$")
_SECRET_VALUE = re.compile(r"^(hf_[A-Za-z0-9]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|AKIA[0-9A-Z]{16}|sk-[A-Za-z0-9_-]{20,})$")


def text(message: str) -> str:
    """``message`` with every URL's user-info (``scheme://user:pass@host``) and secret-looking query values
    (``?access_token=...``) masked."""
    out = _URL_CREDENTIALS.sub(lambda m: f"{m['scheme']}{MASK}@", str(message))
    return _QUERY.sub(lambda m: f"{m['lead']}{m['name']}={MASK}" if is_secret_key(m["name"]) else m[0], out)


def is_secret_key(key: str) -> bool:
    name = str(key).split(".")[-1]
    if _NOT_SECRET.match(name):
        return False
    return bool(_SECRET_KEY.search(re.sub(r"(?i)tokeniz\w*", "", name)))


def looks_secret(value: Any) -> bool:
    """A value shaped like a well-known token (Hugging Face, GitHub, AWS access key, OpenAI-style)."""
    return isinstance(value, str) and bool(_SECRET_VALUE.match(value.strip()))


def config(value: Any, key: str = "") -> Any:
    """A copy of a plain config (dicts, lists, scalars) with secret-looking keys' string values masked, and URL
    credentials masked in every string."""
    if isinstance(value, dict):
        return {k: (MASK if _masked(k, v) else config(v, k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [config(v, key) for v in value]
    if isinstance(value, str):
        return MASK if looks_secret(value) else text(value)
    return value


def _masked(key: str, value: Any) -> bool:
    if value in (None, "") or isinstance(value, bool | int | float):
        return False
    return is_secret_key(key) and not isinstance(value, dict | list)


def secret_override(arg: str) -> bool:
    """A ``key=value`` override whose key looks secret, or whose value is a secret or carries one (URL
    credentials, an inline mapping with a secret key): never recorded, never shown."""
    name, eq, value = arg.partition("=")
    return bool(eq) and (is_secret_key(name) or looks_secret(value) or text(value) != value or _holds_secret(value))


def overrides(args: list[str]) -> list[str]:
    """A command line with every secret override masked (``key=***``): what loggers that record the command line
    (W&B's ``args``) may keep."""
    return [f"{arg.partition('=')[0]}={MASK}" if secret_override(arg) else arg for arg in args]


def _holds_secret(value: str) -> bool:
    """A YAML mapping or list given inline (``loggers={wandb: {api_key: ...}}``) with a secret inside."""
    if not value.lstrip().startswith(("{", "[")):
        return False
    import yaml

    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        return False
    return config(parsed) != parsed
