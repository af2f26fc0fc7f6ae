#!/usr/bin/env bash
# The network-namespace lab: a thin wrapper over the netlab binary, which
# holds the logic (lab files, routes, roles, reports). Needs root.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: netns/lab.sh COMMAND [ARGS]
  up [LAB] [OPTIONS]             build LAB, start its roles, wait until the overlay is ready
  down                           stop and delete the lab (safe to run twice)
  status                         hosts, addresses, processes, overlay readiness
  check                          ping every address of the lab from every host
  link-set LINK [OPTIONS]        change an emulated link while it runs (--delay-ms, --from HOST, ...)
  exec HOST CMD...               run CMD inside HOST's namespace
  client HOST STREAM [OPTIONS]   run oclient on HOST (--headless, --duration S)
  demo [LAB] [OPTIONS]           up, five clients on two streams, report, down
  validate [LAB]                 check a lab file and print its routes (no root)
LAB is a lab file or a name in netns/labs/ (default: seed).
NETLAB_PREFIX names the lab (default: a new prefix for up and demo; otherwise
the only lab that is up). NETLAB_BIN_DIR picks the binaries (default: the
newest of target/debug and target/release). OPTIONS are netlab's: see `netlab help up`.
EOF
}

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
target="${CARGO_TARGET_DIR:-$root/target}"

# The newest executable among the arguments (debug or release).
newest() {
    local best=""
    for f in "$@"; do
        [[ -x "$f" ]] || continue
        if [[ -z "$best" || "$f" -nt "$best" ]]; then best="$f"; fi
    done
    printf '%s' "$best"
}

# A binary: from $NETLAB_BIN_DIR when it has it, else the newest build.
find_bin() {
    if [[ -n "${NETLAB_BIN_DIR:-}" && -x "$NETLAB_BIN_DIR/$1" ]]; then
        printf '%s' "$NETLAB_BIN_DIR/$1"
        return
    fi
    newest "$target/debug/$1" "$target/release/$1" "$root/target/debug/$1" "$root/target/release/$1"
}

lab_file() {
    local lab="${1:-seed}"
    if [[ -f "$lab" ]]; then
        printf '%s' "$lab"
    elif [[ -f "$here/labs/$lab.json" ]]; then
        printf '%s' "$here/labs/$lab.json"
    else
        echo "lab.sh: no lab file $lab (nor $here/labs/$lab.json)" >&2
        exit 2
    fi
}

[[ $# -ge 1 ]] || { usage >&2; exit 2; }
cmd="$1"
shift
case "$cmd" in -h | --help | help) usage; exit 0 ;; esac

netlab="$(find_bin netlab)"
if [[ -z "$netlab" ]]; then
    echo "lab.sh: no netlab binary in $target/{debug,release}: run \`cargo build -p netlab\`" >&2
    exit 1
fi
# onode and oclient: pass their folder on when they are built.
bin_args=()
onode="$(find_bin onode)"
if [[ -n "$onode" ]]; then bin_args=(--bin-dir "$(dirname "$onode")"); fi

# A lab that up or demo is building; torn down if this script dies early.
building=""
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [[ -n "$building" ]]; then
        "$netlab" down --prefix "$building" >&2 || true
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Sets `prefix` from --prefix in the arguments, NETLAB_PREFIX or a new one.
pick_prefix() {
    prefix="${NETLAB_PREFIX:-}"
    local prev=""
    for a in "$@"; do
        if [[ "$prev" == "--prefix" ]]; then prefix="$a"; fi
        if [[ "$a" == --prefix=* ]]; then prefix="${a#--prefix=}"; fi
        prev="$a"
    done
    if [[ -z "$prefix" ]]; then
        prefix="nl$(printf '%04x' "$((RANDOM % 65536))")"
    fi
}

case "$cmd" in
    up | demo)
        lab="seed"
        if [[ $# -ge 1 && "$1" != -* ]]; then lab="$1"; shift; fi
        file="$(lab_file "$lab")"
        pick_prefix "$@"
        args=("$@")
        if [[ " ${args[*]-} " != *" --prefix"* ]]; then args+=(--prefix "$prefix"); fi
        if [[ "$cmd" == demo && -z "$onode" ]]; then
            echo "lab.sh: no onode binary in $target/{debug,release}: run \`cargo build\`" >&2
            exit 1
        fi
        # netlab tears the lab down itself on failure and Ctrl-C (and demo
        # always); the trap covers this script being stopped meanwhile.
        building="$prefix"
        rc=0
        "$netlab" "$cmd" "$file" ${bin_args[@]+"${bin_args[@]}"} ${args[@]+"${args[@]}"} || rc=$?
        building=""
        exit "$rc"
        ;;
    down | status | check | link-set)
        "$netlab" "$cmd" "$@"
        ;;
    exec)
        [[ $# -ge 2 ]] || { usage >&2; exit 2; }
        host="$1"
        shift
        if [[ "$1" == "--" ]]; then shift; fi
        [[ $# -ge 1 ]] || { usage >&2; exit 2; }
        "$netlab" exec "$host" -- "$@"
        ;;
    client)
        [[ $# -ge 2 ]] || { usage >&2; exit 2; }
        "$netlab" client ${bin_args[@]+"${bin_args[@]}"} "$@"
        ;;
    validate)
        file="$(lab_file "${1:-seed}")"
        "$netlab" validate --routes "$file"
        ;;
    *)
        usage >&2
        exit 2
        ;;
esac
