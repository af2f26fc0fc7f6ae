#!/usr/bin/env python3
"""Writes the compose file of a netns lab (default: the original topology).

usage: deploy/gen-compose.py [--lab LAB] [--netlab BIN] [--out FILE] [--check]

One network per underlay link or LAN with the lab's subnet and fixed
addresses; every host a container: routers forward, the others run their
role (bootstrapper, server, node, pop, client). The static routes are not
computed here: they are `netlab validate --routes LAB` (services/netlab,
unit-tested), installed by each container's entry point from
OVERLAY_ROUTES. A `telemetry` network joins every onode and oclient
container to the Jaeger service of the `traces` profile and to the
Prometheus service of the `metrics` profile, which scrapes every node's
/metrics (port 9998) as deploy/prometheus.yml (also written here) says.
The bootstrapper's live map (port 9997) is published on the host's
loopback.

The control plane runs over mutual TLS: every node container gets the
overlay's CA certificate and its own certificate and key from ./tls
(deploy/compose.sh makes them with `onode certs` before `up`), the
bootstrapper also the operator's (its health check calls Overview), and
clients only the CA's. The entry point copies them where the unprivileged
user can read them (OVERLAY_TLS_DIR).

--check exits 1 when FILE differs from what would be written.
"""

import argparse
import ipaddress
import json
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = os.path.join(REPO, "deploy")

TELEMETRY_NET = ipaddress.ip_network("10.99.0.0/24")
JAEGER_ADDR = "10.99.0.2"
JAEGER_IMAGE = "jaegertracing/all-in-one:1.62.0"
PROMETHEUS_ADDR = "10.99.0.3"
PROMETHEUS_IMAGE = "prom/prometheus:v2.53.0"
METRICS_PORT = 9998
MAP_PORT = 9997
BUILTIN_STREAM = "test"
CLIENT_DURATION_S = 12
# Where containers find the TLS files compose mounts, and where the entry
# point copies them for the user `overlay`.
TLS_MOUNT = "/etc/overlay/tls"
TLS_DIR = "/run/overlay-tls"


def netlab_routes(netlab, lab_path):
    """Every host's routes, as `netlab validate --routes` prints them."""
    out = subprocess.run(
        [netlab, "validate", "--routes", lab_path], check=True, capture_output=True, text=True
    ).stdout
    routes, host = {}, None
    for line in out.splitlines():
        m = re.fullmatch(r"(\S+):", line)
        if m:
            host = m.group(1)
            routes[host] = []
            continue
        m = re.fullmatch(r"  (\d+\.\d+\.\d+\.\d+/\d+) via (\d+\.\d+\.\d+\.\d+) dev \S+ \(cost \d+\)", line)
        if m:
            if host is None:
                sys.exit(f"gen-compose: route before any host in netlab's output: {line!r}")
            routes[host].append(f"{m.group(1)} via {m.group(2)}")
    return routes


def segments(lab):
    """(network name, subnet, {host: address}) for every link and LAN."""
    out = []
    for link in lab["links"]:
        a, b = link["a"], link["b"]
        members = {a["host"]: a["addr"], b["host"]: b["addr"]}
        out.append((f"{a['host']}-{b['host']}", members))
    for lan in lab["lans"]:
        out.append((lan["name"], {m["host"]: m["addr"] for m in lan["members"]}))
    result = []
    for name, members in out:
        nets = {ipaddress.ip_interface(a).network for a in members.values()}
        if len(nets) != 1:
            sys.exit(f"gen-compose: segment {name}: addresses on different subnets: {members}")
        net = nets.pop()
        addrs = {h: str(ipaddress.ip_interface(a).ip) for h, a in members.items()}
        result.append((name, net, addrs))
    return result


def gateway(net, used):
    """The highest host address of `net` no member uses: Docker's bridge."""
    for addr in reversed(list(net.hosts())):
        if str(addr) not in used:
            return str(addr)
    sys.exit(f"gen-compose: subnet {net} has no address left for Docker's gateway")


def q(value):
    """A YAML scalar in double quotes."""
    return json.dumps(str(value))


