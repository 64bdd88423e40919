# Sourced by scripts/bootstrap.sh and scripts/vm/setup.sh: install_missing NAME PKG... installs
# the Debian packages among PKG that are not installed yet (apt-get update first), as root.
# Without root it names them and returns 2, for the caller to decide how fatal that is.
install_missing() {
    local who=$1 pkg
    shift
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    ((${#missing[@]})) || return 0
    if [[ $(id -u) -ne 0 ]]; then
        echo "$who: missing Debian packages: ${missing[*]}" >&2
        echo "$who: run as root, or: sudo apt-get install ${missing[*]}" >&2
        return 2
    fi
    echo "$who: installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}
