"""Helpers for the C-Store tests: crafted files, the database's stored
bytes, data sets of received files, and an in-process pynetdicom SCP."""
from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom

from dicomvault.plugins.dimse.dataset import dataset_offset

UID_ROOT = "1.2.826.0.1.3680043.10.1516.77"  # test UIDs


def dataset_bytes(path: Path) -> bytes:
    """The data set of a Part 10 file (or a raw data set): what goes on the wire."""
    with open(path, "rb") as fh:
        dataset_offset(fh)
        return fh.read()


def stored_files(db: Path) -> dict[str, tuple[Path, str, str]]:
    """SOP Instance UID -> (stored file, transfer syntax, SOP class) of an embedded database."""
    by_sha = {p.name: p for p in (db / "store").rglob("*") if p.is_file()}
    con = sqlite3.connect(db / "catalog.sqlite")
    try:
        rows = con.execute("SELECT sop_uid, sha256, transfer_syntax, sop_class_uid FROM instances").fetchall()
    finally:
        con.close()
    out = {}
    for uid, sha, ts, cls in rows:
        path = by_sha.get(sha) or next(p for name, p in by_sha.items() if sha in name)
        out[uid] = (path, ts, cls)
    return out


def craft(src: Path, folder: Path, n: int, *, sop_classes: bool = False, tag: str = "1") -> list[str]:
    """``n`` copies of ``src`` with new, deterministic SOP Instance UIDs (and,
    with ``sop_classes``, a different SOP Class UID each). Returns the UIDs."""
    folder.mkdir(parents=True, exist_ok=True)
    ds = pydicom.dcmread(src)
    uids = []
    for i in range(n):
        uid = f"{UID_ROOT}.{tag}.{i + 1}"
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        if sop_classes:
            ds.SOPClassUID = f"{UID_ROOT}.9.{i + 1}"
            ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.save_as(folder / f"f{tag}_{i:04d}.dcm", enforce_file_format=True)
        uids.append(uid)
    return uids


def outcomes(report: Any) -> dict[str, tuple[str, str]]:
    """SOP Instance UID -> (outcome, reason) for the problems and warnings of a --json report."""
    out = {p["item"]: (p["outcome"], p["reason"]) for p in report["problems"]}
    for w in report["warnings"]:
        what, _, rest = w.partition(": ")
        out[what.split(" ", 1)[1]] = ("stored-with-warning", rest)
    return out


def load(text: str) -> Any:
    return json.loads(text)


@dataclass
class SCP:
    port: int
    received: dict[str, pydicom.Dataset] = field(default_factory=dict)
    syntaxes: dict[str, str] = field(default_factory=dict)  # SOP instance -> transfer syntax it came in
    associations: int = 0


@contextmanager
def pynetdicom_scp(handler: Callable[[Any], int] | None = None, *, syntaxes: list[str] | None = None,
                   sop_classes: list[str] | None = None, require_calling: list[str] | None = None,
                   ssl_context: Any = None) -> Iterator[SCP]:
    """A pynetdicom storage SCP on 127.0.0.1, in this process. ``handler(event)``
    returns the status to answer (default 0x0000); it may sleep or abort."""
    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
    from pynetdicom.sop_class import _STORAGE_CLASSES  # type: ignore[attr-defined]

    ae = AE(ae_title="TESTSCP")
    ae.maximum_associations = 16
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    for uid in sop_classes or list(_STORAGE_CLASSES.values()):
        ae.add_supported_context(uid, syntaxes or ALL_TRANSFER_SYNTAXES)
    if require_calling:
        ae.require_calling_aet = require_calling
    scp = SCP(port=0)
    lock = threading.Lock()

    def on_store(event: Any) -> int:
        code = handler(event) if handler else 0x0000
        if code is not None and code < 0x10000:
            ds = event.dataset
            ds.file_meta = event.file_meta
            with lock:
                scp.received[str(ds.SOPInstanceUID)] = ds
                scp.syntaxes[str(ds.SOPInstanceUID)] = str(event.context.transfer_syntax)
        return code

    def on_accepted(event: Any) -> None:
        with lock:
            scp.associations += 1

    server = ae.start_server(("127.0.0.1", 0), block=False, ssl_context=ssl_context,
                             evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_ACCEPTED, on_accepted)])
    scp.port = server.server_address[1]
    try:
        yield scp
    finally:
        server.shutdown()
