"""A signed plugin registry: publish, list, resolve, fetch, verify, extract (DESIGN section 8).

Layout of a registry (a local directory, or the same files under an HTTP(S) base URL)::

    index.json                      {"format": 1, "plugins": {ID: {"versions": {VERSION: entry}}}}
    index.json.minisig              its signature; trusted comment "sandboxer index seq=N"
    blobs/sha256/<hex>              the plugin directory as a deterministic .tar.gz
    blobs/sha256/<hex>.minisig      its detached signature, minisign format (ed25519)

An entry: {"type", "sha256", "size", "blob", "signature", "published"}.

What a client trusts, in the order it checks (docs/architecture.md, "Registry"):

1. The index: its signature verifies against one of the host's trusted keys, and its sequence
   number N (bumped by one at every publish) is not lower than the newest this host has seen
   from that location (``_rollback``), so a mirror cannot serve an older signed index, and with
   it an older "latest". An unsigned index is refused.
2. The index speaks for a plugin id only if the key that signed it is trusted for that id: a
   key scoped to ``acme.*`` cannot decide which versions of ``evil.tool`` exist.
3. The archive: its sha256 matches the entry, its signature verifies against a trusted key
   whose scope covers the plugin id, and the signature's trusted comment names this very id,
   version and digest ("sandboxer ID@VERSION sha256:HEX"), so a signed archive cannot be
   passed off as another plugin or version.

Fetched archives are cached under ``$XDG_CACHE_HOME/sandboxer`` (``~/.cache/sandboxer``) and
extracted with every member checked (regular files and directories only; no absolute paths,
no ``..``, no links, no devices; size and count caps). Signatures are verified on every fetch,
also from the cache. Nothing here trusts a byte of a registry before its check passed.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import stat
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from . import _minisign, _rollback
from ._archive import MAX_MEMBERS, MAX_UNPACKED, archive_checksum, safe_extract
from ._digest import IGNORED_DIRS, tree_checksum
from ._semver import best_match, parse_range
from ._trusted_keys import TrustedKey, covers, describe_scope
from .errors import IntegrityError, PluginNotFound, RegistryError
from .manifest import load_plugin

__all__ = [
    "Registry",
    "RegistryEntry",
    "SignedIndex",
    "TrustedKey",
    "TrustedPublicKey",
    "publish",
    "sign_index",
    "fetch",
    "fetch_verified",
    "Fetched",
    "safe_extract",
    "default_cache_dir",
    "load_trusted_keys",
    "INDEX",
    "INDEX_SIGNATURE",
    "MAX_ARCHIVE",
    "MAX_UNPACKED",
    "MAX_MEMBERS",
]

FORMAT = 1
MAX_ARCHIVE = 64 << 20  # bytes of a downloaded archive
MAX_INDEX = 16 << 20
MAX_SIGNATURE = 64 << 10
HTTP_TIMEOUT = 30.0
INDEX = "index.json"
INDEX_SIGNATURE = "index.json.minisig"
# The index signature's trusted comment: the sequence in canonical decimal, nothing else.
INDEX_COMMENT = "sandboxer index seq={sequence}"
_INDEX_COMMENT_RE = re.compile(r"sandboxer index seq=(0|[1-9][0-9]{0,18})")


@dataclass(frozen=True, repr=False)
class TrustedPublicKey:
    """A loaded trusted key and the plugin ids it may sign for (``ids`` None: every id).

    ``source`` names where it came from (its key file) for messages."""

    key: _minisign.PublicKey
    ids: tuple[str, ...] | None = None
    source: str = ""

    def __repr__(self) -> str:
        return f"TrustedPublicKey({self.describe()}, {describe_scope(self.ids)})"

    def covers(self, plugin_id: str) -> bool:
        return covers(self.ids, plugin_id)

    def describe(self) -> str:
        """``key 8A3F... (/etc/sandboxer/acme.pub)``"""
        where = f" ({self.source})" if self.source else ""
        return f"key {self.key.key_id_hex}{where}"


def load_trusted_keys(
    keys: Iterable[TrustedKey | str | os.PathLike[str]],
) -> list[TrustedPublicKey]:
    """The minisign public keys ``keys`` name (a plain path: trusted for every id), each with
    its id scope; RegistryError names a key file it cannot read.

    The same key listed more than once is trusted for the union of its scopes."""
    loaded = []
    for item in keys:
        spec = item if isinstance(item, TrustedKey) else TrustedKey(os.fspath(item))
        try:
            public = _minisign.PublicKey.from_file(spec.path)
        except _minisign.SignatureError as exc:
            raise RegistryError(f"trusted key {spec.path}: {exc}") from None
        loaded.append(TrustedPublicKey(public, spec.ids, spec.path))
    return _keyring(loaded)


def _keyring(keys: Iterable[TrustedPublicKey | _minisign.PublicKey]) -> list[TrustedPublicKey]:
    """One entry per distinct key (a bare PublicKey is trusted for every id), scopes merged."""
    merged: dict[_minisign.PublicKey, TrustedPublicKey] = {}
    for item in keys:
        key = item if isinstance(item, TrustedPublicKey) else TrustedPublicKey(item)
        known = merged.get(key.key)
        if known is None:
            merged[key.key] = key
            continue
        if known.ids is None or key.ids is None:
            ids = None
        else:
            ids = known.ids + tuple(p for p in key.ids if p not in known.ids)
        sources = ", ".join(s for s in (known.source, key.source) if s)
        merged[key.key] = TrustedPublicKey(known.key, ids, sources)
    return list(merged.values())


def _signer(
    keys: list[TrustedPublicKey], verified: _minisign.VerifiedSignature
) -> TrustedPublicKey:
    """The trusted key that made a signature verify() accepted."""
    for key in keys:
        if key.key == verified.key:
            return key
    raise RuntimeError("verify() returned a key that is not among the trusted ones")


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sandboxer"


@dataclass(frozen=True)
class RegistryEntry:
    id: str
    version: str
    type: str
    sha256: str
    size: int
    blob: str
    signature: str
    published: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "version": self.version,
            "type": self.type,
            "sha256": self.sha256,
            "size": self.size,
            "blob": self.blob,
            "signature": self.signature,
            "published": self.published,
        }

    def trusted_comment(self) -> str:
        return f"sandboxer {self.id}@{self.version} sha256:{self.sha256}"


class Registry:
    """A registry to read from: a directory path or an ``http(s)://`` base URL."""

    def __init__(self, location: str | os.PathLike[str]) -> None:
        text = os.fspath(location)
        self.location = text
        scheme = urllib.parse.urlsplit(text).scheme
        self.url = text.rstrip("/") + "/" if scheme in ("http", "https") else None
        if scheme and self.url is None and len(scheme) > 1:
            raise RegistryError(
                f"registry {text}: only local directories and http(s) URLs "
                f"are supported, not {scheme}://"
            )
        self.root = None if self.url else Path(text)

    @property
    def state_key(self) -> str:
        """The name the rollback state is kept under: the base URL, or the directory made
        absolute (as configured, symbolic links not resolved: the name is what is trusted)."""
        if self.url is not None:
            return self.url
        assert self.root is not None
        return os.path.abspath(self.root)

    def read(self, relative: str, limit: int) -> bytes:
        """The bytes of ``relative`` (a path inside the registry), at most ``limit``."""
        parts = PurePosixPath(relative).parts
        if (
            not relative
            or relative.startswith("/")
            or ".." in parts
            or any(p in ("", ".") for p in relative.split("/"))
        ):
            raise RegistryError(
                f"registry {self.location}: refuses the path {relative!r} "
                "(absolute or leading outside the registry)"
            )
        if self.url is None:
            assert self.root is not None
            path = self.root / relative
            try:
                with open(path, "rb") as f:
                    data = f.read(limit + 1)
            except FileNotFoundError:
                raise _NotFound(f"registry {self.location}: {relative} not found") from None
            except OSError as exc:
                raise RegistryError(
                    f"registry {self.location}: cannot read {relative}: {exc.strerror}"
                ) from None
        else:
            url = urllib.parse.urljoin(self.url, relative)
            try:
                with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as reply:
                    data = reply.read(limit + 1)
                    expected = reply.headers.get("Content-Length")
            except urllib.error.HTTPError as exc:
                error = _NotFound if exc.code in (404, 410) else RegistryError
                raise error(
                    f"registry {self.location}: {relative}: HTTP {exc.code} {exc.reason}"
                ) from None
            except (urllib.error.URLError, OSError, ValueError) as exc:
                reason = getattr(exc, "reason", exc)
                raise RegistryError(
                    f"registry {self.location}: cannot fetch {relative}: {reason}"
                ) from None
            if expected is not None and expected.isdigit() and len(data) < int(expected):
                raise IntegrityError(
                    f"registry {self.location}: the download of {relative} "
                    f"is truncated ({len(data)} of {expected} bytes)"
                )
        if len(data) > limit:
            raise RegistryError(
                f"registry {self.location}: {relative} is larger than {limit} bytes"
            )
        return data

    def index(
        self,
        trusted_keys: Iterable[TrustedPublicKey | _minisign.PublicKey],
        *,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> SignedIndex:
        """The registry's index, once it is trusted: signed by one of ``trusted_keys`` and not
        older than the newest index seen from this location before (the rollback state under
        ``cache_dir``, by default the user's cache), which it then records.

        Any trusted key may sign the index, whatever its id scope; the returned index then
        resolves only the ids that key is trusted for (SignedIndex.resolve)."""
        keys = _keyring(trusted_keys)
        if not keys:
            raise IntegrityError(
                f"registry {self.location}: cannot trust its index: no "
                "trusted keys are configured (--trusted-key, or "
                "trusted_keys in the host config)"
            )
        raw = self.read(INDEX, MAX_INDEX)
        try:
            signature = self.read(INDEX_SIGNATURE, MAX_SIGNATURE)
        except _NotFound:
            raise IntegrityError(
                f"registry {self.location}: {INDEX} is not signed ({INDEX_SIGNATURE} is "
                "missing), and an unsigned index is refused: whoever serves the registry "
                "could rewrite it. Its publisher signs it with `sandboxer registry publish`, "
                "or, for a registry published before indexes were signed, `sandboxer "
                f"registry sign-index --registry {self.location} --key SECRET_KEY`"
            ) from None
        try:
            verified = _minisign.verify(raw, signature, [k.key for k in keys])
        except _minisign.SignatureError as exc:
            raise _minisign.SignatureError(
                f"registry {self.location}: {INDEX} failed its signature check: {exc}. The "
                "index was altered, signed by a key this host does not trust, or replaced "
                "while it was read (then fetch again); use the publisher's registry and "
                "trust its key",
                check=exc.check,
            ) from None
        sequence = _index_sequence(verified.trusted_comment)
        if sequence is None:
            raise IntegrityError(
                f"registry {self.location}: {INDEX_SIGNATURE} is a valid signature, but its "
                f"trusted comment {verified.trusted_comment!r} is not a sandboxer index's "
                f"({INDEX_COMMENT.format(sequence='N')!r}): it was made for another file"
            )
        plugins = _parse_index(raw, self.location)
        signer = _signer(keys, verified)
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        _rollback.check_and_record(cache, self.state_key, sequence, signer.key.key_id_hex)
        return SignedIndex(
            location=self.location, sequence=sequence, signer=signer, plugins=plugins
        )


class _NotFound(RegistryError):
    """The registry has no such file (ENOENT, HTTP 404 or 410)."""


@dataclass(frozen=True)
class SignedIndex:
    """An index whose signature and sequence were checked (Registry.index() makes them)."""

    location: str
    sequence: int
    signer: TrustedPublicKey
    plugins: dict[str, Any]

    def entries(self) -> list[RegistryEntry]:
        out = []
        for plugin_id, record in sorted(self.plugins.items()):
            versions = record.get("versions", {}) if isinstance(record, dict) else {}
            for version, entry in versions.items():
                out.append(self._entry(plugin_id, version, entry))
        return out

    def _entry(self, plugin_id: str, version: str, entry: Any) -> RegistryEntry:
        try:
            return RegistryEntry(
                id=plugin_id,
                version=version,
                type=str(entry["type"]),
                sha256=_hex(entry["sha256"]),
                size=int(entry["size"]),
                blob=str(entry["blob"]),
                signature=str(entry["signature"]),
                published=str(entry.get("published", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RegistryError(
                f"registry {self.location}: the index entry for "
                f"{plugin_id}@{version} is malformed ({exc})"
            ) from None

    def resolve(self, plugin_id: str, wanted: str = "latest") -> RegistryEntry:
        """The entry for ``plugin_id`` at the highest version ``wanted`` allows.

        Refused when the key that signed the index is not trusted for ``plugin_id``: which
        versions of a plugin exist is for a key trusted for it to say."""
        if not self.signer.covers(plugin_id):
            raise IntegrityError(
                f"registry {self.location}: its index is signed by {self.signer.describe()}, "
                f"which is trusted {describe_scope(self.signer.ids)}, not for "
                f"{plugin_id}, so that index cannot say which versions of {plugin_id} exist. "
                f"Have the registry's index signed by a key you trust for {plugin_id} "
                "(sandboxer registry sign-index), or trust its signer for it",
                plugin_id=plugin_id,
            )
        try:
            spec = parse_range(wanted)
        except ValueError as exc:
            raise RegistryError(str(exc)) from None
        record = self.plugins.get(plugin_id)
        versions = record.get("versions", {}) if isinstance(record, dict) else {}
        if not versions:
            raise PluginNotFound(
                f"registry {self.location} has no plugin {plugin_id!r}", plugin_id=plugin_id
            )
        version = best_match(spec, versions)
        if version is None:
            raise PluginNotFound(
                f"registry {self.location}: no version of {plugin_id} matches {wanted!r} "
                f"(available: {', '.join(sorted(versions))})",
                plugin_id=plugin_id,
            )
        return self._entry(plugin_id, version, versions[version])


def _parse_index(raw: bytes, location: str) -> dict[str, Any]:
    """The ``plugins`` table of an index.json's bytes."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RegistryError(f"registry {location}: {INDEX} is not JSON: {exc}") from None
    if (
        not isinstance(data, dict)
        or data.get("format") != FORMAT
        or not isinstance(data.get("plugins"), dict)
    ):
        raise RegistryError(
            f"registry {location}: {INDEX} is not a format-{FORMAT} sandboxer index"
        )
    plugins: dict[str, Any] = data["plugins"]
    return plugins


def _index_sequence(trusted_comment: str) -> int | None:
    match = _INDEX_COMMENT_RE.fullmatch(trusted_comment)
    if match is None or int(match.group(1)) > _rollback.MAX_SEQUENCE:
        return None
    return int(match.group(1))


def _hex(value: Any) -> str:
    text = str(value)
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise ValueError(f"sha256 must be 64 lower-case hex digits, not {text!r}")
    return text


# -- publishing --------------------------------------------------------------------------------
def _archive(root: Path) -> bytes:
    """The plugin directory as a deterministic .tar.gz: sorted, owner 0, mtime 0, modes 644/755.
    Links are refused: a registry archive holds files and directories only."""
    buf = io.BytesIO()
    with (
        gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in IGNORED_DIRS)
            base = Path(dirpath)
            for name in dirnames + sorted(filenames):
                full = base / name
                rel = full.relative_to(root).as_posix()
                st = os.lstat(full)
                info = tarfile.TarInfo(rel)
                info.mtime = 0
                if stat.S_ISLNK(st.st_mode):
                    raise RegistryError(
                        f"cannot publish {root}: {rel} is a symbolic link "
                        "(registry archives hold files only)"
                    )
                if stat.S_ISDIR(st.st_mode):
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(info)
                elif stat.S_ISREG(st.st_mode):
                    info.size = st.st_size
                    info.mode = 0o755 if st.st_mode & 0o111 else 0o644
                    with open(full, "rb") as f:
                        tar.addfile(info, f)
                else:
                    raise RegistryError(
                        f"cannot publish {root}: {rel} is not a regular file or directory"
                    )
    return buf.getvalue()


def publish(
    plugin_dir: str | os.PathLike[str],
    registry_dir: str | os.PathLike[str],
    secret_key: _minisign.SecretKey,
) -> RegistryEntry:
    """Add a plugin directory to a local registry directory, signed with ``secret_key``; the
    index is signed again with the next sequence number (see sign_index).

    A version already published with different content is refused (versions are immutable)."""
    plugin = load_plugin(plugin_dir)
    root = Path(plugin.root)
    if not root.is_dir():
        raise RegistryError(
            f"cannot publish {plugin_dir}: a registry holds plugin directories with a plugin.toml"
        )
    data = _archive(root)
    digest = hashlib.sha256(data).hexdigest()
    registry = Path(registry_dir)
    blobs = registry / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    entry = RegistryEntry(
        id=plugin.id,
        version=plugin.version,
        type=plugin.type.value,
        sha256=digest,
        size=len(data),
        blob=f"blobs/sha256/{digest}",
        signature=f"blobs/sha256/{digest}.minisig",
        published=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    )
    with _publishing(registry):
        index_path = registry / INDEX
        index: dict[str, Any] = (
            _publisher_index(registry) if index_path.exists() else {"format": FORMAT, "plugins": {}}
        )
        versions = index["plugins"].setdefault(plugin.id, {"versions": {}})["versions"]
        old = versions.get(plugin.version)
        if old is not None and old.get("sha256") != digest:
            raise RegistryError(
                f"{plugin.id}@{plugin.version} is already published with other "
                "content; publish a new version"
            )
        _write_atomic(registry / entry.blob, data)
        signature = _minisign.sign(data, secret_key, trusted_comment=entry.trusted_comment())
        _write_atomic(registry / entry.signature, signature.encode())
        record = entry.to_json()
        for key in ("id", "version"):
            del record[key]
        versions[plugin.version] = record
        raw = json.dumps(index, indent=2, sort_keys=True).encode() + b"\n"
        _write_atomic(index_path, raw)
        _sign_index(registry, raw, secret_key)
    return entry


def sign_index(registry_dir: str | os.PathLike[str], secret_key: _minisign.SecretKey) -> int:
    """Sign a local registry's index.json as it stands with the next sequence number; the
    sequence. For a registry published before indexes were signed, for re-signing an index
    with another key (a registry operator's, after a publisher scoped to some ids published),
    and to refresh one. The index must be a well-formed sandboxer index."""
    registry = Path(registry_dir)
    if not (registry / INDEX).is_file():
        raise RegistryError(
            f"cannot sign the index of {registry}: it has no {INDEX} (publish a plugin to make one)"
        )
    with _publishing(registry):
        raw = (registry / INDEX).read_bytes()
        _parse_index(raw, str(registry))
        return _sign_index(registry, raw, secret_key)


def _sign_index(registry: Path, raw: bytes, secret_key: _minisign.SecretKey) -> int:
    """Write index.json.minisig for ``raw`` (index.json's bytes) with the sequence after the
    one the current signature carries (1 when there is none). A crash between writing the
    index and its signature leaves a mismatch clients refuse, and the next publish or
    sign-index repairs it."""
    sequence = _published_sequence(registry) + 1
    if sequence > _rollback.MAX_SEQUENCE:
        raise RegistryError(
            f"cannot sign the index of {registry}: its sequence is at the "
            f"maximum ({_rollback.MAX_SEQUENCE})"
        )
    signature = _minisign.sign(
        raw,
        secret_key,
        trusted_comment=INDEX_COMMENT.format(sequence=sequence),
        untrusted_comment=f"sandboxer registry index, sequence {sequence}",
    )
    _write_atomic(registry / INDEX_SIGNATURE, signature.encode())
    return sequence


def _published_sequence(registry: Path) -> int:
    """The sequence of the index signature on disk, 0 when there is none.

    Read, not verified: the publisher may not hold the key that signed it last, and the next
    signature is made by the publisher's own key over the index it writes."""
    path = registry / INDEX_SIGNATURE
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return 0
    except OSError as exc:
        raise RegistryError(f"cannot read {path}: {exc.strerror}") from None
    fix = (
        "; move it away only if no client has seen this registry, since its sequence "
        "then starts again at 1 and clients that saw a higher one refuse the index"
    )
    try:
        comment = _minisign.unverified_trusted_comment(text)
    except _minisign.SignatureError as exc:
        raise RegistryError(f"cannot read the index sequence from {path}: {exc}{fix}") from None
    sequence = _index_sequence(comment)
    if sequence is None:
        raise RegistryError(
            f"cannot read the index sequence from {path}: its trusted comment "
            f"{comment!r} is not {INDEX_COMMENT.format(sequence='N')!r}{fix}"
        )
    return sequence


def _publisher_index(registry: Path) -> dict[str, Any]:
    """The local index.json a publisher extends: its own directory, read as it stands."""
    try:
        raw = (registry / INDEX).read_bytes()
    except OSError as exc:
        raise RegistryError(f"cannot read {registry / INDEX}: {exc.strerror}") from None
    return {"format": FORMAT, "plugins": _parse_index(raw, str(registry))}


@contextlib.contextmanager
def _publishing(registry: Path) -> Iterator[None]:
    """One publisher at a time in a registry directory: two would both read sequence N and
    both sign N+1, or lose each other's index entries."""
    registry.mkdir(parents=True, exist_ok=True)
    fd = os.open(
        registry / ".publish.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644
    )
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# -- fetching ----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Fetched:
    """A verified fetch: the entry, the extracted plugin directory, and the tree checksum
    its signed archive unpacks to (computed from the verified bytes), which a load requires
    of the files it runs (``PluginManager.load(..., checksum=)``)."""

    entry: RegistryEntry
    directory: Path
    checksum: str


def fetch(
    registry: Registry,
    plugin_id: str,
    wanted: str,
    *,
    trusted_keys: Iterable[TrustedPublicKey | _minisign.PublicKey],
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[RegistryEntry, Path]:
    """``fetch_verified``'s entry and plugin directory."""
    got = fetch_verified(
        registry, plugin_id, wanted, trusted_keys=trusted_keys, cache_dir=cache_dir
    )
    return got.entry, got.directory


def fetch_verified(
    registry: Registry,
    plugin_id: str,
    wanted: str,
    *,
    trusted_keys: Iterable[TrustedPublicKey | _minisign.PublicKey],
    cache_dir: str | os.PathLike[str] | None = None,
) -> Fetched:
    """Verify the index, resolve, download (or reuse the cache), verify and extract. The
    archive is read once, into memory; its digest, its signature, its extraction and the
    tree checksum it vouches for all come from those bytes, never from the cached file read
    again. A bare PublicKey in ``trusted_keys`` is trusted for every id."""
    keys = _keyring(trusted_keys)
    if not keys:
        raise IntegrityError(
            f"cannot fetch {plugin_id}@{wanted}: no trusted keys are "
            "configured (--trusted-key, or trusted_keys in the host config)",
            plugin_id=plugin_id,
        )
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    entry = registry.index(keys, cache_dir=cache).resolve(plugin_id, wanted)
    if entry.size > MAX_ARCHIVE:
        raise RegistryError(
            f"{entry.id}@{entry.version}: its archive is {entry.size} bytes, "
            f"more than the {MAX_ARCHIVE}-byte limit"
        )
    blob_path = cache / "blobs" / entry.sha256
    data = None
    if blob_path.is_file():
        data = blob_path.read_bytes()
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            data = None  # a damaged cache entry: download again
    cached = data is not None
    if data is None:
        data = registry.read(entry.blob, entry.size)
        if len(data) != entry.size:
            raise IntegrityError(
                f"{entry.id}@{entry.version}: sha256 check failed: the "
                f"archive has {len(data)} bytes, the index says {entry.size} "
                "(truncated or replaced)",
                plugin_id=entry.id,
            )
        actual = hashlib.sha256(data).hexdigest()
        if actual != entry.sha256:
            raise IntegrityError(
                f"{entry.id}@{entry.version}: sha256 check failed: the "
                f"archive is sha256:{actual}, the index says "
                f"sha256:{entry.sha256}",
                plugin_id=entry.id,
            )
    signature = registry.read(entry.signature, MAX_SIGNATURE)
    verified = _minisign.verify(data, signature, [k.key for k in keys])
    if verified.trusted_comment != entry.trusted_comment():
        raise IntegrityError(
            f"{entry.id}@{entry.version}: signature check failed: it was "
            f"made for {verified.trusted_comment!r}, not "
            f"{entry.trusted_comment()!r}",
            plugin_id=entry.id,
        )
    signer = _signer(keys, verified)
    if not signer.covers(entry.id):
        raise IntegrityError(
            f"{entry.id}@{entry.version}: signed by {signer.describe()}, which is trusted "
            f"{describe_scope(signer.ids)}, not for {entry.id}; refusing it. If "
            f"that key's holder should publish {entry.id}, add a pattern for it to the key's "
            "ids (trusted_keys in the host config, or --trusted-key PUB=PATTERN,...)",
            plugin_id=entry.id,
        )
    if not cached:
        _write_atomic(blob_path, data)
    checksum = archive_checksum(data)
    target = cache / "plugins" / entry.id / f"{entry.version}-{entry.sha256[:16]}"
    if not _extracted_intact(target, checksum):
        staging = Path(tempfile.mkdtemp(dir=_ensure(target.parent), prefix=".extract-"))
        try:
            safe_extract(data, staging / "plugin")
            if tree_checksum(staging / "plugin") != checksum:
                raise IntegrityError(
                    f"{entry.id}@{entry.version}: its extraction does not match the archive "
                    "(the cache directory changed while it was being written)",
                    plugin_id=entry.id,
                )
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    plugin = load_plugin(target / "plugin")
    if (plugin.id, plugin.version) != (entry.id, entry.version):
        raise IntegrityError(
            f"{entry.id}@{entry.version}: the archive's manifest says {plugin.id}@{plugin.version}",
            plugin_id=entry.id,
        )
    return Fetched(entry, target / "plugin", checksum)


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _extracted_intact(target: Path, checksum: str) -> bool:
    """An earlier extraction that still is what the verified archive unpacks to (a load
    checks its copy against ``checksum`` again: this only saves extracting anew)."""
    try:
        return (target / "plugin").is_dir() and tree_checksum(target / "plugin") == checksum
    except OSError:
        return False
