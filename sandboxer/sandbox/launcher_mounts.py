"""The sandbox launcher's mounts: the sources made ready, the plugin directory copied (each
file read once, hashed as it is written, the copy refused unless it has the digests its spec
expects: only verified bytes run), and the new root built on a tmpfs (binds, /tmp, /proc,
/dev, masks over denied paths, the /etc files), then pivot_root.

Part of the launcher (``launcher.py``, which calls these in DESIGN section 6's order): imported
by bare name from its directory (``SANDBOXER_LAUNCHER_DIR``), so it imports nothing but the
standard library, ``_syscalls`` and ``launcher_steps``. It never opens a host path by a name
someone else could have changed (the supervisor's fds, sandbox/sources.py, are the sources),
and reaches every mount target inside the new root one component at a time through no link.
"""

from __future__ import annotations

import errno
import hashlib
import os
import resource
import stat

TYPE_CHECKING = False  # (see launcher.py: mypy reads these as the package's modules)
if TYPE_CHECKING:
    from typing import Any

    # A copied tree's entry: (relative path, "d"|"l"|"f"|"x", mode, "" | the link's target
    # | an fd opened on the file); "x" (a fifo, socket or device) is not copied, but counts
    # in the tree checksum as _digest.tree_checksum counts it
    Entry = tuple[str, str, int, int | str]

    from . import _syscalls as sc
    from .launcher_steps import SetupFailed, Step, step
elif __package__:  # imported by the supervisor, for a warm sandbox's handover (sandbox/pool.py)
    from . import _syscalls as sc
    from .launcher_steps import SetupFailed, Step, step
else:
    import _syscalls as sc
    from launcher_steps import SetupFailed, Step, step

__all__ = [
    "NEW_ROOT",
    "open_inside",
    "mount_trees",
    "open_copies",
    "build_root",
    "mount_tmp",
    "copy_trees",
    "bind_paths",
    "mount_proc",
    "build_dev",
    "mask_denied",
    "write_files",
    "pivot",
    "make_dirs",
    "raise_nofile",
    "TooManyEntries",
    "IGNORED_DIRS",
    "tree_digest",
]

NEW_ROOT = "/tmp"  # the new root is a tmpfs mounted over /tmp in the private mount namespace


# -- steps before pivot_root: the sources made ready in the launcher (mount_trees,
# open_copies), the new root built in PID 1 (the rest) ------------------------------------


def make_dirs(path: str) -> None:
    os.makedirs(path, mode=0o755, exist_ok=True)


_PATH_NOFOLLOW = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


