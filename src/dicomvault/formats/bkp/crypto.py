"""Encryption at rest for .bkp files (SPEC.md, section 17 "Encryption").

A key frame (type 3) right after the header holds the scrypt parameters, the
salt, a per-file nonce prefix and a key check value. Every data frame and the
manifest frame are compressed, then sealed with AES-256-GCM:

    nonce = nonce_prefix (4 bytes) || u64 LE counter      (counter = frame seq)
    aad   = file_id || u8 type || u8 codec || u64 LE seq || u64 LE raw

The key is derived once per file (scrypt is deliberately slow and memory
hungry); AES-GCM itself runs in OpenSSL through ``cryptography``.
"""
from __future__ import annotations

import functools
import hashlib
import os
import struct
import unicodedata
from typing import TYPE_CHECKING

from dicomvault.engine import (
    ChecksumError,
    CorruptError,
    UnsupportedFeatureError,
    UsageError,
    WrongPassphraseError,
)

from .layout import CODEC_NONE, FRAME_KEY
from .manifest import FEATURE_ENCRYPTION as FEATURE  # noqa: F401  (re-exported)

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KDF_SCRYPT = 1
CIPHER_AES_256_GCM = 1
# kdf cipher log2_n reserved r p nonce_prefix salt key_check
KEY_TABLE = struct.Struct("<BBBBII4s32s32s")
assert KEY_TABLE.size == 80
KEY_PARAMS_SIZE = 48  # bytes 0..47 of the key table (everything but the key check)
AAD = struct.Struct("<16sBBQQ")  # file_id type codec seq raw
TAG_SIZE = 16
KEY_CHECK_PLAINTEXT = b"dicomvault-bkp-1"  # 16 bytes, sealed under the file's key
KEY_CHECK_COUNTER = (1 << 64) - 1  # never a frame seq

# What the reference writer uses: 128 MiB of memory, about half a second.
DEFAULT_LOG2_N = 17
DEFAULT_R = 8
DEFAULT_P = 1
# What the reference reader accepts: a crafted file must not make it allocate
# or compute without bound.
MAX_SCRYPT_MEMORY = 1 << 30  # 128 * r * N bytes
MAX_P = 16
MAX_LOG2_N = 24
# AES-GCM in cryptography takes at most 2^31 - 1 bytes per call; the format allows 2^30.
MAX_SEALED_CONTENT = 1 << 30


def passphrase_bytes(passphrase: str) -> bytes:
    """The KDF input: the passphrase in Unicode NFC, as UTF-8."""
    if not passphrase:
        raise UsageError("the passphrase is empty")
    return unicodedata.normalize("NFC", passphrase).encode("utf-8")


