"""The embedded database: an SQLite catalog plus a content store directory.

Layout of a database directory::

    catalog.sqlite   the catalog (WAL mode)
    store/ab/<sha256>  every file, byte for byte, named by content
    tmp/             private staging area for files on their way in
"""
from __future__ import annotations

import errno
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import msgspec

from dicomvault.engine import (
    AttachmentRecord,
    Attributes,
    ConflictPolicy,
    DatabaseError,
    FileOpener,
    InstanceRecord,
    Item,
    Level,
    Opener,
    Outcome,
    PatientRecord,
    Rejected,
    Selection,
    SeriesRecord,
    StudyRecord,
    TargetError,
    TreeNode,
    UsageError,
)

from . import catalog as cat
from .collect import Collected, collect
from .store import ContentStore, Staged

ROWS_AT_ONCE = 1000  # instance rows read at a time by a source (memory does not grow with a series)
_NO_NUMBER = -(1 << 62)  # sorts instances without an Instance Number first, as NULL does
COMMIT_EVERY_ITEMS = 500
COMMIT_EVERY_SECONDS = 2.0
OWN_NAMES = {"catalog.sqlite", "catalog.sqlite-wal", "catalog.sqlite-shm", "catalog.sqlite-journal",
             "store", "tmp"}


def _why(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc)


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def check_creatable(root: Path) -> None:
    """Refuse to create a database in a directory that holds other things."""
    # Our own layout may already be there: another process creating this database right now.
    if root.exists() and (not root.is_dir() or any(p.name not in OWN_NAMES for p in root.iterdir())):
        raise DatabaseError(f"{root} is not empty and holds no dicomvault database; "
                            "refusing to create one there")