def telemetry_addresses(lab):
    """Host -> its address on the telemetry network (every host with a role
    but routers)."""
    kinds = {h["name"]: h.get("kind", "host") for h in lab["hosts"]}
    roles = {r["host"]: r for r in lab["roles"]}
    out, next_addr = {}, 10
    for h in (h["name"] for h in lab["hosts"]):
        if kinds[h] != "router" and h in roles:
            out[h] = str(TELEMETRY_NET.network_address + next_addr)
            next_addr += 1
    return out


def prometheus(lab_path):
    """The Prometheus configuration: every overlay node's /metrics at its
    telemetry address, labelled with its name and role."""
    with open(lab_path) as f:
        lab = json.load(f)
    addrs = telemetry_addresses(lab)
    w = [
        f"# Prometheus scrape configuration of the overlay of {os.path.relpath(lab_path, REPO)}; generated",
        "# by deploy/gen-compose.py with deploy/compose.yml (the `metrics` profile mounts it).",
        "global:",
        "  scrape_interval: 5s",
        "  scrape_timeout: 4s",
        "scrape_configs:",
        "  - job_name: overlay",
        "    static_configs:",
    ]
    for r in lab["roles"]:
        if r["role"] == "client":
            continue
        name = r.get("name", r["host"])
        w.append(f"      - targets: [\"{addrs[r['host']]}:{METRICS_PORT}\"]")
        w.append(f"        labels: {{node: {name}, role: {r['role']}}}")
    return "\n".join(w) + "\n"


