"""Test helpers for .bkp files: re-pack a file with small frames (so that
damage hits only part of it), and replace its manifest."""
from __future__ import annotations

import msgspec
import zstandard

from dicomvault.formats.bkp.layout import FRAME, FRAME_MANIFEST, pack_footer, pack_frame_header, xxh3
from dicomvault.formats.bkp.manifest import FEATURE_PAGES, AttachmentEntry, InstanceEntry, Manifest
from dicomvault.formats.bkp.reader import BkpReader
from dicomvault.formats.bkp.writer import BkpWriter


def repack(src, dst, *, frame_size: int = 64 << 10, passphrase=None, kdf_log2_n=17):  # type: ignore[no-untyped-def]
    """Copy ``src`` to ``dst`` with data frames of ``frame_size`` bytes
    (encrypted with ``passphrase`` when given)."""
    reader = BkpReader(src)
    try:
        m = reader.manifest
        writer = BkpWriter(dst, writer="dicomvault tests (repack)", frame_size=frame_size,
                           passphrase=passphrase, kdf_log2_n=kdf_log2_n)
        instances, attachments = [], []
        for e in sorted(reader.iter_instances(), key=lambda e: e.blob.offset):
            with reader.open_blob(e.blob) as fh:
                instances.append(InstanceEntry(e.record, writer.add_blob(fh)))
        for a in m.attachments:
            with reader.open_blob(a.blob) as fh:
                attachments.append(AttachmentEntry(a.record, writer.add_blob(fh)))
        # every instance in the manifest: a repacked file has no pages (the writer adds them back
        # only when it writes them)
        new = msgspec.structs.replace(m, frames=[], instances=instances, attachments=attachments,
                                      created="", pages=msgspec.UNSET,
                                      required_features=[f for f in m.required_features
                                                         if f != FEATURE_PAGES])
        assert isinstance(new, Manifest)
        return writer.finish(new)
    finally:
        reader.close()


def reseal_manifest(data: bytes, edit) -> bytes:  # type: ignore[no-untyped-def]
    """``data`` with its manifest replaced by ``edit(manifest as builtins)``, stored uncompressed."""
    manifest_at = int.from_bytes(data[-64:-56], "little")
    reader_m = msgspec.msgpack.decode(_manifest_bytes(data, manifest_at))
    edit(reader_m)
    raw = msgspec.msgpack.encode(reader_m)
    body = data[:manifest_at]
    nframes = int.from_bytes(data[-48:-40], "little")
    frame = pack_frame_header(FRAME_MANIFEST, 0, nframes, len(raw), len(raw), xxh3(raw)) + raw
    return body + frame + pack_footer(manifest_at, FRAME.size + len(raw), nframes, data[16:32])


def _manifest_bytes(data: bytes, at: int) -> bytes:
    _magic, _t, codec, _r, _seq, stored, raw, _p, _h = FRAME.unpack(data[at:at + FRAME.size])
    payload = data[at + FRAME.size:at + FRAME.size + stored]
    return zstandard.ZstdDecompressor().decompress(payload, max_output_size=raw) if codec == 1 else payload
