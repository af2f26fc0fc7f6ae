#!/usr/bin/env python3
"""Relay benchmark: CPU per forwarded packet of our relay against the two
reference relays (GStreamer udpsrc ! multiudpsink, and rawrelay.c, the
recvmmsg/sendmmsg floor), measured in the same run, interleaved, several
rounds; prints medians and our ratios to both.

Usage: run.py RELAY_BENCH_BINARY [--rounds N]
"""
import argparse, os, re, statistics, subprocess, sys, tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
SSRC = 0x1234ABCD  # the SSRC bench.py sends with

CASES = [  # (fanout, packets, rate)
    (1, 100000, 50000),
    (50, 8000, 4000),
]


def run_case(cmd, fanout, packets, rate):
    out = subprocess.run(
        [sys.executable, os.path.join(HERE, "bench.py"), "--fanout", str(fanout), "--packets", str(packets),
         "--rate", str(rate), "--"] + cmd,
        capture_output=True, text=True, check=True).stdout
    m = re.search(r"cpu_s_per_M_in=([\d.]+) cpu_s_per_M_out=([\d.]+) delivered_first=([\d.]+)", out)
    if not m:
        raise SystemExit(f"bench.py printed nothing usable: {out!r}")
    return float(m.group(1)), float(m.group(2)), float(m.group(3))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("ours")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="relay-bench-")
    raw = os.path.join(tmp, "rawrelay")
    subprocess.run(["gcc", "-O2", "-o", raw, os.path.join(HERE, "rawrelay.c")], check=True)
    relays = {
        "ours": [a.ours, "{listen}", "{first}", "{k}", str(SSRC)],
        "rawrelay": [raw, "{listen}", "{first}", "{k}"],
        "gstreamer": ["gst-launch-1.0", "-q", "udpsrc", "port={listen}", "buffer-size=8388608", "!",
                      "multiudpsink", "clients={clients}", "sync=false"],
    }
    for fanout, packets, rate in CASES:
        per = {name: [] for name in relays}
        delivered = {name: [] for name in relays}
        for r in range(a.rounds):
            for name, cmd in relays.items():
                _, out_us, got = run_case(cmd, fanout, packets, rate)
                per[name].append(out_us)
                delivered[name].append(got)
        med = {n: statistics.median(v) for n, v in per.items()}
        print(f"fan-out {fanout}, {rate} pps, {packets} packets, {a.rounds} rounds (median µs CPU per output packet):")
        for n in relays:
            print(f"  {n:10s} {med[n]:6.2f} µs   delivered to first sink {min(delivered[n]):.3f}   runs {' '.join(f'{x:.2f}' for x in per[n])}")
        print(f"  ratio ours/rawrelay  {med['ours'] / med['rawrelay']:.2f}x   (target <= 1.10x)")
        print(f"  ratio gstreamer/rawrelay {med['gstreamer'] / med['rawrelay']:.2f}x")
        print(f"  ratio ours/gstreamer {med['ours'] / med['gstreamer']:.2f}x")


main()
