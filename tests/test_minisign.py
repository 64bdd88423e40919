"""minisign-compatible signatures (sandboxer._minisign), checked against Debian's minisign.

The compatibility tests run the real `minisign` binary (Debian package `minisign`) both ways:
what it makes, we read and verify; what we make, it verifies. They never skip: without the
binary they fail, as CI must prove compatibility rather than assume it.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sandboxer._minisign import (
    MAX_TRUSTED_COMMENT,
    MAX_UNTRUSTED_COMMENT,
    PublicKey,
    SecretKey,
    SignatureError,
    VerifiedSignature,
    generate_keypair,
    sign,
    verify,
)
from sandboxer.errors import IntegrityError, exit_code

DATA = b"plugin archive bytes\x00\xff\n" * 100

# Small scrypt parameters for tests (minisign's own cost 1 GiB and seconds). The two pairs
# exercise both branches of libsodium's parameter choice: (N=2^11, r=8, p=1) and
# (N=2^12, r=8, p=8).
SMALL_KDF = [(65536, 1 << 24), (1 << 20, 1 << 22)]


# --- helpers -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minisign_bin() -> str:
    path = shutil.which("minisign")
    if path is None:
        pytest.fail("the minisign tool is not installed: apt-get install minisign "
                    "(scripts/bootstrap.sh installs it)", pytrace=False)
    return path


def run_minisign(
    binary: str, *args: str, cwd: Path, stdin: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run minisign in ``cwd`` with no terminal: stdin is /dev/null unless text is given."""
    proc = subprocess.run(
        [binary, *args], cwd=cwd, text=True, capture_output=True, timeout=120,
        stdin=subprocess.DEVNULL if stdin is None else None, input=stdin,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(cwd),
             "LC_ALL": "C"},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"minisign {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


def b64_line(text: str, number: int) -> bytes:
    return base64.b64decode(text.splitlines()[number])


def replace_line(text: str, number: int, new: str) -> str:
    lines = text.splitlines()
    lines[number] = new
    return "\n".join(lines) + "\n"


def check_of(excinfo: pytest.ExceptionInfo[SignatureError]) -> str:
    return excinfo.value.check


@pytest.fixture(scope="module")
def keypair() -> tuple[PublicKey, SecretKey]:
    return generate_keypair()


@pytest.fixture(scope="module")
def signed(keypair: tuple[PublicKey, SecretKey]) -> str:
    return sign(DATA, keypair[1], trusted_comment="sandboxer registry test\tv1")


# --- our own round trips -------------------------------------------------------------------------


def test_round_trip(keypair: tuple[PublicKey, SecretKey], signed: str) -> None:
    pub, _ = keypair
    result = verify(DATA, signed, [pub])
    assert result == VerifiedSignature(key=pub, trusted_comment="sandboxer registry test\tv1",
                                       untrusted_comment="signature from sandboxer secret key",
                                       prehashed=True)
    assert result.key_id_hex == pub.key_id_hex
    # A single key, bytes input, and the key among others all work.
    assert verify(DATA, signed.encode(), pub).key == pub
    others = [generate_keypair()[0] for _ in range(3)]
    assert verify(DATA, signed, [*others, pub, others[0]]).key == pub
    # Prehashed: the signature's algorithm tag is "ED".
    assert b64_line(signed, 1)[:2] == b"ED"
    assert b64_line(signed, 1)[2:10] == pub.key_id


def test_legacy_round_trip(keypair: tuple[PublicKey, SecretKey]) -> None:
    pub, sec = keypair
    text = sign(DATA, sec, trusted_comment="legacy", legacy=True)
    assert b64_line(text, 1)[:2] == b"Ed"
    result = verify(DATA, text, [pub])
    assert result.prehashed is False and result.trusted_comment == "legacy"
    with pytest.raises(SignatureError, match="legacy") as e:
        verify(DATA, text, [pub], allow_legacy=False)
    assert check_of(e) == "algorithm"


