#!/usr/bin/env bash
# Entry point of every overlay image: installs the container's static routes
# (the underlay's next hops, given by the compose file), then runs COMMAND as
# the unprivileged user `overlay` with no capabilities left.
#
#   OVERLAY_ROUTES        "DEST via HOP, DEST via HOP, ...": routes to install
#                         (needs the container to start as root with NET_ADMIN)
#   OVERLAY_START_DELAY_S seconds to wait before COMMAND starts (staggered clients)
#   OVERLAY_TLS_DIR       where onode and oclient find their TLS files: those
#                         mounted in /etc/overlay/tls are copied there, owned
#                         by `overlay`, keys readable by it alone
set -euo pipefail

if [[ $# -eq 0 || $1 == -h || $1 == --help ]]; then
    echo "usage: overlay-entrypoint COMMAND [ARGS...]" >&2
    exit 2
fi

if [[ -n ${OVERLAY_ROUTES:-} ]]; then
    if [[ $(id -u) != 0 ]]; then
        echo "overlay-entrypoint: OVERLAY_ROUTES needs the container to start as root with NET_ADMIN (compose: user: root, cap_add: [NET_ADMIN])" >&2
        exit 1
    fi
    IFS=',' read -ra routes <<<"$OVERLAY_ROUTES"
    for route in "${routes[@]}"; do
        read -ra words <<<"$route"
        [[ ${#words[@]} -gt 0 ]] || continue
        # Compose attaches the networks just before start; give a late
        # interface a moment before calling the route wrong.
        for attempt in 1 2 3 4 5 6 7 8 9 10; do
            if err=$(ip route replace "${words[@]}" 2>&1); then
                break
            fi
            if [[ $attempt == 10 ]]; then
                echo "overlay-entrypoint: ip route replace ${words[*]}: $err" >&2
                ip -4 -brief address >&2 || true
                exit 1
            fi
            sleep 0.2
        done
    done
fi

if [[ -n ${OVERLAY_TLS_DIR:-} && -d /etc/overlay/tls && $(id -u) == 0 ]]; then
    install -d -m 0700 -o overlay -g overlay "$OVERLAY_TLS_DIR"
    for f in /etc/overlay/tls/*; do
        [[ -f $f ]] || { echo "overlay-entrypoint: $f is not a file (run deploy/compose.sh up: it makes ./tls)" >&2; exit 1; }
        mode=0644
        [[ $f == *.key ]] && mode=0600
        install -m "$mode" -o overlay -g overlay "$f" "$OVERLAY_TLS_DIR/"
    done
fi

if [[ -n ${OVERLAY_START_DELAY_S:-} ]]; then
    sleep "$OVERLAY_START_DELAY_S"
fi

if [[ $(id -u) == 0 ]]; then
    export HOME=/home/overlay USER=overlay LOGNAME=overlay
    exec setpriv --reuid=overlay --regid=overlay --init-groups \
        --inh-caps=-all --bounding-set=-all --no-new-privs -- "$@"
fi
exec "$@"
