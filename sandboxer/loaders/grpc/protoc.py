"""A gRPC plugin's descriptor set: its ``.proto`` files compiled by ``protoc`` inside the
sandbox, or its ``.pb``/``.protoset`` read as is (issue 19).

The ``.proto`` files are a stranger's input, and protoc is a large C++ parser. So protoc never
runs in the supervisor: it runs as any sandboxed program does (its own cgroup, user, mount,
pid and net namespaces, the strict seccomp profile, no network, ``PROTOC_SANDBOX``'s limits),
and sees only the plugin's listed proto files, read-only, at /plugin, plus /usr (protoc and
the well-known types in /usr/include/google/protobuf). The descriptor set comes back on its
stdout (``--descriptor_set_out=/dev/stdout``), so nothing inside needs to be writable.

The supervisor reads each listed file once, beneath the plugin directory through no link
(``sandbox/paths.py``), hashes what it read and stages exactly those bytes for protoc: what
is compiled is what the cache key covers, whatever happens to the plugin directory meanwhile.
Results are cached in memory by that key (the files' relative names and bytes, and protoc's
version); a descriptor set that does not parse as a ``FileDescriptorSet`` is never cached.

This module must never parse a ``.proto`` file itself, open a plugin's file by name through a
link, or run protoc outside the sandbox.
"""

from __future__ import annotations

import collections
import errno
import hashlib
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import descriptor_pb2
from google.protobuf.message import DecodeError

from ..._units import format_size
from ...errors import CallTimeout, MemoryLimitExceeded, PluginLoadError, SandboxUnavailable
from ...manifest import DESCRIPTOR_SET_SUFFIXES, Plugin
from ...sandbox.confinement import launch_confined
from ...sandbox.paths import open_beneath
from ...sandbox.policy import SandboxConfig
from ...sandbox.program import EXEC_PATH, KILL_GRACE, find_program
from ...sandbox.seccomp_cache import filter_for
from ...sandbox.spec import PLUGIN_MOUNT, LaunchSpec, Mount, base_mounts
from ..out_of_process import ProcessLoader

__all__ = [
    "descriptor_set",
    "statistics",
    "ProtocStatistics",
    "PROTOC_SANDBOX",
    "MAX_PROTO_SIZE",
    "MAX_DESCRIPTOR_SET",
]

# protoc's sandbox: the strict profile (no inet sockets, noexec /tmp), no network, and limits
# a schema compiler never comes near (a hostile file that makes it try is stopped by them).
PROTOC_SANDBOX = SandboxConfig(
    profile="strict",
    memory_limit=256 << 20,
    cpu_limit=1.0,
    timeout=30.0,
    pids_limit=16,
    tmp_size=1 << 20,
    nofile=256,
)
MAX_PROTO_SIZE = 4 << 20  # one .proto file or descriptor set, as read by the supervisor
MAX_PROTO_TOTAL = 16 << 20  # all of a plugin's proto files together
MAX_DESCRIPTOR_SET = 64 << 20  # what protoc may write; more fails the load
MAX_MESSAGE = 4096  # how much of protoc's stderr an error carries
# The well-known types (google/protobuf/timestamp.proto ...), where Debian's protoc has them.
WELL_KNOWN = ("google/protobuf", "/usr/include/google/protobuf")
_CACHE_ENTRIES = 64
_CACHE_BYTES = 64 << 20
_INSTALL_HINT = "apt-get install protobuf-compiler"


@dataclass(frozen=True, slots=True)
class ProtocStatistics:
    """How this process has used protoc: ``runs`` of it in the sandbox (compiles and version
    queries), ``compiles`` of proto files, cache ``hits``, and what the cache holds now."""

    runs: int
    compiles: int
    hits: int
    entries: int
    cached_bytes: int


@dataclass(frozen=True, slots=True)
class _Proto:
    """One listed ``.proto`` file as the supervisor read it: its name relative to the plugin
    directory (protoc's name for it) and its bytes."""

    name: str
    data: bytes


class _Cache:
    """Descriptor sets by content key, in memory, least recently used evicted first."""

    def __init__(self) -> None:
        self._sets: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._bytes = 0
        self.runs = 0
        self.compiles = 0
        self.hits = 0
        # protoc's version, by what /usr/bin/protoc is (an upgrade is a new file)
        self.version: tuple[tuple[int, int, int, int], str] | None = None

    def get(self, key: str) -> bytes | None:
        data = self._sets.get(key)
        if data is not None:
            self._sets.move_to_end(key)
            self.hits += 1
        return data

    def put(self, key: str, data: bytes) -> None:
        if key in self._sets:
            return
        self._sets[key] = data
        self._bytes += len(data)
        while len(self._sets) > _CACHE_ENTRIES or self._bytes > _CACHE_BYTES:
            _, dropped = self._sets.popitem(last=False)
            self._bytes -= len(dropped)

    def statistics(self) -> ProtocStatistics:
        return ProtocStatistics(self.runs, self.compiles, self.hits, len(self._sets), self._bytes)