def test_signature_error_is_an_integrity_error() -> None:
    err = SignatureError("bad signature: x", check="signature")
    assert isinstance(err, IntegrityError)
    assert exit_code(err) == 2
    assert err.to_json() == {"type": "SignatureError", "message": "bad signature: x",
                             "check": "signature"}


def test_tampered_data_fails(keypair: tuple[PublicKey, SecretKey], signed: str) -> None:
    for tampered in (DATA + b"x", DATA[:-1], b"", bytes([DATA[0] ^ 1]) + DATA[1:]):
        with pytest.raises(SignatureError, match="^bad signature") as e:
            verify(tampered, signed, [keypair[0]])
        assert check_of(e) == "signature"


def test_tampered_trusted_comment_fails(
    keypair: tuple[PublicKey, SecretKey], signed: str
) -> None:
    for comment in ("sandboxer registry test\tv2", "sandboxer registry test\tv1 ", ""):
        tampered = replace_line(signed, 2, f"trusted comment: {comment}")
        with pytest.raises(SignatureError, match="^bad trusted-comment signature") as e:
            verify(DATA, tampered, [keypair[0]])
        assert check_of(e) == "trusted-comment"
    # Swapping in the global signature of another signature over the same comment fails too.
    other = sign(DATA + b"!", keypair[1], trusted_comment="sandboxer registry test\tv1")
    mixed = replace_line(signed, 3, other.splitlines()[3])
    with pytest.raises(SignatureError) as e:
        verify(DATA, mixed, [keypair[0]])
    assert check_of(e) == "trusted-comment"


def test_untrusted_comment_is_not_covered(
    keypair: tuple[PublicKey, SecretKey], signed: str
) -> None:
    changed = replace_line(signed, 0, "untrusted comment: anything at all")
    assert verify(DATA, changed, [keypair[0]]).untrusted_comment == "anything at all"


def test_unknown_key_id_names_both_keys(
    keypair: tuple[PublicKey, SecretKey], signed: str
) -> None:
    stranger, _ = generate_keypair()
    with pytest.raises(SignatureError) as e:
        verify(DATA, signed, [stranger])
    assert check_of(e) == "key-id"
    assert str(e.value) == (f"unknown key id: signed by key {keypair[0].key_id_hex}, "
                            f"not the trusted key {stranger.key_id_hex}")
    two = [stranger, generate_keypair()[0]]
    with pytest.raises(SignatureError, match="not any of the trusted keys") as e:
        verify(DATA, signed, two)
    assert all(k.key_id_hex in str(e.value) for k in two)
    with pytest.raises(SignatureError, match="no key is trusted"):
        verify(DATA, signed, [])


def test_wrong_key_with_the_same_key_id_fails(
    keypair: tuple[PublicKey, SecretKey], signed: str
) -> None:
    """A different key that claims the signer's key id: the ed25519 check catches it."""
    impostor, _ = generate_keypair()
    impostor = PublicKey(key_id=keypair[0].key_id, raw=impostor.raw)
    with pytest.raises(SignatureError, match="^bad signature") as e:
        verify(DATA, signed, [impostor])
    assert check_of(e) == "signature"
    # With the real key among the candidates, it is found.
    assert verify(DATA, signed, [impostor, keypair[0]]).key == keypair[0]


def test_unknown_algorithm(keypair: tuple[PublicKey, SecretKey], signed: str) -> None:
    blob = b64_line(signed, 1)
    for alg in (b"Xx", b"ed", b"\x00\x00"):
        forged = replace_line(signed, 1, base64.b64encode(alg + blob[2:]).decode())
        with pytest.raises(SignatureError, match="^unknown signature algorithm") as e:
            verify(DATA, forged, [keypair[0]])
        assert check_of(e) == "algorithm"
    # Relabelling a prehashed signature as legacy does not verify either.
    relabelled = replace_line(signed, 1, base64.b64encode(b"Ed" + blob[2:]).decode())
    with pytest.raises(SignatureError) as e:
        verify(DATA, relabelled, [keypair[0]])
    assert check_of(e) == "signature"