class EmbeddedDatabase:
    """A :class:`~dicomvault.engine.Database` in a local directory."""

    def __init__(self, root: str | os.PathLike[str], *, create: bool = True) -> None:
        self.root = Path(root).expanduser()
        self.url = str(self.root)
        catalog_path = self.root / "catalog.sqlite"
        if not catalog_path.exists():
            if not create:
                raise UsageError(f"no dicomvault database at {self.root} (check --db or $DICOMVAULT_DB; "
                                 "import-dicom or import-db creates one)")
            check_creatable(self.root)
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.umask(os.umask(0o077) | 0o077)  # files we create are private to the user
        self.store = ContentStore(self.root)
        self.conn = cat.connect(catalog_path)

    # ---------------------------------------------------------------- reading
    def hierarchy(self) -> Iterator[tuple[PatientRecord, StudyRecord, SeriesRecord]]:
        for row in self.conn.execute(cat.HIERARCHY_SQL):
            yield cat.patient_of(row[0:6]), cat.study_of(row[6:13]), cat.series_of(row[13:18])

    def _selected_series(self, selection: Selection,
                         conn: sqlite3.Connection | None = None) -> list[tuple]:  # type: ignore[type-arg]
        out = []
        for row in (conn or self.conn).execute(cat.HIERARCHY_SQL):
            p, st, se = cat.patient_of(row[0:6]), cat.study_of(row[6:13]), cat.series_of(row[13:18])
            if selection.matches(p, st, se):
                out.append((p, st, se, row[18]))
        return out

    def instances(self, selection: Selection) -> Iterator[InstanceRecord]:
        for _p, _st, _se, series_id in self._selected_series(selection):
            for row in self.conn.execute(
                    f"SELECT {cat.INSTANCE_COLS} FROM instances i JOIN series se ON i.series = se.id "
                    "WHERE se.id = ? ORDER BY i.number, i.sop_uid", (series_id,)):
                yield cat.instance_of(row)

    def tree(self, selection: Selection, depth: Level) -> list[TreeNode]:
        counts = {sid: (n, size) for sid, n, size in self.conn.execute(
            "SELECT series, count(*), CAST(coalesce(sum(size), 0) AS BIGINT) FROM instances GROUP BY series")}
        patients: dict[str, TreeNode] = {}
        studies: dict[str, TreeNode] = {}
        for p, st, se, sid in self._selected_series(selection):
            n, size = counts.get(sid, (0, 0))
            pn = patients.get(p.key)
            if pn is None:
                pn = patients[p.key] = TreeNode(level="patient", uid=p.key, label={
                    "patient_id": p.patient_id, "name": p.name, "birth_date": p.birth_date, "sex": p.sex})
            sn = studies.get(st.study_uid)
            if sn is None:
                sn = studies[st.study_uid] = TreeNode(level="study", uid=st.study_uid, label={
                    "date": st.date, "description": st.description, "accession": st.accession,
                    "study_id": st.study_id})
                pn.children.append(sn)
                pn.studies += 1
            se_node = TreeNode(level="series", uid=se.series_uid, label={
                "modality": se.modality, "number": se.number, "description": se.description},
                instances=n, size=size)
            if depth == "instance":
                se_node.children = [
                    TreeNode(level="instance", uid=r[0], label={"number": r[1], "sha256": r[3],
                                                                 "transfer_syntax": r[4]}, size=r[2])
                    for r in self.conn.execute(
                        "SELECT sop_uid, number, size, sha256, transfer_syntax FROM instances "
                        "WHERE series = ? ORDER BY number, sop_uid", (sid,))]
            sn.children.append(se_node)
            for node in (sn, pn):
                node.instances += n
                node.size += size
            sn.series += 1
            pn.series += 1
        return list(patients.values())

    # ---------------------------------------------------------------- selection list
    def get_selected(self) -> list[Selection]:
        return [msgspec.json.decode(r[0], type=Selection)
                for r in self.conn.execute("SELECT selection FROM selected ORDER BY position")]

    def set_selected(self, selections: list[Selection]) -> None:
        with Transaction(self.conn):
            self.conn.execute("DELETE FROM selected")
            self.conn.executemany("INSERT INTO selected (selection) VALUES (?)",
                                  [(msgspec.json.encode(s).decode(),) for s in selections])

    # ---------------------------------------------------------------- bookkeeping
    def _check_entity(self, level: Level, uid: str) -> None:
        table, col = {"patient": ("patients", "key"), "study": ("studies", "study_uid"),
                      "series": ("series", "series_uid"), "instance": ("instances", "sop_uid")}[level]
        if self.conn.execute(f"SELECT 1 FROM {table} WHERE {col} = ?", (uid,)).fetchone() is None:
            raise UsageError(f"no {level} {uid if level != 'patient' else '(given)'} in this database")

    def resolve_patient(self, patient: str) -> str:
        """The patient key for a PatientID or a key."""
        row = self.conn.execute("SELECT key FROM patients WHERE key = ? OR patient_id = ? LIMIT 2",
                                (patient, patient)).fetchall()
        if len(row) != 1:
            raise UsageError("the patient given matches " + ("no patient" if not row else
                             "several patients: use the patient key shown by 'ls --json'"))
        return str(row[0][0])

    def add_attachment(self, level: Level, uid: str, path: str, name: str,
                       media_type: str) -> AttachmentRecord:
        self._check_entity(level, uid)
        with open(path, "rb") as fh:
            staged = self.store.stage(fh)
        import uuid  # here: only attaching needs it, and every command would load it at start
        rec = AttachmentRecord(attachment_id=str(uuid.uuid4()), level=level, uid=uid, name=name,
                               media_type=media_type, size=staged.size, sha256=staged.sha256,
                               created_at=now_iso())
        # Published and committed under the write lock, as every writer does: a file is never
        # published while another writer checks whether it is still referenced, to remove it.
        try:
            with Transaction(self.conn):
                self.store.publish(staged)
                self.store.make_durable([staged.sha256], {self.store.dir_of(staged.sha256)})
                self.conn.execute(f"INSERT INTO attachments ({cat.ATTACHMENT_COLS}) VALUES "
                                  "(?,?,?,?,?,?,?,?)", _attachment_row(rec))
        finally:
            staged.discard()
        return rec

    def update_attributes(self, level: Level, uid: str, *, comment: str | None = None,
                          add_tags: tuple[str, ...] = (), fields: dict[str, str] | None = None,
                          ) -> Attributes:
        self._check_entity(level, uid)
        with Transaction(self.conn):
            attrs = self._attributes(level, uid) or Attributes(level=level, uid=uid)
            if comment is not None:
                attrs.comment = comment
            attrs.tags = sorted(set(attrs.tags) | set(add_tags))
            attrs.fields.update(fields or {})
            _write_attributes(self.conn, attrs)
        return attrs

    def _attributes(self, level: str, uid: str) -> Attributes | None:
        row = self.conn.execute("SELECT level, uid, comment, tags, fields FROM attributes "
                                "WHERE level = ? AND uid = ?", (level, uid)).fetchone()
        return cat.attributes_of(row) if row else None

    def collect_garbage(self, *, dry_run: bool = False) -> Collected:
        """Remove what interrupted writers left: staged copies of processes
        that are gone, store files no catalog row names (see :mod:`.collect`)."""
        return collect(Transaction(self.conn), self.store.files, self.store.tmp, dry_run=dry_run)

    def source(self) -> EmbeddedSource:
        return EmbeddedSource(self)

    def target(self) -> EmbeddedTarget:
        return EmbeddedTarget(self)

    def close(self) -> None:
        self.conn.close()


class Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, rolled back on error."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type: object, *_: object) -> None:
        self.conn.execute("ROLLBACK" if exc_type else "COMMIT")


def _as_planned(outcome: Outcome, reason: str) -> tuple[Outcome, str]:
    planned = {Outcome.STORED: Outcome.WOULD_STORE, Outcome.OVERWRITTEN: Outcome.WOULD_OVERWRITE}
    return planned.get(outcome, outcome), reason


def _attachment_row(rec: AttachmentRecord) -> tuple:  # type: ignore[type-arg]
    return (rec.attachment_id, rec.level, rec.uid, rec.name, rec.media_type, rec.size, rec.sha256,
            rec.created_at)


def _write_attributes(conn: sqlite3.Connection, attrs: Attributes) -> None:
    conn.execute("INSERT OR REPLACE INTO attributes (level, uid, comment, tags, fields) "
                 "VALUES (?,?,?,?,?)", (attrs.level, attrs.uid, attrs.comment,
                                        msgspec.json.encode(attrs.tags).decode(),
                                        msgspec.json.encode(attrs.fields).decode()))


class EmbeddedSource:
    """Reads a selection from a consistent snapshot of the database."""

    def __init__(self, db: EmbeddedDatabase) -> None:
        self.db = db
        self.description = f"database {db.root}"
        # A connection of its own, in one read transaction: a snapshot that
        # concurrent ingests cannot change under us.
        self.conn = sqlite3.connect(db.root / "catalog.sqlite", timeout=60, isolation_level=None,
                                    check_same_thread=False)
        self.conn.execute("BEGIN")
        self._picked: list[tuple] | None = None  # type: ignore[type-arg]

    def _series(self, selection: Selection) -> list[tuple]:  # type: ignore[type-arg]
        if self._picked is None:
            self._picked = self.db._selected_series(selection, self.conn)
        return self._picked

    def _opener(self, sha256: str) -> Opener:
        return FileOpener(self.db.store.path_of(sha256))

    def instances(self, selection: Selection) -> Iterator[Item | Rejected]:
        for p, st, se, series_id in self._series(selection):
            # A series at a time, in pieces (keyset: what was handed out is never asked for
            # again, whatever changes meanwhile): a series of 100,000 instances costs one piece.
            after: tuple[int, str] = (_NO_NUMBER - 1, "")
            while True:
                rows = self.conn.execute(  # plain SQL: PostgreSQL runs it too
                    f"SELECT {cat.INSTANCE_COLS}, coalesce(i.number, ?) FROM instances i "
                    "JOIN series se ON i.series = se.id WHERE se.id = ? "
                    "AND (coalesce(i.number, ?), i.sop_uid) > (?, ?) "
                    "ORDER BY coalesce(i.number, ?), i.sop_uid LIMIT ?",
                    (_NO_NUMBER, series_id, _NO_NUMBER, *after, _NO_NUMBER, ROWS_AT_ONCE)).fetchall()
                for row in rows:
                    rec = cat.instance_of(row[:-1])
                    yield Item(rec, se, st, p, self._opener(rec.sha256))
                if len(rows) < ROWS_AT_ONCE:
                    break
                after = (rows[-1][-1], rows[-1][0])

    def _owners(self, selection: Selection) -> dict[str, set[str]]:
        owners: dict[str, set[str]] = {"patient": set(), "study": set(), "series": set()}
        for p, st, se, _sid in self._series(selection):
            owners["patient"].add(p.key)
            owners["study"].add(st.study_uid)
            owners["series"].add(se.series_uid)
        return owners

    def attributes(self, selection: Selection) -> Iterator[Attributes]:
        owners = self._owners(selection)
        for row in self.conn.execute("SELECT level, uid, comment, tags, fields FROM attributes "
                                     "WHERE level != 'instance' ORDER BY level, uid"):
            if row[1] in owners.get(row[0], ()):
                yield cat.attributes_of(row)
        series_ids = [sid for *_x, sid in self._series(selection)]
        for sid in series_ids:
            for row in self.conn.execute(
                    "SELECT a.level, a.uid, a.comment, a.tags, a.fields FROM attributes a JOIN instances i "
                    "ON a.level = 'instance' AND a.uid = i.sop_uid WHERE i.series = ?", (sid,)):
                yield cat.attributes_of(row)

    def attachments(self, selection: Selection) -> Iterator[tuple[AttachmentRecord, Opener]]:
        owners = self._owners(selection)
        for row in self.conn.execute(f"SELECT {cat.ATTACHMENT_COLS} FROM attachments "
                                     "ORDER BY level, uid, created_at, attachment_id"):
            if row[2] in owners.get(row[1], ()):
                rec = cat.attachment_of(row)
                yield rec, self._opener(rec.sha256)

    def delete(self, sop_uid: str, sha256: str) -> bool:
        """Delete one instance if its stored SHA-256 is still ``sha256`` (see
        the Source contract); durable when it returns. Its instance-level
        attributes go with it; series, studies and patients stay."""
        return delete_instance(self.db, sop_uid, sha256)

    def close(self) -> None:
        self.conn.close()


