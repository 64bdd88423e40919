#!/usr/bin/env bash
# Builds the local Vagrant box (provider libvirt) from scripts/vm/build-image.sh's image and
# adds it to Vagrant as sandboxer/bookworm-local, unless a box of the same image is there.
#
# The box is what vagrant-libvirt expects (box.img qcow2 + metadata.json + Vagrantfile) plus
# the image's kernel and initramfs: the image has no bootloader, so the box's Vagrantfile
# boots it straight from those (libvirt's direct kernel boot), as scripts/vm/qemu-run does.
# The vagrant user logs in with Vagrant's insecure key, which Vagrant replaces at first boot.
#
# Honours VAGRANT_HOME (make vm-test points it at a private directory).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
log() { echo "build-box: $*" >&2; }

image=$("$here/build-image.sh")
name=sandboxer/bookworm-local
stamp=$(basename "$image")  # bookworm-<hash of the image's build inputs>

if vagrant box list --machine-readable 2>/dev/null | grep -q ",box-name,$name\$" &&
   [[ -f ${VAGRANT_HOME:-$HOME/.vagrant.d}/sandboxer-box-$stamp ]]; then
    log "$name is current ($stamp)"; exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
log "converting $image/rootfs.img"
qemu-img convert -O qcow2 "$image/rootfs.img" "$work/box.img"
cp "$image/vmlinuz" "$image/initrd.img" "$work/"
size=$(( $(stat -c %s "$image/rootfs.img") / 1024 / 1024 / 1024 ))
printf '{"provider": "libvirt", "format": "qcow2", "virtual_size": %d}\n' "$size" >"$work/metadata.json"
cat >"$work/Vagrantfile" <<'EOF'
# The box's own defaults: boot the image's kernel directly (the disk has no bootloader).
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |libvirt|
    box = File.dirname(__FILE__)
    libvirt.kernel = File.join(box, "vmlinuz")
    libvirt.initrd = File.join(box, "initrd.img")
    libvirt.cmd_line = "root=/dev/vda rw console=ttyS0 net.ifnames=0 panic=-1 quiet"
    libvirt.disk_bus = "virtio"
  end
end
EOF
tar -C "$work" -cf "$work/sandboxer.box" metadata.json Vagrantfile box.img vmlinuz initrd.img
vagrant box add --force --name "$name" "$work/sandboxer.box" >&2
rm -f "${VAGRANT_HOME:-$HOME/.vagrant.d}"/sandboxer-box-*
touch "${VAGRANT_HOME:-$HOME/.vagrant.d}/sandboxer-box-$stamp"
log "added $name ($stamp)"
