#!/usr/bin/env bash
# Health of a client container: media is arriving, i.e. the container's UDP
# datagram counter (its network namespace's, /proc/net/snmp) grew since the
# previous check.
set -euo pipefail

# The counter starts again with each network namespace (a restart): keep
# one state file per namespace.
netns=$(readlink /proc/self/ns/net | tr -cd '0-9')
state=${TMPDIR:-/tmp}/overlay-client-health.$netns
now=$(awk '$1 == "Udp:" && $2 ~ /^[0-9]+$/ { print $2; exit }' /proc/net/snmp)
last=$(cat "$state" 2>/dev/null || echo 0)
echo "$now" >"$state"
if ((now > last)); then
    exit 0
fi
echo "no UDP datagram arrived since the last check ($now received in all)"
exit 1