def open_inside(path: str, *, create: bool | None = None) -> int | None:
    """An O_PATH fd for ``path`` in the new root, reached one component at a time from the
    root's fd, through no symbolic link: a link on the way (a host directory bound in may
    hold one, put there by whoever can write it) fails the step instead of leading out.
    ``create`` True/False makes a missing last component as a directory/file (and missing
    parents as directories); None returns None for a missing path."""
    parts = [p for p in path.split("/") if p]
    current = os.open(NEW_ROOT, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            try:
                following = os.open(part, _PATH_NOFOLLOW, dir_fd=current)
            except FileNotFoundError:
                if create is None:
                    os.close(current)
                    return None
                if last and create is False:
                    os.close(
                        os.open(
                            part,
                            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                            0o644,
                            dir_fd=current,
                        )
                    )
                else:
                    os.mkdir(part, 0o755, dir_fd=current)
                following = os.open(part, _PATH_NOFOLLOW, dir_fd=current)
            os.close(current)
            current = following
            mode = os.fstat(current).st_mode
            if stat.S_ISLNK(mode):
                raise OSError(
                    errno.ELOOP, "a symbolic link is in the way", "/" + "/".join(parts[: i + 1])
                )
            if not last and not stat.S_ISDIR(mode):
                raise OSError(errno.ENOTDIR, "not a directory", "/" + "/".join(parts[: i + 1]))
        return current
    except BaseException:
        os.close(current)
        raise


def attach(tree: int, target: int, attrs: int) -> None:
    """Set ``attrs`` (and private propagation) on a detached mount tree, then mount it on
    the object ``target`` refers to."""
    sc.mount_setattr_fd(tree, attrs)
    sc.move_mount(tree, target)


def clone_onto(source: int, target: int, attrs: int) -> None:
    """Mount a copy of the mount tree at ``source`` on ``target``, with ``attrs``."""
    tree = sc.open_tree(source)
    try:
        attach(tree, target, attrs)
    finally:
        os.close(tree)


def mount_trees(spec: dict[str, Any], fds: list[int]) -> list[int]:
    """A detached mount tree per bind, in this mount namespace: the supervisor's clones as
    they are; else each O_PATH source re-opened by the path the kernel reported for it, through
    no link, refused unless it is the very inode the supervisor opened, then cloned here."""
    if spec["trees"]:
        return [fds[bind["fd"]] for bind in spec["binds"]]
    trees = []
    for bind in spec["binds"]:
        source = fds[bind["fd"]]
        with step(Step.BIND, bind["host_path"]):
            here = sc.openat2(
                sc.AT_FDCWD,
                bind["host_path"],
                os.O_PATH,
                sc.RESOLVE_NO_SYMLINKS | sc.RESOLVE_NO_MAGICLINKS,
            )
            try:
                mine, theirs = os.fstat(here), os.fstat(source)
                if (mine.st_dev, mine.st_ino) != (theirs.st_dev, theirs.st_ino):
                    raise SetupFailed(
                        Step.BIND,
                        "the path was replaced after the supervisor opened it",
                        bind["host_path"],
                    )
                trees.append(sc.open_tree(here))
            finally:
                os.close(here)
    return trees


class TooManyEntries(SetupFailed):
    """A copied tree has more entries than its limit (a warm sandbox's handover, which has a
    lower one, then starts the plugin cold instead)."""


def _same_inode(fd: int, expected: os.stat_result, rel: str) -> None:
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != (expected.st_dev, expected.st_ino):
        os.close(fd)
        raise SetupFailed(Step.COPY, "it changed while the plugin directory was being copied", rel)


# As sandboxer._digest.IGNORED_DIRS (this module imports nothing of the package; a test holds
# the two equal): never copied, never counted. Python's bytecode caches are not what a digest
# vouches for, and a planted .pyc (an unchecked hash-based one) would run in place of its
# verified source.
IGNORED_DIRS = frozenset({"__pycache__"})


def _walk_copy(dir_fd: int, prefix: str, entries: list[Entry], limit: int) -> None:
    """Every entry below ``dir_fd``: directories opened from their parent's fd with
    O_NOFOLLOW | O_DIRECTORY, files with O_NOFOLLOW, each checked to be the inode its lstat
    named; links copied as links, never followed; anything else listed as "x", not copied;
    ``IGNORED_DIRS`` (and links by those names) left out."""
    for name in sorted(os.listdir(dir_fd)):
        if len(entries) >= limit:
            raise TooManyEntries(Step.COPY, f"the plugin directory has more than {limit} entries")
        rel = prefix + name
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        mode = st.st_mode & 0o7777
        if name in IGNORED_DIRS and (stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode)):
            continue
        if stat.S_ISLNK(st.st_mode):
            entries.append((rel, "l", 0, os.readlink(name, dir_fd=dir_fd)))
        elif stat.S_ISDIR(st.st_mode):
            sub = os.open(
                name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd
            )
            _same_inode(sub, st, rel)
            try:
                entries.append((rel, "d", mode, ""))
                _walk_copy(sub, rel + "/", entries, limit)
            finally:
                os.close(sub)
        elif stat.S_ISREG(st.st_mode):
            fd = os.open(
                name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd
            )
            _same_inode(fd, st, rel)
            entries.append((rel, "f", mode, fd))
        else:
            entries.append((rel, "x", 0, ""))


