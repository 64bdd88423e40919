"""git on a repository made outside, committed to inside an ``:rw`` grant.

The same git session (commit, branch, merge, tag, gc, fsck) runs once outside, as the
repository's owner, and once inside, on a fresh copy of the repository made the same way
at the same path. Dates and identities are fixed, so every object id is the same on both
sides and the two outputs compare byte for byte. Afterwards the owner reads the
repository the sandbox wrote: ``git fsck`` is clean, the history is there, and every file
belongs to the owner (docs/architecture.md, "Writable grants are idmapped to their owner").
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from .harness import differences, run_inside, run_outside, sh

pytestmark = pytest.mark.timeout(180)

DATES = "export GIT_AUTHOR_DATE='2024-01-02T03:04:05Z' GIT_COMMITTER_DATE='2024-01-02T03:04:05Z'"

MAKE_REPO = f"""
set -e
{DATES}
cd "$1"
git init -q -b main repo
cd repo
git config user.name 'Compat Tester'
git config user.email compat@example.org
printf 'one\\n' > README
git add README
git commit -q -m first
"""

# What a developer does in a checkout; every line's output is deterministic.
SESSION = f"""
set -e
{DATES}
cd "$1"
git status --porcelain=v2 --branch
printf 'two\\n' >> README
git add README
git commit -q -m second
git switch -q -c feature
mkdir -p src && printf 'int main(void) {{ return 0; }}\\n' > src/main.c
git add src
git commit -q -m 'add src'
git switch -q main
git merge -q --no-ff -m 'merge feature' feature
git tag -a v1 -m 'release v1'
git log --graph --format='%H %an <%ae> %s' --all
git describe
git show --stat --format=%s HEAD^2
git rev-parse 'HEAD^{{tree}}'
git gc --quiet
git count-objects -v | grep -E '^(count|in-pack|packs|prune-packable|garbage):'
git fsck --strict --no-progress
git status --porcelain=v2 --branch
echo "session done"
"""

OWNERS = {"root": (0, 0), "a-user": (4321, 4321)}


def _fresh_repo(parent: Path, uid: int, gid: int) -> Path:
    """``parent/repo``, made by its owner outside with one commit."""
    shutil.rmtree(parent, ignore_errors=True)
    parent.mkdir()
    os.chown(parent, uid, gid)
    made = run_outside(sh(MAKE_REPO) + ["sh", str(parent)], uid=uid, gid=gid)
    assert made.status == 0, made.stderr
    return parent / "repo"


@pytest.mark.parametrize("owner", sorted(OWNERS))
def test_a_repository_made_outside_takes_the_same_commits_inside(workspace: Path,
                                                                 owner: str) -> None:
    uid, gid = OWNERS[owner]
    parent = workspace / f"git-{owner}"
    repo = _fresh_repo(parent, uid, gid)
    outside = run_outside(sh(SESSION) + ["sh", str(repo)], uid=uid, gid=gid)
    assert outside.status == 0 and outside.stdout.endswith("session done\n"), outside.stderr

    repo = _fresh_repo(parent, uid, gid)
    inside = run_inside(sh(SESSION) + ["sh", str(repo)], allow=[f"{repo}:rw"])
    diff = differences(outside, inside)
    assert not diff, f"git inside an :rw grant differs:\n{diff}"

    # The owner reads what the sandbox wrote: a sound repository, all of it theirs.
    check = run_outside(["git", "-C", str(repo), "fsck", "--strict", "--no-progress"],
                        uid=uid, gid=gid)
    assert (check.status, check.stdout, check.stderr) == (0, "", "")
    log = run_outside(["git", "-C", str(repo), "log", "--format=%s"], uid=uid, gid=gid)
    assert sorted(log.stdout.splitlines()) == ["add src", "first", "merge feature", "second"]
    strangers = []
    for path in [repo, *repo.rglob("*")]:
        st = path.lstat()
        if (st.st_uid, st.st_gid) != (uid, gid) or st.st_mode & (stat.S_ISUID | stat.S_ISGID):
            strangers.append(f"{path} {st.st_uid}:{st.st_gid} {stat.filemode(st.st_mode)}")
    assert strangers == [], f"not the owner's plain files: {strangers[:10]}"
    shutil.rmtree(parent)
