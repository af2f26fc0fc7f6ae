# Recipes for building, testing, benchmarking and running the overlay.
# `just --list` shows them all.

set shell := ["bash", "-euo", "pipefail", "-c"]

# List the recipes.
default:
    @just --list

# Build every crate and binary (debug).
build:
    cargo build --workspace --all-targets

# Build release binaries.
release:
    cargo build --workspace --release

# Run the whole test suite (unit, loopback integration, netns lab tests; lab tests need root),
# then a short run of every fuzz target over its committed corpus.
test:
    #!/usr/bin/env bash
    set -euo pipefail
    start=$SECONDS
    scratch=$(mktemp -d)
    trap 'rm -rf "$scratch"' EXIT
    # The compose test's base image (debootstrap: mostly downloads) is made
    # while the build runs, where Docker runs and it is missing.
    base=""
    if docker info >/dev/null 2>&1 && ! docker image inspect overlay-base:bookworm >/dev/null 2>&1; then
        deploy/base-image.sh >"$scratch/base.log" 2>&1 &
        base=$!
    fi
    just build
    if [[ -n $base ]] && ! wait "$base"; then
        echo "the base image was not made (the compose test will say why):"; cat "$scratch/base.log"
    fi
    built=$SECONDS
    cargo test --workspace -- --test-threads=2 --skip compose_deployment_of_the_original_topology
    tested=$SECONDS
    # The fuzz smoke (CPU) overlaps the compose deployment test, which waits
    # mostly on image downloads and judges its viewers by frames > 0.
    (just fuzz-smoke >"$scratch/fuzz.log" 2>&1; echo $? >"$scratch/fuzz.rc") &
    fuzz=$!
    compose_rc=0
    cargo test -p onode --test compose -- --exact compose_deployment_of_the_original_topology || compose_rc=$?
    wait "$fuzz" || true
    cat "$scratch/fuzz.log"
    echo "just test: build $((built - start)) s, tests $((tested - built)) s, compose test and fuzz smoke $((SECONDS - tested)) s"
    [[ $compose_rc == 0 && $(cat "$scratch/fuzz.rc") == 0 ]]

# Run every fuzz target for SECS seconds, growing its corpus (services/fuzz/corpus).
fuzz SECS="60":
    services/fuzz/run.sh {{SECS}}

# A few seconds of each fuzz target, the corpus left as it is (skipped without nightly and cargo-fuzz).
fuzz-smoke SECS="5":
    if cargo +nightly fuzz --version >/dev/null 2>&1; then services/fuzz/run.sh --smoke {{SECS}}; else echo "fuzz smoke skipped: needs the nightly toolchain and cargo-fuzz (.ci/deps installs them)"; fi

# Validate an overlay topology file (default: the original example).
topology-check FILE="netns/labs/seed-overlay.json": build
    target/debug/onode topology check {{FILE}}

# Relay CPU per packet against GStreamer and the recvmmsg/sendmmsg floor (same run), link emulator CPU, CPU per process kind in a lab at rest and streaming, failover gaps, time to first frame (ours and RTSP players), POP CPU per output Mbit with 1/10/50 RTSP players over UDP and TCP, server CPU per ingested Mbit and first frames of published streams.
bench ROUNDS="3": build release
    python3 services/relay/bench/run.py target/release/relay-bench --rounds {{ROUNDS}}
    target/release/linkem-bench
    target/release/cpubench netns/labs/seed.json 10
    target/debug/faultbench netns/labs/seed.json {{ROUNDS}}
    target/debug/startbench netns/labs/seed.json {{ROUNDS}}
    target/release/rtspbench netns/labs/seed.json 8
    target/release/pubbench netns/labs/seed.json {{ROUNDS}} 8

# Bring a netns lab up (default: the original topology).
lab-up LAB="netns/labs/seed.json": build
    netns/lab.sh up {{LAB}}

# Tear a lab down (safe to run twice); PREFIX names it when several are up.
lab-down PREFIX="":
    if [ -n "{{PREFIX}}" ]; then export NETLAB_PREFIX="{{PREFIX}}"; fi; netns/lab.sh down

# Show the running lab: namespaces, processes, overlay state.
lab-status:
    netns/lab.sh status

# Run a command inside a lab host's namespace.
lab-exec HOST +CMD:
    netns/lab.sh exec {{HOST}} -- {{CMD}}

# Start a client on a lab host (a window when a display is available).
client HOST STREAM="test":
    netns/lab.sh client {{HOST}} {{STREAM}}

# The demo: default lab, five headless clients on two streams, a report, teardown (optimised binaries, as a user runs them).
demo LAB="netns/labs/seed.json": release
    NETLAB_BIN_DIR="$PWD/target/release" netns/lab.sh demo {{LAB}}

# Format and lint.
fmt:
    cargo fmt --all
    cargo clippy --workspace --all-targets

# Build the role images overlay-{server,node,pop,client} (release binaries; makes the Debian base image first when missing).
images:
    deploy/images.sh

# Start the compose deployment of the original topology (`just compose-up --traces` also starts Jaeger).
compose-up *FLAGS:
    deploy/compose.sh up {{FLAGS}}

# Remove the compose deployment: every container, network and volume of it.
compose-down:
    deploy/compose.sh down

# Print the Jaeger URL of the compose deployment.
traces:
    deploy/compose.sh traces
