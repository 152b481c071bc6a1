#!/bin/sh
# Builds the minimal Debian root file system the real-systemd tests boot, as a tarball.
# Usage: make-rootfs.sh OUT.tar  (needs root, debootstrap and the network to a Debian mirror)
# Parallel callers are serialized by a lock next to the tarball; an existing tarball is kept.
set -eu
out=${1:?usage: make-rootfs.sh OUT.tar}
suite=${BBUPGRADE_ROOTFS_SUITE:-bookworm}
mirror=${BBUPGRADE_ROOTFS_MIRROR:-http://deb.debian.org/debian}
mkdir -p "$(dirname "$out")"
exec 9>"$out.lock"
flock 9
[ -s "$out" ] && exit 0
command -v debootstrap >/dev/null || { echo "debootstrap is not installed: apt-get install -y debootstrap" >&2; exit 1; }
work=$(mktemp -d "$(dirname "$out")/rootfs-build.XXXXXX")
trap 'rm -rf "$work"' EXIT
debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus "$suite" "$work/root" "$mirror" >"$work/log" 2>&1 \
  || { tail -n 30 "$work/log" >&2; exit 1; }
# The package cache is not needed to boot; dropping it halves the tarball.
rm -rf "$work/root/var/cache/apt/archives/"*.deb "$work/root/var/lib/apt/lists/"*
tar -C "$work/root" --numeric-owner -cf "$work/rootfs.tar" .
mv "$work/rootfs.tar" "$out"
