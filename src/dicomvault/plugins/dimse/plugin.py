"""The ``cstore`` command and the ``dicom://`` target kind."""
from __future__ import annotations

import argparse
import signal
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from dicomvault.engine import (
    AttachmentRecord,
    Attributes,
    Context,
    Item,
    Kind,
    Opener,
    Operation,
    Rejected,
    Report,
    Selection,
    Source,
    UsageError,
    hookimpl,
    transfer,
)
from dicomvault.engine.options import add_selection_options, selection_from
from dicomvault.engine.passphrase import add_passphrase_options

from .address import check_aet, is_dicom_url, parse_address, parse_dicom_url
from .association import Peer, Timeouts
from .contexts import ContextPlan
from .target import DicomTarget, ParallelDicomTarget, SendOptions

if TYPE_CHECKING:
    import ssl

MAX_ASSOCIATIONS = 4  # the run loop's worker threads


def make_target(peer: Peer, options: SendOptions, plan: ContextPlan | None = None) -> DicomTarget:
    cls = ParallelDicomTarget if options.associations > 1 else DicomTarget
    return cls(peer, options, plan)


def tls_context(ca: str | None, cert: str | None, key: str | None) -> ssl.SSLContext:
    """A client context: the server's certificate is checked against ``ca``
    (else the system's CAs); ours is presented when given. Host names are not
    checked (DICOM servers are mostly addressed by IP), the chain is."""
    import ssl  # here: only TLS needs it, and loading it costs every command at start
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        if ca:
            ctx.load_verify_locations(cafile=ca)
        else:
            ctx.load_default_certs()
        if cert:
            ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"TLS setup failed: {exc}") from exc
    return ctx


class _Planned:
    """The selection, scanned once ahead (records only, memory stays flat) so
    that presentation contexts can be planned; then read again once per
    association group, so each group's instances go out together. Stops
    handing out items when Ctrl-C is pressed (those in flight still get
    their outcome)."""

    def __init__(self, source: Source, selection: Selection) -> None:
        self.source = source
        self.description = source.description
        pairs = set()
        self.total = 0
        for it in source.instances(selection):
            if isinstance(it, Item):
                self.total += 1
                if it.instance.sop_class_uid and it.instance.transfer_syntax:
                    pairs.add((it.instance.sop_class_uid, it.instance.transfer_syntax))
        self.plan = ContextPlan(sorted(pairs))
        self.stop = threading.Event()
        self.sent = 0

    @property
    def left(self) -> int:
        return self.total - self.sent

    def instances(self, selection: Selection) -> Iterator[Item | Rejected]:
        groups = len(self.plan)
        for group in range(max(groups, 1)):
            for it in self.source.instances(selection):
                if self.stop.is_set():
                    return
                if isinstance(it, Rejected):
                    if group == 0:
                        yield it
                    continue
                # unknown classes (no record of it) go with the first pass; sent as found
                mine = self.plan.group_of.get(it.instance.sop_class_uid, 0)
                if groups > 1 and mine != group:
                    continue
                self.sent += 1
                yield it

    def attributes(self, selection: Selection) -> Iterator[Attributes]:
        return iter(())

    def attachments(self, selection: Selection) -> Iterator[tuple[AttachmentRecord, Opener]]:
        return iter(())

    def close(self) -> None:
        pass


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--to", dest="target", metavar="AET@HOST:PORT", required=True,
                   help="the DICOM server: its AE title, host and port")
    p.add_argument("--aet", default="DICOMVAULT", help="our AE title (default: DICOMVAULT)")
    p.add_argument("--from", dest="source", metavar="URL",
                   help="where to read from: the database (default, --db) or a .bkp file")
    add_selection_options(p)
    add_passphrase_options(p)
    p.add_argument("--transcode", choices=["auto", "never"], default="auto",
                   help="when the server does not take a file's transfer syntax: convert it losslessly "
                        "to an uncompressed one (auto, default) or fail the instance (never)")
    p.add_argument("--associations", type=int, default=1, metavar="N",
                   help=f"send over N parallel associations (1 to {MAX_ASSOCIATIONS}, default 1)")
    p.add_argument("--retries", type=int, default=3, metavar="N",
                   help="further attempts when an association cannot be made (default 3)")
    p.add_argument("--retry-wait", type=float, default=1.0, metavar="SECONDS",
                   help="first wait before a retry, doubled each time (default 1)")
    p.add_argument("--timeout-network", type=float, default=30.0, metavar="SECONDS",
                   help="TCP connect timeout (default 30)")
    p.add_argument("--timeout-acse", type=float, default=30.0, metavar="SECONDS",
                   help="association request and release timeout (default 30)")
    p.add_argument("--timeout-dimse", type=float, default=60.0, metavar="SECONDS",
                   help="wait at most this long for each C-STORE response (default 60)")
    p.add_argument("--tls", action="store_true", help="DICOM over TLS")
    p.add_argument("--tls-ca", metavar="FILE", help="CA certificate(s) to check the server against")
    p.add_argument("--tls-cert", metavar="FILE", help="our certificate (PEM)")
    p.add_argument("--tls-key", metavar="FILE", help="our private key (PEM)")


