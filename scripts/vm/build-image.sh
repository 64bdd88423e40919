#!/usr/bin/env bash
# Builds the guest of the VM stage: Debian 12 (bookworm), pure cgroup v2 under systemd, booted
# by qemu straight from its kernel and initramfs (no bootloader, no partition table), with
# sandboxer's pinned dependencies baked into /opt/sandboxer-venv. sandboxer itself is not in
# the image: each run copies the tree under test to /opt/sandboxer-src, which the venv already
# has on its path (sandboxer-src.pth) and whose console script is /usr/local/bin/sandboxer.
#
# Output, printed as the last line on stdout: a directory holding vmlinuz, initrd.img,
# rootfs.img (raw ext4, the whole disk), and id_ed25519, the key root's ssh accepts. It is
# cached under $SANDBOXER_VM_CACHE (default /var/cache/sandboxer-vm as root, else
# $XDG_CACHE_HOME/sandboxer-vm) keyed by the sha256 of this script and requirements.lock, so
# changing either rebuilds; older builds are removed. Users in the image:
#   root       ssh with the generated key (the qemu runner);
#   vagrant    uid 1000, password-less sudo, Vagrant's well-known insecure key (the box);
#   sandboxer  uid 1001, unprivileged: the rootless supervisor of the VM suite.
# Needs root (debootstrap, chroot, files owned by other users), the host's .venv (its pip
# builds the wheels the guest installs, offline) and scripts/vm/setup.sh's packages.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
log() { echo "build-image: $*" >&2; }

if [[ $(id -u) -ne 0 ]]; then
    log "must run as root (debootstrap and chroot)"; exit 1
fi
# The chroot's mounts (/proc, /sys, /dev) live in a mount namespace of this build's own:
# nothing else on the host (the test suite, which may run meanwhile) sees them come and go,
# and they vanish with the build whatever way it ends.
if [[ -z ${SANDBOXER_VM_PRIVATE_MOUNTS:-} ]]; then
    export SANDBOXER_VM_PRIVATE_MOUNTS=1
    exec unshare --mount --propagation private "$0" "$@"
fi
if [[ -n ${SANDBOXER_VM_CACHE:-} ]]; then
    cache=$SANDBOXER_VM_CACHE
else
    cache=/var/cache/sandboxer-vm
fi
key=$(cat "$0" "$repo/requirements.lock" | sha256sum | cut -c1-16)
out=$cache/bookworm-$key
mkdir -p "$cache"
chmod 700 "$cache"  # the image's root key lives here

# One build at a time; a second caller waits and then finds the result.
exec 9>"$cache/.lock"
flock 9
if [[ -f $out/ready ]]; then
    echo "$out"; exit 0
fi

started=$SECONDS
work=$(mktemp -d "$cache/build.XXXXXX")
root=$work/root
cleanup() {
    for m in dev/pts dev proc sys; do
        mountpoint -q "$root/$m" 2>/dev/null && umount -l "$root/$m"
    done
    rm -rf "$work"
}
trap cleanup EXIT