@functools.lru_cache(maxsize=64)  # a file reopened (a volume of a set read again) costs no second scrypt
def derive_key(passphrase: str, salt: bytes, log2_n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(passphrase_bytes(passphrase), salt=salt, n=1 << log2_n, r=r, p=p,
                          maxmem=MAX_SCRYPT_MEMORY + (1 << 24), dklen=32)


class FrameCipher:
    """Seals and opens the frames of one file under its key."""

    def __init__(self, key: bytes, file_id: bytes, nonce_prefix: bytes) -> None:
        # Imported here: only encrypted files need OpenSSL's AES-GCM, and loading it costs
        # every other run tens of milliseconds at start.
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        self._aead: AESGCM = AESGCM(key)
        self.file_id = file_id
        self.nonce_prefix = nonce_prefix

    def _nonce(self, counter: int) -> bytes:
        return self.nonce_prefix + struct.pack("<Q", counter)

    def aad(self, ftype: int, codec: int, seq: int, raw: int) -> bytes:
        return AAD.pack(self.file_id, ftype, codec, seq, raw)

    def seal(self, ftype: int, codec: int, seq: int, raw: int, data: bytes | bytearray) -> bytes:
        if len(data) > MAX_SEALED_CONTENT:
            raise ValueError(f"an encrypted frame holds at most {MAX_SEALED_CONTENT} bytes")
        return self._aead.encrypt(self._nonce(seq), bytes(data), self.aad(ftype, codec, seq, raw))

    def open(self, ftype: int, codec: int, seq: int, raw: int, payload: bytes, what: str) -> bytes:
        if len(payload) < TAG_SIZE:
            raise CorruptError(f"{what} is too short to be encrypted ({len(payload)} bytes)")
        if len(payload) - TAG_SIZE > MAX_SEALED_CONTENT:
            raise UnsupportedFeatureError(f"{what}: an encrypted frame of {len(payload)} bytes exceeds "
                                          f"this release's limit of {MAX_SEALED_CONTENT + TAG_SIZE}")
        from cryptography.exceptions import InvalidTag
        try:
            return self._aead.decrypt(self._nonce(seq), payload, self.aad(ftype, codec, seq, raw))
        except InvalidTag:
            raise ChecksumError(f"{what} fails decryption: it is damaged, or it was moved from another "
                                "file or position (AES-GCM authentication failed)") from None


def new_key_frame(passphrase: str, file_id: bytes, *, log2_n: int = DEFAULT_LOG2_N, r: int = DEFAULT_R,
                  p: int = DEFAULT_P) -> tuple[bytes, FrameCipher]:
    """A fresh salt and nonce prefix: (key frame payload, cipher for the file's frames)."""
    _check_params(log2_n, r, p)
    salt, nonce_prefix = os.urandom(32), os.urandom(4)
    key = derive_key(passphrase, salt, log2_n, r, p)
    params = KEY_TABLE.pack(KDF_SCRYPT, CIPHER_AES_256_GCM, log2_n, 0, r, p, nonce_prefix, salt,
                            bytes(32))[:KEY_PARAMS_SIZE]
    cipher = FrameCipher(key, file_id, nonce_prefix)
    check = _key_check(cipher, params)
    return params + check, cipher


def _key_check(cipher: FrameCipher, params: bytes) -> bytes:
    aad = cipher.aad(FRAME_KEY, CODEC_NONE, 0, KEY_TABLE.size) + params
    return cipher._aead.encrypt(cipher._nonce(KEY_CHECK_COUNTER), KEY_CHECK_PLAINTEXT, aad)


def _check_params(log2_n: int, r: int, p: int) -> None:
    if not (1 <= log2_n <= MAX_LOG2_N and r >= 1 and 1 <= p <= MAX_P
            and 128 * r * (1 << log2_n) <= MAX_SCRYPT_MEMORY):
        raise UnsupportedFeatureError(
            f"the key frame asks for scrypt N=2^{log2_n} r={r} p={p}, beyond what this release accepts "
            f"(N up to 2^{MAX_LOG2_N}, p up to {MAX_P}, 128·r·N up to {MAX_SCRYPT_MEMORY >> 20} MiB)")


def open_key_frame(payload: bytes, passphrase: str, file_id: bytes) -> FrameCipher:
    """The cipher for the file's frames; ``WrongPassphraseError`` if the key check fails."""
    if len(payload) != KEY_TABLE.size:
        raise CorruptError(f"the key frame has {len(payload)} bytes, {KEY_TABLE.size} expected")
    kdf, cipher_id, log2_n, reserved, r, p, nonce_prefix, salt, check = KEY_TABLE.unpack(payload)
    if reserved != 0:
        raise CorruptError("the key frame's reserved field is not zero")
    if kdf != KDF_SCRYPT:
        raise UnsupportedFeatureError(f"the key frame names key derivation function {kdf}, unknown to "
                                      "this release")
    if cipher_id != CIPHER_AES_256_GCM:
        raise UnsupportedFeatureError(f"the key frame names cipher {cipher_id}, unknown to this release")
    _check_params(log2_n, r, p)
    cipher = FrameCipher(derive_key(passphrase, salt, log2_n, r, p), file_id, nonce_prefix)
    aad = cipher.aad(FRAME_KEY, CODEC_NONE, 0, KEY_TABLE.size) + payload[:KEY_PARAMS_SIZE]
    from cryptography.exceptions import InvalidTag
    try:
        plain = cipher._aead.decrypt(cipher._nonce(KEY_CHECK_COUNTER), check, aad)
    except InvalidTag:
        plain = b""
    if plain != KEY_CHECK_PLAINTEXT:
        raise WrongPassphraseError("wrong passphrase: it does not open this encrypted .bkp file "
                                   "(nothing was read from it)")
    return cipher
