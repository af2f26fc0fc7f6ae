#!/usr/bin/env bash
# Runs the compose deployment of the original topology (deploy/compose.yml)
# as the project `overlay` (COMPOSE_PROJECT_NAME to change it).
#
#   up [--traces]   make the servers' media files and the TLS certificates
#                   (./tls: a new CA and one certificate per node, the
#                   operator's), start everything, wait until the overlay is
#                   ready; --traces also starts Jaeger (profile
#                   `traces`; its image must be available) and points every
#                   node and client at it
#   down            remove every container, network and volume of the project,
#                   and ./tls
#   traces          print the Jaeger URL
#   stats CLIENT    print a client's statistics (JSON) once it has finished
#   wait CLIENT [S] wait up to S seconds (default 120) for a client to finish;
#                   exits with the client's exit status
set -euo pipefail

usage() { echo "usage: deploy/compose.sh up [--traces] | down | traces | stats CLIENT | wait CLIENT [SECS]" >&2; }

deploy=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
project=${COMPOSE_PROJECT_NAME:-overlay}
jaeger_ui=http://127.0.0.1:16686
otlp_endpoint=http://10.99.0.2:4317

compose() { docker-compose -p "$project" -f "$deploy/compose.yml" "$@"; }

# Makes ./media/STREAM.mkv (10 s of H.264 and Opus from test sources, as the
# netns demo does) for every stream the compose file names in x-media-streams.
make_media() {
    local streams stream file
    streams=$(sed -n 's/^x-media-streams: *"\(.*\)"$/\1/p' "$deploy/compose.yml")
    mkdir -p "$deploy/media"
    for stream in $streams; do
        file=$deploy/media/$stream.mkv
        [[ -s $file ]] && continue
        if ! command -v gst-launch-1.0 >/dev/null; then
            echo "compose: gst-launch-1.0 is missing (gstreamer1.0-tools): no $stream.mkv, its viewers will fail" >&2
            continue
        fi
        gst-launch-1.0 -q -e \
            videotestsrc num-buffers=250 pattern=ball ! video/x-raw,format=I420,width=640,height=360,framerate=25/1 \
            ! x264enc tune=zerolatency speed-preset=veryfast key-int-max=25 bitrate=800 ! h264parse ! queue ! mux. \
            audiotestsrc num-buffers=500 samplesperbuffer=960 wave=sine freq=440 ! audio/x-raw,rate=48000,channels=2 \
            ! audioconvert ! opusenc ! queue ! mux. \
            matroskamux name=mux ! filesink location="$file.part"
        mv "$file.part" "$file"
    done
}

# Issues ./tls with the server image's onode: a new CA for this deployment,
# certificates for every node of the topology and for the operator.
make_certs() {
    local topology
    topology=$(sed -n 's/^x-topology: *"\(.*\)"$/\1/p' "$deploy/compose.yml")
    [[ -n $topology ]] || { echo "compose: compose.yml names no x-topology: regenerate it (deploy/gen-compose.py)" >&2; exit 1; }
    rm -rf "$deploy/tls"
    mkdir -p "$deploy/tls"
    docker run --rm --user 0 --entrypoint onode \
        -v "$(cd "$deploy" && realpath "$topology"):/topology.json:ro" -v "$deploy/tls:/out" \
        "overlay-server:${TAG:-latest}" certs --topology /topology.json --out /out --new-ca
}

container_of() {
    local id
    id=$(compose ps -q "$1" 2>/dev/null || true)
    [[ -n $id ]] || { echo "compose: no container for $1 in project $project" >&2; exit 1; }
    echo "$id"
}

case "${1:-}" in
up)
    traces=0
    [[ ${2:-} == --traces ]] && traces=1
    for role in server node pop client; do
        docker image inspect "overlay-$role:${TAG:-latest}" >/dev/null 2>&1 \
            || { echo "compose: image overlay-$role:${TAG:-latest} is missing: run \`just images\`" >&2; exit 1; }
    done
    make_media
    make_certs
    if [[ $traces == 1 ]]; then
        # Never an implicit pull: say what is missing instead.
        jaeger=$(COMPOSE_PROFILES=traces compose config | sed -n 's/^ *image: *\(.*jaeger.*\)$/\1/p' | head -1)
        docker image inspect "$jaeger" >/dev/null 2>&1 || {
            echo "compose: the Jaeger image $jaeger is not here: \`docker pull $jaeger\` (or set JAEGER_IMAGE to one that is)" >&2
            exit 1
        }
        export COMPOSE_PROFILES=traces OTEL_EXPORTER_OTLP_ENDPOINT=$otlp_endpoint
    fi
    # Clients start once the bootstrapper is healthy (every node registered).
    compose up -d --quiet-pull
    compose exec -T s1 onode overview "$(sed -n 's/^x-bootstrap: *"\(.*\)"$/\1/p' "$deploy/compose.yml")"
    [[ $traces == 0 ]] || echo "compose: traces in Jaeger at $jaeger_ui"
    ;;
down)
    compose --profile traces down --volumes --remove-orphans --timeout 5
    rm -rf "$deploy/tls"
    ;;
traces)
    if [[ -n $(COMPOSE_PROFILES=traces compose ps -q jaeger 2>/dev/null) ]]; then
        echo "$jaeger_ui"
    else
        echo "$jaeger_ui (Jaeger is not running: start with \`just compose-up --traces\`)"
    fi
    ;;
stats)
    [[ -n ${2:-} ]] || { usage; exit 2; }
    docker cp "$(container_of "$2"):/stats/$2.json" - | tar -xO
    ;;
wait)
    [[ -n ${2:-} ]] || { usage; exit 2; }
    id=$(container_of "$2")
    code=$(timeout "${3:-120}" docker wait "$id") || { echo "compose: $2 still running after ${3:-120} s" >&2; exit 1; }
    exit "$code"
    ;;
-h | --help)
    usage
    ;;
*)
    usage
    exit 2
    ;;
esac
