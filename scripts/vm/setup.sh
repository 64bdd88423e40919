#!/usr/bin/env bash
# Installs what the VM stage needs on a Debian 12 host, only what is missing: qemu (TCG is
# enough; no KVM needed), debootstrap and e2fsprogs to build the guest image, an ssh client to
# drive the guest. With --vagrant also Vagrant, vagrant-libvirt and a libvirt daemon *without*
# libvirt-daemon-system (that package defines a bridged default network; we want none).
set -euo pipefail

APT_PACKAGES=(qemu-system-x86 qemu-utils debootstrap e2fsprogs openssh-client ca-certificates)
if [[ ${1:-} == --vagrant ]]; then
    APT_PACKAGES+=(vagrant vagrant-libvirt libvirt-daemon libvirt-daemon-driver-qemu
                   libvirt-clients rsync)
fi

source "$(dirname "$0")/../apt-missing.sh"
# Not fatal for `make test` outside CI without root: the VM stage then skips and says why
# (under CI=true that skip is a failure, tests/conftest.py).
install_missing vm-setup "${APT_PACKAGES[@]}" || {
    status=$?; [[ $status -eq 2 && ${CI:-} != true ]] && exit 0; exit 1; }
if [[ ${1:-} == --vagrant ]]; then
    # libvirtd runs qemu as libvirt-qemu:kvm; without libvirt-daemon-system nobody creates them.
    getent group kvm >/dev/null || groupadd --system kvm
    getent group libvirt-qemu >/dev/null || groupadd --system libvirt-qemu
    id libvirt-qemu >/dev/null 2>&1 ||
        useradd --system --no-create-home --home-dir /var/lib/libvirt -g kvm -s /usr/sbin/nologin libvirt-qemu
fi