_cache = _Cache()


def statistics() -> ProtocStatistics:
    """A snapshot of this process's protoc runs and descriptor set cache."""
    return _cache.statistics()


async def descriptor_set(plugin: Plugin, *, loader: ProcessLoader) -> bytes:
    """The ``FileDescriptorSet`` bytes for ``plugin``'s ``[grpc] proto``: its descriptor sets
    read (several are merged), or its ``.proto`` files compiled by protoc in a sandbox run
    with ``loader``'s cgroup backend, fallbacks, profile directories and setup timeout, and
    cached in memory by content.

    PluginLoadError naming the plugin and file for a file that cannot be read through no link
    beneath the plugin directory, for protoc's own complaint, or for a descriptor set that is
    not one; SandboxUnavailable without protoc; CallTimeout or MemoryLimitExceeded when
    protoc hits ``PROTOC_SANDBOX``'s limits."""
    spec = plugin.grpc
    if spec is None or not spec.proto:
        raise PluginLoadError(
            f"plugin {plugin.id}: protocol grpc needs the [grpc] table", plugin_id=plugin.id
        )
    sets = [p for p in spec.proto if p.suffix in DESCRIPTOR_SET_SUFFIXES]
    if sets:
        if len(sets) != len(spec.proto):
            raise PluginLoadError(
                f"plugin {plugin.id}: [grpc] proto mixes .proto files and descriptor sets",
                plugin_id=plugin.id,
            )
        return _merged(plugin, [(_relative(plugin, p), _read(plugin, p)) for p in sets])
    protos = _read_protos(plugin, spec.proto)
    protoc = _protoc(plugin)
    version = await _version(plugin, protoc, loader)
    key = _key(version, protos)
    cached = _cache.get(key)
    if cached is not None:
        return cached
    data = await _compile(plugin, protoc, protos, loader)
    _cache.put(key, data)
    return data


# -- reading the plugin's files ----------------------------------------------------------------


def _root(plugin: Plugin) -> Path:
    # The manifest resolves the plugin directory before it checks the proto paths under it.
    return plugin.root.resolve()


def _relative(plugin: Plugin, path: Path) -> str:
    root = _root(plugin)
    if not path.is_relative_to(root):
        raise PluginLoadError(
            f"plugin {plugin.id}: [grpc] proto {path} is not inside the plugin directory",
            plugin_id=plugin.id,
        )
    name = path.relative_to(root).as_posix()
    if name in ("", ".") or ".." in name.split("/"):
        raise PluginLoadError(
            f"plugin {plugin.id}: [grpc] proto {path} is not a file inside the plugin directory",
            plugin_id=plugin.id,
        )
    return name


_WHY = {
    errno.ELOOP: "a symbolic link is on its way (the supervisor reads proto files through no "
    "link: replace the link with the file)",
    errno.EXDEV: "it leads out of the plugin directory",
    errno.ENOENT: "it does not exist",
    errno.ENOTDIR: "a component on its way is not a directory",
    errno.EACCES: "permission denied",
}


