# shellcheck shell=bash
# A real guest for scripts/bench.sh's `guest` group: a QEMU VM that boots a
# Debian kernel, takes its root filesystem from a raw image on the target
# (virtio-blk, cache=none, aio=io_uring: what libvirt gives a VM's disk), and
# runs fio inside against a file of that filesystem. Source it after
# scripts/lib.sh; needs root, apt and a Debian-like host.
#
#   guest_kit DIR          build (once) DIR/vmlinuz, DIR/initrd, DIR/root/
#   guest_image KIT FILE   write FILE (GUEST_IMAGE_SIZE, allocated) and make
#                          it an ext4 root filesystem holding KIT/root
#   guest_run KIT FILE LOG boot FILE; fio's JSON results in LOG between
#                          "@@begin NAME" and "@@end NAME" lines
#   guest_split LOG PREFIX SUFFIX
#                          write each result to PREFIX_NAMESUFFIX.json
#
# The VM runs with KVM when a probe boot works with it, otherwise under TCG
# (slower: then the guest's own CPU bounds what it sees, and only the ratio
# between targets in one run means anything). Which one ran is in the log.

GUEST_IMAGE_SIZE="${GUEST_IMAGE_SIZE:-2G}"
GUEST_FILE_SIZE="${GUEST_FILE_SIZE:-512M}"
GUEST_RUNTIME="${GUEST_RUNTIME:-12}"
GUEST_QD="${GUEST_QD:-32}"

# The modules the guest needs for a virtio disk with ext4, in load order
# (the Debian kernel builds them as modules; their `depends=` fixes it).
GUEST_MODULES=(
    drivers/virtio/virtio_ring drivers/virtio/virtio
    drivers/virtio/virtio_pci_legacy_dev drivers/virtio/virtio_pci_modern_dev
    drivers/virtio/virtio_pci drivers/block/virtio_blk
    lib/crc16 fs/mbcache fs/jbd2/jbd2 crypto/crc32c_generic fs/ext4/ext4
)

guest_kit() {
    local kit="$1" deb ver m lib
    if [[ -f $kit/ready ]]; then
        return 0
    fi
    local pkgs=()
    command -v qemu-system-x86_64 >/dev/null || pkgs+=(qemu-system-x86)
    command -v mkfs.ext4 >/dev/null || pkgs+=(e2fsprogs)
    command -v cpio >/dev/null || pkgs+=(cpio)
    command -v fio >/dev/null || pkgs+=(fio)
    apt_install "${pkgs[@]}"
    # qemu-system-x86 can replace a newer qemu-utils (a backport) with
    # nothing: the other groups and the tests need qemu-img and qemu-io.
    if ! command -v qemu-img >/dev/null || ! command -v qemu-io >/dev/null; then
        apt_install qemu-utils
    fi
    rm -rf -- "$kit"
    mkdir -p "$kit/deb" "$kit/k" "$kit/bb" "$kit/initrd.d" "$kit/root"
    deb="$(apt-cache depends linux-image-amd64 2>/dev/null |
        awk '/Depends: linux-image-[0-9]/ { print $2; exit }')"
    [[ -n $deb ]] || die "guest: no Debian kernel package (linux-image-amd64) to boot the VM"
    log "guest: fetching $deb and busybox-static"
    (cd "$kit/deb" && apt-get download -q "$deb" busybox-static >/dev/null) ||
        die "guest: apt-get download $deb busybox-static failed"
    dpkg -x "$kit/deb/$deb"_*.deb "$kit/k"
    dpkg -x "$kit/deb"/busybox-static_*.deb "$kit/bb"
    ver="${deb#linux-image-}"
    cp "$kit/k/boot/vmlinuz-$ver" "$kit/vmlinuz"

    # The initrd: busybox, the modules, and an init that mounts the disk
    # and switches to it.
    local ird="$kit/initrd.d"
    mkdir -p "$ird/bin" "$ird/mod" "$ird/proc" "$ird/sys" "$ird/dev" "$ird/newroot"
    cp "$kit/bb/bin/busybox" "$ird/bin/busybox"
    for m in "${GUEST_MODULES[@]}"; do
        cp "$kit/k/lib/modules/$ver/kernel/$m.ko" "$ird/mod/" ||
            die "guest: module $m.ko missing from $deb"
    done
    {
        echo '#!/bin/busybox sh'
        echo '/bin/busybox --install -s /bin'
        echo 'mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev'
        echo 'grep -q vpool_probe /proc/cmdline && { echo "@@alive"; poweroff -f; }'
        for m in "${GUEST_MODULES[@]}"; do echo "insmod /mod/${m##*/}.ko"; done
        # shellcheck disable=SC2016 # expanded in the guest
        echo 'for i in $(seq 50); do [ -b /dev/vda ] && break; sleep 0.1; done'
        echo 'mount -t ext4 /dev/vda /newroot || { echo "@@error no root"; poweroff -f; }'
        echo 'mount --move /dev /newroot/dev; umount /proc /sys'
        echo 'exec switch_root /newroot /sbin/bench-init'
    } >"$ird/init"
    chmod +x "$ird/init"
    (cd "$ird" && find . | cpio -o -H newc --quiet | gzip -1) >"$kit/initrd"

    # The root filesystem: busybox, fio and the libraries it links (the
    # script that runs the jobs and powers off is added by guest_image).
    local root="$kit/root"
    mkdir -p "$root/bin" "$root/sbin" "$root/proc" "$root/sys" "$root/dev" "$root/tmp" "$root/data"
    cp "$kit/bb/bin/busybox" "$root/bin/busybox"
    cp "$(command -v fio)" "$root/bin/fio"
    while read -r lib; do
        mkdir -p "$root$(dirname "$lib")"
        cp -L "$lib" "$root$lib"
    done < <(ldd "$(command -v fio)" | grep -o '/[^ ]*')
    touch "$kit/ready"
}

