"""What S3 settings may be: an endpoint `http(s)://host[:port]`, keys of valid UTF-8 without
control characters; checked without importing aiobotocore.

Both the configuration (which names the setting) and `S3Store` use them. A URL holding a
user name or password is refused without being repeated: every message naming the store
would repeat the password otherwise, and the keys have settings of their own.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from datamover.errors import InvalidInput


def check_endpoint(endpoint: str, name: str) -> None:
    """Raise `InvalidInput`, one line starting with `name`, unless `endpoint` is an http(s)
    URL with a host, an optional valid port, an optional trailing `/`, and nothing else."""
    if "@" in endpoint:
        raise InvalidInput(
            f"{name} must not hold a user name or password (not shown here): give the keys "
            "as [store] access_key and secret_key"
        )
    if any(ord(c) < 32 or ord(c) == 127 for c in endpoint):
        raise InvalidInput(f"{name} {endpoint!r} contains a control character")
    try:
        parts = urlsplit(endpoint)
        ok = parts.scheme.lower() in ("http", "https") and bool(parts.hostname)
        parts.port  # noqa: B018 (raises ValueError for a port that is not a number in range)
    except ValueError:
        ok = False
    if not ok:
        raise InvalidInput(
            f"{name} {endpoint!r} is not a URL like https://s3.example.org or http://127.0.0.1:8333"
        )
    if (
        parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or endpoint.endswith(("?", "#"))
    ):
        raise InvalidInput(
            f"{name} {endpoint!r} has a path, a query or a fragment: give only "
            "http(s)://host[:port]"
        )


def check_key_setting(value: str, name: str) -> None:
    """Raise `InvalidInput` naming `name`, not the value (a secret), if an access or secret
    key holds a control character or is not valid UTF-8 (a lone surrogate: a byte from the
    environment that no text can hold). Either would fail every request as if the store
    were down: a newline pasted with the key goes into a header, which the HTTP library
    refuses, and a surrogate cannot be encoded to sign or send. Other non-ASCII text is
    left to the store, which refuses a key it does not know."""
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise InvalidInput(f"{name} contains a control character (not shown here)")
    if any(0xD800 <= ord(c) <= 0xDFFF for c in value):
        raise InvalidInput(f"{name} is not valid UTF-8 text (not shown here)")