def referenced(conn: sqlite3.Connection, sha: str) -> bool:
    """Whether any instance or attachment refers to these bytes."""
    return (conn.execute("SELECT 1 FROM instances WHERE sha256 = ? LIMIT 1", (sha,)).fetchone()
            or conn.execute("SELECT 1 FROM attachments WHERE sha256 = ? LIMIT 1",
                            (sha,)).fetchone()) is not None


def delete_instance(db: EmbeddedDatabase, sop_uid: str, sha256: str) -> bool:
    """The catalog row goes first (committed), then the file, and the file
    only if nothing refers to it, checked under the write lock that every
    writer holds from publishing a file to committing the row that uses it."""
    with Transaction(db.conn) as conn:
        gone = conn.execute("DELETE FROM instances WHERE sop_uid = ? AND sha256 = ?",
                            (sop_uid, sha256)).rowcount == 1
        if gone:
            conn.execute("DELETE FROM attributes WHERE level = 'instance' AND uid = ?", (sop_uid,))
    if gone:
        with Transaction(db.conn) as conn:
            if not referenced(conn, sha256):
                db.store.remove(sha256)
    return gone


class EmbeddedTarget:
    """Stores items, committing in batches; nothing is damaged by a failure.

    A new file is staged (hashed, fsynced) and verified before it is renamed
    into the store; catalog rows follow in the same batch. An overwritten
    file is removed only after the catalog no longer refers to it.
    """

    catalog_errors: tuple[type[Exception], ...] = (sqlite3.DatabaseError,)

    def __init__(self, db: EmbeddedDatabase, *, owns_db: bool = False) -> None:
        self.db = db
        self.owns_db = owns_db  # opened for this target alone: closed by finish()
        self.conn = db.conn
        self.description = f"database {db.root}"
        self._in_tx = False
        self._pending = 0
        self._since = time.monotonic()
        self._new_files: list[str] = []  # added to the store in the open batch
        self._drop_after_commit: list[str] = []  # replaced by an overwrite
        self._dirs: set[str] = set()
        self._ids: dict[tuple[str, str], int] = {}
        self._local = threading.local()  # read connections for prepare() in worker threads
        self._readers: list[sqlite3.Connection] = []
        self._publishing = ""  # the file being moved into the store right now
        db.store.drop_staged(own=False)  # what killed writers left: nobody else cleans it
        # An empty catalog (a restore into a new database) needs no look-ups ahead of the copy:
        # put_prepared still decides, under the write lock, whatever another process added since.
        self._catalog_was_empty = self.conn.execute("SELECT 1 FROM instances LIMIT 1").fetchone() is None

    # ------------------------------------------------------------ batching
    def _begin(self) -> None:
        if not self._in_tx:
            # Noted before it is taken: an interrupt right after BEGIN must still roll it back.
            self._in_tx = True
            try:
                self.conn.execute("BEGIN IMMEDIATE")
            except BaseException:
                self._in_tx = False
                raise
            self._since = time.monotonic()

    def _maybe_commit(self) -> None:
        self._pending += 1
        if self._pending >= COMMIT_EVERY_ITEMS or time.monotonic() - self._since > COMMIT_EVERY_SECONDS:
            self._commit()

    def _commit(self) -> None:
        if not self._in_tx:
            return
        failures: tuple[type[Exception], ...] = (OSError, *self.catalog_errors)
        try:
            self.db.store.make_durable(self._new_files, self._dirs)
            self.conn.execute("COMMIT")
        except failures as exc:
            self._rollback()
            raise TargetError(f"{self.description}: a batch could not be committed ({_why(exc)}); it was "
                              "rolled back, what was committed before stays") from exc
        self._in_tx = False
        self._pending = 0
        self._dirs.clear()
        self._new_files.clear()
        if self._drop_after_commit:
            # Replaced files go only if nothing refers to them, checked under the write lock:
            # another writer may be publishing the same bytes right now.
            with Transaction(self.conn):
                for sha in self._drop_after_commit:
                    if not self._referenced(sha):
                        self.db.store.remove(sha)
        self._drop_after_commit.clear()

    def _rollback(self) -> None:
        if self._in_tx:
            self._in_tx = False
            try:
                self.conn.execute("ROLLBACK")
            except self.catalog_errors:
                pass  # a failed COMMIT may have ended the transaction already
        # Files this run added go if nothing refers to them, checked under the write lock: another
        # writer may have found the same bytes already stored and be about to commit a row for them.
        added = [*self._new_files, *([self._publishing] if self._publishing else [])]
        self._publishing = ""
        try:
            with Transaction(self.conn):
                for sha in added:
                    if not self._referenced(sha):
                        self.db.store.remove(sha)
        except self.catalog_errors:
            pass  # the catalog cannot say: unreferenced files stay, a referenced one is never removed
        self._new_files.clear()
        self._drop_after_commit.clear()
        self._ids.clear()

    def _referenced(self, sha: str) -> bool:
        return referenced(self.conn, sha)

    def finish(self, ok: bool) -> None:
        try:
            if ok:
                self._commit()
            else:
                self._rollback()
        finally:
            # The run is over, however it ended: no staged file of ours is wanted any more (an
            # interrupt may have come between staging a copy and using or discarding it).
            self.db.store.drop_staged()
            for conn in self._readers:
                conn.close()
            self._readers.clear()
            if self.owns_db:
                self.db.close()

    # ------------------------------------------------------------ hierarchy
    def _id(self, table: str, col: str, value: str) -> int | None:
        key = (table, value)
        if key in self._ids:
            return self._ids[key]
        row = self.conn.execute(f"SELECT id FROM {table} WHERE {col} = ?", (value,)).fetchone()
        if row:
            self._ids[key] = row[0]
            return int(row[0])
        return None

    def _series_id(self, item: Item) -> tuple[int, str]:
        """Find or create patient, study and series rows; returns the series
        id and a warning when the hierarchy disagrees with what is stored."""
        warning = ""
        sid = self._id("series", "series_uid", item.series.series_uid)
        if sid is not None:
            return sid, warning
        st_id = self._id("studies", "study_uid", item.study.study_uid)
        if st_id is None:
            p = item.patient
            p_id = self._id("patients", "key", p.key)
            if p_id is None:
                p_id = self.conn.execute(
                    "INSERT INTO patients (key, patient_id, issuer, name, birth_date, sex) "
                    "VALUES (?,?,?,?,?,?)", (p.key, p.patient_id, p.issuer, p.name, p.birth_date,
                                             p.sex)).lastrowid
                self._ids[("patients", p.key)] = p_id  # type: ignore[assignment]
            st = item.study
            st_id = self.conn.execute(
                "INSERT INTO studies (study_uid, patient, date, time, study_id, accession, description) "
                "VALUES (?,?,?,?,?,?,?)", (st.study_uid, p_id, st.date, st.time, st.study_id,
                                           st.accession, st.description)).lastrowid
            self._ids[("studies", st.study_uid)] = st_id  # type: ignore[assignment]
        else:
            owner = self.conn.execute("SELECT p.key FROM studies st JOIN patients p ON st.patient = p.id "
                                      "WHERE st.id = ?", (st_id,)).fetchone()[0]
            if owner != item.patient.key:
                warning = (f"study {item.study.study_uid} is stored under another patient; "
                           "the series was filed under the stored study")
        se = item.series
        sid = self.conn.execute(
            "INSERT INTO series (series_uid, study, modality, number, description) VALUES (?,?,?,?,?)",
            (se.series_uid, st_id, se.modality, se.number, se.description)).lastrowid
        self._ids[("series", se.series_uid)] = sid  # type: ignore[assignment]
        return sid, warning  # type: ignore[return-value]

    # ------------------------------------------------------------ items
    def lookup(self, sop_uid: str) -> str | None:
        row = self.conn.execute("SELECT sha256 FROM instances WHERE sop_uid = ?", (sop_uid,)).fetchone()
        return row[0] if row else None

    def _stage_verified(self, open_: Opener, expected: str, what: str) -> Staged:
        try:
            with open_() as fh:
                staged = self.db.store.stage(fh)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                # only writing fails so: the copy, not the source; nothing more can be stored
                raise TargetError(f"{self.description}: cannot store {what}: {exc.strerror}; "
                                  "nothing more is stored") from exc
            raise
        if expected and staged.sha256 != expected:
            staged.discard()
            raise DatabaseError(f"{what}: the bytes received do not match their SHA-256 "
                                f"(expected {expected[:16]}..., got {staged.sha256[:16]}...); not stored")
        return staged

    def _publish(self, staged: Staged) -> None:
        self._publishing = staged.sha256  # an interrupt between the rename and the note below
        added = self.db.store.publish(staged)
        self._dirs.add(self.db.store.dir_of(staged.sha256))
        if added:
            self._new_files.append(staged.sha256)
        self._publishing = ""

    def prepare(self, item: Item, policy: ConflictPolicy) -> Staged | None:
        """The heavy, order-free part of storing an item: copy its bytes into
        the staging area, hashing and verifying them. Thread-safe; the run
        loop calls it from worker threads ahead of :meth:`put_prepared`.
        Returns None when the item need not be copied (already stored
        identically, or a conflict that the policy leaves alone)."""
        rec = item.instance
        if rec.sha256 and not self._catalog_was_empty:
            stored = self._lookup_threadsafe(rec.sop_uid)
            if stored is not None and (stored == rec.sha256 or policy is not ConflictPolicy.OVERWRITE):
                return None
        return self._stage_verified(item.open, rec.sha256, f"instance {rec.sop_uid}")

    def discard(self, prepared: Staged | None) -> None:
        if prepared is not None:
            prepared.discard()

    def _lookup_threadsafe(self, sop_uid: str) -> str | None:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = sqlite3.connect(self.db.root / "catalog.sqlite", timeout=60,
                                                      check_same_thread=False)
            self._readers.append(conn)
        row = conn.execute("SELECT sha256 FROM instances WHERE sop_uid = ?", (sop_uid,)).fetchone()
        return row[0] if row else None

    def put_instance(self, item: Item, policy: ConflictPolicy) -> tuple[Outcome, str]:
        return self.put_prepared(item, self.prepare(item, policy), policy)

    def put_prepared(self, item: Item, staged: Staged | None, policy: ConflictPolicy) -> tuple[Outcome, str]:
        """Decide and commit, in the calling (run loop) thread."""
        rec = item.instance
        stored = self.lookup(rec.sop_uid)  # authoritative: sees this batch's rows too
        if stored is None and not self._in_tx:
            # Not under the write lock yet: another process may store this UID meanwhile.
            self._begin()
            stored = self.lookup(rec.sop_uid)
            if stored is not None:
                self._commit()  # nothing written: release the lock
        if staged is None:
            if stored is not None and stored == rec.sha256:
                return Outcome.UNCHANGED, ""
            if stored is not None and policy is not ConflictPolicy.OVERWRITE:
                return Outcome.CONFLICT, ""
            staged = self.prepare(item, ConflictPolicy.OVERWRITE)
            assert staged is not None
        if stored is not None:
            if stored == staged.sha256:
                staged.discard()
                return Outcome.UNCHANGED, ""
            if policy is not ConflictPolicy.OVERWRITE:
                staged.discard()
                return Outcome.CONFLICT, ""
        try:
            self._begin()
            self._publish(staged)
            series_id, warning = self._series_id(item)
            values = (series_id, rec.sop_class_uid, rec.transfer_syntax, rec.number, staged.size,
                      staged.sha256, rec.imported_at or now_iso(), rec.origin)
            if stored is None:
                self.conn.execute("INSERT INTO instances (series, sop_class_uid, transfer_syntax, number, "
                                  "size, sha256, imported_at, origin, sop_uid) VALUES (?,?,?,?,?,?,?,?,?)",
                                  (*values, rec.sop_uid))
                outcome = Outcome.STORED
            else:
                self.conn.execute("UPDATE instances SET series=?, sop_class_uid=?, transfer_syntax=?, "
                                  "number=?, size=?, sha256=?, imported_at=?, origin=? WHERE sop_uid=?",
                                  (*values, rec.sop_uid))
                self._drop_after_commit.append(stored)
                outcome = Outcome.OVERWRITTEN
        except self.catalog_errors as exc:
            self._rollback()
            raise DatabaseError(f"instance {rec.sop_uid}: catalog error: {exc}") from exc
        self._maybe_commit()
        return outcome, warning

    def _exists(self, level: str, uid: str) -> bool:
        table, col = {"patient": ("patients", "key"), "study": ("studies", "study_uid"),
                      "series": ("series", "series_uid"), "instance": ("instances", "sop_uid")}[level]
        return self._id(table, col, uid) is not None

    def _decide_attributes(self, attrs: Attributes, policy: ConflictPolicy) -> tuple[Outcome, str]:
        """STORED / OVERWRITTEN (to be written), UNCHANGED or CONFLICT."""
        current = self.db._attributes(attrs.level, attrs.uid)
        if current is not None and not current.is_empty():
            if current == attrs:
                return Outcome.UNCHANGED, ""
            if policy is not ConflictPolicy.OVERWRITE:
                return Outcome.CONFLICT, "other attributes are stored for this entity; left untouched"
            return Outcome.OVERWRITTEN, ""
        return Outcome.STORED, ""

    def plan_attributes(self, attrs: Attributes, policy: ConflictPolicy) -> tuple[Outcome, str]:
        """What :meth:`put_attributes` would do, changing nothing. An entity
        not stored yet is assumed to arrive with the instances of this run."""
        if not self._exists(attrs.level, attrs.uid):
            return Outcome.WOULD_STORE, ""
        return _as_planned(*self._decide_attributes(attrs, policy))

    def put_attributes(self, attrs: Attributes, policy: ConflictPolicy) -> tuple[Outcome, str]:
        if not self._exists(attrs.level, attrs.uid):
            return Outcome.FAILED, f"no {attrs.level} to attach the attributes to"
        self._begin()
        outcome, reason = self._decide_attributes(attrs, policy)
        if outcome in (Outcome.STORED, Outcome.OVERWRITTEN):
            _write_attributes(self.conn, attrs)
            self._maybe_commit()
        return outcome, reason

    def _current_attachment(self, record: AttachmentRecord) -> AttachmentRecord | None:
        row = self.conn.execute(f"SELECT {cat.ATTACHMENT_COLS} FROM attachments WHERE attachment_id = ?",
                                (record.attachment_id,)).fetchone()
        return cat.attachment_of(row) if row else None

    @staticmethod
    def _decide_attachment(current: AttachmentRecord | None, record: AttachmentRecord,
                           policy: ConflictPolicy) -> tuple[Outcome, str]:
        if current == record:
            return Outcome.UNCHANGED, ""
        if current is not None and policy is not ConflictPolicy.OVERWRITE:
            return Outcome.CONFLICT, "another attachment is stored under this id; left untouched"
        return (Outcome.OVERWRITTEN if current else Outcome.STORED), ""

    def plan_attachment(self, record: AttachmentRecord, policy: ConflictPolicy) -> tuple[Outcome, str]:
        """What :meth:`put_attachment` would do, changing nothing."""
        return _as_planned(*self._decide_attachment(self._current_attachment(record), record, policy))

    def put_attachment(self, record: AttachmentRecord, open_: Opener,
                       policy: ConflictPolicy) -> tuple[Outcome, str]:
        self._begin()
        current = self._current_attachment(record)
        outcome, reason = self._decide_attachment(current, record, policy)
        if outcome not in (Outcome.STORED, Outcome.OVERWRITTEN):
            return outcome, reason
        staged = self._stage_verified(open_, record.sha256, f"attachment {record.attachment_id}")
        self._publish(staged)
        self.conn.execute(f"INSERT OR REPLACE INTO attachments ({cat.ATTACHMENT_COLS}) "
                          "VALUES (?,?,?,?,?,?,?,?)", _attachment_row(record))
        if current is not None and current.sha256 != record.sha256:
            self._drop_after_commit.append(current.sha256)
        self._maybe_commit()
        return outcome, reason


