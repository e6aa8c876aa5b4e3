"""The embedded database as a source reads a series in pieces (keyset
pagination), so memory does not grow with the size of a series: every
instance comes once, in the order of (Instance Number, SOP Instance UID)
with instances without a number first, whatever the piece size."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from dicomvault.engine import Context, Hooks, Item, Selection, make_plugin_manager
from dicomvault.plugins.embedded import database


@pytest.fixture
def db(cli, real_dicom: list[str], tmp_path: Path) -> Path:  # type: ignore[no-untyped-def]
    path = tmp_path / "db"
    assert cli("--db", path, "-q", "import-dicom", *real_dicom).code in (0, 1)  # some files are not instances
    return path


def _handed_out(db: Path) -> list[tuple[str, str]]:
    ctx = Context(Hooks(make_plugin_manager(autoload=False)), str(db))
    source = ctx.open_database().source()
    return [(it.series.series_uid, it.instance.sop_uid) for it in source.instances(Selection(whole=True))
            if isinstance(it, Item)]


@pytest.mark.parametrize("piece", [1, 2, 7])
def test_pieces_hand_out_every_instance_once_in_order(db: Path, piece: int,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    whole = _handed_out(db)
    conn = sqlite3.connect(db / "catalog.sqlite")
    try:
        numbers = dict(conn.execute("SELECT sop_uid, number FROM instances"))
    finally:
        conn.close()
    assert len(whole) == len(numbers) > 100 and len(set(whole)) == len(whole)
    assert any(n is None for n in numbers.values()), "the data must hold instances without a number"
    assert max(sum(1 for s, _u in whole if s == series) for series, _u in whole) > 7, \
        "a series must span several pieces"
    for series in {s for s, _u in whole}:  # within a series: number (none first), then UID
        uids = [u for s, u in whole if s == series]
        assert uids == sorted(uids, key=lambda u: (numbers[u] is not None, numbers[u] or 0, u))
    monkeypatch.setattr(database, "ROWS_AT_ONCE", piece)
    assert _handed_out(db) == whole