def open_copies(spec: dict[str, Any], fds: list[int]) -> list[tuple[str, list[Entry]]]:
    """For each copied tree (the plugin directory, or a bare file): every entry, its files
    opened for reading while still the supervisor's host identity, walked from the fd the
    supervisor opened and through no link. Copied rather than bound, the plugin's directory
    shows no host path anywhere, not even as a mount's root in mountinfo. (Every file is open
    at once: the caller makes room for that, ``raise_nofile``.)"""
    trees: list[tuple[str, list[Entry]]] = []
    for copy in spec["copies"]:
        source = fds[copy["fd"]]
        entries: list[Entry] = []
        try:
            with step(Step.COPY, copy["target"]):
                st = os.fstat(source)
                if stat.S_ISDIR(st.st_mode):
                    _walk_copy(source, "", entries, copy["max_entries"])
                else:  # a bare file: the supervisor checked it is a regular file
                    entries.append((copy["name"], "f", st.st_mode & 0o7777, os.dup(source)))
        except BaseException:  # the files opened so far (the supervisor outlives a failure)
            for _, tree in [*trees, (copy["target"], entries)]:
                for _, kind, _, payload in tree:
                    if kind == "f":
                        os.close(int(payload))
            raise
        trees.append((copy["target"], entries))
    return trees


