# Recipes for building, testing, benchmarking and running the overlay.
# `just --list` shows them all.

set shell := ["bash", "-euo", "pipefail", "-c"]

# Link with mold where it is installed (.ci/deps installs it): with the
# default linker, linking the forty-odd test and tool binaries is most of a
# rebuild (here 125 s against 33 s after a change to netlab's library).
export RUSTFLAGS := env("RUSTFLAGS", if `command -v mold || true` != "" { "-C link-arg=-fuse-ld=mold" } else { "" })

# List the recipes.
default:
    @just --list

# Build every crate and binary (debug).
build:
    cargo build --workspace --all-targets

# Build release binaries.
release:
    cargo build --workspace --release

# Run the whole test suite (unit, loopback integration, netns lab tests; lab tests need root;
# the compose deployment where Docker runs). Fuzzing is `just fuzz` and `just fuzz-smoke`.
test:
    #!/usr/bin/env bash
    set -euo pipefail
    start=$SECONDS
    just build
    built=$SECONDS
    # The role images (debootstrap, apt) are mostly waiting on the network:
    # they build beside the lab tests, and the compose test finds them made.
    images=""
    if docker info >/dev/null 2>&1; then
        log=target/images-for-test.log
        echo "just test: building the role images in the background (log: $log)"
        BIN_DIR="$PWD/target/debug" nice deploy/images.sh >"$log" 2>&1 &
        images=$!
    fi
    # Wait for the background build however the tests end (its lock would
    # otherwise outlive them).
    trap '[ -z "$images" ] || wait "$images" || true' EXIT
    cargo test --workspace -- --test-threads=2
    echo "just test: build $((built - start)) s, tests $((SECONDS - built)) s"

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

# Simulate the overlay (every node runs overlay-core's engine) on a virtual clock: 1,000 nodes,
# 10 servers, 200 POPs with viewers, SEEDS seeded fault schedules; routes judged against an oracle,
# trees checked for loops and bad roots, repair times printed (overlay-sim --help for more).
sim SEEDS="4" *FLAGS:
    cargo run --release -p overlay-sim -- --seeds {{SEEDS}} {{FLAGS}}

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
