"""PostgreSQL database addresses:
``postgresql://USER[:PASSWORD]@HOST[:PORT]/DBNAME?store=DIR`` (also
``postgres://``). ``store`` names the content store directory, which every
client must reach under the same path; the other query parameters are
libpq's."""
from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from dicomvault.engine import UsageError

SCHEMES = ("postgresql", "postgres")


def is_postgres(url: str) -> bool:
    return url.split("://", 1)[0].lower() in SCHEMES and "://" in url


def parse(url: str) -> tuple[str, str, str]:
    """(libpq conninfo URL, store directory, the address without password)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    stores = [v for k, v in query if k == "store"]
    if not stores or not stores[0]:
        raise UsageError(f"the PostgreSQL address {redact(url)} names no file store: add "
                         "?store=DIR (a directory every client reaches under that path)")
    rest = urlencode([(k, v) for k, v in query if k != "store"])
    conninfo = urlunsplit(("postgresql", parts.netloc, parts.path, rest, ""))
    return conninfo, stores[0], redact(url)


def redact(url: str) -> str:
    """The address with any password replaced by ``***``, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit((parts.scheme, f"{user}:***@{host}", parts.path, parts.query, parts.fragment))
