"""``bkp``: look into, check and rescue .bkp files without a database.

    dicomvault bkp inspect FILE     header, versions, features, counts, writer
    dicomvault bkp ls FILE          contents by patient, study and series (manifest only)
    dicomvault bkp validate FILE    structure and schema against SPEC.md; findings with codes
    dicomvault bkp verify FILE      reads everything: every checksum and every SHA-256
    dicomvault bkp salvage FILE OUT recovers every intact instance into a new .bkp

Exit codes: 0 good; 1 the file has errors (validate, verify) or not
everything could be recovered (salvage); 2 the file cannot be read at all.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from dicomvault.engine import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_PARTIAL,
    Context,
    Operation,
    PassphraseRequiredError,
    UsageError,
    hookimpl,
)
from dicomvault.engine.passphrase import PassphraseSource, add_passphrase_options
from dicomvault.formats.bkp.layout import (
    FOOTER,
    FRAME,
    HEADER,
    file_is_encrypted,
    parse_header,
    unpack_footer,
)
from dicomvault.formats.bkp.reader import BkpOpenError, BkpReader, open_named
from dicomvault.formats.bkp.validate import Result, check
from dicomvault.formats.bkp.volumes import volume_path, volumes_named_by

T = TypeVar("T")


def configure(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bkp_command", metavar="ACTION", required=True)
    helps = {
        "inspect": "header, format version, features, counts and writer of a .bkp",
        "ls": "contents by patient, study and series, from the manifest alone",
        "validate": "check structure and schema against SPEC.md (frame payloads are not read)",
        "verify": "read everything: every frame checksum and every instance's SHA-256",
        "salvage": "recover every intact instance of a damaged or truncated .bkp into a new .bkp",
    }
    for name, text in helps.items():
        sp = sub.add_parser(name, help=text, description=text)
        sp.add_argument("file", metavar="FILE.bkp")
        if name == "salvage":
            sp.add_argument("output", metavar="NEW.bkp", help="where the recovered instances go")
        if name == "ls":
            sp.add_argument("--level", choices=["patient", "study", "series", "instance"], default="series",
                            help="how deep to show (default: series)")
        sp.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print the result as JSON on stdout")
        sp.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no progress display")
        sp.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                        help="more log output on stderr")
        add_passphrase_options(sp)


def _emit(args: argparse.Namespace, data: Any, text: list[str]) -> None:
    if args.json:
        sys.stdout.write(msgspec.json.encode(data).decode() + "\n")
    else:
        sys.stdout.write("".join(line + "\n" for line in text))


def _passphrase(args: argparse.Namespace, *, ask: bool = True) -> str | None:
    """The passphrase when the file is encrypted (asked in a terminal when
    ``ask`` and no --passphrase-env/--passphrase-file was given)."""
    if not file_is_encrypted(args.file):
        return None
    return PassphraseSource.from_args(args).get(f"the encrypted backup {args.file}", ask=ask)


def _set_hint(path: str) -> str:
    """For NAME.bkp that does not exist but volumes NAME.NNN.bkp do: what to do."""
    given = Path(path)
    found = volumes_named_by(given)
    if not found:
        return ""
    missing = "" if 1 in found else f"; its volume 1, {volume_path(given, 1).name}, is missing"
    return (f"; {given.name} names a volume set ({found[min(found)][0].name}, ...): each volume is a "
            "complete .bkp that these tools take one at a time, and import-db, compare and --from take "
            f"the whole set by this name{missing}")


def _asking_late(args: argparse.Namespace, use: Callable[[str | None], T]) -> T:
    """``use(passphrase)`` with the passphrase the command line gives (None
    without one); asked for (in a terminal) only when ``use`` finds the file
    sound and encrypted (SPEC.md 10.1: a truncated file says so first)."""
    try:
        return use(_passphrase(args, ask=False))
    except PassphraseRequiredError:
        return use(_passphrase(args))


def _open(args: argparse.Namespace) -> BkpReader:
    """The file, opened; errors (one line, exit code 2) name it."""
    try:
        return _asking_late(args, lambda passphrase: open_named(args.file, passphrase=passphrase))
    except BkpOpenError as exc:
        if hint := _set_hint(args.file):
            raise BkpOpenError(f"{exc}{hint}") from exc
        raise


def _inspect(args: argparse.Namespace) -> int:
    try:
        reader = _open(args)
    except PassphraseRequiredError:  # none given, none to ask for: what is readable without it
        return _inspect_sealed(args)
    try:
        m = reader.manifest
        stored = sum(fe.stored for fe in m.frames)
        info = {
            "file": args.file, "size": reader.size, "format": m.format,
            "version": f"{reader.major}.{reader.minor}", "writer": m.writer, "created": m.created,
            "file_id": reader.file_id.hex(),
            "required_features": m.required_features, "optional_features": m.optional_features,
            "frames": len(m.frames), "payload_bytes": reader.stream_size, "stored_bytes": stored,
            "patients": len(m.patients), "studies": len(m.studies), "series": len(m.series),
            "instances": reader.instance_count, "attributes": len(m.attributes),
            "attachments": len(m.attachments),
            "encrypted": reader.encrypted, "sealed": False,
            "manifest_pages": len(reader.pages),
            "manifest_bytes": reader.size - reader.data_start - 64
            - sum(FRAME.size + fe.stored for fe in m.frames),
        }
    finally:
        reader.close()
    ratio = f"{info['payload_bytes'] / stored:.2f}x" if stored else "-"
    text = [
        f"file        {args.file} ({info['size']:,} bytes)",
        f"format      {info['format']} {info['version']}, written by {info['writer']} at {info['created']}",
        f"encrypted   {'yes (AES-256-GCM, key from a passphrase by scrypt)' if reader.encrypted else 'no'}",
        f"features    required: {', '.join(m.required_features) or 'none'}; "
        f"optional: {', '.join(m.optional_features) or 'none'}",
        f"payload     {info['payload_bytes']:,} bytes in {info['frames']} frames, stored in {stored:,} "
        f"({ratio})",
        f"contents    {info['patients']} patients, {info['studies']} studies, {info['series']} series, "
        f"{info['instances']} instances, {info['attachments']} attachments, "
        f"{info['attributes']} attribute sets",
    ]
    _emit(args, info, text)
    return EXIT_OK


def _inspect_sealed(args: argparse.Namespace) -> int:
    """An encrypted file without its passphrase: what its header and footer
    say (the file has passed every check up to the key frame, SPEC.md 10.1)."""
    with open(args.file, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        header = parse_header(fh.read(HEADER.size))
        fh.seek(size - FOOTER.size)
        _moff, _mlen, frames, _id = unpack_footer(fh.read(FOOTER.size))
    created = datetime.datetime.fromtimestamp(header.created // 10**9, datetime.UTC)
    info = {"file": args.file, "size": size, "format": "dicomvault-bkp",
            "version": f"{header.major}.{header.minor}", "created": created.isoformat(),
            "file_id": header.file_id.hex(), "encrypted": True, "frames": frames, "sealed": True}
    text = [
        f"file        {args.file} ({size:,} bytes)",
        f"format      dicomvault-bkp {info['version']}, created {info['created']}",
        "encrypted   yes (AES-256-GCM, key from a passphrase by scrypt)",
        f"payload     {frames} data frames",
        "contents    sealed: give the passphrase (--passphrase-env VAR, --passphrase-file PATH, or run "
        "in a terminal) to see the writer, features and counts",
    ]
    _emit(args, info, text)
    return EXIT_OK


def _ls(args: argparse.Namespace) -> int:
    reader = _open(args)
    # Per series: [instances, bytes, records]. Down to series, counts are all that is kept
    # (pages are read one at a time); down to instances, the listing is as long as the backup.
    per_series: dict[str, list[Any]] = defaultdict(lambda: [0, 0, []])
    try:
        m = reader.manifest
        for e in reader.iter_instances():
            entry = per_series[e.record.series_uid]
            entry[0] += 1
            entry[1] += e.record.size
            if args.level == "instance":
                entry[2].append(e.record)
    finally:
        reader.close()
    series_of: dict[str, list[Any]] = defaultdict(list)
    for s in m.series:
        series_of[s.study_uid].append(s)
    studies_of: dict[str, list[Any]] = defaultdict(list)
    for st in m.studies:
        studies_of[st.patient_key].append(st)
    depth = ["patient", "study", "series", "instance"].index(args.level)
    tree: list[dict[str, Any]] = []
    text: list[str] = []
    for p in m.patients:
        pnode: dict[str, Any] = {"level": "patient", "key": p.key, "patient_id": p.patient_id,
                                 "name": p.name, "studies": []}
        tree.append(pnode)
        n_inst = sum(per_series[se.series_uid][0]
                     for st in studies_of[p.key] for se in series_of[st.study_uid])
        text.append(f"PATIENT {p.name or '(no name)'}  id={p.patient_id or '(none)'}  "
                    f"[{len(studies_of[p.key])} studies, {n_inst} instances]")
        if depth < 1:
            continue
        for st in studies_of[p.key]:
            snode: dict[str, Any] = {"level": "study", "uid": st.study_uid, "date": st.date,
                                     "description": st.description, "series": []}
            pnode["studies"].append(snode)
            text.append(f"  STUDY {st.date or '--------'} {st.description or '(no description)'}  "
                        f"{st.study_uid}  [{len(series_of[st.study_uid])} series]")
            if depth < 2:
                continue
            for se in series_of[st.study_uid]:
                count, size, recs = per_series[se.series_uid]
                senode: dict[str, Any] = {"level": "series", "uid": se.series_uid, "modality": se.modality,
                                          "number": se.number, "description": se.description,
                                          "instances": count, "size": size}
                snode["series"].append(senode)
                num = "" if se.number is None else f"#{se.number} "
                text.append(f"    SERIES {se.modality or '??'} {num}{se.description or ''}  {se.series_uid}  "
                            f"[{count} instances, {size:,} bytes]")
                if depth < 3:
                    continue
                senode["items"] = [{"sop_uid": r.sop_uid, "size": r.size, "sha256": r.sha256} for r in recs]
                text.extend(f"      {r.sop_uid}  [{r.size:,} bytes  sha256={r.sha256}]" for r in recs)
    if m.attachments:
        text.append(f"({len(m.attachments)} attachments)")
    _emit(args, tree, text or ["(the file holds no instances)"])
    return EXIT_OK


def _check(args: argparse.Namespace, deep: bool) -> int:
    try:
        # Without --passphrase-env/--passphrase-file an encrypted file gets every check that
        # needs no key (frame chain, every frame checksum with verify); with it, everything.
        result: Result = check(args.file, deep=deep, passphrase=_passphrase(args, ask=False))
    except OSError as exc:  # missing, unreadable: as inspect and ls say it (exit 2)
        raise BkpOpenError(f"cannot open {args.file}: {exc.strerror}{_set_hint(args.file)}") from exc
    text = [f"{f.severity.upper():7} {f.code:26} {f.message}" for f in result.findings]
    wrong_key = next((f for f in result.findings if f.code == "key.passphrase"), None)
    if wrong_key is not None:  # the key is wrong, not (as far as anyone can tell) the file
        text.append(f"{args.file}: not checked: {wrong_key.message}")
        _emit(args, result, text)
        return EXIT_FAILED
    verdict = "valid" if result.valid else "INVALID"
    what = (f"{result.instances} instances, {result.attachments} attachments, {result.frames} frames"
            + (f", {result.bytes_verified:,} bytes hashed" if deep else ""))
    if any(f.code == "encrypted.unchecked" for f in result.findings):
        what = (f"encrypted, {result.frames} data frames: frame chain and checksums checked, contents not "
                "(give the passphrase to check them)")
    text.append(f"{args.file}: {verdict} (format {result.version or '?'}; {what})")
    _emit(args, result, text)
    if result.valid:
        return EXIT_OK
    return EXIT_PARTIAL if result.version else EXIT_FAILED  # no version: not even a header


def _salvage(args: argparse.Namespace) -> int:
    if os.path.lexists(args.output):
        raise UsageError(f"{args.output} exists; choose another name")
    if not args.output.lower().endswith(".bkp"):
        raise UsageError("the output file name must end in .bkp")
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
        raise UsageError(f"the folder {os.path.dirname(os.path.abspath(args.output))} does not exist")
    if not os.path.isfile(args.file):
        if hint := _set_hint(args.file):  # as the other tools say it (exit 2)
            raise BkpOpenError(f"cannot open {args.file}: no such file{hint}")
        raise UsageError(f"{args.file} is not a file")
    try:
        from dicomvault.formats.bkp.salvage import salvage  # pydicom: only when salvaging

        result = _asking_late(args, lambda passphrase: salvage(args.file, args.output, passphrase=passphrase))
    except OSError as exc:
        raise UsageError(f"cannot salvage {args.file}: {exc.strerror or exc}") from exc
    text = [f"note: {n}" for n in result.notes]
    text += [f"lost: {line}" for line in result.lost]
    into = f"into {args.output}" if result.output else "(no file written: nothing to keep)"
    text.append(f"{result.instances_recovered} instances and {result.attachments_recovered} attachments "
                f"recovered {into} (by {result.method}; {result.frames_intact} frames intact, "
                f"{result.frames_damaged} damaged"
                + (f"; {result.instances_lost} instances and {result.attachments_lost} attachments lost"
                   if result.method == "manifest" else "") + ")")
    _emit(args, result, text)
    complete = result.method == "manifest" and not result.lost and not result.frames_damaged
    if complete:
        return EXIT_OK
    return EXIT_PARTIAL if result.instances_recovered or result.attachments_recovered else EXIT_FAILED


def run(ctx: Context, args: argparse.Namespace) -> int:
    action = args.bkp_command
    if action == "inspect":
        return _inspect(args)
    if action == "ls":
        return _ls(args)
    if action in ("validate", "verify"):
        return _check(args, deep=action == "verify")
    return _salvage(args)


@hookimpl
def dicomvault_register_operations() -> list[Operation]:
    return [Operation(name="bkp", help="inspect, list, validate, verify or salvage a .bkp file",
                      configure=configure, run=run)]
