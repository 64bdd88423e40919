"""minisign-compatible ed25519 keys and signatures (DESIGN section 8, "Registry").

The file formats are those of minisign (https://jedisct1.github.io/minisign/), checked against
Debian's ``minisign`` 0.11 by tests/test_minisign.py, so keys and signatures move freely
between sandboxer and the ``minisign`` tool. docs/architecture.md, "Signatures (minisign
format)", describes the bytes.

Everything read is untrusted: parsing is strict (exact line structure, canonical base64, exact
lengths, size caps) and every failure is a :class:`SignatureError` whose message names the check
that failed; nothing else escapes from malformed input.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from .errors import IntegrityError

__all__ = [
    "MAX_TRUSTED_COMMENT",
    "MAX_UNTRUSTED_COMMENT",
    "PublicKey",
    "SecretKey",
    "SignatureError",
    "VerifiedSignature",
    "generate_keypair",
    "sign",
    "unverified_trusted_comment",
    "verify",
]

# Algorithm tags, two bytes each, as minisign.h names them.
SIG_ALG_LEGACY = b"Ed"  # signature over the raw data (`minisign -S -l`); also the key tag
SIG_ALG_PREHASHED = b"ED"  # signature over BLAKE2b-512(data) (minisign's default)
KDF_SCRYPT = b"Sc"  # scrypt (libsodium's crypto_pwhash_scryptsalsa208sha256)
KDF_NONE = b"\x00\x00"  # unencrypted secret key (`minisign -G -W`)
CHK_ALG = b"B2"  # BLAKE2b-256 checksum of the secret key

UNTRUSTED_PREFIX = "untrusted comment: "
TRUSTED_PREFIX = "trusted comment: "
DEFAULT_SIGNATURE_COMMENT = "signature from sandboxer secret key"
SECRET_KEY_DEFAULT_COMMENT = "minisign encrypted secret key"  # minisign writes it even with -W

# minisign reads lines with fgets into fixed buffers (COMMENTMAXBYTES = 1024 for the
# untrusted comment, TRUSTEDCOMMENTMAXBYTES = 8192 for the trusted one, each including the
# prefix, the newline and the C string's NUL); longer comments do not round-trip through it.
MAX_UNTRUSTED_COMMENT = 1024 - len(UNTRUSTED_PREFIX) - 2
MAX_TRUSTED_COMMENT = 8192 - len(TRUSTED_PREFIX) - 2
_MAX_FILE_CHARS = 16 * 1024  # no valid key or signature file comes near this

_KEY_ID_LEN = 8
_PUBLIC_LEN = 32
_SEED_LEN = 32
_SIG_LEN = 64
_CHK_LEN = 32
_SALT_LEN = 32
_PUBKEY_STRUCT_LEN = 2 + _KEY_ID_LEN + _PUBLIC_LEN  # 42
_SIG_STRUCT_LEN = 2 + _KEY_ID_LEN + _SIG_LEN  # 74
_KEYNUM_SK_LEN = _KEY_ID_LEN + _SEED_LEN + _PUBLIC_LEN + _CHK_LEN  # 104
_SECKEY_STRUCT_LEN = 2 + 2 + 2 + _SALT_LEN + 8 + 8 + _KEYNUM_SK_LEN  # 158

# libsodium's crypto_pwhash_scryptsalsa208sha256_{OPSLIMIT,MEMLIMIT}_SENSITIVE, which minisign
# uses for every key it encrypts (scrypt N = 2^20, r = 8, p = 1: 1 GiB, a few seconds).
KDF_OPSLIMIT_SENSITIVE = 33554432
KDF_MEMLIMIT_SENSITIVE = 1073741824
# What we are willing to spend deriving a key from a file's KDF parameters.
_KDF_MAX_MEMORY = 2**31 - 2**21  # hashlib.scrypt's maxmem must stay below INT_MAX
_KDF_MAX_WORK = 2**27  # N * r * p

Check = Literal["malformed", "algorithm", "key-id", "signature", "trusted-comment", "key"]


class SignatureError(IntegrityError):
    """A signature (or a key) cannot be trusted.

    ``check`` names the check that failed: ``malformed`` (the signature file is not a minisign
    signature), ``algorithm`` (an algorithm tag we do not know), ``key-id`` (signed by a key
    that is not trusted), ``signature`` (the data does not match), ``trusted-comment`` (the
    trusted comment was altered), ``key`` (a key file is malformed, unreadable or locked).
    """

    def __init__(self, message: str, *, check: Check, plugin_id: str | None = None) -> None:
        super().__init__(message, plugin_id=plugin_id)
        self.check = check

    def to_json(self) -> dict[str, Any]:
        out = super().to_json()
        out["check"] = self.check
        return out


def _key_id_hex(key_id: bytes) -> str:
    """minisign's display form of a key id: the 8 stored bytes as a little-endian uint64."""
    # minisign prints the little-endian id with "%" PRIX64: no leading zeros (a key id whose
    # top nibble is 0 shows as 15 digits, 1 key in 16).
    return f"{int.from_bytes(key_id, 'little'):X}"


