#!/usr/bin/env bash
# `make vm-test`: the VM suite through Vagrant itself, offline, on this machine.
#
#   scripts/vm/vagrant-test.sh [MACHINE...]     (default: v2 v1)
#
# Starts a private libvirtd (its own sockets in a temporary directory; no libvirt network is
# ever defined), builds and adds the local box (scripts/vm/build-box.sh), then for each
# machine of vagrant/Vagrantfile: `vagrant up` (which provisions and runs the in-guest
# suite), `vagrant destroy -f`. Vagrant's state lives in a private VAGRANT_HOME under the VM
# cache, never in the user's ~/.vagrant.d. Everything started here is stopped on exit.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
log() { echo "vm-test: $*" >&2; }
machines=("$@")
((${#machines[@]})) || machines=(v2 v1)

"$repo/scripts/vm/setup.sh" --vagrant

# libvirt runs qemu as libvirt-qemu, which must reach the box's kernel and initramfs: a
# VAGRANT_HOME others may traverse (the image cache itself stays private).
export VAGRANT_HOME=${SANDBOXER_VAGRANT_HOME:-/var/lib/sandboxer-vm/vagrant-home}
mkdir -p "$VAGRANT_HOME"
chmod 711 "$(dirname "$VAGRANT_HOME")" "$VAGRANT_HOME"
export VAGRANT_CHECKPOINT_DISABLE=1 VAGRANT_DEFAULT_PROVIDER=libvirt SANDBOXER_BOX=local \
       SANDBOXER_LIBVIRT_DRIVER=qemu VAGRANT_NO_COLOR=1
run=$(mktemp -d /tmp/sandboxer-libvirt.XXXXXX)
export VAGRANT_DOTFILE_PATH=$run/vagrant
pids=()
cleanup() {
    status=$?
    cd "$repo/vagrant"
    for m in "${machines[@]}"; do vagrant destroy -f "$m" >/dev/null 2>&1 || true; done
    # vagrant-libvirt keeps the box's disk in the storage pool as a base for the next
    # machine; it is a copy of the cached image, so it goes too.
    if [[ -n ${SANDBOXER_LIBVIRT_URI:-} ]]; then
        for vol in $(virsh -q -c "$SANDBOXER_LIBVIRT_URI" vol-list default 2>/dev/null |
                     awk '$1 ~ /^sandboxer-VAGRANTSLASH-bookworm-local_vagrant_box_image_/ {print $1}'); do
            virsh -q -c "$SANDBOXER_LIBVIRT_URI" vol-delete --pool default "$vol" >/dev/null || true
        done
    fi
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    done
    rm -rf "$run"
    exit $status
}
trap cleanup EXIT INT TERM

# A libvirtd of our own, its sockets in $run, and the virtlogd it hands qemu's output to.
cat >"$run/libvirtd.conf" <<EOF
unix_sock_dir = "$run"
unix_sock_group = "root"
unix_sock_rw_perms = "0700"
auth_unix_rw = "none"
auth_unix_ro = "none"
EOF
started=$SECONDS
virtlogd >"$run/virtlogd.log" 2>&1 &
pids+=($!)
libvirtd --config "$run/libvirtd.conf" --pid-file "$run/libvirtd.pid" >"$run/libvirtd.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do [[ -S $run/libvirt-sock ]] && break; sleep 0.1; done
[[ -S $run/libvirt-sock ]] || { cat "$run/libvirtd.log" >&2; log "libvirtd did not start"; exit 1; }
export SANDBOXER_LIBVIRT_URI="qemu:///system?socket=$run/libvirt-sock"
virsh -c "$SANDBOXER_LIBVIRT_URI" pool-info default >/dev/null 2>&1 || {
    mkdir -p /var/lib/libvirt/images
    virsh -q -c "$SANDBOXER_LIBVIRT_URI" pool-define-as default dir --target /var/lib/libvirt/images
    virsh -q -c "$SANDBOXER_LIBVIRT_URI" pool-start default
}
log "libvirtd $((SECONDS - started)) s"

started=$SECONDS
"$repo/scripts/vm/build-box.sh"
log "box $((SECONDS - started)) s"

cd "$repo/vagrant"
status=0
for m in "${machines[@]}"; do
    started=$SECONDS
    vagrant up "$m" --provider libvirt || status=1
    log "$m: up + provision + suite $((SECONDS - started)) s"
    started=$SECONDS
    vagrant destroy -f "$m" || status=1
    log "$m: destroy $((SECONDS - started)) s"
done
exit $status
