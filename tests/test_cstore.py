"""C-Store: sending to real DCMTK storescp and Orthanc, byte for byte, and to
an in-process pynetdicom SCP that answers with injected statuses, timeouts,
aborts and refusals."""
from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from pathlib import Path

import numpy as np
import pydicom
import pytest

from cstore_helpers import craft, dataset_bytes, outcomes, pynetdicom_scp, stored_files
from dicomvault.plugins.dimse.contexts import MAX_CONTEXTS, ContextPlan
from dicomvault.plugins.dimse.status import describe, verdict

DEFLATED = "1.2.840.10008.1.2.1.99"
CT = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return Path(os.environ["DICOMVAULT_DB"])


def _import(cli, *folders: Path) -> None:  # type: ignore[no-untyped-def]
    res = cli("import-dicom", "-q", "--json", *folders)
    assert res.code in (0, 1), res.err


def _same_on_the_wire(sent: bytes, got: bytes, ts: str) -> bool:
    # an odd-length deflated stream goes out padded with one null byte (PS3.5 A.5)
    return got == sent or (ts == DEFLATED and len(sent) % 2 == 1 and got == sent + b"\0")


# ---------------------------------------------------------------------- real peers
def test_storescp_receives_every_instance_byte_identical(cli, db, pydicom_files, tmp_path):  # type: ignore[no-untyped-def]
    from peers import storescp

    _import(cli, pydicom_files)
    stored = stored_files(db)
    assert len(stored) > 100
    with storescp(tmp_path / "scp", args="+B") as scp:  # +B: storescp writes what arrives as is
        res = cli("cstore", "--json", "--to", f"{scp.aet}@127.0.0.1:{scp.port}", "--whole")
        assert res.code == 0, res.out + res.err
        report = res.json()
        received = {p.name.split(".", 1)[1]: p for p in scp.received.iterdir()}
    assert report["counts"]["instance"] == {"stored": len(stored)}
    assert set(received) == set(stored)
    for uid, (path, ts, _cls) in stored.items():
        assert _same_on_the_wire(dataset_bytes(path), dataset_bytes(received[uid]), ts), uid
        assert pydicom.dcmread(received[uid], stop_before_pixels=True).file_meta.TransferSyntaxUID == ts


def _orthanc_get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read()  # type: ignore[no-any-return]


def test_orthanc_counts_and_files_match(cli, db, pydicom_files, orthanc_server):  # type: ignore[no-untyped-def]
    _import(cli, pydicom_files)
    stored = stored_files(db)
    res = cli("cstore", "--json", "--to", f"{orthanc_server.aet}@127.0.0.1:{orthanc_server.dicom_port}",
              "--whole", "--associations", "2")
    report = res.json()
    got = report["counts"]["instance"]
    problems = outcomes(report)
    # Every instance gets an outcome; whatever Orthanc refused is named with its status.
    assert sum(got.values()) == len(stored)
    assert res.code == (1 if got.get("failed") else 0)
    for uid, (outcome, reason) in problems.items():
        assert outcome in ("failed", "stored-with-warning") and reason, uid
    ok = [uid for uid in stored if uid not in problems]
    assert len(ok) >= 100
    stats = json.loads(_orthanc_get(orthanc_server.url + "/statistics"))
    assert stats["CountInstances"] == got.get("stored", 0) + got.get("stored-with-warning", 0)
    ids = json.loads(_orthanc_get(orthanc_server.url + "/instances"))
    by_uid = {}
    for oid in ids:
        tags = json.loads(_orthanc_get(f"{orthanc_server.url}/instances/{oid}/simplified-tags"))
        by_uid[tags["SOPInstanceUID"]] = oid
    assert set(ok) <= set(by_uid)
    identical = 0
    for uid in ok:
        path, ts, _ = stored[uid]
        copy = db.parent / "orthanc.dcm"
        copy.write_bytes(_orthanc_get(f"{orthanc_server.url}/instances/{by_uid[uid]}/file"))
        if _same_on_the_wire(dataset_bytes(path), dataset_bytes(copy), ts):
            identical += 1
            continue
        # Orthanc re-serialises some files through DCMTK (group lengths recomputed, lengths and
        # odd encapsulated fragments rewritten): then every element must still be the same, and
        # the pixel data byte for byte or, encapsulated, the same decoded pixels.
        a, b = pydicom.dcmread(path, force=True), pydicom.dcmread(copy, force=True)
        for ds in (a, b):
            for tag in [t for t in ds.keys() if t.element == 0]:
                del ds[tag]
        pixels_a, pixels_b = a.pop(0x7FE00010, None), b.pop(0x7FE00010, None)
        assert a == b, (uid, [str(t) for t in a.keys() if t not in b or a[t] != b[t]])
        if pixels_a is not None and pixels_a.value != pixels_b.value:
            assert a.file_meta.TransferSyntaxUID.is_compressed, uid
            a.PixelData, b.PixelData = pixels_a.value, pixels_b.value
            assert np.array_equal(a.pixel_array, b.pixel_array), uid
    assert identical >= 0.8 * len(ok)


