#!/usr/bin/env bash
# Runs inside a Vagrant guest as root: makes /opt/sandboxer-src (the synced tree) runnable as
# the VM suite expects, the same layout scripts/vm/build-image.sh bakes into the local box:
# /opt/sandboxer-venv with the pinned dependencies and the tree on its path,
# /usr/local/bin/sandboxer, and the unprivileged user `sandboxer` (uid 1001) of the rootless
# test. On the local box all of it is there already and this only checks it; on a public box
# it installs Debian packages and the requirements from the network.
#
#     provision.sh [--v1]    --v1: also switch the guest to systemd's cgroup v1 layout
#                            (kernel command line; takes effect at the next boot)
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

if [[ ! -x /opt/sandboxer-venv/bin/python ]]; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends python3-venv python3-dev gcc libc6-dev \
        libcap-dev libseccomp2 dbus-user-session libpam-systemd rsync >/dev/null
    python3 -m venv /opt/sandboxer-venv
    /opt/sandboxer-venv/bin/pip install -q --disable-pip-version-check \
        -r /opt/sandboxer-src/requirements.lock
    site=$(/opt/sandboxer-venv/bin/python -c "import sysconfig; print(sysconfig.get_path('purelib'))")
    echo /opt/sandboxer-src >"$site/sandboxer-src.pth"
    printf '#!/opt/sandboxer-venv/bin/python\nimport sys\nfrom sandboxer.cli import main\nsys.exit(main())\n' \
        >/opt/sandboxer-venv/bin/sandboxer
    chmod 755 /opt/sandboxer-venv/bin/sandboxer
    ln -sf /opt/sandboxer-venv/bin/sandboxer /usr/local/bin/sandboxer
fi
id sandboxer >/dev/null 2>&1 || useradd -m -u 1001 -s /bin/bash sandboxer

if [[ ${1:-} == --v1 ]] && [[ -f /etc/default/grub ]] &&
   ! grep -q "systemd.unified_cgroup_hierarchy=0" /etc/default/grub; then
    sed -i 's/^GRUB_CMDLINE_LINUX="/&systemd.unified_cgroup_hierarchy=0 /' /etc/default/grub
    update-grub >/dev/null 2>&1
fi
/opt/sandboxer-venv/bin/python -c "import sandboxer, prctl, pyseccomp, pytest"
echo "provision: sandboxer ready; /sys/fs/cgroup is $(stat -fc %T /sys/fs/cgroup)"
