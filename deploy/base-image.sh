#!/usr/bin/env bash
# Makes the Debian 12 base image locally, for machines with no registry:
# debootstrap (minbase) from the mirror this machine's apt already uses,
# cleaned, then `docker import`ed. Needs root, debootstrap and a Docker daemon.
set -euo pipefail

usage() { echo "usage: deploy/base-image.sh [IMAGE]   (default overlay-base:bookworm)" >&2; }
case "${1:-}" in -h|--help) usage; exit 0 ;; esac
image="${1:-overlay-base:bookworm}"
suite=bookworm

command -v debootstrap >/dev/null || { echo "base-image: debootstrap is not installed (apt-get install debootstrap)" >&2; exit 1; }

# The mirror URIs this machine's apt uses: deb822 sources first, then the
# one-line format. The first is the main archive, a *-security one the
# security archive.
sources() {
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -f $f ]] && sed -n 's/^URIs:[[:space:]]*//p' "$f"
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -f $f ]] && awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; break } }' "$f"
    done
}
mapfile -t uris < <(sources | tr ' ' '\n' | sed '/^$/d' | awk '!seen[$0]++')
mirror=""
security=""
for u in "${uris[@]}"; do
    if [[ $u == *security* ]]; then
        [[ -n $security ]] || security=$u
    else
        [[ -n $mirror ]] || mirror=$u
    fi
done
[[ -n $mirror ]] || { echo "base-image: no Debian mirror found in /etc/apt/sources.list{,.d}" >&2; exit 1; }

work=$(mktemp -d /tmp/overlay-base.XXXXXX)
cleanup() { rm -rf "$work"; }
trap cleanup EXIT
root=$work/root

echo "base-image: debootstrap --variant=minbase $suite from $mirror"
if ! debootstrap --variant=minbase "$suite" "$root" "$mirror" >"$work/debootstrap.log" 2>&1; then
    tail -20 "$work/debootstrap.log" >&2
    exit 1
fi

# Clean: no cached packages or lists, no host resolver, no documentation,
# manuals or translations (and dpkg told to install none later, as in
# debian:bookworm-slim), and apt pointed at the same mirrors.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/*.bin "$root"/var/lib/apt/lists/* \
    "$root"/var/log/* "$root"/tmp/* "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/locale/*
find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
cat >"$root/etc/dpkg/dpkg.cfg.d/overlay-slim" <<'SLIM'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
SLIM
: >"$root/etc/resolv.conf"
{
    echo "deb $mirror $suite main"
    echo "deb $mirror $suite-updates main"
    [[ -z $security ]] || echo "deb $security $suite-security main"
} >"$root/etc/apt/sources.list"

tar --numeric-owner -C "$root" -c . | docker import -c 'CMD ["/bin/bash"]' - "$image" >/dev/null
echo "base-image: $image ($(docker image inspect -f '{{.Size}}' "$image" | awk '{ printf "%.0f MB", $1 / 1e6 }'))"