def _malformed_variants(signed: str) -> dict[str, str | bytes]:
    lines = signed.splitlines()
    sig_b64, global_b64 = lines[1], lines[3]
    return {
        "empty": "",
        "garbage": "hello world\n",
        "binary": os.urandom(200),
        "not utf-8": signed.encode().replace(b"sandboxer", b"\xff\xfe"),
        "truncated to 3 lines": "\n".join(lines[:3]) + "\n",
        "truncated mid-line": signed[: len(signed) // 2],
        "truncated base64": replace_line(signed, 1, sig_b64[:-4]),
        "extra line": signed + "more\n",
        "blank line between": "\n".join([lines[0], "", *lines[1:]]) + "\n",
        "no untrusted prefix": replace_line(signed, 0, "comment: x"),
        "no trusted prefix": replace_line(signed, 2, "trusted comment:x"),
        "lines swapped": "\n".join([lines[2], lines[1], lines[0], lines[3]]) + "\n",
        "bad base64 char": replace_line(signed, 1, "!" + sig_b64[1:]),
        "unpadded base64": replace_line(signed, 1, sig_b64.rstrip("=")),
        "base64 with spaces": replace_line(signed, 1, sig_b64[:8] + " " + sig_b64[8:]),
        "short signature": replace_line(signed, 1, base64.b64encode(b"ED" + bytes(71)).decode()),
        "long signature": replace_line(signed, 1, base64.b64encode(bytes(75)).decode()),
        "short global signature": replace_line(signed, 3, global_b64[:-8]),
        "non-canonical base64": replace_line(signed, 3, global_b64[:-3] + "R=="),
        "CR inside a comment": replace_line(signed, 2, "trusted comment: a\rb"),
        "NUL inside a comment": replace_line(signed, 2, "trusted comment: a\x00b"),
        "huge": signed + "x" * 100_000,
        "huge trusted comment": replace_line(
            signed, 2, "trusted comment: " + "x" * (MAX_TRUSTED_COMMENT + 1)),
    }


def test_truncated_and_garbage_signature_files(
    keypair: tuple[PublicKey, SecretKey], signed: str
) -> None:
    for name, text in _malformed_variants(signed).items():
        with pytest.raises(SignatureError, match="^malformed") as e:
            verify(DATA, text, [keypair[0]])
        assert check_of(e) == "malformed", name


def test_line_endings(keypair: tuple[PublicKey, SecretKey], signed: str) -> None:
    """CRLF files and a missing final newline are still the same signature."""
    assert verify(DATA, signed.replace("\n", "\r\n"), [keypair[0]])
    assert verify(DATA, signed.rstrip("\n"), [keypair[0]])


def test_sign_refuses_comments_minisign_cannot_carry(
    keypair: tuple[PublicKey, SecretKey]
) -> None:
    sec = keypair[1]
    for bad in ("two\nlines", "cr\r", "nul\x00"):
        with pytest.raises(ValueError, match="one line"):
            sign(DATA, sec, trusted_comment=bad)
        with pytest.raises(ValueError, match="one line"):
            sign(DATA, sec, trusted_comment="ok", untrusted_comment=bad)
    with pytest.raises(ValueError, match="limit"):
        sign(DATA, sec, trusted_comment="x" * (MAX_TRUSTED_COMMENT + 1))
    longest = sign(DATA, sec, trusted_comment="x" * MAX_TRUSTED_COMMENT)
    assert verify(DATA, longest, keypair[0]).trusted_comment == "x" * MAX_TRUSTED_COMMENT


# --- key files -----------------------------------------------------------------------------------


def test_public_key_file_round_trip(keypair: tuple[PublicKey, SecretKey], tmp_path: Path) -> None:
    pub, sec = keypair
    text = pub.to_file_text()
    assert text.splitlines()[0] == f"untrusted comment: minisign public key {pub.key_id_hex}"
    # the 8 stored bytes as one little-endian number, upper-case hex without leading zeros
    assert int(pub.key_id_hex, 16) == int.from_bytes(pub.key_id, "little")
    assert pub.key_id_hex == pub.key_id_hex.upper()
    assert pub.key_id_hex == "0" or not pub.key_id_hex.startswith("0")
    raw = b64_line(text, 1)
    assert raw == b"Ed" + pub.key_id + pub.raw and len(raw) == 42
    (tmp_path / "k.pub").write_text(text)
    assert PublicKey.from_file(tmp_path / "k.pub") == pub
    assert PublicKey.from_base64(pub.to_base64()) == pub
    assert sec.public_key == pub
    assert sec.key_id_hex == pub.key_id_hex
    assert "seed" not in repr(sec) and sec.seed.hex() not in repr(sec)


def test_secret_key_file_round_trip_unencrypted(keypair: tuple[PublicKey, SecretKey]) -> None:
    _, sec = keypair
    text = sec.to_file_text()
    blob = b64_line(text, 1)
    assert text.splitlines()[0] == "untrusted comment: minisign encrypted secret key"
    assert len(blob) == 158
    assert blob[:6] == b"Ed\x00\x00B2" and blob[6:54] == bytes(48)  # no KDF, zero salt/limits
    assert blob[54:62] == sec.key_id
    assert blob[62:94] == sec.seed and blob[94:126] == sec.public_key.raw
    assert blob[126:] == hashlib.blake2b(b"Ed" + blob[54:126], digest_size=32).digest()
    assert SecretKey.from_file_text(text) == sec
    # A password given for an unencrypted key is not needed and does no harm.
    assert SecretKey.from_file_text(text, password="unused") == sec


@pytest.mark.parametrize("opslimit, memlimit", SMALL_KDF)
def test_secret_key_file_round_trip_encrypted(
    keypair: tuple[PublicKey, SecretKey], opslimit: int, memlimit: int
) -> None:
    _, sec = keypair
    text = sec.to_file_text(password="correct horse", kdf_opslimit=opslimit,
                            kdf_memlimit=memlimit)
    blob = b64_line(text, 1)
    assert blob[:6] == b"EdScB2" and blob[54:62] != sec.key_id  # the key id is encrypted too
    assert SecretKey.from_file_text(text, password="correct horse") == sec
    assert SecretKey.from_file_text(text, password=b"correct horse") == sec
    with pytest.raises(SignatureError, match="wrong password") as e:
        SecretKey.from_file_text(text, password="wrong")
    assert check_of(e) == "key"
    with pytest.raises(SignatureError, match="unencrypted key") as e:
        SecretKey.from_file_text(text)
    assert check_of(e) == "key"


def test_secret_key_refuses_absurd_kdf_parameters(keypair: tuple[PublicKey, SecretKey]) -> None:
    blob = bytearray(b64_line(keypair[1].to_file_text(), 1))
    blob[2:4] = b"Sc"
    blob[38:54] = (2**40).to_bytes(8, "little") + (2**40).to_bytes(8, "little")
    text = "untrusted comment: x\n" + base64.b64encode(bytes(blob)).decode() + "\n"
    with pytest.raises(SignatureError, match="unusable scrypt parameters"):
        SecretKey.from_file_text(text, password="pw")


def test_corrupted_secret_keys_are_refused(keypair: tuple[PublicKey, SecretKey]) -> None:
    good = bytearray(b64_line(keypair[1].to_file_text(), 1))

    def text(blob: bytes) -> str:
        return "untrusted comment: k\n" + base64.b64encode(blob).decode() + "\n"

    cases = {
        "checksum": (126, b"\x01"),
        "public half": (100, bytes([good[100] ^ 1])),
        "signature algorithm": (0, b"XX"),
        "checksum algorithm": (4, b"B3"),
        "key derivation algorithm": (2, b"Ar"),
    }
    for name, (offset, patch) in cases.items():
        blob = bytearray(good)
        blob[offset:offset + len(patch)] = patch
        with pytest.raises(SignatureError) as e:
            SecretKey.from_file_text(text(bytes(blob)))
        assert check_of(e) == "key", name
    # An all-zero checksum is what `minisign -G -W` (0.11) writes: accepted.
    zero = bytearray(good)
    zero[126:] = bytes(32)
    assert SecretKey.from_file_text(text(bytes(zero))) == keypair[1]


def test_malformed_key_files(tmp_path: Path, keypair: tuple[PublicKey, SecretKey]) -> None:
    pub_text = keypair[0].to_file_text()
    bad = [
        "", "garbage", pub_text.splitlines()[1] + "\n",  # the bare base64 is not a file
        "untrusted comment: x\n" + base64.b64encode(b"Ed" + bytes(41)).decode() + "\n",
        "untrusted comment: x\n" + base64.b64encode(b"EX" + bytes(40)).decode() + "\n",
        pub_text + "extra\n",
    ]
    for text in bad:
        with pytest.raises(SignatureError) as e:
            PublicKey.from_file_text(text)
        assert check_of(e) == "key"
        with pytest.raises(SignatureError) as e:
            SecretKey.from_file_text(text)
        assert check_of(e) == "key"
    with pytest.raises(SignatureError, match="cannot read the public key file") as e:
        PublicKey.from_file(tmp_path / "missing.pub")
    assert check_of(e) == "key"


def test_generate_keypair_comment() -> None:
    pub, sec = generate_keypair("sandboxer registry key")
    assert pub.to_file_text().startswith("untrusted comment: sandboxer registry key\n")
    assert sec.to_file_text().startswith("untrusted comment: sandboxer registry key\n")
    assert PublicKey.from_file_text(pub.to_file_text()).comment == "sandboxer registry key"
    a, b = generate_keypair(), generate_keypair()
    assert a[0].key_id != b[0].key_id and a[0].raw != b[0].raw


# --- property tests ------------------------------------------------------------------------------

comments = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n\x00"),
                   max_size=200)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=4096), trusted=comments, untrusted=comments, legacy=st.booleans())
