"""Addresses of DICOM servers: ``AET@HOST:PORT`` for ``cstore --to`` and
``dicom://AET@HOST:PORT[?aet=OURS&associations=N&transcode=never]`` as a target
address for ``transfer`` and ``move``."""
from __future__ import annotations

import re
from urllib.parse import parse_qsl

from dicomvault.engine import UsageError

_ADDR = re.compile(r"^(?P<aet>[^@]{1,16})@(?P<host>\[[0-9A-Fa-f:.]+\]|[^:/?\[\]]+):(?P<port>\d{1,5})$")


def check_aet(aet: str, what: str = "AE title") -> str:
    if not 0 < len(aet) <= 16 or aet.strip() != aet or "\\" in aet or not aet.isascii() \
            or any(ord(ch) < 32 for ch in aet):
        raise UsageError(f"'{aet}' is not a valid {what} (1 to 16 ASCII characters, no backslash, "
                         "no leading or trailing spaces)")
    return aet


def parse_address(text: str) -> tuple[str, str, int]:
    """``AET@HOST:PORT`` -> (AE title, host, port)."""
    m = _ADDR.match(text.strip())
    if not m:
        raise UsageError(f"'{text}' is not a DICOM address: write AET@HOST:PORT, e.g. PACS@10.0.0.5:104")
    port = int(m["port"])
    if not 0 < port < 65536:
        raise UsageError(f"port {port} is out of range")
    return check_aet(m["aet"], "called AE title"), m["host"].strip("[]"), port


def is_dicom_url(url: str) -> bool:
    return url.lower().startswith("dicom://")


def parse_dicom_url(url: str) -> tuple[str, str, int, dict[str, str]]:
    """``dicom://AET@HOST:PORT?k=v`` -> (AE title, host, port, options)."""
    rest = url[len("dicom://"):]
    addr, _, query = rest.partition("?")
    aet, host, port = parse_address(addr)
    options = dict(parse_qsl(query, keep_blank_values=True))
    unknown = set(options) - {"aet", "associations", "transcode", "retries", "retry-wait",
                              "timeout-acse", "timeout-dimse", "timeout-network"}
    if unknown:
        raise UsageError(f"unknown option(s) in {url}: {', '.join(sorted(unknown))}")
    return aet, host, port, options
