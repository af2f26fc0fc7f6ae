#!/usr/bin/env bash
# Builds the role images overlay-{server,node,pop,client}:TAG. Makes the
# base image first when it is missing (deploy/base-image.sh), builds the
# release binaries on this machine (Debian 12, so the glibc matches) and
# copies them, stripped, into a build context with the entry point.
#
#   BASE      base image (default overlay-base:bookworm, made when missing;
#             any other is used as given, e.g. debian:bookworm-slim)
#   TAG       image tag (default latest)
#   BIN_DIR   take onode, oclient and rtspwatch from here instead of `cargo build --release`
set -euo pipefail

usage() { echo "usage: deploy/images.sh [ROLE...]   (roles: server node pop client; default all)" >&2; }
case "${1:-}" in -h|--help) usage; exit 0 ;; esac

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
base=${BASE:-overlay-base:bookworm}
tag=${TAG:-latest}
roles=("$@")
[[ ${#roles[@]} -gt 0 ]] || roles=(server node pop client)
for role in "${roles[@]}"; do
    [[ -f $repo/deploy/$role.Dockerfile ]] || { echo "images: unknown role $role" >&2; usage; exit 2; }
done

# One build at a time on this machine: `just test` starts one beside the
# lab tests and the compose test asks again; the second waits, then finds
# every layer cached.
exec 9>/tmp/overlay-images.lock
if ! flock -n 9; then
    echo "images: another image build runs here; waiting for it" >&2
    flock 9
fi

if ! docker image inspect "$base" >/dev/null 2>&1; then
    if [[ $base == overlay-base:bookworm ]]; then
        "$repo/deploy/base-image.sh" "$base"
    else
        echo "images: base image $base is missing (pull it, or unset BASE to make overlay-base:bookworm)" >&2
        exit 1
    fi
fi

if [[ -z ${BIN_DIR:-} ]]; then
    (cd "$repo" && cargo build --release --quiet -p onode -p oclient)
    BIN_DIR=${CARGO_TARGET_DIR:-$repo/target}/release
fi

context=$(mktemp -d /tmp/overlay-images.XXXXXX)
cleanup() { rm -rf "$context"; }
trap cleanup EXIT
for bin in onode oclient rtspwatch; do
    [[ -x $BIN_DIR/$bin ]] || { echo "images: $BIN_DIR/$bin is missing" >&2; exit 1; }
    strip -o "$context/$bin" "$BIN_DIR/$bin"
done
install -m 0755 "$repo/deploy/entrypoint.sh" "$context/overlay-entrypoint"
install -m 0755 "$repo/deploy/client-health.sh" "$context/overlay-client-health"

for role in "${roles[@]}"; do
    start=$SECONDS
    log=$context/build-$role.log
    if ! docker build --build-arg "BASE=$base" -t "overlay-$role:$tag" -f "$repo/deploy/$role.Dockerfile" "$context" >"$log" 2>&1; then
        tail -30 "$log" >&2
        echo "images: overlay-$role failed to build" >&2
        exit 1
    fi
    size=$(docker image inspect -f '{{.Size}}' "overlay-$role:$tag" | awk '{ printf "%.0f MB", $1 / 1e6 }')
    echo "images: overlay-$role:$tag ($size, $((SECONDS - start)) s)"
done
# The images these builds replaced (untagged now); the build stages stay as cache.
docker image prune -f --filter label=overlay.role >/dev/null