def test_round_trip_property(
    keypair: tuple[PublicKey, SecretKey], data: bytes, trusted: str, untrusted: str, legacy: bool
) -> None:
    text = sign(data, keypair[1], trusted_comment=trusted, untrusted_comment=untrusted,
                legacy=legacy)
    result = verify(data, text, [keypair[0]])
    assert (result.trusted_comment, result.untrusted_comment) == (trusted, untrusted)
    assert result.prehashed is not legacy


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.text(max_size=600), st.binary(max_size=600)))
def test_parsers_never_crash_on_garbage(text: str | bytes) -> None:
    pub, _ = generate_keypair()
    for parse in (lambda: verify(b"x", text, [pub]), lambda: PublicKey.from_file_text(text),
                  lambda: SecretKey.from_file_text(text), lambda: SecretKey.from_file_text(
                      text, password="pw")):
        try:
            parse()
        except SignatureError as e:
            assert e.check in {"malformed", "key"}, e


_SAMPLE_PUB, _SAMPLE_SEC = generate_keypair()
_SAMPLE_SIG = sign(DATA, _SAMPLE_SEC, trusted_comment="fuzz me")
_SAMPLE_SEC_TEXT = _SAMPLE_SEC.to_file_text()


def _mutate(text: str, position: int, replacement: str, delete: int) -> str:
    position %= len(text) + 1
    return text[:position] + replacement + text[position + delete:]