# The host's own Debian mirror (its apt sources), so the guest comes from where the host's
# packages come from; debootstrap's default when the host names none.
mirror=$(awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
[[ -n $mirror ]] || mirror=$(awk '$1=="deb" && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)

# Python wheels first (on the host, with the host's pip and build tools): the guest is the
# same Debian release with the same python3.11, so they install there as they are.
log "building wheels for requirements.lock"
PIP_DISABLE_PIP_VERSION_CHECK=1 "$repo/.venv/bin/python" -m pip wheel -q \
    -r "$repo/requirements.lock" -w "$work/wheels" 2>&1 | grep -v "^WARNING: Location" >&2 || true
ls "$work"/wheels/python_prctl-*.whl >/dev/null  # the one that needs a compiler: fail here if missing

# gcc and libc6-dev build the escape probes (tests/escapes compiles probe.c); clang, lld,
# wasi-libc and the wasm32 compiler-rt build the WASI probes (tests/escapes/test_wasm_grants.py);
# git commits into an idmapped writable grant (tests/escapes/test_writable_grants.py); rsync serves
# Vagrant's synced folder on the box; dbus-user-session
# and libpam-systemd give the unprivileged user a systemd user manager with a bus, which is
# what delegates a cgroup subtree to a rootless supervisor.
packages=initramfs-tools,systemd,systemd-sysv,udev,kmod,dbus,dbus-user-session,libpam-systemd,openssh-server,sudo,python3,python3-venv,qemu-guest-agent,libseccomp2,libcap2,ca-certificates,gcc,libc6-dev,clang,lld,wasi-libc,libclang-rt-14-dev-wasm32,git,procps,iproute2,rsync
log "debootstrap bookworm ${mirror:-(default mirror)}"
debootstrap --variant=minbase --include="$packages" bookworm "$root" ${mirror:+"$mirror"} >"$work/debootstrap.log" 2>&1 || {
    tail -30 "$work/debootstrap.log" >&2; exit 1; }

mount -t proc proc "$root/proc"
mount -t sysfs sys "$root/sys"
mount --bind /dev "$root/dev"
mount --bind /dev/pts "$root/dev/pts"
in_root() {  # a clean environment: nothing of the host's shell leaks into the guest
    env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
        DEBIAN_FRONTEND=noninteractive chroot "$root" "$@"
}

# The drivers the guest's root disk and shares need, in the initramfs (virtio disk, ext4) or
# loadable from the root (9p).
# Only those (MODULES=list): a small initramfs unpacks in seconds even under TCG.
printf '%s\n' virtio_pci virtio_blk virtio_net ext4 9p 9pnet_virtio >>"$root/etc/initramfs-tools/modules"
sed -i 's/^MODULES=.*/MODULES=list/' "$root/etc/initramfs-tools/initramfs.conf"
log "installing the kernel"
in_root apt-get install -y -qq --no-install-recommends linux-image-amd64 >"$work/kernel.log" 2>&1 || {
    tail -30 "$work/kernel.log" >&2; exit 1; }

echo sandboxer-vm >"$root/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 sandboxer-vm\n' >"$root/etc/hosts"
echo "/dev/vda / ext4 rw,relatime 0 1" >"$root/etc/fstab"
# DHCP on qemu's user-mode network (or libvirt's NIC): the only network the guest has.
mkdir -p "$root/etc/systemd/network"
printf '[Match]\nName=e*\n\n[Network]\nDHCP=ipv4\n' >"$root/etc/systemd/network/20-wired.network"
in_root systemctl enable -q systemd-networkd
in_root systemctl disable -q systemd-networkd-wait-online 2>/dev/null || true
# Nothing that runs on a timer or at boot for minutes: the guest runs one suite and goes.
in_root systemctl mask -q apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer \
    fstrim.timer systemd-tmpfiles-clean.timer 2>/dev/null || true
# The guest's clock comes from qemu; no ssh reverse DNS lookups on a network without DNS.
printf 'UseDNS no\nPermitRootLogin prohibit-password\n' >"$root/etc/ssh/sshd_config.d/sandboxer.conf"

ssh-keygen -q -t ed25519 -N "" -C sandboxer-vm -f "$work/id_ed25519"
install -d -m 700 "$root/root/.ssh"
install -m 600 "$work/id_ed25519.pub" "$root/root/.ssh/authorized_keys"
in_root passwd -q -l root

in_root useradd -m -u 1000 -s /bin/bash vagrant
in_root useradd -m -u 1001 -s /bin/bash sandboxer
echo "vagrant ALL=(ALL) NOPASSWD: ALL" >"$root/etc/sudoers.d/vagrant"
chmod 440 "$root/etc/sudoers.d/vagrant"
install -d -m 700 -o 1000 -g 1000 "$root/home/vagrant/.ssh"
# Vagrant's published insecure key: the box's first login uses it, then Vagrant replaces it.
echo "ssh-rsa AAAAB3NzaC1yc2EAAAABIwAAAQEA6NF8iallvQVp22WDkTkyrtvp9eWW6A8YVr+kz4TjGYe7gHzIw+niNltGEFHzD8+v1I2YJ6oXevct1YeS0o9HZyN1Q9qgCgzUFtdOKLv6IedplqoPkcmF0aYet2PkEDo3MlTBckFXPITAMzF8dJSIFo9D8HfdOV0IAdx4O7PtixWKn5y2hMNG0zQPyUecp4pzC6kivAIhyfHilFR61RGL+GPXQ2MWZWFYbAGjyiYJnAmCP3NOTd0jMZEnDkbUvxhMmBYSdETk1rRgm+R4LOzFUGaHqHDLKLX+FIPKcF96hrucXzcWyLbIbEgE98OHlnVYCzRdK8jlqm8tehUc9c9WhQ== vagrant insecure public key" \
    >"$root/home/vagrant/.ssh/authorized_keys"
chown 1000:1000 "$root/home/vagrant/.ssh/authorized_keys"
chmod 600 "$root/home/vagrant/.ssh/authorized_keys"

log "installing the Python dependencies into /opt/sandboxer-venv"
cp -r "$work/wheels" "$root/tmp/wheels"
cp "$repo/requirements.lock" "$root/tmp/requirements.lock"
in_root python3 -m venv /opt/sandboxer-venv
in_root /opt/sandboxer-venv/bin/pip install -q --no-index --find-links /tmp/wheels \
    --disable-pip-version-check -r /tmp/requirements.lock
in_root /opt/sandboxer-venv/bin/python -c "import orjson, prctl, pyseccomp, wasmtime, inotify_simple, cryptography, pytest, pytest_asyncio, pytest_timeout, hypothesis"
# sandboxer from the tree each run copies in, as an editable install would have it.
site=$(in_root /opt/sandboxer-venv/bin/python -c "import sysconfig; print(sysconfig.get_path('purelib'))")
echo /opt/sandboxer-src >"$root$site/sandboxer-src.pth"
printf '#!/opt/sandboxer-venv/bin/python\nimport sys\nfrom sandboxer.cli import main\nsys.exit(main())\n' \
    >"$root/opt/sandboxer-venv/bin/sandboxer"
chmod 755 "$root/opt/sandboxer-venv/bin/sandboxer"
ln -s /opt/sandboxer-venv/bin/sandboxer "$root/usr/local/bin/sandboxer"
install -d -m 755 "$root/opt/sandboxer-src"

in_root apt-get clean
rm -rf "$root/tmp/wheels" "$root/tmp/requirements.lock" "$root"/var/lib/apt/lists/*
for m in dev/pts dev proc sys; do umount "$root/$m"; done

mkdir -p "$work/out"
cp "$root/boot/vmlinuz-"* "$work/out/vmlinuz"
cp "$root/boot/initrd.img-"* "$work/out/initrd.img"
mv "$work/id_ed25519" "$work/id_ed25519.pub" "$work/out/"
# The disk is the file system itself: loop devices get no partition nodes on some hosts, and
# direct kernel boot needs no bootloader. Sparse, so 6G costs only what is used.
log "writing rootfs.img"
mkfs.ext4 -q -L sandboxer-root -d "$root" "$work/out/rootfs.img" 6G >&2
sha256sum "$0" "$repo/requirements.lock" >"$work/out/built-from"
touch "$work/out/ready"
for old in "$cache"/bookworm-*; do
    [[ $old == "$out" ]] || rm -rf "$old"
done
mv "$work/out" "$out"
log "built $out in $((SECONDS - started)) s"
echo "$out"