@dataclass(frozen=True, repr=False)
class PublicKey:
    """An ed25519 public key with its minisign key id.

    ``key_id`` is the 8 bytes as stored in the files; ``key_id_hex`` is how minisign prints it
    (``minisign public key <KEYID>``, and in its key-id mismatch message).
    """

    key_id: bytes
    raw: bytes
    comment: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if len(self.key_id) != _KEY_ID_LEN or len(self.raw) != _PUBLIC_LEN:
            raise ValueError("a minisign public key has an 8-byte key id and 32 key bytes")

    def __repr__(self) -> str:
        return f"PublicKey(key_id={self.key_id_hex}, key={self.to_base64()})"

    @property
    def key_id_hex(self) -> str:
        return _key_id_hex(self.key_id)

    def to_base64(self) -> str:
        """The key as one base64 string, the form `minisign -P` takes."""
        return base64.b64encode(SIG_ALG_LEGACY + self.key_id + self.raw).decode("ascii")

    def to_file_text(self) -> str:
        """The contents of a minisign public key file (what `minisign -G -p` writes)."""
        comment = (
            self.comment if self.comment is not None else (f"minisign public key {self.key_id_hex}")
        )
        _check_comment(comment, MAX_UNTRUSTED_COMMENT, "the public key's comment")
        return f"{UNTRUSTED_PREFIX}{comment}\n{self.to_base64()}\n"

    @classmethod
    def from_base64(cls, text: str, *, comment: str | None = None) -> PublicKey:
        """A key from its base64 string (`minisign -P` form)."""
        blob = _b64(text, _PUBKEY_STRUCT_LEN, "public key", "key")
        if blob[:2] != SIG_ALG_LEGACY:
            raise SignatureError(
                f"malformed public key: unknown signature algorithm {_tag(blob[:2])} "
                f"(expected 'Ed')",
                check="key",
            )
        return cls(key_id=blob[2:10], raw=blob[10:], comment=comment)

    @classmethod
    def from_file_text(cls, text: str | bytes) -> PublicKey:
        """A key from the contents of a minisign public key file."""
        comment, b64 = _key_lines(text, "public key")
        return cls.from_base64(b64, comment=comment)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> PublicKey:
        return cls.from_file_text(_read_key_file(path, "public key"))

    def _verifier(self) -> Ed25519PublicKey:
        return Ed25519PublicKey.from_public_bytes(self.raw)