@settings(max_examples=1000, deadline=None)
@given(position=st.integers(0, 10_000), replacement=st.text(max_size=4),
       delete=st.integers(0, 4))
def test_mutated_signatures_fail_cleanly(position: int, replacement: str, delete: int) -> None:
    """Any edit of a valid signature file is refused with a SignatureError, unless it only
    touched the untrusted comment or the line ending (which nothing signs)."""
    mutated = _mutate(_SAMPLE_SIG, position, replacement, delete)
    try:
        result = verify(DATA, mutated, [_SAMPLE_PUB])
    except SignatureError as e:
        assert e.check in {"malformed", "algorithm", "key-id", "signature", "trusted-comment"}
    else:
        # (split on LF only: str.splitlines() would also split on \x1e, \x85, \u2028 ...)
        assert result.trusted_comment == "fuzz me"
        lines = mutated.replace("\r\n", "\n").rstrip("\n").split("\n")
        assert lines[0].startswith("untrusted comment: ")
        assert lines[1:] == _SAMPLE_SIG.rstrip("\n").split("\n")[1:]


@settings(max_examples=300, deadline=None)
@given(position=st.integers(0, 10_000), replacement=st.text(max_size=4),
       delete=st.integers(0, 4))
def test_mutated_secret_keys_fail_cleanly(position: int, replacement: str, delete: int) -> None:
    mutated = _mutate(_SAMPLE_SEC_TEXT, position, replacement, delete)
    try:
        key = SecretKey.from_file_text(mutated)
    except SignatureError as e:
        assert e.check == "key"
    else:
        assert key == _SAMPLE_SEC


