"""One association with a DICOM server, synchronous: negotiate, send C-STORE
requests one at a time (the data set streamed from the file, byte for byte),
release or abort. TCP_NODELAY is set; TLS when a context is given."""
from __future__ import annotations

import hashlib
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO

from . import dimse, pdu

if TYPE_CHECKING:
    import ssl

FRAGMENT_CAP = 1 << 20  # our largest P-DATA fragment when the server sets no limit


class AssociationError(Exception):
    """The association could not be made. ``permanent``: retrying will not help."""

    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class LinkError(Exception):
    """The association broke during an operation (abort, timeout, closed socket)."""


class ChecksumMismatch(Exception):
    """The bytes read differ from the recorded SHA-256; the request was aborted
    before its last fragment, so the server never got a complete data set."""


@dataclass(frozen=True)
class Timeouts:
    network: float = 30.0  # TCP connect
    acse: float = 30.0  # association request, release
    dimse: float = 60.0  # a C-STORE response


@dataclass(frozen=True)
class Peer:
    called: str
    host: str
    port: int
    calling: str = "DICOMVAULT"
    timeouts: Timeouts = field(default_factory=Timeouts)
    tls: ssl.SSLContext | None = None
    max_pdu: int = 1 << 20  # what we accept; we only ever receive small responses

    def __str__(self) -> str:
        return f"{self.called}@{self.host}:{self.port}"