@dataclass(frozen=True, repr=False)
class SecretKey:
    """An ed25519 secret key (its 32-byte seed) with its minisign key id."""

    key_id: bytes
    seed: bytes
    comment: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if len(self.key_id) != _KEY_ID_LEN or len(self.seed) != _SEED_LEN:
            raise ValueError("a minisign secret key has an 8-byte key id and a 32-byte seed")

    def __repr__(self) -> str:  # never the seed, not even in a traceback
        return f"SecretKey(key_id={self.key_id_hex})"

    @property
    def key_id_hex(self) -> str:
        return _key_id_hex(self.key_id)

    @property
    def public_key(self) -> PublicKey:
        raw = self._signer().public_key().public_bytes_raw()
        return PublicKey(key_id=self.key_id, raw=raw)

    def _signer(self) -> Ed25519PrivateKey:
        return Ed25519PrivateKey.from_private_bytes(self.seed)

    def _keynum_sk(self) -> bytes:
        """key id || secret key (seed || public key) || checksum, in clear."""
        sk = self.seed + self.public_key.raw
        return self.key_id + sk + _checksum(self.key_id, sk)

    def to_file_text(
        self,
        *,
        password: str | bytes | None = None,
        kdf_opslimit: int = KDF_OPSLIMIT_SENSITIVE,
        kdf_memlimit: int = KDF_MEMLIMIT_SENSITIVE,
    ) -> str:
        """The contents of a minisign secret key file.

        Unencrypted (as `minisign -G -W` writes) unless a password is given; then encrypted
        with scrypt as minisign does, by default with minisign's own (costly) parameters.
        Write the file with mode 0600.
        """
        comment = self.comment if self.comment is not None else SECRET_KEY_DEFAULT_COMMENT
        _check_comment(comment, MAX_UNTRUSTED_COMMENT, "the secret key's comment")
        keynum_sk = self._keynum_sk()
        if password is None:
            header = SIG_ALG_LEGACY + KDF_NONE + CHK_ALG + bytes(_SALT_LEN) + bytes(16)
        else:
            salt = os.urandom(_SALT_LEN)
            stream = _scrypt_stream(_password_bytes(password), salt, kdf_opslimit, kdf_memlimit)
            keynum_sk = bytes(a ^ b for a, b in zip(keynum_sk, stream, strict=True))
            header = (
                SIG_ALG_LEGACY
                + KDF_SCRYPT
                + CHK_ALG
                + salt
                + struct.pack("<QQ", kdf_opslimit, kdf_memlimit)
            )
        blob = header + keynum_sk
        assert len(blob) == _SECKEY_STRUCT_LEN
        return f"{UNTRUSTED_PREFIX}{comment}\n{base64.b64encode(blob).decode('ascii')}\n"

    @classmethod
    def from_file_text(cls, text: str | bytes, *, password: str | bytes | None = None) -> SecretKey:
        """A key from the contents of a minisign secret key file.

        Unencrypted keys (`minisign -G -W`) need no password; scrypt-encrypted ones need the
        password they were made with.
        """
        comment, b64 = _key_lines(text, "secret key")
        blob = _b64(b64, _SECKEY_STRUCT_LEN, "secret key", "key")
        sig_alg, kdf_alg, chk_alg = blob[0:2], blob[2:4], blob[4:6]
        salt = blob[6:38]
        opslimit, memlimit = struct.unpack("<QQ", blob[38:54])
        keynum_sk = blob[54:]
        if sig_alg != SIG_ALG_LEGACY:
            raise SignatureError(
                f"secret key: unknown signature algorithm {_tag(sig_alg)} (expected 'Ed')",
                check="key",
            )
        if chk_alg != CHK_ALG:
            raise SignatureError(
                f"secret key: unknown checksum algorithm {_tag(chk_alg)} (expected 'B2')",
                check="key",
            )
        encrypted = False
        if kdf_alg == KDF_SCRYPT:
            if password is None:
                raise SignatureError(
                    "secret key is encrypted with a password: give the password, or use an "
                    "unencrypted key (minisign -G -W makes one; minisign -C -W removes the "
                    "password of an existing key)",
                    check="key",
                )
            stream = _scrypt_stream(_password_bytes(password), salt, opslimit, memlimit)
            keynum_sk = bytes(a ^ b for a, b in zip(keynum_sk, stream, strict=True))
            encrypted = True
        elif kdf_alg != KDF_NONE:
            raise SignatureError(
                f"secret key: unknown key derivation algorithm {_tag(kdf_alg)} "
                "(expected 'Sc' or none)",
                check="key",
            )
        key_id = keynum_sk[:8]
        sk = keynum_sk[8:72]
        chk = keynum_sk[72:]
        expected = _checksum(key_id, sk)
        # minisign 0.11 leaves the checksum of a key generated with -W all zero (it computes
        # it only when encrypting); `minisign -C -W` keeps the real one.
        if not hmac.compare_digest(chk, expected) and (encrypted or any(chk)):
            raise SignatureError(
                "secret key: wrong password for that key"
                if encrypted
                else "secret key: checksum mismatch (the key file is corrupted)",
                check="key",
            )
        key = cls(key_id=key_id, seed=sk[:32], comment=comment)
        if not hmac.compare_digest(key.public_key.raw, sk[32:]):
            raise SignatureError(
                "secret key: its public half does not belong to its seed "
                "(the key file is corrupted)",
                check="key",
            )
        return key

    @classmethod
    def from_file(
        cls, path: str | os.PathLike[str], *, password: str | bytes | None = None
    ) -> SecretKey:
        return cls.from_file_text(_read_key_file(path, "secret key"), password=password)


