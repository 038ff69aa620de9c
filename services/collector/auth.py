"""Write keys: Segment SDKs send theirs as the HTTP Basic user name (empty
password), and some also as `writeKey` in the body."""
from __future__ import annotations

import base64
import binascii
import hmac


class Unauthorized(ValueError):
    """No valid write key; str(error) is the reason the client reads in the 401."""


def basic_user(authorization: str | None) -> str | None:
    """The user name of an `Authorization: Basic ...` header, None without one."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "basic":
        raise Unauthorized(f"Authorization scheme {scheme!r} is not supported: use Basic "
                           "with the write key as user name")
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise Unauthorized("Authorization header is not valid Basic credentials") from None
    return decoded.partition(":")[0]


def check_write_key(keys: tuple[str, ...], header_key: str | None, body_key: object) -> str:
    """The write key the request carries, if it is one of `keys`."""
    key = header_key if header_key else body_key
    if not key:
        raise Unauthorized("no write key: send it as the HTTP Basic user name "
                           "(or as writeKey in the body)")
    if not isinstance(key, str) or not any(hmac.compare_digest(key.encode(), k.encode())
                                           for k in keys):
        raise Unauthorized("unknown write key")
    return key