def _run(ctx: Context, args: argparse.Namespace) -> Report:
    called, host, port = parse_address(args.target)
    if not 1 <= args.associations <= MAX_ASSOCIATIONS:
        raise UsageError(f"--associations must be 1 to {MAX_ASSOCIATIONS}")
    if args.retries < 0 or args.retry_wait < 0:
        raise UsageError("--retries and --retry-wait cannot be negative")
    if (args.tls_ca or args.tls_cert or args.tls_key) and not args.tls:
        raise UsageError("--tls-ca, --tls-cert and --tls-key need --tls")
    tls = tls_context(args.tls_ca, args.tls_cert, args.tls_key) if args.tls else None
    peer = Peer(called, host, port, check_aet(args.aet, "calling AE title (--aet)"),
                Timeouts(args.timeout_network, args.timeout_acse, args.timeout_dimse), tls)
    options = SendOptions(transcode=args.transcode == "auto", associations=args.associations,
                          retries=args.retries, retry_wait=args.retry_wait)
    db = ctx.open_database() if args.source is None or args.selected else None
    selection = selection_from(args, db)
    source = db.source() if args.source is None and db is not None else ctx.open_source(args.source)
    try:
        planned = _Planned(source, selection)
        target = make_target(peer, options, planned.plan)
        previous: Any = None
        if threading.current_thread() is threading.main_thread():
            def interrupted(signum: int, frame: object) -> None:
                planned.stop.set()
                signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once
            previous = signal.signal(signal.SIGINT, interrupted)
        try:
            report = transfer(ctx, planned, target, selection, operation="cstore",
                              total=planned.total)
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
    finally:
        source.close()
    if planned.stop.is_set():
        report.aborted = f"interrupted (Ctrl-C): {planned.left} instance(s) not sent"
    report.details["from"] = source.description
    report.details["to"] = target.description
    report.details["associations"] = target.stats["associations"]
    if target.stats["given up"]:
        report.details["associations the server did not take"] = target.stats["given up"]
    if target.stats["converted"]:
        report.details["converted"] = target.stats["converted"]
    if report.seconds:
        report.details["files/s"] = round(report.done / report.seconds, 1)
    return report


def _open_target(url: str, ctx: Context) -> DicomTarget:
    called, host, port, opts = parse_dicom_url(url)
    try:
        associations = int(opts.get("associations", 1))
        options = SendOptions(transcode=opts.get("transcode", "auto") != "never",
                              associations=associations, retries=int(opts.get("retries", 3)),
                              retry_wait=float(opts.get("retry-wait", 1)))
        timeouts = Timeouts(float(opts.get("timeout-network", 30)), float(opts.get("timeout-acse", 30)),
                            float(opts.get("timeout-dimse", 60)))
    except ValueError as exc:
        raise UsageError(f"bad option value in {url}: {exc}") from exc
    if not 1 <= associations <= MAX_ASSOCIATIONS:
        raise UsageError(f"associations must be 1 to {MAX_ASSOCIATIONS}")
    peer = Peer(called, host, port, check_aet(opts.get("aet", "DICOMVAULT"), "calling AE title"), timeouts)
    return make_target(peer, options)


@hookimpl
def dicomvault_register_targets() -> list[Kind]:
    return [Kind(name="dicom", description="a DICOM server, sent to by C-STORE "
                 "(dicom://AET@HOST:PORT[?aet=OURS&associations=N&transcode=never])",
                 matches=is_dicom_url, open=_open_target)]


@hookimpl
def dicomvault_register_operations() -> list[Operation]:
    return [Operation(name="cstore", help="send a selection to a DICOM server (C-STORE), byte for byte",
                      configure=_configure, run=_run)]