def raise_nofile() -> None:
    """The soft limit on open fds up to the hard one: ``open_copies`` opens every file."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def copy_trees(
    spec: dict[str, Any], trees: list[tuple[str, list[Entry]]], *, root: str = NEW_ROOT
) -> None:
    """Each tree into a tmpfs of its own at its target under ``root`` (the new root before
    pivot_root; "" after it, in a warm sandbox's handover), read-only once filled, then
    checked against the digests its spec entry expects (``verify_copy``): each file is read
    once, and the bytes hashed are the bytes written, so what the checks vouch for is the
    copy that will run, whatever happens to the host's files meanwhile."""
    for (target, entries), copy in zip(trees, spec["copies"], strict=True):
        full_target = root + target
        digests: dict[str, tuple[str, str]] = {}
        links: dict[str, str] = {}
        with step(Step.COPY, target):
            make_dirs(full_target)
            sc.mount(
                "tmpfs",
                full_target,
                "tmpfs",
                sc.MS_NOSUID | sc.MS_NODEV,
                f"mode=0755,size={int(copy['size'])}",
            )
            try:
                _fill(full_target, entries, digests, links)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                # The tmpfs was sized for the tree as the supervisor measured it: it grew.
                raise SetupFailed(
                    Step.VERIFY,
                    f"the plugin directory grew past the {int(copy['size'])} bytes measured "
                    "before it was copied: it changed after it was checked; none of it ran",
                    target,
                ) from None
            sc.mount_setattr(
                full_target, sc.MOUNT_ATTR_RDONLY | sc.MOUNT_ATTR_NOSUID | sc.MOUNT_ATTR_NODEV
            )
        verify_copy(target, digests, links, copy.get("expect", ()), bare=bool(copy.get("bare")))


def _fill(
    full_target: str,
    entries: list[Entry],
    digests: dict[str, tuple[str, str]],
    links: dict[str, str],
) -> None:
    """Make ``entries`` under ``full_target``, noting each one's kind and digest (a link's:
    its target text's) and each link's target text."""
    for rel, kind, mode, payload in entries:
        dest = os.path.join(full_target, rel)
        if kind == "d":
            os.mkdir(dest, mode | 0o700)
            digests[rel] = ("d", "")
        elif kind == "l":
            os.symlink(str(payload), dest)
            links[rel] = str(payload)
            digests[rel] = ("l", hashlib.sha256(os.fsencode(str(payload))).hexdigest())
        elif kind == "x":
            digests[rel] = ("x", "")
        else:
            out = os.open(
                dest,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                (mode & 0o7777 & ~0o6000) | 0o600,
            )
            try:
                digests[rel] = ("f", _copy_file(int(payload), out))
            finally:
                os.close(out)
                os.close(int(payload))


def _copy_file(source: int, out: int) -> str:
    """Copy ``source`` to ``out`` through one buffer: the hex sha256 of the bytes written."""
    h = hashlib.sha256()
    while chunk := os.read(source, 1 << 20):
        h.update(chunk)
        view = memoryview(chunk)
        while view:
            view = view[os.write(out, view) :]
    return h.hexdigest()


def tree_digest(digests: dict[str, tuple[str, str]], prefix: str = "") -> str:
    """The hex tree checksum (sandboxer._digest.tree_checksum's format: ``path NUL kind NUL
    digest LF`` per entry in sorted path order, directories themselves not listed) of the
    entries under ``prefix`` ("" or "dir/"), their paths taken relative to it."""
    outer = hashlib.sha256()
    for rel in sorted(r for r in digests if r.startswith(prefix)):
        kind, digest = digests[rel]
        if kind != "d":
            outer.update(
                f"{rel[len(prefix) :]}\0{kind}\0{digest}\n".encode("utf-8", "surrogateescape")
            )
    return outer.hexdigest()


def _resolve_in_copy(digests: dict[str, tuple[str, str]], links: dict[str, str], rel: str) -> str:
    """``rel`` with the links at its end followed inside the copy, as the sandbox resolves a
    relative link under /plugin; a link that leads out of the copy (absolute, or up past its
    top) or round in circles stays unresolved (the check then refuses it)."""
    for _ in range(40):  # the kernel's MAXSYMLINKS
        kind, _ = digests.get(rel, ("", ""))
        if kind != "l":
            return rel
        link = links[rel]
        joined = os.path.normpath(os.path.join(os.path.dirname(rel), link))
        if os.path.isabs(link) or joined == ".." or joined.startswith("../"):
            return rel
        rel = joined
    return rel


def verify_copy(
    target: str,
    digests: dict[str, tuple[str, str]],
    links: dict[str, str],
    expect: Any,
    *,
    bare: bool,
) -> None:
    """Refuse the copy at ``target`` unless every expected digest matches what was written:
    ``{"path", "sha256", "what"}`` with path "" for the whole tree (its tree checksum; a bare
    file's own sha256), else a file (its sha256) or a directory (its tree checksum) inside,
    reached through links inside the copy as the sandbox reaches it."""
    for check in expect:
        rel, expected, what = check["path"], check["sha256"], check["what"]
        with step(Step.VERIFY, target + ("/" + rel if rel else "")):
            if not rel:
                actual = next(iter(digests.values()))[1] if bare else tree_digest(digests)
                name = "the plugin file" if bare else "the plugin directory"
            else:
                name = _resolve_in_copy(digests, links, rel)
                kind, actual = digests.get(name, ("", ""))
                if kind == "d":
                    actual = tree_digest(digests, name + "/")
                elif kind != "f":
                    raise SetupFailed(
                        Step.VERIFY,
                        f"{name} is {_KINDS.get(kind, 'missing')} in the copy, so {what} "
                        f"(sha256 {expected}) cannot vouch for it",
                        target + "/" + rel,
                    )
            if actual != expected:
                raise SetupFailed(
                    Step.VERIFY,
                    f"{name} was copied with sha256 {actual}, but {what} says {expected}: "
                    "the files changed after they were checked; none of them ran",
                    target + ("/" + rel if rel else ""),
                )


_KINDS = {"l": "a link out of the plugin directory", "x": "not a regular file", "": "missing"}


def build_root() -> None:
    """Private propagation, and a tmpfs for the new root."""
    with step(Step.ROOT):
        sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)
    with step(Step.ROOT, NEW_ROOT):
        sc.mount("tmpfs", NEW_ROOT, "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, "mode=0755,size=16m")


def bind_paths(spec: dict[str, Any], trees: list[int]) -> None:
    for bind, tree in zip(spec["binds"], trees, strict=True):
        if bind["device"]:
            continue  # build_dev
        with step(Step.BIND, bind["target"]):
            target = open_inside(bind["target"], create=bind["dir"])
            assert target is not None
            attrs = sc.MOUNT_ATTR_NOSUID | sc.MOUNT_ATTR_NODEV
            if not bind["writable"]:
                attrs |= sc.MOUNT_ATTR_RDONLY
            if not bind["exec"]:
                attrs |= sc.MOUNT_ATTR_NOEXEC
            try:
                attach(tree, target, attrs)
            finally:
                os.close(target)


def mount_tmp(spec: dict[str, Any]) -> None:
    target = NEW_ROOT + "/tmp"
    # Executable only if the profile says so (default: compilers and test suites run what
    # they build there); strict's /tmp is noexec like every other writable mount.
    noexec = 0 if spec["tmp_exec"] else sc.MS_NOEXEC
    with step(Step.ROOT, "/tmp"):
        make_dirs(target)
        sc.mount(
            "tmpfs",
            target,
            "tmpfs",
            sc.MS_NOSUID | sc.MS_NODEV | noexec,
            f"mode=1777,size={int(spec['tmp_size'])}",
        )


def mount_proc(spec: dict[str, Any]) -> None:
    target = NEW_ROOT + "/proc"
    with step(Step.PROC, "/proc"):
        make_dirs(target)
        sc.mount("proc", target, "proc", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC)
    # As Docker does: files that leak kernel state or act on the host are masked, trees
    # that are writable in a fresh procfs are made read-only.
    for path in spec["proc_masked"]:
        full = target + path
        if not os.path.lexists(full):
            continue
        with step(Step.MASK, "/proc" + path):
            if os.path.isdir(full):
                sc.mount(
                    "tmpfs",
                    full,
                    "tmpfs",
                    sc.MS_RDONLY | sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC,
                    "size=0,mode=0555",
                )
            else:
                sc.mount("/dev/null", full, None, sc.MS_BIND)
                sc.mount_setattr(
                    full,
                    sc.MOUNT_ATTR_RDONLY
                    | sc.MOUNT_ATTR_NOSUID
                    | sc.MOUNT_ATTR_NODEV
                    | sc.MOUNT_ATTR_NOEXEC,
                    recursive=False,
                )
    for path in spec["proc_readonly"]:
        full = target + path
        if not os.path.isdir(full):
            continue
        with step(Step.MASK, "/proc" + path):
            sc.mount(full, full, None, sc.MS_BIND | sc.MS_REC)
            sc.mount_setattr(
                full,
                sc.MOUNT_ATTR_RDONLY
                | sc.MOUNT_ATTR_NOSUID
                | sc.MOUNT_ATTR_NODEV
                | sc.MOUNT_ATTR_NOEXEC,
            )


def build_dev(spec: dict[str, Any], trees: list[int]) -> None:
    dev = NEW_ROOT + "/dev"
    with step(Step.DEV, "/dev"):
        make_dirs(dev)
        sc.mount("tmpfs", dev, "tmpfs", sc.MS_NOSUID | sc.MS_NOEXEC, "mode=0755,size=64k")
        for bind, tree in zip(spec["binds"], trees, strict=True):
            if not bind["device"]:
                continue
            target = open_inside(bind["target"], create=False)
            assert target is not None
            try:
                attach(tree, target, sc.MOUNT_ATTR_NOSUID | sc.MOUNT_ATTR_NOEXEC)
            finally:
                os.close(target)
        for name, link in (
            ("fd", "/proc/self/fd"),
            ("stdin", "/proc/self/fd/0"),
            ("stdout", "/proc/self/fd/1"),
            ("stderr", "/proc/self/fd/2"),
        ):
            os.symlink(link, f"{dev}/{name}")
        make_dirs(dev + "/shm")
        sc.mount(
            "tmpfs",
            dev + "/shm",
            "tmpfs",
            sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC,
            "mode=1777,size=16m",
        )
    with step(Step.DEV, "/dev/pts"):
        # A devpts of the sandbox's own (newinstance): programs may make pseudo-terminals
        # (openpty, script, expect, terminal test suites) and see none of the host's.
        make_dirs(dev + "/pts")
        sc.mount(
            "devpts",
            dev + "/pts",
            "devpts",
            sc.MS_NOSUID | sc.MS_NOEXEC,
            "newinstance,ptmxmode=0666,mode=0620",
        )
        os.symlink("pts/ptmx", dev + "/ptmx")
    with step(Step.DEV, "/dev"):
        # Not the program's to write in, as on the host (EACCES); its owner is the sandbox
        # user, but the tmpfs is its own: nothing it could do there reaches the host.
        os.chmod(dev, 0o555)


_MASK_ATTRS = (
    sc.MOUNT_ATTR_RDONLY | sc.MOUNT_ATTR_NOSUID | sc.MOUNT_ATTR_NODEV | sc.MOUNT_ATTR_NOEXEC
)


def mask_denied(spec: dict[str, Any]) -> None:
    # Directories between a writable grant and a denied path in it become mount points, which
    # cannot be renamed or removed: the mask cannot be carried away by moving its parent.
    for path in spec["pins"]:
        with step(Step.MASK, path):
            target = open_inside(path)
            if target is None:
                raise SetupFailed(Step.MASK, "the directory holding a denied path is gone", path)
            try:
                clone_onto(
                    target,
                    target,
                    sc.MOUNT_ATTR_NOSUID | sc.MOUNT_ATTR_NODEV | sc.MOUNT_ATTR_NOEXEC,
                )
            finally:
                os.close(target)
    for mask in spec["masks"]:
        path = mask["path"]
        with step(Step.MASK, path):
            target = open_inside(path)
            if target is None:
                if mask["required"]:
                    raise SetupFailed(
                        Step.MASK,
                        "a denied path inside a writable grant is gone: the plugin could create it",
                        path,
                    )
                continue
            try:
                if stat.S_ISDIR(os.fstat(target).st_mode):
                    sc.mount(
                        "tmpfs",
                        f"/proc/self/fd/{target}",
                        "tmpfs",
                        sc.MS_RDONLY | sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC,
                        "size=0,mode=0000",
                    )
                else:
                    null = os.open("/dev/null", os.O_PATH | os.O_CLOEXEC)
                    try:
                        clone_onto(null, target, _MASK_ATTRS)
                    finally:
                        os.close(null)
            finally:
                os.close(target)


def write_files(spec: dict[str, Any]) -> None:
    with step(Step.ROOT, "/etc"):
        for path, content in spec["files"].items():
            full = NEW_ROOT + path
            make_dirs(os.path.dirname(full))
            with open(full, "w") as f:
                f.write(content)
        for link, target in spec["symlinks"].items():
            full = NEW_ROOT + link
            make_dirs(os.path.dirname(full))
            os.symlink(target, full)


def pivot() -> None:
    with step(Step.PIVOT, NEW_ROOT):
        os.chdir(NEW_ROOT)
        sc.pivot_root(".", ".")
        # The old root is now stacked under the new one at "/": detach it, as nsjail does.
        sc.umount2(".", sc.MNT_DETACH)
        os.chdir("/")
        sc.mount_setattr(
            "/", sc.MOUNT_ATTR_RDONLY | sc.MOUNT_ATTR_NOSUID | sc.MOUNT_ATTR_NODEV, recursive=False
        )