def test_more_than_128_sop_classes_all_arrive(cli, db, pydicom_files, tmp_path):  # type: ignore[no-untyped-def]
    from peers import storescp

    uids = craft(pydicom_files / "CT_small.dcm", tmp_path / "many", 150, sop_classes=True)
    _import(cli, tmp_path / "many")
    with storescp(tmp_path / "scp", args="+B") as scp:  # -pm: any SOP class
        res = cli("cstore", "--json", "--to", f"{scp.aet}@127.0.0.1:{scp.port}", "--whole")
        assert res.code == 0, res.out + res.err
        received = {p.name.split(".", 1)[1] for p in scp.received.iterdir()}
    report = res.json()
    assert report["counts"]["instance"] == {"stored": 150}
    assert received == set(uids)
    assert report["details"]["associations"] == 3  # 2 contexts a class, 64 classes an association


def test_context_plan_groups_classes_within_128() -> None:
    pairs = [(f"1.2.3.{i}", "1.2.840.10008.1.2.4.70") for i in range(100)]
    pairs += [("1.2.3.0", "1.2.840.10008.1.2.1")]
    plan = ContextPlan(pairs)
    assert len(plan) == 2
    for g in range(len(plan)):
        ctxs = plan.contexts(g)
        assert len(ctxs) <= MAX_CONTEXTS
    first = plan.contexts(plan.group_of["1.2.3.0"])
    mine = [c for c in first if c[0] == "1.2.3.0"]
    # the file's own syntaxes alone, plus the uncompressed fallback
    assert mine == [("1.2.3.0", ["1.2.840.10008.1.2.1"]), ("1.2.3.0", ["1.2.840.10008.1.2.4.70"]),
                    ("1.2.3.0", ["1.2.840.10008.1.2"])]
    before = plan.version[0]
    plan.group_for("1.2.3.1", "1.2.840.10008.1.2.5")  # grown later: the group is renegotiated
    assert plan.version[plan.group_of["1.2.3.1"]] != before or plan.group_of["1.2.3.1"] != 0


def test_status_verdicts() -> None:
    assert verdict(0) == "success"
    for code in (0xB000, 0xB006, 0xB007, 0x0111, 0x0001):
        assert verdict(code) == "warning"
    for code in (0xA700, 0xA900, 0xC000, 0x0122, 0x0124, 0x0110, 0x0117):
        assert verdict(code) == "failure"
    assert describe(0xA701) == "status 0xA701 (out of resources)"


# ---------------------------------------------------------------------- injected statuses
STATUSES = {1: 0x0000, 2: 0xB000, 3: 0xB006, 4: 0xB007, 5: 0x0111, 6: 0xA700, 7: 0xC123, 8: 0x0122}