# --- compatibility with Debian's minisign --------------------------------------------------------


@pytest.fixture
def minisign_keys(minisign_bin: str, tmp_path: Path) -> Path:
    """A key pair made by `minisign -G -W` in tmp_path (minisign.pub, minisign.key)."""
    run_minisign(minisign_bin, "-G", "-W", "-p", "minisign.pub", "-s", "minisign.key",
                 cwd=tmp_path)
    (tmp_path / "file.bin").write_bytes(DATA)
    return tmp_path


def test_minisign_made_signature_verifies_with_us(minisign_bin: str, minisign_keys: Path) -> None:
    d = minisign_keys
    run_minisign(minisign_bin, "-S", "-s", "minisign.key", "-m", "file.bin",
                 "-t", "release 1.2.3 of x", cwd=d)
    pub = PublicKey.from_file(d / "minisign.pub")
    # Our key id reads the way minisign prints it in the public key file's comment.
    assert (d / "minisign.pub").read_text().splitlines()[0] == (
        f"untrusted comment: minisign public key {pub.key_id_hex}")
    sig = (d / "file.bin.minisig").read_text()
    result = verify(DATA, sig, [pub])
    assert result.trusted_comment == "release 1.2.3 of x" and result.prehashed
    assert result.untrusted_comment == "signature from minisign secret key"
    # minisign's default trusted comment, and the same checks failing as with our own.
    run_minisign(minisign_bin, "-S", "-s", "minisign.key", "-m", "file.bin", "-x", "d.sig", cwd=d)
    default = verify(DATA, (d / "d.sig").read_text(), pub).trusted_comment
    assert default.startswith("timestamp:") and default.endswith("\tfile:file.bin\thashed")
    with pytest.raises(SignatureError) as e:
        verify(DATA + b"x", sig, [pub])
    assert check_of(e) == "signature"
    with pytest.raises(SignatureError) as e:
        verify(DATA, replace_line(sig, 2, "trusted comment: release 9.9.9 of x"), [pub])
    assert check_of(e) == "trusted-comment"
    with pytest.raises(SignatureError) as e:
        verify(DATA, sig, [generate_keypair()[0]])
    assert check_of(e) == "key-id" and pub.key_id_hex in str(e.value)


def test_minisign_legacy_signature_verifies_with_us(
    minisign_bin: str, minisign_keys: Path
) -> None:
    d = minisign_keys
    run_minisign(minisign_bin, "-S", "-l", "-s", "minisign.key", "-m", "file.bin",
                 "-t", "legacy one", cwd=d)
    sig = (d / "file.bin.minisig").read_text()
    assert b64_line(sig, 1)[:2] == b"Ed"
    result = verify(DATA, sig, [PublicKey.from_file(d / "minisign.pub")])
    assert result.trusted_comment == "legacy one" and result.prehashed is False
    with pytest.raises(SignatureError) as e:
        verify(DATA, sig, [PublicKey.from_file(d / "minisign.pub")], allow_legacy=False)
    assert check_of(e) == "algorithm"