def _read(plugin: Plugin, path: Path) -> bytes:
    """``path``'s bytes, opened once beneath the plugin directory through no link: a regular
    file of at most ``MAX_PROTO_SIZE`` bytes."""
    name = _relative(plugin, path)

    def refuse(why: str) -> PluginLoadError:
        return PluginLoadError(
            f"plugin {plugin.id}: [grpc] proto {name} cannot be read: {why}", plugin_id=plugin.id
        )

    try:
        handle = open_beneath(str(_root(plugin)), str(path))
    except OSError as exc:
        raise refuse(_WHY.get(exc.errno or 0, exc.strerror or str(exc))) from None
    try:
        # O_PATH first: a fifo or device is refused before it is opened (a fifo would block).
        if not stat.S_ISREG(os.fstat(handle).st_mode):
            raise refuse("not a regular file")
        fd = os.open(f"/proc/self/fd/{handle}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise refuse(exc.strerror or str(exc)) from None
    finally:
        os.close(handle)
    try:
        chunks: list[bytes] = []
        size = 0
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_PROTO_SIZE:
                raise refuse(f"larger than {format_size(MAX_PROTO_SIZE)}")
        return b"".join(chunks)
    except OSError as exc:
        raise refuse(exc.strerror or str(exc)) from None
    finally:
        os.close(fd)


def _read_protos(plugin: Plugin, paths: Sequence[Path]) -> list[_Proto]:
    protos: list[_Proto] = []
    total = 0
    for path in dict.fromkeys(paths):
        proto = _Proto(_relative(plugin, path), _read(plugin, path))
        total += len(proto.data)
        if total > MAX_PROTO_TOTAL:
            raise PluginLoadError(
                f"plugin {plugin.id}: [grpc] proto files are larger than "
                f"{format_size(MAX_PROTO_TOTAL)} together",
                plugin_id=plugin.id,
            )
        protos.append(proto)
    return protos


def _merged(plugin: Plugin, sets: list[tuple[str, bytes]]) -> bytes:
    """One descriptor set as read; several as one, each file once (the same file in two sets
    must be the same)."""
    if len(sets) == 1:
        return sets[0][1]  # load_schema parses it and names what is wrong
    files: dict[str, descriptor_pb2.FileDescriptorProto] = {}
    for name, data in sets:
        one = _parsed(data)
        if one is None:
            raise PluginLoadError(
                f"plugin {plugin.id}: {name}: not a protobuf descriptor set", plugin_id=plugin.id
            )
        for file in one.file:
            seen = files.setdefault(file.name, file)
            if seen != file:
                raise PluginLoadError(
                    f"plugin {plugin.id}: {name}: describes {file.name!r} differently from an "
                    "earlier descriptor set",
                    plugin_id=plugin.id,
                )
    merged: bytes = descriptor_pb2.FileDescriptorSet(file=files.values()).SerializeToString()
    return merged


def _parsed(data: bytes) -> descriptor_pb2.FileDescriptorSet | None:
    files = descriptor_pb2.FileDescriptorSet()
    try:
        files.ParseFromString(data)
    except DecodeError:
        return None
    return files


def _key(version: str, protos: list[_Proto]) -> str:
    """sha256 over protoc's version and each file's name and bytes, each length-prefixed so
    that no two different inputs run together into the same bytes."""
    digest = hashlib.sha256(b"sandboxer protoc descriptor set 1\0")
    for part in (version.encode(), *(x for p in protos for x in (p.name.encode(), p.data))):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


# -- protoc, in the sandbox ---------------------------------------------------------------------


def _protoc(plugin: Plugin) -> str:
    """protoc's path, as it shows inside the sandbox (under /usr)."""
    found = shutil.which("protoc", path=":".join(EXEC_PATH))
    if found is None:
        raise SandboxUnavailable(
            f"plugin {plugin.id}: its [grpc] proto files need protoc to compile them, and this "
            f"host has none: {_INSTALL_HINT}",
            missing="protoc",
            plugin_id=plugin.id,
        )
    return find_program(found, base_mounts())


async def _version(plugin: Plugin, protoc: str, loader: ProcessLoader) -> str:
    """``protoc --version`` ("libprotoc 3.21.12"), asked once per protoc binary."""
    info = os.stat(protoc)
    identity = (info.st_dev, info.st_ino, info.st_mtime_ns, info.st_size)
    if _cache.version is not None and _cache.version[0] == identity:
        return _cache.version[1]
    code, out, err = await _run(plugin, [protoc, "--version"], None, loader, what="--version")
    text = out.decode(errors="replace").strip()
    if code != 0 or not text.startswith("libprotoc "):
        raise SandboxUnavailable(
            f"plugin {plugin.id}: {protoc} --version did not say which protoc it is "
            f"(exit {code}): {_message(err or out)}; reinstall it: {_INSTALL_HINT}",
            missing="protoc",
            plugin_id=plugin.id,
        )
    _cache.version = (identity, text)
    return text


async def _compile(
    plugin: Plugin, protoc: str, protos: list[_Proto], loader: ProcessLoader
) -> bytes:
    """``protos`` compiled to one self-contained descriptor set, in the sandbox."""
    names = ", ".join(p.name for p in protos)
    # 0700, the supervisor's; resolved, since the mount opens it through no link
    staging = os.path.realpath(tempfile.mkdtemp(prefix="sandboxer-protoc-"))
    try:
        tree = _stage(staging, protos)
        argv = [
            protoc,
            f"--proto_path={PLUGIN_MOUNT}",
            f"--proto_path={WELL_KNOWN[0]}={WELL_KNOWN[1]}",
            "--include_imports",
            "--descriptor_set_out=/dev/stdout",
            # absolute: a file named "--plugin=..." cannot pass for an option
            *(f"{PLUGIN_MOUNT}/{p.name}" for p in protos),
        ]
        _cache.compiles += 1
        code, out, err = await _run(plugin, argv, tree, loader, what=names)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if code != 0:
        raise PluginLoadError(
            f"plugin {plugin.id}: protoc cannot compile [grpc] proto {names} (exit {code}):\n"
            f"{_message(err)}",
            plugin_id=plugin.id,
        )
    if _parsed(out) is None:
        raise PluginLoadError(
            f"plugin {plugin.id}: protoc wrote no descriptor set for {names}",
            plugin_id=plugin.id,
        )
    return out


def _stage(staging: str, protos: list[_Proto]) -> str:
    """The files as read, under ``staging``/plugin: world-readable whatever the umask, so
    that a sandbox user of another uid (rootful hosts) can read them through the read-only
    mount."""
    tree = os.path.join(staging, "plugin")
    os.mkdir(tree)
    os.chmod(tree, 0o755)
    for proto in protos:
        parent = tree
        *directories, name = proto.name.split("/")
        for directory in directories:
            parent = os.path.join(parent, directory)
            if not os.path.isdir(parent):
                os.mkdir(parent)
                os.chmod(parent, 0o755)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(os.path.join(parent, name), flags, 0o600)
        try:
            os.fchmod(fd, 0o644)
            view = memoryview(proto.data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
    return tree


class _Bounded:
    """An output sink keeping the first ``limit`` bytes and counting the rest."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.data = bytearray()
        self.total = 0

    def __call__(self, chunk: bytes) -> None:
        self.total += len(chunk)
        room = self.limit - len(self.data)
        if room > 0:
            self.data += chunk[:room]


async def _run(
    plugin: Plugin,
    argv: list[str],
    tree: str | None,
    loader: ProcessLoader,
    *,
    what: str,
) -> tuple[int, bytes, bytes]:
    """protoc run in ``PROTOC_SANDBOX`` with ``tree`` read-only at /plugin: its exit code,
    stdout and stderr (bounded)."""
    sandbox = PROTOC_SANDBOX
    mounts = base_mounts()
    if tree is not None:
        mounts.append(Mount(tree, PLUGIN_MOUNT, writable=False, exec=False, root="/"))
    spec = LaunchSpec(
        argv=argv,
        env={"PATH": ":".join(EXEC_PATH), "HOME": "/tmp", "LANG": "C.UTF-8"},
        sandbox=sandbox,
        mounts=tuple(mounts),
        cwd=PLUGIN_MOUNT if tree is not None else "/tmp",
        seccomp_bpf=filter_for(sandbox.profile, network=False, extra_dirs=loader.profile_dirs),
        rpc=False,
        profile_dirs=loader.profile_dirs,
    )
    out, err = _Bounded(MAX_DESCRIPTOR_SET), _Bounded(MAX_MESSAGE)
    _cache.runs += 1
    null = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
    try:
        proc, confinement = await launch_confined(
            spec,
            backend=loader.cgroups(),
            rpc_fd=null,
            logger=logging.getLogger(f"sandboxer.plugin.{plugin.id}"),
            sinks=(out, err),
            fallbacks=loader.fallbacks,
            plugin_id=plugin.id,
            setup_timeout=loader.setup_timeout,
        )
    finally:
        os.close(null)
    try:
        finished = await proc.wait(sandbox.timeout)
        if finished is None:
            await proc.terminate(KILL_GRACE)
        await proc.output_closed(1.0)
        oom_killed = confinement.oom_killed()
        stats = confinement.stats()
    finally:
        await proc.close()
        await confinement.aclose()
    if finished is None:
        raise CallTimeout(
            f"plugin {plugin.id}: protoc did not finish [grpc] proto {what} within "
            f"{sandbox.timeout:g}s and was stopped",
            timeout=sandbox.timeout,
            plugin_id=plugin.id,
        )
    if oom_killed:
        raise MemoryLimitExceeded(
            f"plugin {plugin.id}: protoc was killed compiling [grpc] proto {what}: it exceeded "
            f"its memory limit of {format_size(sandbox.memory_limit)}",
            limit=sandbox.memory_limit,
            peak=stats.memory_peak if stats else None,
            plugin_id=plugin.id,
        )
    if out.total > out.limit:
        raise PluginLoadError(
            f"plugin {plugin.id}: protoc's descriptor set for [grpc] proto {what} is larger "
            f"than {format_size(MAX_DESCRIPTOR_SET)}",
            plugin_id=plugin.id,
        )
    if proc.returncode is None:
        raise RuntimeError(f"protoc for plugin {plugin.id}: reaped without a return code")
    return proc.returncode, bytes(out.data), bytes(err.data)


def _message(data: bytes) -> str:
    """protoc's stderr for an error message: bounded, printable, indented. It quotes the
    plugin's own text, so no terminal control characters get through to the host's logs."""
    text = data[:MAX_MESSAGE].decode(errors="replace")
    text = "".join(c if c.isprintable() or c == "\n" else "?" for c in text).strip()
    if len(data) > MAX_MESSAGE:
        text += "\n[...]"
    return "  " + "\n  ".join(text.splitlines()) if text else "  (no message)"
