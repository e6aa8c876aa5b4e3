"""Temporary files that say who wrote them (``HOST.PID`` in their name), so
that what a killed process left behind can be told from what a running one
is still writing, and removed safely by whoever comes next."""
from __future__ import annotations

import os
import socket


def writer_tag() -> str:
    """``HOST.PID`` of this process, for the names of its temporary files."""
    return f"{socket.gethostname()}.{os.getpid()}"


def writer_is_gone(tag: str) -> bool:
    """Whether the process a :func:`writer_tag` names is known to have ended:
    a process of this host that no longer runs. Anything else (another host,
    a name that is not a tag, a running process) is not known to be gone."""
    host, _, pid = tag.rpartition(".")
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        return False  # someone else's process, or not a pid at all
    return False