def test_statuses_map_to_outcomes(cli, db, pydicom_files, tmp_path):  # type: ignore[no-untyped-def]
    uids = craft(pydicom_files / "CT_small.dcm", tmp_path / "in", len(STATUSES))
    _import(cli, tmp_path / "in")
    answers = {uid: STATUSES[i + 1] for i, uid in enumerate(uids)}

    with pynetdicom_scp(lambda e: answers[e.request.AffectedSOPInstanceUID]) as scp:
        res = cli("cstore", "--json", "--to", f"TESTSCP@127.0.0.1:{scp.port}", "--whole")
    report = res.json()
    assert res.code == 1  # something failed
    assert report["counts"]["instance"] == {"stored": 1, "stored-with-warning": 4, "failed": 3}
    got = outcomes(report)
    assert uids[0] not in got
    for i, uid in enumerate(uids[1:5], start=2):
        assert got[uid][0] == "stored-with-warning"
        assert f"0x{STATUSES[i]:04X}" in got[uid][1]
    assert "coercion of data elements" in got[uids[1]][1]
    assert got[uids[5]] == ("failed", "status 0xA700 (out of resources)")
    assert got[uids[6]] == ("failed", "status 0xC123 (cannot understand)")
    assert got[uids[7]] == ("failed", "status 0x0122 (SOP class not supported)")


def test_dicom_url_target_warning_is_not_stored(cli, db, pydicom_files, tmp_path):  # type: ignore[no-untyped-def]
    uids = craft(pydicom_files / "CT_small.dcm", tmp_path / "in", 2)
    _import(cli, tmp_path / "in")
    with pynetdicom_scp(lambda e: 0xB000 if e.request.AffectedSOPInstanceUID == uids[1] else 0) as scp:
        res = cli("transfer", "--json", "--whole", "--to", f"dicom://TESTSCP@127.0.0.1:{scp.port}?aet=ME")
    report = res.json()
    assert res.code == 0
    assert report["counts"]["instance"] == {"stored": 1, "stored-with-warning": 1}
    assert report["counts"]["attributes"] if "attributes" in report["counts"] else True


def test_slow_answer_abort_and_the_rest_goes_on(cli, db, pydicom_files, tmp_path):  # type: ignore[no-untyped-def]
    uids = craft(pydicom_files / "CT_small.dcm", tmp_path / "in", 4)
    _import(cli, tmp_path / "in")

    def handler(event):  # type: ignore[no-untyped-def]
        uid = event.request.AffectedSOPInstanceUID
        if uid == uids[1]:
            time.sleep(1.5)  # past the DIMSE timeout
        if uid == uids[2]:
            event.assoc.abort()
            return 0x0000
        return 0x0000

    with pynetdicom_scp(handler) as scp:
        res = cli("cstore", "--json", "--to", f"TESTSCP@127.0.0.1:{scp.port}", "--whole",
                  "--timeout-dimse", "0.5")
        associations = scp.associations
    report = res.json()
    got = outcomes(report)
    assert res.code == 1
    assert report["counts"]["instance"] == {"stored": 2, "failed": 2}
    assert "DIMSE timeout" in got[uids[1]][1]
    assert "aborted" in got[uids[2]][1] or "closed" in got[uids[2]][1]
    assert uids[0] not in got and uids[3] not in got
    assert associations == 3  # a new association after the timeout and after the abort


def test_rejected_association_fails_instances_not_the_job(cli, db, pydicom_files, tmp_path):  # type: ignore[no-untyped-def]
    craft(pydicom_files / "CT_small.dcm", tmp_path / "in", 3)
    _import(cli, tmp_path / "in")
    with pynetdicom_scp(require_calling=["SOMEONE"]) as scp:
        started = time.monotonic()
        res = cli("cstore", "--json", "--to", f"TESTSCP@127.0.0.1:{scp.port}", "--whole")
        took = time.monotonic() - started
    report = res.json()
    assert res.code == 2 and not report["aborted"]
    assert report["counts"]["instance"] == {"failed": 3}
    reasons = {r for _, r in outcomes(report).values()}
    assert reasons == {"association rejected permanently by the server: calling AE title not recognized"}
    assert took < 5  # a permanent refusal is not retried