@dataclass(frozen=True)
class VerifiedSignature:
    """A signature that verified: the trusted key that made it and its trusted comment."""

    key: PublicKey
    trusted_comment: str
    untrusted_comment: str
    prehashed: bool

    @property
    def key_id_hex(self) -> str:
        return self.key.key_id_hex


def generate_keypair(comment: str | None = None) -> tuple[PublicKey, SecretKey]:
    """A new key pair with a random key id.

    ``comment`` becomes the untrusted comment of both key files; by default they carry
    minisign's (``minisign public key <KEYID>``, ``minisign encrypted secret key``).
    """
    if comment is not None:
        _check_comment(comment, MAX_UNTRUSTED_COMMENT, "comment")
    secret = SecretKey(
        key_id=os.urandom(_KEY_ID_LEN),
        seed=Ed25519PrivateKey.generate().private_bytes_raw(),
        comment=comment,
    )
    pub = secret.public_key
    return PublicKey(key_id=pub.key_id, raw=pub.raw, comment=comment), secret


def sign(
    data: bytes,
    secret: SecretKey,
    *,
    trusted_comment: str,
    untrusted_comment: str = DEFAULT_SIGNATURE_COMMENT,
    legacy: bool = False,
) -> str:
    """The text of a .minisig file for ``data``.

    Prehashed (``ED``, minisign's default) unless ``legacy`` asks for the old ``Ed`` format
    (`minisign -S -l`). Comments are one line each.
    """
    _check_comment(untrusted_comment, MAX_UNTRUSTED_COMMENT, "untrusted_comment")
    _check_comment(trusted_comment, MAX_TRUSTED_COMMENT, "trusted_comment")
    signer = secret._signer()
    alg = SIG_ALG_LEGACY if legacy else SIG_ALG_PREHASHED
    signature = signer.sign(bytes(data) if legacy else _prehash(data))
    global_signature = signer.sign(signature + trusted_comment.encode("utf-8"))
    sig_b64 = base64.b64encode(alg + secret.key_id + signature).decode("ascii")
    global_b64 = base64.b64encode(global_signature).decode("ascii")
    return (
        f"{UNTRUSTED_PREFIX}{untrusted_comment}\n{sig_b64}\n"
        f"{TRUSTED_PREFIX}{trusted_comment}\n{global_b64}\n"
    )