def generate(lab_path, netlab):
    with open(lab_path) as f:
        lab = json.load(f)
    routes = netlab_routes(netlab, lab_path)
    segs = segments(lab)
    roles = {r["host"]: r for r in lab["roles"]}
    kinds = {h["name"]: h.get("kind", "host") for h in lab["hosts"]}
    lab_dir = os.path.dirname(os.path.abspath(lab_path))
    overlay = os.path.relpath(os.path.join(lab_dir, lab["overlay"]), DEPLOY)
    bootstrap = lab.get("bootstrap") or next(
        a for _, _, addrs in segs for h, a in addrs.items() if roles.get(h, {}).get("role") == "bootstrapper"
    )
    port = lab.get("control_port", 7070)
    bootstrap_arg = bootstrap if port == 7070 else f"{bootstrap}:{port}"
    file_streams = []
    for r in lab["roles"]:
        s = r.get("stream")
        if r["role"] == "client" and s != BUILTIN_STREAM and s not in file_streams:
            file_streams.append(s)

    lab_name = os.path.relpath(lab_path, REPO)
    w = []
    w.append(f"# The overlay of {lab_name} as a compose project; generated by")
    w.append(f"# deploy/gen-compose.py from that lab and `netlab validate --routes`: edit those,")
    w.append("# not this file. Run it with deploy/compose.sh (just compose-up, compose-down).")
    w.append('version: "2.4"')
    w.append("")
    w.append("# The topology the TLS certificates are issued for, and the bootstrapper.")
    w.append(f"x-topology: {q(overlay)}")
    w.append(f"x-bootstrap: {q(bootstrap)}")
    w.append("")
    w.append("# Streams the servers serve from files in ./media (deploy/compose.sh makes them).")
    w.append(f"x-media-streams: {q(' '.join(file_streams))}")
    w.append("")
    w.append("# Every container starts as root with NET_ADMIN so that its entry point")
    w.append("# can install the routes in OVERLAY_ROUTES; it then runs its command as")
    w.append("# the user `overlay` with no capabilities.")
    w.append("x-host: &host")
    w.append("  init: true")
    w.append('  user: "0"')
    w.append("  cap_add: [NET_ADMIN]")
    w.append("  sysctls:")
    w.append('    net.ipv4.ip_forward: "1"')
    w.append('    net.ipv4.conf.all.rp_filter: "0"')
    w.append('    net.ipv4.conf.default.rp_filter: "0"')
    w.append("")
    w.append("services:")

    hosts = [h["name"] for h in lab["hosts"]]
    addr_of = {h: {} for h in hosts}
    for name, net, addrs in segs:
        for h, a in addrs.items():
            addr_of[h][name] = a
    telemetry_addr = telemetry_addresses(lab)

    for h in hosts:
        role = roles.get(h, {}).get("role", "router" if kinds[h] == "router" else None)
        if role is None:
            sys.exit(f"gen-compose: host {h} has no role and is not a router")
        node_name = roles.get(h, {}).get("name", h)
        extra = [str(a) for a in roles.get(h, {}).get("args", [])]
        w.append(f"  {h}:")
        w.append("    <<: *host")
        env = {"OVERLAY_ROUTES": ", ".join(routes.get(h, []))}
        healthcheck = None
        depends = []
        volumes = []
        tls = []
        if role == "router":
            w.append("    image: overlay-node:${TAG:-latest}")
            w.append('    entrypoint: ["overlay-entrypoint", "sleep", "infinity"]')
            healthcheck = '["CMD", "grep", "-qx", "1", "/proc/sys/net/ipv4/ip_forward"]'
        elif role == "bootstrapper":
            w.append("    image: overlay-server:${TAG:-latest}")
            cmd = ["--topology", "/etc/overlay/topology.json", "--name", node_name, "--media", "/media"] + extra
            w.append(f"    command: [{', '.join(q(c) for c in cmd)}]")
            volumes = [f"{overlay}:/etc/overlay/topology.json:ro", "./media:/media:ro"]
            tls = ["ca.pem", f"{node_name}.pem", f"{node_name}.key", "operator.pem", "operator.key"]
            # Clients wait for this: every node has registered. Dialled at
            # an address its certificate names, with the operator's.
            healthcheck = f"[\"CMD-SHELL\", \"onode overview {bootstrap} | grep -q '\\\"ready\\\": true'\"]"
            # The live map, for the operator on this host.
            w.append("    ports:")
            w.append(f'      - "127.0.0.1:{MAP_PORT}:{MAP_PORT}"')
        elif role in ("server", "node", "pop"):
            image = "server" if role == "server" else role
            w.append(f"    image: overlay-{image}:${{TAG:-latest}}")
            cmd = ["--bootstrap", bootstrap_arg, "--name", node_name]
            if role == "server":
                cmd += ["--media", "/media"]
                volumes = ["./media:/media:ro"]
            cmd += extra
            w.append(f"    command: [{', '.join(q(c) for c in cmd)}]")
            tls = ["ca.pem", f"{node_name}.pem", f"{node_name}.key"]
            depends = [(bootstrap_host(roles), "service_started")]
        elif role == "client":
            r = roles[h]
            w.append("    image: overlay-client:${TAG:-latest}")
            duration = r.get("duration_s", CLIENT_DURATION_S)
            cmd = [
                "--bootstrap", bootstrap_arg, r["stream"], "--headless", "--name", h,
                "--duration", f"${{CLIENT_DURATION_S:-{duration}}}", "--stats-json", f"/stats/{h}.json",
            ] + extra
            w.append(f"    command: [{', '.join(q(c) for c in cmd)}]")
            env["OVERLAY_START_DELAY_S"] = str(r.get("start_s", 0))
            volumes = ["stats:/stats"]
            tls = ["ca.pem"]
            depends = [(bootstrap_host(roles), "service_healthy")]
            w.append('    restart: "no"')
        else:
            sys.exit(f"gen-compose: host {h}: unknown role {role}")
        w.append(f"    hostname: {h}")
        if h in telemetry_addr:
            env["OTEL_EXPORTER_OTLP_ENDPOINT"] = "${OTEL_EXPORTER_OTLP_ENDPOINT:-}"
        if tls:
            env["OVERLAY_TLS_DIR"] = TLS_DIR
            volumes += [f"./tls/{f}:{TLS_MOUNT}/{f}:ro" for f in tls]
        w.append("    environment:")
        for k, v in env.items():
            if k == "OVERLAY_ROUTES" and v:
                # Folded: one route a line here, one line in the variable.
                w.append(f"      {k}: >-")
                w.extend(f"        {r}," if i + 1 < len(routes[h]) else f"        {r}" for i, r in enumerate(routes[h]))
            else:
                w.append(f"      {k}: {q(v)}")
        if volumes:
            w.append("    volumes:")
            for v in volumes:
                w.append(f"      - {v}")
        if healthcheck:
            w.append("    healthcheck:")
            w.append(f"      test: {healthcheck}")
            w.append("      interval: 2s")
            w.append("      timeout: 3s")
            w.append("      retries: 3")
        if depends:
            w.append("    depends_on:")
            for d, cond in depends:
                w.append(f"      {d}:")
                w.append(f"        condition: {cond}")
        w.append("    networks:")
        for name, a in sorted(addr_of[h].items(), key=lambda kv: ipaddress.ip_address(kv[1])):
            w.append(f"      {name}: {{ipv4_address: {a}}}")
        if h in telemetry_addr:
            w.append(f"      telemetry: {{ipv4_address: {telemetry_addr[h]}}}")

    w.append("  jaeger:")
    w.append("    # Receives OTLP from every node; opt-in because its image must be pulled.")
    w.append("    profiles: [traces]")
    w.append(f"    image: ${{JAEGER_IMAGE:-{JAEGER_IMAGE}}}")
    w.append("    init: true")
    w.append("    hostname: jaeger")
    w.append("    environment:")
    w.append('      COLLECTOR_OTLP_ENABLED: "true"')
    w.append("    ports:")
    w.append('      - "127.0.0.1:16686:16686"')
    w.append("    networks:")
    w.append(f"      telemetry: {{ipv4_address: {JAEGER_ADDR}}}")
    w.append("  prometheus:")
    w.append("    # Scrapes every node's /metrics (deploy/prometheus.yml); opt-in because")
    w.append("    # its image must be pulled.")
    w.append("    profiles: [metrics]")
    w.append(f"    image: ${{PROMETHEUS_IMAGE:-{PROMETHEUS_IMAGE}}}")
    w.append("    init: true")
    w.append("    hostname: prometheus")
    w.append("    volumes:")
    w.append("      - ./prometheus.yml:/etc/prometheus/prometheus.yml:ro")
    w.append("    ports:")
    w.append('      - "127.0.0.1:9090:9090"')
    w.append("    networks:")
    w.append(f"      telemetry: {{ipv4_address: {PROMETHEUS_ADDR}}}")
    w.append("")
    w.append("volumes:")
    w.append("  # Clients' statistics: /stats/NAME.json.")
    w.append("  stats: {}")
    w.append("")
    w.append("networks:")
    extra = {"jaeger": JAEGER_ADDR, "prometheus": PROMETHEUS_ADDR}
    for name, net, addrs in segs + [("telemetry", TELEMETRY_NET, {**extra, **telemetry_addr})]:
        w.append(f"  {name}:")
        w.append("    driver_opts:")
        w.append('      com.docker.network.bridge.enable_ip_masquerade: "false"')
        w.append("    ipam:")
        w.append("      config:")
        w.append(f"        - subnet: {net}")
        w.append(f"          gateway: {gateway(net, set(addrs.values()))}")
    return "\n".join(w) + "\n"


