"""A signed plugin registry: publish, list, resolve, fetch, verify, extract (DESIGN section 8).

Layout of a registry (a local directory, or the same files under an HTTP(S) base URL)::

    index.json                      {"format": 1, "plugins": {ID: {"versions": {VERSION: entry}}}}
    blobs/sha256/<hex>              the plugin directory as a deterministic .tar.gz
    blobs/sha256/<hex>.minisig      its detached signature, minisign format (ed25519)

An entry: {"type", "sha256", "size", "blob", "signature", "published"}. The index itself is not
signed; what makes a fetch trustworthy is that the archive's sha256 matches the entry *and*
the signature verifies against a key the host trusts *and* the signature's trusted comment
names this very id, version and digest ("sandboxer ID@VERSION sha256:HEX"), so a signed
archive cannot be passed off as another plugin or version.

Fetched archives are cached under ``$XDG_CACHE_HOME/sandboxer`` (``~/.cache/sandboxer``) and
extracted with every member checked (regular files and directories only; no absolute paths,
no ``..``, no links, no devices; size and count caps). Signatures are verified on every fetch,
also from the cache.
"""

from __future__ import annotations

import contextlib
import datetime
import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

from . import _minisign
from ._digest import IGNORED_DIRS, tree_checksum
from ._semver import best_match, parse_range
from .errors import IntegrityError, PluginNotFound, RegistryError
from .manifest import load_plugin

__all__ = ["Registry", "RegistryEntry", "publish", "fetch", "safe_extract", "default_cache_dir",
           "load_trusted_keys",
           "MAX_ARCHIVE", "MAX_UNPACKED", "MAX_MEMBERS"]

FORMAT = 1
MAX_ARCHIVE = 64 << 20      # bytes of a downloaded archive
MAX_UNPACKED = 256 << 20    # bytes of all its files, unpacked
MAX_MEMBERS = 10_000
MAX_INDEX = 16 << 20
HTTP_TIMEOUT = 30.0


def load_trusted_keys(paths: Iterable[str | os.PathLike[str]]) -> list[_minisign.PublicKey]:
    """The minisign public keys in ``paths``; RegistryError names a key file it cannot read."""
    keys = []
    for path in paths:
        try:
            keys.append(_minisign.PublicKey.from_file(path))
        except OSError as exc:
            raise RegistryError(f"cannot read trusted key {path}: {exc.strerror}") from None
    return keys


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
        return {"id": self.id, "version": self.version, "type": self.type,
                "sha256": self.sha256, "size": self.size, "blob": self.blob,
                "signature": self.signature, "published": self.published}

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
            raise RegistryError(f"registry {text}: only local directories and http(s) URLs "
                                f"are supported, not {scheme}://")
        self.root = None if self.url else Path(text)

    def read(self, relative: str, limit: int) -> bytes:
        """The bytes of ``relative`` (a path inside the registry), at most ``limit``."""
        parts = PurePosixPath(relative).parts
        if (not relative or relative.startswith("/") or ".." in parts
                or any(p in ("", ".") for p in relative.split("/"))):
            raise RegistryError(f"registry {self.location}: refuses the path {relative!r} "
                                "(absolute or leading outside the registry)")
        if self.url is None:
            assert self.root is not None
            path = self.root / relative
            try:
                with open(path, "rb") as f:
                    data = f.read(limit + 1)
            except FileNotFoundError:
                raise RegistryError(f"registry {self.location}: {relative} not found") from None
            except OSError as exc:
                raise RegistryError(f"registry {self.location}: cannot read {relative}: "
                                    f"{exc.strerror}") from None
        else:
            url = urllib.parse.urljoin(self.url, relative)
            try:
                with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as reply:
                    data = reply.read(limit + 1)
                    expected = reply.headers.get("Content-Length")
            except urllib.error.HTTPError as exc:
                raise RegistryError(f"registry {self.location}: {relative}: HTTP {exc.code} "
                                    f"{exc.reason}") from None
            except (urllib.error.URLError, OSError, ValueError) as exc:
                reason = getattr(exc, "reason", exc)
                raise RegistryError(f"registry {self.location}: cannot fetch {relative}: "
                                    f"{reason}") from None
            if expected is not None and expected.isdigit() and len(data) < int(expected):
                raise IntegrityError(f"registry {self.location}: the download of {relative} "
                                     f"is truncated ({len(data)} of {expected} bytes)")
        if len(data) > limit:
            raise RegistryError(f"registry {self.location}: {relative} is larger than "
                                f"{limit} bytes")
        return data

    def index(self) -> dict[str, Any]:
        raw = self.read("index.json", MAX_INDEX)
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RegistryError(f"registry {self.location}: index.json is not JSON: "
                                f"{exc}") from None
        if (not isinstance(data, dict) or data.get("format") != FORMAT
                or not isinstance(data.get("plugins"), dict)):
            raise RegistryError(f"registry {self.location}: index.json is not a format-"
                                f"{FORMAT} sandboxer index")
        return data

    def entries(self) -> list[RegistryEntry]:
        out = []
        for plugin_id, record in sorted(self.index()["plugins"].items()):
            versions = record.get("versions", {}) if isinstance(record, dict) else {}
            for version, entry in versions.items():
                out.append(self._entry(plugin_id, version, entry))
        return out

    def _entry(self, plugin_id: str, version: str, entry: Any) -> RegistryEntry:
        try:
            return RegistryEntry(
                id=plugin_id, version=version, type=str(entry["type"]),
                sha256=_hex(entry["sha256"]), size=int(entry["size"]),
                blob=str(entry["blob"]), signature=str(entry["signature"]),
                published=str(entry.get("published", "")))
        except (KeyError, TypeError, ValueError) as exc:
            raise RegistryError(f"registry {self.location}: the index entry for "
                                f"{plugin_id}@{version} is malformed ({exc})") from None

    def resolve(self, plugin_id: str, wanted: str = "latest") -> RegistryEntry:
        """The entry for ``plugin_id`` at the highest version ``wanted`` allows."""
        try:
            spec = parse_range(wanted)
        except ValueError as exc:
            raise RegistryError(str(exc)) from None
        record = self.index()["plugins"].get(plugin_id)
        versions = record.get("versions", {}) if isinstance(record, dict) else {}
        if not versions:
            raise PluginNotFound(f"registry {self.location} has no plugin {plugin_id!r}",
                                 plugin_id=plugin_id)
        version = best_match(spec, versions)
        if version is None:
            raise PluginNotFound(
                f"registry {self.location}: no version of {plugin_id} matches {wanted!r} "
                f"(available: {', '.join(sorted(versions))})", plugin_id=plugin_id)
        return self._entry(plugin_id, version, versions[version])


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
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
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
                        raise RegistryError(f"cannot publish {root}: {rel} is a symbolic link "
                                            "(registry archives hold files only)")
                    if stat.S_ISDIR(st.st_mode):
                        info.type, info.mode = tarfile.DIRTYPE, 0o755
                        tar.addfile(info)
                    elif stat.S_ISREG(st.st_mode):
                        info.size = st.st_size
                        info.mode = 0o755 if st.st_mode & 0o111 else 0o644
                        with open(full, "rb") as f:
                            tar.addfile(info, f)
                    else:
                        raise RegistryError(f"cannot publish {root}: {rel} is not a regular "
                                            "file or directory")
    return buf.getvalue()