def verify(
    data: bytes,
    signature_text: str | bytes,
    trusted: PublicKey | Iterable[PublicKey],
    *,
    allow_legacy: bool = True,
) -> VerifiedSignature:
    """Check a .minisig signature of ``data`` against the trusted keys.

    In minisign's order: the file's form, the algorithm, the key id (it must be one of the
    trusted keys), the signature over the data, the global signature over the trusted comment.
    Raises :class:`SignatureError` naming the check that failed.
    """
    keys = [trusted] if isinstance(trusted, PublicKey) else list(trusted)
    parsed = _parse_signature(signature_text)
    alg, key_id, signature, trusted_comment, global_signature, untrusted = parsed
    if alg == SIG_ALG_PREHASHED:
        prehashed = True
    elif alg == SIG_ALG_LEGACY:
        if not allow_legacy:
            raise SignatureError(
                "unknown signature algorithm: a legacy (not prehashed) 'Ed' "
                "signature, and legacy signatures are not accepted here",
                check="algorithm",
            )
        prehashed = False
    else:
        raise SignatureError(
            f"unknown signature algorithm {_tag(alg)} (expected 'ED', or "
            "'Ed' for a legacy signature)",
            check="algorithm",
        )
    candidates = [k for k in keys if hmac.compare_digest(k.key_id, key_id)]
    if not candidates:
        if not keys:
            trusted_text = "no key is trusted"
        elif len(keys) == 1:
            trusted_text = f"not the trusted key {keys[0].key_id_hex}"
        else:
            trusted_text = "not any of the trusted keys " + ", ".join(k.key_id_hex for k in keys)
        raise SignatureError(
            f"unknown key id: signed by key {_key_id_hex(key_id)}, {trusted_text}", check="key-id"
        )
    message = _prehash(data) if prehashed else bytes(data)
    key = next((k for k in candidates if _ed25519_ok(k, signature, message)), None)
    if key is None:
        raise SignatureError(
            f"bad signature: the data does not match its signature by key "
            f"{_key_id_hex(key_id)} (the data or the signature was altered)",
            check="signature",
        )
    if not _ed25519_ok(key, global_signature, signature + trusted_comment.encode("utf-8")):
        raise SignatureError(
            f"bad trusted-comment signature: the trusted comment is not the one key "
            f"{key.key_id_hex} signed (it was altered)",
            check="trusted-comment",
        )
    return VerifiedSignature(
        key=key, trusted_comment=trusted_comment, untrusted_comment=untrusted, prehashed=prehashed
    )


def unverified_trusted_comment(signature_text: str | bytes) -> str:
    """The trusted comment of a .minisig file, *without verifying anything*.

    For a publisher reading the state of its own registry (the last index's sequence number)
    when it may not hold the key that signed it; never for a trust decision: use
    :func:`verify`. Raises :class:`SignatureError` (``malformed``) as :func:`verify` would.
    """
    return _parse_signature(signature_text)[3]


# --- internals ---------------------------------------------------------------------------------


def _prehash(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=64).digest()


def _checksum(key_id: bytes, sk: bytes) -> bytes:
    return hashlib.blake2b(SIG_ALG_LEGACY + key_id + sk, digest_size=32).digest()


def _ed25519_ok(key: PublicKey, signature: bytes, message: bytes) -> bool:
    try:
        key._verifier().verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def _tag(alg: bytes) -> str:
    return repr(alg.decode("latin-1")) if alg.isascii() and alg.isalnum() else f"0x{alg.hex()}"


def _check_comment(comment: str, limit: int, what: str) -> None:
    if not isinstance(comment, str):
        raise TypeError(f"{what} must be a str")
    if any(c in comment for c in "\r\n\x00"):
        raise ValueError(f"{what} must be one line (no CR, LF or NUL)")
    if len(comment.encode("utf-8")) > limit:
        raise ValueError(f"{what} is longer than minisign's limit of {limit} bytes")


def _password_bytes(password: str | bytes) -> bytes:
    return password.encode("utf-8") if isinstance(password, str) else bytes(password)


