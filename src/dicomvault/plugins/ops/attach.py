"""``attach`` (a non-DICOM file) and ``annotate`` (comments, tags, fields):
the database attributes that travel in a .bkp but not in a DICOM export."""
from __future__ import annotations

import argparse
import mimetypes
import os
import sys

import msgspec

from dicomvault.engine import Context, Level, Operation, UsageError, hookimpl


def _owner_options(p: argparse.ArgumentParser, instance: bool) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--patient", metavar="PATIENT_ID", help="a PatientID or patient key")
    g.add_argument("--study", metavar="UID")
    g.add_argument("--series", metavar="UID")
    if instance:
        g.add_argument("--instance", metavar="UID", help="a SOP Instance UID")


def _owner(ctx: Context, args: argparse.Namespace) -> tuple[Level, str]:
    db = ctx.open_database()
    if args.patient:
        resolve = getattr(db, "resolve_patient", None)
        return "patient", resolve(args.patient) if resolve else args.patient
    for level in ("study", "series", "instance"):
        value = getattr(args, level, None)
        if value:
            return level, value  # type: ignore[return-value]
    raise UsageError("say what to attach to")


def _attach_configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="the file to attach (VOI definition, model result, ...)")
    _owner_options(p, instance=False)
    p.add_argument("--name", help="name to keep it under (default: the file's name)")
    p.add_argument("--media-type", help="e.g. text/csv (default: guessed from the name)")


def _attach_run(ctx: Context, args: argparse.Namespace) -> int:
    if not os.path.isfile(args.file):
        raise UsageError(f"{args.file} is not a file")
    level, uid = _owner(ctx, args)
    name = args.name or os.path.basename(args.file)
    media = args.media_type or mimetypes.guess_type(name)[0] or "application/octet-stream"
    rec = ctx.open_database().add_attachment(level, uid, args.file, name, media)
    if args.json:
        sys.stdout.write(msgspec.json.encode(rec).decode() + "\n")
    else:
        print(f"attached {rec.name} ({rec.size} bytes) to the {level}; id {rec.attachment_id}")
    return 0


def _field(value: str) -> tuple[str, str]:
    if "=" not in value:
        raise argparse.ArgumentTypeError("a field is KEY=VALUE")
    k, v = value.split("=", 1)
    return k.strip(), v


def _annotate_configure(p: argparse.ArgumentParser) -> None:
    _owner_options(p, instance=True)
    p.add_argument("--comment", help="replace the comment")
    p.add_argument("--tag", action="append", default=[], help="add a tag (repeatable)")
    p.add_argument("--field", action="append", default=[], type=_field, metavar="KEY=VALUE",
                   help="set a free key/value field (repeatable)")


def _annotate_run(ctx: Context, args: argparse.Namespace) -> int:
    level, uid = _owner(ctx, args)
    attrs = ctx.open_database().update_attributes(level, uid, comment=args.comment, add_tags=tuple(args.tag),
                                                  fields=dict(args.field))
    if args.json:
        sys.stdout.write(msgspec.json.encode(attrs).decode() + "\n")
    else:
        print(f"{level} attributes: {len(attrs.tags)} tag(s), {len(attrs.fields)} field(s), "
              f"comment {'set' if attrs.comment else 'empty'}")
    return 0


@hookimpl
def dicomvault_register_operations() -> list[Operation]:
    return [
        Operation(name="attach", help="attach a non-DICOM file to a patient, study or series",
                  configure=_attach_configure, run=_attach_run),
        Operation(name="annotate", help="set database attributes: comment, tags, key/value fields",
                  configure=_annotate_configure, run=_annotate_run),
    ]