def publish(plugin_dir: str | os.PathLike[str], registry_dir: str | os.PathLike[str],
            secret_key: _minisign.SecretKey) -> RegistryEntry:
    """Add a plugin directory to a local registry directory, signed with ``secret_key``.

    A version already published with different content is refused (versions are immutable)."""
    plugin = load_plugin(plugin_dir)
    root = Path(plugin.root)
    if not root.is_dir():
        raise RegistryError(f"cannot publish {plugin_dir}: a registry holds plugin "
                            "directories with a plugin.toml")
    data = _archive(root)
    digest = hashlib.sha256(data).hexdigest()
    registry = Path(registry_dir)
    blobs = registry / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    entry = RegistryEntry(
        id=plugin.id, version=plugin.version, type=plugin.type.value, sha256=digest,
        size=len(data), blob=f"blobs/sha256/{digest}", signature=f"blobs/sha256/{digest}.minisig",
        published=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    index_path = registry / "index.json"
    index = Registry(registry).index() if index_path.exists() else {"format": FORMAT,
                                                                     "plugins": {}}
    versions = index["plugins"].setdefault(plugin.id, {"versions": {}})["versions"]
    old = versions.get(plugin.version)
    if old is not None and old.get("sha256") != digest:
        raise RegistryError(f"{plugin.id}@{plugin.version} is already published with other "
                            "content; publish a new version")
    _write_atomic(registry / entry.blob, data)
    signature = _minisign.sign(data, secret_key, trusted_comment=entry.trusted_comment())
    _write_atomic(registry / entry.signature, signature.encode())
    record = entry.to_json()
    for key in ("id", "version"):
        del record[key]
    versions[plugin.version] = record
    _write_atomic(index_path, json.dumps(index, indent=2, sort_keys=True).encode() + b"\n")
    return entry


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
def fetch(registry: Registry, plugin_id: str, wanted: str, *,
          trusted_keys: Iterable[_minisign.PublicKey],
          cache_dir: str | os.PathLike[str] | None = None) -> tuple[RegistryEntry, Path]:
    """Resolve, download (or reuse the cache), verify and extract; the plugin directory."""
    keys = list(trusted_keys)
    if not keys:
        raise IntegrityError(f"cannot fetch {plugin_id}@{wanted}: no trusted keys are "
                             "configured (--trusted-key, or trusted_keys in the host config)",
                             plugin_id=plugin_id)
    entry = registry.resolve(plugin_id, wanted)
    if entry.size > MAX_ARCHIVE:
        raise RegistryError(f"{entry.id}@{entry.version}: its archive is {entry.size} bytes, "
                            f"more than the {MAX_ARCHIVE}-byte limit")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
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
            raise IntegrityError(f"{entry.id}@{entry.version}: sha256 check failed: the "
                                 f"archive has {len(data)} bytes, the index says {entry.size} "
                                 "(truncated or replaced)", plugin_id=entry.id)
        actual = hashlib.sha256(data).hexdigest()
        if actual != entry.sha256:
            raise IntegrityError(f"{entry.id}@{entry.version}: sha256 check failed: the "
                                 f"archive is sha256:{actual}, the index says "
                                 f"sha256:{entry.sha256}", plugin_id=entry.id)
    signature = registry.read(entry.signature, 64 << 10)
    verified = _minisign.verify(data, signature, keys)
    if verified.trusted_comment != entry.trusted_comment():
        raise IntegrityError(f"{entry.id}@{entry.version}: signature check failed: it was "
                             f"made for {verified.trusted_comment!r}, not "
                             f"{entry.trusted_comment()!r}", plugin_id=entry.id)
    if not cached:
        _write_atomic(blob_path, data)
    target = cache / "plugins" / entry.id / f"{entry.version}-{entry.sha256[:16]}"
    if not _extracted_intact(target):
        staging = Path(tempfile.mkdtemp(dir=_ensure(target.parent), prefix=".extract-"))
        try:
            safe_extract(data, staging / "plugin")
            (staging / "plugin.sum").write_text(tree_checksum(staging / "plugin"))
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    plugin = load_plugin(target / "plugin")
    if (plugin.id, plugin.version) != (entry.id, entry.version):
        raise IntegrityError(f"{entry.id}@{entry.version}: the archive's manifest says "
                             f"{plugin.id}@{plugin.version}", plugin_id=entry.id)
    return entry, target / "plugin"


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _extracted_intact(target: Path) -> bool:
    """An earlier extraction that nobody changed since (its tree checksum still matches)."""
    try:
        return (target / "plugin.sum").read_text() == tree_checksum(target / "plugin")
    except OSError:
        return False


def safe_extract(data: bytes, dest: Path, *, max_unpacked: int = MAX_UNPACKED,
                 max_members: int = MAX_MEMBERS) -> None:
    """Extract a .tar.gz into the new directory ``dest``, refusing anything but plain files and
    directories inside it; IntegrityError names the member and what is wrong with it."""
    dest.mkdir(mode=0o755)
    total = 0
    try:
        tar = tarfile.open(fileobj=io.BytesIO(data), mode="r:gz")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise IntegrityError(f"the archive cannot be read: {exc}") from None
    with tar:
        count = 0
        try:
            for member in tar:
                count += 1
                if count > max_members:
                    raise IntegrityError(f"the archive has more than {max_members} members")
                rel = _member_path(member.name)
                target = dest.joinpath(*rel.parts)
                if member.isdir():
                    target.mkdir(mode=0o755, parents=True, exist_ok=True)
                    continue
                if member.issym() or member.islnk():
                    raise IntegrityError(f"the archive member {member.name!r} is a link "
                                         f"(to {member.linkname!r}); links are refused")
                if not member.isreg():
                    raise IntegrityError(f"the archive member {member.name!r} is not a regular "
                                         "file or directory (a device, fifo or the like)")
                total += member.size
                if total > max_unpacked:
                    raise IntegrityError(f"the archive unpacks to more than {max_unpacked} "
                                         "bytes")
                target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
                source = tar.extractfile(member)
                assert source is not None
                mode = 0o755 if member.mode & 0o111 else 0o644
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                             mode)
                with os.fdopen(fd, "wb") as out:
                    written = 0
                    while chunk := source.read(1 << 20):
                        written += len(chunk)
                        if written > member.size:
                            raise IntegrityError(f"the archive member {member.name!r} holds "
                                                 "more than its declared size")
                        out.write(chunk)
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            raise IntegrityError(f"the archive is damaged: {exc}") from None


def _member_path(name: str) -> PurePosixPath:
    path = PurePosixPath(name)
    if not name or path.is_absolute() or ".." in path.parts or "\0" in name:
        raise IntegrityError(f"the archive member {name!r} has an absolute path or leads "
                             "outside the plugin directory")
    parts = [p for p in path.parts if p not in (".", "")]
    if not parts:
        raise IntegrityError(f"the archive member {name!r} has no name")
    return PurePosixPath(*parts)
