#!/usr/bin/env python3
"""Keeps Cargo.toml's list of build-time-only crates current.

The dev profile builds dependencies at opt-level 2 ([profile.dev.package."*"],
so that lab tests run fast binaries). That setting also reaches proc macros,
build scripts and their dependencies (it takes precedence over
build-override), which then cost minutes of optimisation on every clean
build while running for milliseconds. The crates that are only ever built
for build time are listed by name at opt-level 0, between the markers in
Cargo.toml; this script finds them with `cargo metadata` (a crate that is
also a run-time dependency, in any version, is left out).

usage: .ci/build-time-crates.py [--check]   (--check: exit 1 when the list is stale)
"""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEGIN = "# BEGIN build-time crates (.ci/build-time-crates.py)"
END = "# END build-time crates"


def build_time_only():
    meta = json.loads(
        subprocess.run(["cargo", "metadata", "--format-version", "1"], cwd=REPO, check=True, capture_output=True).stdout
    )
    packages = {p["id"]: p for p in meta["packages"]}
    nodes = {n["id"]: n for n in meta["resolve"]["nodes"]}
    members = set(meta["workspace_members"])

    def proc_macro(i):
        return any("proc-macro" in t["kind"] for t in packages[i]["targets"])

    runtime, host = set(), set()
    todo = [(m, False) for m in members]
    while todo:
        i, at_build = todo.pop()
        seen = host if at_build else runtime
        if i in seen:
            continue
        seen.add(i)
        for dep in nodes[i]["deps"]:
            for kind in (k["kind"] for k in dep["dep_kinds"]):
                if kind == "build":
                    todo.append((dep["pkg"], True))
                elif kind != "dev" or i in members:
                    todo.append((dep["pkg"], at_build or proc_macro(dep["pkg"])))
    runtime_names = {packages[i]["name"] for i in runtime}
    return sorted({packages[i]["name"] for i in host} - runtime_names)


def block(names):
    lines = [BEGIN, "# Crates only ever built for build time (proc macros, build scripts and"]
    lines.append("# what they use): no optimisation, they run for milliseconds.")
    lines += [f'[profile.dev.package."{n}"]\nopt-level = 0' for n in names]
    lines.append(END)
    return "\n".join(lines)


def main():
    path = os.path.join(REPO, "Cargo.toml")
    text = open(path).read()
    new = block(build_time_only())
    if BEGIN in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        updated = head + new + tail
    else:
        updated = text.rstrip("\n") + "\n\n" + new + "\n"
    if "--check" in sys.argv[1:]:
        if updated != text:
            sys.exit("build-time-crates: Cargo.toml's list is stale: run .ci/build-time-crates.py")
        return
    open(path, "w").write(updated)


if __name__ == "__main__":
    main()