def test_unreachable_server_is_retried_with_backoff(cli, db, pydicom_files, tmp_path):  # type: ignore[no-untyped-def]
    craft(pydicom_files / "CT_small.dcm", tmp_path / "in", 2)
    _import(cli, tmp_path / "in")
    with pynetdicom_scp() as scp:
        port = scp.port  # then closed: nobody listens there
    started = time.monotonic()
    res = cli("cstore", "--json", "--to", f"TESTSCP@127.0.0.1:{port}", "--whole", "--retries", "2",
              "--retry-wait", "0.2")
    took = time.monotonic() - started
    report = res.json()
    assert report["counts"]["instance"] == {"failed": 2}
    reasons = {r for _, r in outcomes(report).values()}
    assert len(reasons) == 1 and "(after 3 attempts)" in reasons.pop()
    assert 0.6 <= took < 5  # 0.2 + 0.4 s of backoff, once for the whole group


# ---------------------------------------------------------------------- transcoding
COMPRESSED = ["MR_small_RLE.dcm", "SC_rgb_jpeg_gdcm.dcm", "693_J2KI.dcm",
              "rtdose_rle.dcm", "SC_rgb_jpeg_dcmtk.dcm"]


def test_compressed_to_uncompressed_only_server_arrives_with_identical_pixels(  # type: ignore[no-untyped-def]
        cli, db, pydicom_files, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in COMPRESSED:
        (folder / name).write_bytes((pydicom_files / name).read_bytes())
    _import(cli, folder)
    stored = stored_files(db)
    assert len(stored) == len(COMPRESSED)
    plain = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]
    with pynetdicom_scp(syntaxes=plain) as scp:
        never = cli("cstore", "--json", "--to", f"TESTSCP@127.0.0.1:{scp.port}", "--whole",
                    "--transcode", "never")
        assert never.code == 2
        assert not scp.received
        assert all("--transcode is never" in r for _, r in outcomes(never.json()).values())
        res = cli("cstore", "--json", "--to", f"TESTSCP@127.0.0.1:{scp.port}", "--whole")
    report = res.json()
    assert res.code == 0, res.out
    assert report["counts"]["instance"] == {"converted": len(COMPRESSED)}
    assert report["details"]["converted"] == len(COMPRESSED)
    for uid, (path, _ts, _cls) in stored.items():
        got = scp.received[uid]
        assert scp.syntaxes[uid] in plain
        orig = pydicom.dcmread(path)
        assert np.array_equal(orig.pixel_array, got.pixel_array), uid
        assert got.SOPInstanceUID == orig.SOPInstanceUID


def test_move_never_deletes_what_arrived_converted(cli, db, pydicom_files, tmp_path):  # type: ignore[no-untyped-def]
    """A server that takes only uncompressed data gets decompressed copies: the values are the
    same, the bytes are not, so move keeps the originals and lists them."""
    folder = tmp_path / "in"
    folder.mkdir()
    for name in [*COMPRESSED, "CT_small.dcm"]:
        (folder / name).write_bytes((pydicom_files / name).read_bytes())
    _import(cli, folder)
    before = stored_files(db)
    plain = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]
    with pynetdicom_scp(syntaxes=plain) as scp:
        res = cli("move", "--json", "--to", f"dicom://TESTSCP@127.0.0.1:{scp.port}", "--whole")
    report = res.json()
    assert report["counts"]["instance"] == {"converted": len(COMPRESSED), "stored": 1}, res.out
    after = stored_files(db)
    assert len(after) == len(COMPRESSED)  # only the one sent byte for byte left the source
    assert set(report["details"]["left in source"]) == set(after) and set(after) < set(before)
    assert res.code == 1  # partly done: something stayed behind


def test_compressed_sent_as_is_when_accepted(cli, db, pydicom_files, tmp_path):  # type: ignore[no-untyped-def]
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.dcm").write_bytes((pydicom_files / "MR_small_RLE.dcm").read_bytes())
    _import(cli, folder)
    with pynetdicom_scp() as scp:
        res = cli("cstore", "--json", "--to", f"TESTSCP@127.0.0.1:{scp.port}", "--whole")
    assert res.code == 0
    assert "converted" not in res.json()["details"]
    assert set(scp.syntaxes.values()) == {"1.2.840.10008.1.2.5"}


