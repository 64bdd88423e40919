#!/usr/bin/env bash
# Sets up everything `make test` and `make demo` need on a fresh Debian 12 machine:
# the Debian packages (installed only when missing), then .venv with the pinned dependencies
# and sandboxer itself. Safe to run again; it does only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages: libcap-dev builds python-prctl; libseccomp2 backs pyseccomp; python3-venv
# gives the system interpreter its venv module; gcc, make and golang-go build the native
# examples the tests compile; nodejs runs the external example written in JavaScript; git and
# sqlite3 are among the ordinary programs the tests run inside the sandbox, and so is Python's
# own test suite (libpython3.11-testsuite). clang, lld, wasi-libc and the wasm32 compiler-rt
# build the C examples for wasm32-wasi. minisign is Debian's minisign tool: the tests prove that
# the registry's signatures and keys are compatible with it, both ways. curl goes through the
# egress proxy in the network-policy tests (HTTP, HTTPS, SOCKS5 over TCP and the Unix socket).
APT_PACKAGES=(libcap-dev libseccomp2 python3-venv python3-dev gcc make golang-go nodejs git sqlite3
              libpython3.11-testsuite clang lld wasi-libc libclang-rt-14-dev-wasm32 minisign curl)

source scripts/apt-missing.sh
install_missing bootstrap "${APT_PACKAGES[@]}" || exit 1

# The system interpreter (under /usr) rather than one in a home directory: the sandbox binds
# /usr read-only into plugin hosts, so the runtime they need is already inside.
PYTHON=${PYTHON:-/usr/bin/python3}
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    echo "bootstrap: $PYTHON is older than Python 3.11" >&2; exit 1; }

if [[ ! -x .venv/bin/python ]]; then
    "$PYTHON" -m venv .venv
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/python -m pip install -q setuptools==80.9.0 wheel==0.45.1 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q -r requirements.lock 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v "^WARNING: Location" || true
# pip's exit status is lost in the filter above: check the result directly.
.venv/bin/python -c "import sandboxer, orjson, prctl, pyseccomp, wasmtime, inotify_simple, cryptography, pytest" || {
    echo "bootstrap: the virtualenv is incomplete; see the pip output above" >&2; exit 1; }
touch .venv/.installed
echo "bootstrap: .venv ready"