def _scrypt_params(opslimit: int, memlimit: int) -> tuple[int, int, int]:
    """libsodium's pickparams(): (opslimit, memlimit) -> scrypt (log2 N, r, p)."""
    opslimit = max(opslimit, 32768)
    r = 8
    if opslimit < memlimit // 32:
        p = 1
        max_n = opslimit // (r * 4)
    else:
        max_n = memlimit // (r * 128)
    n_log2 = 1
    while n_log2 < 63 and (1 << n_log2) <= max_n // 2:
        n_log2 += 1
    if not opslimit < memlimit // 32:
        max_rp = min((opslimit // 4) // (1 << n_log2), 0x3FFFFFFF)
        p = max_rp // r
    return n_log2, r, p


def _scrypt_stream(password: bytes, salt: bytes, opslimit: int, memlimit: int) -> bytes:
    n_log2, r, p = _scrypt_params(opslimit, memlimit)
    n = 1 << n_log2
    memory = 128 * r * (n + p + 2)
    if p < 1 or memory > _KDF_MAX_MEMORY or n * r * p > _KDF_MAX_WORK:
        raise SignatureError(
            f"secret key: unusable scrypt parameters (opslimit {opslimit}, memlimit "
            f"{memlimit}: N=2^{n_log2}, r={r}, p={p}); use an unencrypted key",
            check="key",
        )
    try:
        return hashlib.scrypt(
            password, salt=salt, n=n, r=r, p=p, dklen=_KEYNUM_SK_LEN, maxmem=memory + 2**20
        )
    except (ValueError, MemoryError) as e:
        raise SignatureError(
            f"secret key: scrypt key derivation failed ({e}); use an unencrypted key", check="key"
        ) from e


def _b64(text: str, length: int, what: str, check: Check) -> bytes:
    """Canonical, padded standard base64 decoding to exactly ``length`` bytes."""
    try:
        blob = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise SignatureError(f"malformed {what}: not valid base64", check=check) from None
    if base64.b64encode(blob).decode("ascii") != text:
        raise SignatureError(f"malformed {what}: not canonical base64", check=check)
    if len(blob) != length:
        raise SignatureError(
            f"malformed {what}: {len(blob)} bytes where minisign has {length}", check=check
        )
    return blob


def _lines(text: str | bytes, count: int, what: str, check: Check) -> list[str]:
    """Exactly ``count`` lines, LF or CRLF terminated (the last terminator optional)."""
    if isinstance(text, (bytes, bytearray, memoryview)):
        if len(text) > _MAX_FILE_CHARS:
            raise SignatureError(f"malformed {what} file: too large", check=check)
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError:
            raise SignatureError(f"malformed {what} file: not UTF-8 text", check=check) from None
    if not isinstance(text, str):
        raise TypeError(f"the {what} file's text must be str or bytes")
    if len(text) > _MAX_FILE_CHARS:
        raise SignatureError(f"malformed {what} file: too large", check=check)
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) != count:
        raise SignatureError(
            f"malformed {what} file: {len(lines)} lines where minisign writes {count}", check=check
        )
    lines = [line[:-1] if line.endswith("\r") else line for line in lines]
    for number, line in enumerate(lines, 1):
        if "\r" in line or "\x00" in line:
            raise SignatureError(
                f"malformed {what} file: line {number} holds a CR or NUL character", check=check
            )
    return lines


def _key_lines(text: str | bytes, what: str) -> tuple[str, str]:
    comment_line, b64 = _lines(text, 2, what, "key")
    if not comment_line.startswith(UNTRUSTED_PREFIX):
        raise SignatureError(
            f"malformed {what} file: line 1 does not start with {UNTRUSTED_PREFIX!r}", check="key"
        )
    return comment_line[len(UNTRUSTED_PREFIX) :], b64


def _read_key_file(path: str | os.PathLike[str], what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(_MAX_FILE_CHARS + 1)
    except OSError as e:
        raise SignatureError(
            f"cannot read the {what} file {Path(path)}: {e.strerror or e}", check="key"
        ) from e


def _comment(line: str, prefix: str, limit: int, number: int, what: str) -> str:
    """The text of a comment line of a signature file, checked as minisign checks it."""
    if not line.startswith(prefix):
        raise SignatureError(
            f"malformed signature file: line {number} does not start with {prefix!r}",
            check="malformed",
        )
    text = line[len(prefix) :]
    if len(text.encode("utf-8")) > limit:
        raise SignatureError(
            f"malformed signature file: the {what} is longer than minisign allows",
            check="malformed",
        )
    return text


def _parse_signature(text: str | bytes) -> tuple[bytes, bytes, bytes, str, bytes, str]:
    """(algorithm, key id, signature, trusted comment, global signature, untrusted comment)."""
    untrusted_line, sig_b64, trusted_line, global_b64 = _lines(text, 4, "signature", "malformed")
    untrusted = _comment(
        untrusted_line, UNTRUSTED_PREFIX, MAX_UNTRUSTED_COMMENT, 1, "untrusted comment"
    )
    blob = _b64(sig_b64, _SIG_STRUCT_LEN, "signature (line 2)", "malformed")
    trusted_comment = _comment(
        trusted_line, TRUSTED_PREFIX, MAX_TRUSTED_COMMENT, 3, "trusted comment"
    )
    global_signature = _b64(global_b64, _SIG_LEN, "trusted-comment signature (line 4)", "malformed")
    return blob[:2], blob[2:10], blob[10:], trusted_comment, global_signature, untrusted