@pytest.mark.parametrize("legacy", [False, True])
def test_our_signature_verifies_with_minisign(
    minisign_bin: str, tmp_path: Path, legacy: bool
) -> None:
    pub, sec = generate_keypair()
    (tmp_path / "our.pub").write_text(pub.to_file_text())
    (tmp_path / "file.bin").write_bytes(DATA)
    comment = "sandboxer index sha256:abc\tversion 7 \u00e9"
    (tmp_path / "file.bin.minisig").write_text(
        sign(DATA, sec, trusted_comment=comment, legacy=legacy))
    out = run_minisign(minisign_bin, "-V", "-p", "our.pub", "-m", "file.bin", cwd=tmp_path)
    assert "Signature and comment signature verified" in out.stdout
    assert f"Trusted comment: {comment}\n" in out.stdout
    # Also with the key given inline, as `minisign -P` takes it.
    out = run_minisign(minisign_bin, "-V", "-P", pub.to_base64(), "-m", "file.bin", "-Q",
                       cwd=tmp_path)
    assert out.stdout == comment + "\n"
    # `-H` (prehashed signatures only) accepts ours unless we signed legacy.
    hashed_only = run_minisign(minisign_bin, "-V", "-H", "-p", "our.pub", "-m", "file.bin",
                               cwd=tmp_path, check=False)
    assert (hashed_only.returncode == 0) is not legacy
    # And minisign refuses what we refuse: altered data.
    (tmp_path / "file.bin").write_bytes(DATA + b"x")
    bad = run_minisign(minisign_bin, "-V", "-p", "our.pub", "-m", "file.bin", cwd=tmp_path,
                       check=False)
    assert bad.returncode != 0 and "Signature verification failed" in bad.stderr


def test_comment_limits_match_minisign(minisign_bin: str, tmp_path: Path) -> None:
    """The longest comments we write, minisign reads; one byte more, both refuse."""
    pub, sec = generate_keypair()
    (tmp_path / "our.pub").write_text(pub.to_file_text())
    (tmp_path / "file.bin").write_bytes(DATA)
    longest = sign(DATA, sec, trusted_comment="t" * MAX_TRUSTED_COMMENT,
                   untrusted_comment="u" * MAX_UNTRUSTED_COMMENT)
    too_long = {
        "trusted": longest.replace("trusted comment: t", "trusted comment: tt"),
        "untrusted": longest.replace("untrusted comment: u", "untrusted comment: uu"),
    }
    (tmp_path / "file.bin.minisig").write_text(longest)
    out = run_minisign(minisign_bin, "-V", "-p", "our.pub", "-m", "file.bin", "-Q", cwd=tmp_path)
    assert out.stdout == "t" * MAX_TRUSTED_COMMENT + "\n"
    for which, text in too_long.items():
        (tmp_path / "file.bin.minisig").write_text(text)
        out = run_minisign(minisign_bin, "-V", "-p", "our.pub", "-m", "file.bin", cwd=tmp_path,
                           check=False)
        assert out.returncode != 0 and "too long" in out.stderr, which
        with pytest.raises(SignatureError, match="longer than minisign allows") as e:
            verify(DATA, text, pub)
        assert check_of(e) == "malformed"


def test_our_key_ids_match_minisigns_reading(minisign_bin: str, tmp_path: Path) -> None:
    """minisign names our key id the way we do when it does not match."""
    pub, sec = generate_keypair()
    other, _ = generate_keypair()
    (tmp_path / "other.pub").write_text(other.to_file_text())
    (tmp_path / "file.bin").write_bytes(DATA)
    (tmp_path / "file.bin.minisig").write_text(sign(DATA, sec, trusted_comment="t"))
    out = run_minisign(minisign_bin, "-V", "-p", "other.pub", "-m", "file.bin", cwd=tmp_path,
                       check=False)
    assert out.returncode == 1
    # minisign 0.11 prints the ids with %PRIX64 (no zero padding); ours are padded to 16.
    assert f"is {pub.key_id_hex.lstrip('0') or '0'}\n" in out.stderr
    assert f"public key is {other.key_id_hex.lstrip('0') or '0'}\n" in out.stderr


