#!/usr/bin/env bash
# Builds every fuzz target of this crate and runs each for SECONDS (default
# 60), growing its corpus in corpus/TARGET. Prints one line per target
# (runs executed, corpus size); exits 1 if any target crashed, timed out or
# ran out of memory, naming the target and the artifact that reproduces it.
# With --smoke, new inputs go to a temporary folder instead, so that the
# committed corpus stays as it is (the test suite's short run).
#
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`).
# Works from any directory: services/fuzz/run.sh 10
set -euo pipefail

usage() {
    echo "usage: $0 [--smoke] [SECONDS]" >&2
    exit 2
}
smoke=0
if [[ ${1:-} == --smoke ]]; then
    smoke=1
    shift
fi
secs=${1:-60}
[[ $# -le 1 && $secs =~ ^[1-9][0-9]*$ ]] || usage

dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$dir"
log=$(mktemp)
scratch=$(mktemp -d)
trap 'rm -rf "$log" "$scratch"' EXIT

# cargo-fuzz looks for fuzz/ at the top of the enclosing package unless told
# where the fuzz crate is.
# The smoke run builds without optimisation (half the build time; a few
# seconds of fuzzing need no speed).
profile=()
if ((smoke)); then
    profile=(--dev)
fi
fuzz() {
    local cmd=$1
    shift
    cargo +nightly fuzz "$cmd" --fuzz-dir "$dir" "${profile[@]}" "$@"
}

fuzz build
failed=()
for target in $(cargo +nightly fuzz list --fuzz-dir "$dir"); do
    mkdir -p "corpus/$target"
    dirs=("corpus/$target")
    if ((smoke)); then
        mkdir -p "$scratch/$target"
        dirs=("$scratch/$target" "corpus/$target")
    fi
    if fuzz run "$target" "${dirs[@]}" -- -max_total_time="$secs" -rss_limit_mb=2048 >"$log" 2>&1; then
        runs=$(sed -n 's/^Done \([0-9]*\) runs.*/\1/p' "$log" | tail -n 1)
        files=$(find "corpus/$target" -type f | wc -l)
        kib=$(du -sk "corpus/$target" | cut -f 1)
        echo "fuzz $target: ${runs:-?} runs in ${secs} s, corpus $files files (${kib} KiB)"
    else
        tail -n 40 "$log" >&2
        artifact=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n 1)
        [[ -n $artifact ]] && artifact=$dir/${artifact#./}
        echo "fuzz $target: FAILED, artifact: ${artifact:-none (see the log above)}" >&2
        failed+=("$target")
    fi
done
if ((${#failed[@]})); then
    echo "fuzz: failed: ${failed[*]}; reproduce with: cargo +nightly fuzz run --fuzz-dir $dir TARGET ARTIFACT" >&2
    exit 1
fi