# ---------------------------------------------------------------------- the rest
def test_cstore_from_a_bkp_and_parallel_associations(cli, db, pydicom_files, tmp_path):  # type: ignore[no-untyped-def]
    craft(pydicom_files / "CT_small.dcm", tmp_path / "in", 12)
    _import(cli, tmp_path / "in")
    assert cli("export-db", tmp_path / "x.bkp", "--whole", "-q").code == 0
    with pynetdicom_scp() as scp:
        res = cli("cstore", "--json", "--to", f"TESTSCP@127.0.0.1:{scp.port}", "--from",
                  tmp_path / "x.bkp", "--whole", "--associations", "3")
        assert res.code == 0, res.out + res.err
        assert len(scp.received) == 12
        assert scp.associations == 3
    assert res.json()["details"]["associations"] == 3


def test_ctrl_c_stops_cleanly_with_a_report(cli, db, pydicom_files, tmp_path):  # type: ignore[no-untyped-def]
    uids = craft(pydicom_files / "CT_small.dcm", tmp_path / "in", 6)
    _import(cli, tmp_path / "in")

    def handler(event):  # type: ignore[no-untyped-def]
        if event.request.AffectedSOPInstanceUID == uids[1]:
            os.kill(os.getpid(), signal.SIGINT)
        return 0x0000

    with pynetdicom_scp(handler) as scp:
        res = cli("cstore", "--json", "--to", f"TESTSCP@127.0.0.1:{scp.port}", "--whole")
    report = res.json()
    assert res.code == 2
    assert report["aborted"].startswith("interrupted (Ctrl-C)")
    sent = report["counts"]["instance"]["stored"]
    assert 2 <= sent < 6 and f"{6 - sent} instance(s) not sent" in report["aborted"]


@pytest.mark.parametrize("address", ["STORESCP@localhost", "@host:104", "A" * 17 + "@h:1", "X@h:0",
                                     "X@h:99999"])
def test_bad_addresses_are_usage_errors(cli, address):  # type: ignore[no-untyped-def]
    res = cli("cstore", "--to", address, "--whole")
    assert res.code == 64 and "error:" in res.err


def test_tls(cli, db, pydicom_files, tmp_path):  # type: ignore[no-untyped-def]
    import ssl

    from cstore_tls import make_pki

    pki = make_pki(tmp_path / "pki")
    craft(pydicom_files / "CT_small.dcm", tmp_path / "in", 3)
    _import(cli, tmp_path / "in")
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(pki["server_cert"], pki["server_key"])
    server.load_verify_locations(cafile=pki["ca"])
    server.verify_mode = ssl.CERT_REQUIRED
    with pynetdicom_scp(ssl_context=server) as scp:
        res = cli("cstore", "--json", "--to", f"TESTSCP@127.0.0.1:{scp.port}", "--whole", "--tls",
                  "--tls-ca", pki["ca"], "--tls-cert", pki["client_cert"], "--tls-key", pki["client_key"])
        assert res.code == 0, res.out + res.err
        assert len(scp.received) == 3
        # without our certificate the server refuses the handshake: failed, not a crash
        res2 = cli("cstore", "--json", "--to", f"TESTSCP@127.0.0.1:{scp.port}", "--whole", "--tls",
                   "--tls-ca", pki["ca"], "--retries", "0")
    assert res2.code == 2
    assert res2.json()["counts"]["instance"] == {"failed": 3}


def test_parallel_to_a_server_taking_one_association_still_sends_all(  # type: ignore[no-untyped-def]
        cli, db, pydicom_files, tmp_path):
    from peers import storescp

    uids = craft(pydicom_files / "CT_small.dcm", tmp_path / "in", 20)
    _import(cli, tmp_path / "in")
    with storescp(tmp_path / "scp") as scp:  # no --fork: one association at a time
        res = cli("cstore", "--json", "--to", f"{scp.aet}@127.0.0.1:{scp.port}", "--whole",
                  "--associations", "2", "--timeout-acse", "1")
        received = {p.name.split(".", 1)[1] for p in scp.received.iterdir()}
    report = res.json()
    assert res.code == 0, res.out
    assert report["counts"]["instance"] == {"stored": 20}
    assert received == set(uids)
    assert report["details"]["associations the server did not take"] == 1