class NewDatabaseTarget:
    """The target for an embedded database that does not exist yet. It is
    created by the first write, so opening it, a dry run, or a run that
    stores nothing leaves nothing behind."""

    def __init__(self, root: Path) -> None:
        check_creatable(root)
        self.root = root
        self.description = f"database {root} (new)"
        self._target: EmbeddedTarget | None = None
        self._lock = threading.Lock()

    def _real(self) -> EmbeddedTarget:
        with self._lock:  # prepare() runs in worker threads
            if self._target is None:
                self._target = EmbeddedTarget(EmbeddedDatabase(self.root), owns_db=True)
            return self._target

    def lookup(self, sop_uid: str) -> str | None:
        return self._target.lookup(sop_uid) if self._target is not None else None

    def plan_attributes(self, attrs: Attributes, policy: ConflictPolicy) -> tuple[Outcome, str]:
        if self._target is None:
            return Outcome.WOULD_STORE, ""
        return self._target.plan_attributes(attrs, policy)

    def plan_attachment(self, record: AttachmentRecord, policy: ConflictPolicy) -> tuple[Outcome, str]:
        if self._target is None:
            return Outcome.WOULD_STORE, ""
        return self._target.plan_attachment(record, policy)

    def prepare(self, item: Item, policy: ConflictPolicy) -> Staged | None:
        return self._real().prepare(item, policy)

    def discard(self, prepared: Staged | None) -> None:
        if prepared is not None:
            prepared.discard()

    def put_prepared(self, item: Item, staged: Staged | None, policy: ConflictPolicy) -> tuple[Outcome, str]:
        return self._real().put_prepared(item, staged, policy)

    def put_instance(self, item: Item, policy: ConflictPolicy) -> tuple[Outcome, str]:
        return self._real().put_instance(item, policy)

    def put_attributes(self, attrs: Attributes, policy: ConflictPolicy) -> tuple[Outcome, str]:
        return self._real().put_attributes(attrs, policy)

    def put_attachment(self, record: AttachmentRecord, open_: Opener,
                       policy: ConflictPolicy) -> tuple[Outcome, str]:
        return self._real().put_attachment(record, open_, policy)

    def finish(self, ok: bool) -> None:
        if self._target is not None:
            self._target.finish(ok)