def test_we_sign_with_a_minisign_secret_key(minisign_bin: str, minisign_keys: Path) -> None:
    d = minisign_keys
    sec = SecretKey.from_file(d / "minisign.key")
    pub = PublicKey.from_file(d / "minisign.pub")
    assert sec.public_key == pub
    (d / "file.bin.minisig").write_text(sign(DATA, sec, trusted_comment="signed by sandboxer"))
    out = run_minisign(minisign_bin, "-V", "-p", "minisign.pub", "-m", "file.bin", cwd=d)
    assert "Trusted comment: signed by sandboxer\n" in out.stdout
    # Same key, same data, same comment: ed25519 is deterministic, so minisign's own signature
    # is byte for byte ours (apart from the untrusted comment).
    run_minisign(minisign_bin, "-S", "-s", "minisign.key", "-m", "file.bin", "-x", "m.sig",
                 "-t", "signed by sandboxer", cwd=d)
    theirs = (d / "m.sig").read_text().splitlines()
    ours = (d / "file.bin.minisig").read_text().splitlines()
    assert theirs[1:] == ours[1:]


def test_minisign_uses_our_secret_key_files(minisign_bin: str, tmp_path: Path) -> None:
    pub, sec = generate_keypair()
    (tmp_path / "our.pub").write_text(pub.to_file_text())
    (tmp_path / "our.key").write_text(sec.to_file_text())
    (tmp_path / "file.bin").write_bytes(DATA)
    run_minisign(minisign_bin, "-S", "-s", "our.key", "-m", "file.bin", "-t", "by minisign",
                 cwd=tmp_path)
    assert verify(DATA, (tmp_path / "file.bin.minisig").read_text(), pub).trusted_comment == (
        "by minisign")
    # `minisign -R` rebuilds the public key file from our secret key: exactly our file.
    (tmp_path / "our.pub").unlink()
    run_minisign(minisign_bin, "-R", "-s", "our.key", "-p", "our.pub", cwd=tmp_path)
    assert (tmp_path / "our.pub").read_text() == pub.to_file_text()


@pytest.mark.parametrize("opslimit, memlimit", SMALL_KDF)
def test_minisign_decrypts_our_encrypted_secret_key(
    minisign_bin: str, tmp_path: Path, opslimit: int, memlimit: int
) -> None:
    pub, sec = generate_keypair()
    (tmp_path / "our.key").write_text(
        sec.to_file_text(password="pass phrase", kdf_opslimit=opslimit, kdf_memlimit=memlimit))
    (tmp_path / "file.bin").write_bytes(DATA)
    run_minisign(minisign_bin, "-S", "-s", "our.key", "-m", "file.bin", "-t", "enc",
                 cwd=tmp_path, stdin="pass phrase\n")
    assert verify(DATA, (tmp_path / "file.bin.minisig").read_text(), pub).trusted_comment == "enc"
    wrong = run_minisign(minisign_bin, "-S", "-s", "our.key", "-m", "file.bin", cwd=tmp_path,
                         stdin="wrong\n", check=False)
    assert wrong.returncode != 0 and "Wrong password" in wrong.stderr


@pytest.mark.timeout(300)
def test_we_decrypt_a_minisign_encrypted_secret_key(minisign_bin: str, tmp_path: Path) -> None:
    """minisign's own scrypt parameters (N=2^20: 1 GiB, several seconds each way)."""
    run_minisign(minisign_bin, "-G", "-p", "m.pub", "-s", "m.key", cwd=tmp_path,
                 stdin="pw of minisign\npw of minisign\n")
    blob = b64_line((tmp_path / "m.key").read_text(), 1)
    assert blob[:6] == b"EdScB2"
    sec = SecretKey.from_file(tmp_path / "m.key", password="pw of minisign")
    assert sec.public_key == PublicKey.from_file(tmp_path / "m.pub")
    with pytest.raises(SignatureError, match="unencrypted key"):
        SecretKey.from_file(tmp_path / "m.key")


def test_a_key_id_prints_as_minisign_prints_it_without_leading_zeros():
    """minisign shows the little-endian key id with "%" PRIX64: a top nibble of 0 is not
    printed (found by a random key: 1 in 16 made our public key file differ from `-R`)."""
    from sandboxer._minisign import _key_id_hex
    assert _key_id_hex(bytes.fromhex("4a2c71b8be506109")) == "96150BEB8712C4A"
    assert _key_id_hex(bytes.fromhex("4a2c71b8be5061f9")) == "F96150BEB8712C4A"