class Association:
    """Use :meth:`open`; then :meth:`store` as often as needed; then
    :meth:`release` (or :meth:`abort`)."""

    def __init__(self, sock: socket.socket, peer: Peer, proposed: dict[int, tuple[str, list[str]]],
                 accepted: pdu.Accepted) -> None:
        self.sock = sock
        self.peer = peer
        self.proposed = proposed
        self.accepted = accepted
        # fragments of even length: DICOM values are even, and some servers refuse odd fragments
        limit = accepted.max_pdu - 6 if accepted.max_pdu > 16 else FRAGMENT_CAP
        self.fragment = min(limit, FRAGMENT_CAP) & ~1
        self.by_pair: dict[tuple[str, str], int] = {}
        self.refused: dict[str, str] = {}  # SOP class -> why no context for it was accepted
        for cid, (abstract, _syntaxes) in proposed.items():
            result, ts = accepted.results.get(cid, (2, ""))
            if result == 0 and ts:
                self.by_pair.setdefault((abstract, ts), cid)
            else:
                self.refused.setdefault(abstract, pdu.CONTEXT_RESULTS.get(result, f"result {result}"))
        self.message_id = 0
        self.alive = True
        import ssl  # here, as below: loading it costs every command at start, and only C-STORE needs it
        self._plain = not isinstance(sock, ssl.SSLSocket)

    # ------------------------------------------------------------------ setting up
    @classmethod
    def open(cls, peer: Peer, contexts: Sequence[tuple[str, list[str]]]) -> Association:
        """Connect and negotiate ``contexts`` (abstract syntax, transfer syntaxes), at most 128."""
        if not 0 < len(contexts) <= 128:
            raise ValueError(f"{len(contexts)} presentation contexts: 1 to 128 per association")
        import ssl
        proposed = {2 * i + 1: (abstract, list(syntaxes)) for i, (abstract, syntaxes) in enumerate(contexts)}
        try:
            raw = socket.create_connection((peer.host, peer.port), timeout=peer.timeouts.network)
        except OSError as exc:
            raise AssociationError(f"cannot connect to {peer.host}:{peer.port}: "
                                   f"{exc.strerror or type(exc).__name__}") from exc
        sock: socket.socket = raw
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if peer.tls is not None:
                sock = peer.tls.wrap_socket(raw, server_hostname=peer.host)
            sock.settimeout(peer.timeouts.acse)
            sock.sendall(pdu.associate_rq(peer.called, peer.calling,
                                          [(cid, a, s) for cid, (a, s) in proposed.items()], peer.max_pdu))
            kind, body = _read_pdu(sock)
        except ssl.SSLError as exc:
            _close(sock)
            raw.close()
            raise AssociationError(f"TLS handshake with {peer.host}:{peer.port} failed: "
                                   f"{exc.reason or exc}", permanent=True) from exc
        except TimeoutError as exc:
            _close(sock)
            raise AssociationError(f"no answer to the association request within "
                                   f"{peer.timeouts.acse:g} s (ACSE timeout)") from exc
        except (OSError, LinkError) as exc:
            _close(sock)
            raise AssociationError(f"the association request failed: {exc}") from exc
        if kind == pdu.A_ASSOCIATE_AC:
            return cls(sock, peer, proposed, pdu.parse_associate_ac(body))
        _close(sock)
        if kind == pdu.A_ASSOCIATE_RJ:
            text, permanent = pdu.describe_reject(body)
            raise AssociationError(text, permanent=permanent)
        if kind == pdu.A_ABORT:
            raise AssociationError(pdu.describe_abort(body))
        raise AssociationError(f"unexpected answer to the association request (PDU type {kind})")

    def context_for(self, sop_class: str, ts: str) -> int | None:
        return self.by_pair.get((sop_class, ts))

    def accepted_syntaxes(self, sop_class: str) -> list[str]:
        return [ts for (a, ts) in self.by_pair if a == sop_class]

    # ------------------------------------------------------------------ C-STORE
    def store(self, cid: int, sop_class: str, sop_uid: str, data: BinaryIO | bytes,
              prefix: bytes = b"", expected_sha256: str = "") -> tuple[int, str]:
        """Send one C-STORE request; returns (status, error comment).

        ``data`` is the data set (a stream positioned at its start, or bytes).
        With ``expected_sha256``, ``prefix`` (the bytes of the file before the
        data set) and the data set are hashed while they go out, and the last
        fragment is held back until the hash matches."""
        self.message_id = (self.message_id % 0xFFFF) + 1
        command = dimse.c_store_rq(self.message_id, sop_class, sop_uid)
        digest = hashlib.sha256(prefix) if expected_sha256 else None
        frag = self.fragment
        try:
            self.sock.settimeout(self.peer.timeouts.dimse)
            pending: bytes | memoryview
            if isinstance(data, bytes | bytearray):
                view = memoryview(data)
                chunks = (view[i:i + frag] for i in range(0, len(view), frag))
                pending = next(chunks, b"")
                read = lambda: next(chunks, b"")  # noqa: E731
            else:
                read = lambda: data.read(frag)  # noqa: E731
                pending = read()
            first = True
            total = 0
            while True:
                nxt = read()
                if not nxt:
                    break
                total += len(pending)
                if digest is not None:
                    digest.update(pending)
                self._send_pdata(cid, pending, last=False, command=command if first else None)
                first = False
                pending = nxt
            if digest is not None:
                digest.update(pending)
                if digest.hexdigest() != expected_sha256:
                    self.abort()
                    raise ChecksumMismatch("the bytes read do not match their SHA-256 (stored copy "
                                           "damaged?); not sent (the request was aborted before its end)")
            if (total + len(pending)) % 2:
                # An odd-length data set (a deflated stream stored unpadded): PS3.5 A.5 pads the
                # deflated bit stream with one null byte to an even length.
                pending = bytes(pending) + b"\0"
            self._send_pdata(cid, pending, last=True, command=command if first else None)
            return self._response()
        except TimeoutError as exc:
            self.abort()
            raise LinkError(f"no response within {self.peer.timeouts.dimse:g} s (DIMSE timeout); "
                            "association aborted") from exc
        except (OSError, LinkError) as exc:
            self._lost()
            raise exc if isinstance(exc, LinkError) else LinkError(f"connection lost: {exc}") from exc

    def _send_pdata(self, cid: int, chunk: bytes | memoryview, *, last: bool, command: bytes | None) -> None:
        parts: list[bytes | memoryview] = []
        if command is not None:
            parts += [pdu.pdata_head(cid, 0x03, len(command)), command]
        parts += [pdu.pdata_head(cid, 0x02 if last else 0x00, len(chunk)), chunk]
        if self._plain:
            total = sum(len(p) for p in parts)
            sent = self.sock.sendmsg(parts)
            if sent < total:  # rare: finish what sendmsg left
                self.sock.sendall(b"".join(bytes(p) for p in parts)[sent:])
        else:
            self.sock.sendall(b"".join(parts))

    def _response(self) -> tuple[int, str]:
        command = bytearray()
        while True:
            kind, body = _read_pdu(self.sock)
            if kind == pdu.P_DATA_TF:
                done = False
                for _cid, control, data in pdu.iter_pdvs(body):
                    if control & 0x01:
                        command += data
                        done = done or bool(control & 0x02)
                if done:
                    break
            elif kind == pdu.A_ABORT:
                self._lost()
                raise LinkError(pdu.describe_abort(body))
            else:
                self.abort()
                raise LinkError(f"unexpected PDU type {kind} while waiting for the C-STORE response")
        cmd = dimse.parse_command(bytes(command))
        if dimse.us(cmd, 0x0100) != dimse.C_STORE_RSP or dimse.us(cmd, 0x0120) != self.message_id:
            self.abort()
            raise LinkError("the server answered with something other than our C-STORE response")
        status = dimse.us(cmd, 0x0900)
        if status is None:
            self.abort()
            raise LinkError("the C-STORE response has no status")
        return status, dimse.text(cmd, 0x0902)

    # ------------------------------------------------------------------ ending
    def release(self) -> None:
        if not self.alive:
            return
        try:
            self.sock.settimeout(self.peer.timeouts.acse)
            self.sock.sendall(pdu.release_rq())
            while True:
                kind, _ = _read_pdu(self.sock)
                if kind in (pdu.A_RELEASE_RP, pdu.A_ABORT):
                    break
        except (OSError, LinkError):
            pass
        self._lost()

    def abort(self) -> None:
        if self.alive:
            try:
                self.sock.settimeout(1.0)
                self.sock.sendall(pdu.abort())
            except OSError:
                pass
        self._lost()

    def _lost(self) -> None:
        self.alive = False
        _close(self.sock)


def _close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise LinkError("the server closed the connection")
        got += k
    return bytes(buf)


def _read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    kind, length = pdu.HEAD.unpack(_recv_exact(sock, 6))
    if length > 64 << 20:
        raise LinkError(f"the server sent a PDU of {length} bytes; not read")
    return kind, _recv_exact(sock, length)