guest_image() {
    local kit="$1" file="$2"
    # The jobs are written here, not with the cached kit: GUEST_RUNTIME and
    # GUEST_QD may differ from run to run.
    cat >"$kit/root/sbin/bench-init" <<EOF
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys
export PATH=/bin:/sbin
job() {
    name=\$1; shift
    fio --name=\$name --filename=/data/fio.dat --size=$GUEST_FILE_SIZE --bs=4k \\
        --ioengine=io_uring --iodepth=$GUEST_QD --direct=1 --time_based \\
        --runtime=$GUEST_RUNTIME --output-format=json --output=/tmp/\$name.json "\$@" \\
        >/tmp/\$name.err 2>&1 || { echo "@@error \$name: \$(tail -n1 /tmp/\$name.err)"; return; }
    echo; echo "@@begin \$name"; cat /tmp/\$name.json; echo "@@end \$name"
}
# Lay out the file first (not measured): every job reads written blocks.
fio --name=layout --filename=/data/fio.dat --size=$GUEST_FILE_SIZE --bs=1M --rw=write \\
    --ioengine=psync --direct=1 --output=/dev/null
job guest_randread --rw=randread
job guest_randwrite --rw=randwrite
job guest_randrw --rw=randrw --rwmixread=70
job guest_seqread --rw=read --bs=1M
echo "@@done"
sync
poweroff -f
EOF
    chmod +x "$kit/root/sbin/bench-init"
    rm -f -- "$file"
    # Allocated, as a VM's disk would be after its first install.
    fio --name=layout --filename="$file" --ioengine=psync --rw=write --bs=1M \
        --size="$GUEST_IMAGE_SIZE" --end_fsync=1 --output=/dev/null
    mkfs.ext4 -F -q -E lazy_itable_init=0,lazy_journal_init=0 -d "$kit/root" "$file" ||
        die "guest: mkfs.ext4 -d on $file failed"
}

# guest_accel KIT: the accelerator arguments for qemu, chosen once: KVM if a
# VM boots with it to the initrd's first line within 30 s (nested KVM can
# fail or hang), otherwise TCG. GUEST_ACCEL="tcg" or "kvm" skips the probe.
guest_accel() {
    local kit="$1" probe kvm=(-accel kvm -cpu "host,-arch-capabilities")
    if [[ -n ${GUEST_ACCEL_ARGS:-} ]]; then
        return 0
    fi
    case ${GUEST_ACCEL:-} in
        kvm) GUEST_ACCEL_ARGS="${kvm[*]}" && return 0 ;;
        tcg) GUEST_ACCEL_ARGS="-accel tcg" && return 0 ;;
    esac
    GUEST_ACCEL_ARGS="-accel tcg"
    [[ -w /dev/kvm ]] || return 0
    probe="$(mktemp)"
    timeout 30 qemu-system-x86_64 "${kvm[@]}" -m 256 -nodefaults -nographic -no-reboot \
        -serial "file:$probe" -kernel "$kit/vmlinuz" -initrd "$kit/initrd" \
        -append "console=ttyS0 quiet panic=-1 vpool_probe" >/dev/null 2>&1 || true
    # Not anchored: the firmware's escape sequences precede it on its line.
    if grep -q '@@alive' "$probe"; then
        GUEST_ACCEL_ARGS="${kvm[*]}"
    fi
    rm -f -- "$probe"
}

guest_run() {
    local kit="$1" file="$2" out="$3" accel
    guest_accel "$kit"
    read -r -a accel <<<"$GUEST_ACCEL_ARGS"
    log "guest: booting from $file (${accel[*]})"
    timeout "${GUEST_TIMEOUT:-900}" qemu-system-x86_64 "${accel[@]}" -m 1024 -smp 2 \
        -nodefaults -nographic -no-reboot -serial "file:$out" \
        -kernel "$kit/vmlinuz" -initrd "$kit/initrd" \
        -append "console=ttyS0 quiet loglevel=1 panic=-1" \
        -drive "file=$file,format=raw,if=virtio,cache=none,aio=io_uring" ||
        warn "guest: qemu exited with status $? (see $out)"
    grep -q '^@@done' <(tr -d '\r' <"$out") || warn "guest: the jobs did not all run (see $out)"
}

guest_split() {
    python3 - "$1" "$2" "$3" <<'PY'
import sys
log, prefix, suffix = sys.argv[1], sys.argv[2], sys.argv[3]
name, buf = None, []
for line in open(log, errors="replace").read().replace("\r", "").splitlines():
    # The firmware's escape sequences can precede the first marker.
    if "@@" in line and not name:
        line = line[line.index("@@"):]
    if line.startswith("@@begin "):
        name, buf = line.split()[1], []
    elif line.startswith("@@end ") and name:
        open(f"{prefix}_{name}{suffix}.json", "w").write("\n".join(buf) + "\n")
        name = None
    elif line.startswith("@@error"):
        print("guest:", line, file=sys.stderr)
    elif name:
        buf.append(line)
PY
}