def bootstrap_host(roles):
    return next(h for h, r in roles.items() if r["role"] == "bootstrapper")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lab", default=os.path.join(REPO, "netns/labs/seed.json"))
    p.add_argument("--netlab", default=None, help="netlab binary (default: target/{debug,release}/netlab)")
    p.add_argument("--out", default=os.path.join(DEPLOY, "compose.yml"))
    p.add_argument("--check", action="store_true")
    args = p.parse_args()
    netlab = args.netlab
    if netlab is None:
        target = os.environ.get("CARGO_TARGET_DIR", os.path.join(REPO, "target"))
        found = [os.path.join(target, d, "netlab") for d in ("debug", "release")]
        found = [f for f in found if os.path.exists(f)]
        if not found:
            sys.exit("gen-compose: no netlab binary; run `cargo build -p netlab` or pass --netlab")
        netlab = found[0]
    outputs = [
        (args.out, generate(args.lab, netlab)),
        (os.path.join(os.path.dirname(os.path.abspath(args.out)), "prometheus.yml"), prometheus(args.lab)),
    ]
    for path, text in outputs:
        if args.check:
            with open(path) as f:
                if f.read() != text:
                    sys.exit(f"gen-compose: {path} is stale: run deploy/gen-compose.py")
            continue
        with open(path, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
