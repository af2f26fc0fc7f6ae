// The overlay map: draws the state the bootstrapper sends (/state, then
// server-sent events on /events) as SVG. Nodes sit in rows by their hop
// distance from the nearest server; each stream's tree is drawn over the
// links in its own colour, arrows in the direction of the media.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const COLOURS = ["#e6550d", "#6a3d9a", "#1f9e89", "#c51b7d", "#b8860b", "#2c7fb8"];
const WIDTH = 1000, ROW = 130, MARGIN = 60, RADIUS = 18;

let layout = null; // node name -> {x, y}; made once per set of nodes
let layoutKey = "";
let updates = 0;

function el(name, attrs, parent) {
  const e = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (parent) parent.appendChild(e);
  return e;
}

// Rows by breadth-first distance from the servers; within a row, nodes
// follow the mean position of their neighbours in the row above.
function place(state) {
  const adj = new Map(state.nodes.map(n => [n.name, []]));
  for (const l of state.links) {
    adj.get(l.a)?.push(l.b);
    adj.get(l.b)?.push(l.a);
  }
  const depth = new Map();
  let frontier = state.nodes.filter(n => n.role === "server").map(n => n.name);
  frontier.forEach(n => depth.set(n, 0));
  while (frontier.length) {
    const next = [];
    for (const n of frontier) {
      for (const m of adj.get(n) || []) {
        if (!depth.has(m)) { depth.set(m, depth.get(n) + 1); next.push(m); }
      }
    }
    frontier = next;
  }
  const rows = [];
  for (const n of state.nodes) {
    const d = depth.has(n.name) ? depth.get(n.name) : rows.length;
    (rows[d] = rows[d] || []).push(n.name);
  }
  const pos = new Map();
  rows.forEach((row, d) => {
    if (d > 0) {
      const key = n => {
        const up = (adj.get(n) || []).filter(m => pos.has(m) && depth.get(m) < d).map(m => pos.get(m).x);
        return up.length ? up.reduce((a, b) => a + b, 0) / up.length : WIDTH / 2;
      };
      row.sort((a, b) => key(a) - key(b) || a.localeCompare(b));
    } else {
      row.sort();
    }
    const step = (WIDTH - 2 * MARGIN) / row.length;
    row.forEach((n, i) => pos.set(n, { x: MARGIN + step * (i + 0.5), y: MARGIN + d * ROW }));
  });
  return { pos, height: MARGIN * 2 + (rows.length - 1) * ROW + 30 };
}

function draw(state) {
  const key = state.nodes.map(n => n.name).join(",") + "|" + state.links.map(l => l.a + "-" + l.b).join(",");
  if (key !== layoutKey) { layout = place(state); layoutKey = key; }
  const { pos, height } = layout;
  const svg = document.getElementById("map");
  svg.setAttribute("viewBox", `0 0 ${WIDTH} ${height}`);
  svg.replaceChildren();
  const defs = el("defs", {}, svg);
  state.streams.forEach((s, i) => {
    const m = el("marker", { id: "arrow" + i, viewBox: "0 0 10 10", refX: 10, refY: 5,
      markerWidth: 5, markerHeight: 5, orient: "auto-start-reverse" }, defs);
    el("path", { d: "M 0 0 L 10 5 L 0 10 z", fill: COLOURS[i % COLOURS.length] }, m);
  });

  for (const l of state.links) {
    const a = pos.get(l.a), b = pos.get(l.b);
    if (!a || !b) continue;
    el("line", { class: "link" + (l.down ? " down" : ""), "data-a": l.a, "data-b": l.b,
      x1: a.x, y1: a.y, x2: b.x, y2: b.y }, svg);
    if (l.delay_us != null) {
      const t = el("text", { class: "delay", x: (a.x + b.x) / 2 + 4, y: (a.y + b.y) / 2 - 4 }, svg);
      t.textContent = (l.delay_us / 1000).toFixed(1) + " ms";
    }
  }

  // Tree edges, each stream shifted sideways so that shared links show
  // every stream that crosses them.
  const n = state.streams.length;
  state.streams.forEach((s, i) => {
    const colour = COLOURS[i % COLOURS.length];
    const shift = (i - (n - 1) / 2) * 6;
    for (const e of s.edges) {
      const a = pos.get(e.from), b = pos.get(e.to);
      if (!a || !b) continue;
      const dx = b.x - a.x, dy = b.y - a.y, len = Math.hypot(dx, dy) || 1;
      const ox = -dy / len * shift, oy = dx / len * shift;
      const cut = (RADIUS + 3) / len;
      el("line", {
        class: "tree", "data-stream": s.stream, "data-from": e.from, "data-to": e.to,
        stroke: colour, "marker-end": `url(#arrow${i})`,
        x1: a.x + dx * cut + ox, y1: a.y + dy * cut + oy,
        x2: b.x - dx * cut + ox, y2: b.y - dy * cut + oy,
      }, svg);
    }
  });

  for (const node of state.nodes) {
    const p = pos.get(node.name);
    const g = el("g", { class: `node ${node.role}` + (node.alive ? "" : " failed"),
      "data-name": node.name, "data-alive": node.alive }, svg);
    el("circle", { cx: p.x, cy: p.y, r: RADIUS }, g);
    if (!node.alive) {
      el("path", { class: "cross", d: `M ${p.x - 8} ${p.y - 8} L ${p.x + 8} ${p.y + 8} M ${p.x + 8} ${p.y - 8} L ${p.x - 8} ${p.y + 8}` }, g);
    }
    const t = el("text", { class: "name", x: p.x, y: p.y - RADIUS - 6 }, g);
    t.textContent = node.name;
    let line = 0;
    state.streams.forEach((s, i) => {
      const v = s.viewers[node.name];
      if (!v) return;
      const vt = el("text", { class: "viewers", "data-stream": s.stream, "data-node": node.name,
        x: p.x, y: p.y + RADIUS + 15 + 14 * line++, fill: COLOURS[i % COLOURS.length] }, g);
      vt.textContent = `${s.stream}: ${v} viewer${v > 1 ? "s" : ""}`;
    });
  }

  const legend = document.getElementById("legend");
  legend.replaceChildren();
  state.streams.forEach((s, i) => {
    const item = document.createElement("span");
    const sw = document.createElement("span");
    sw.className = "swatch";
    sw.style.background = COLOURS[i % COLOURS.length];
    const viewers = Object.values(s.viewers).reduce((a, b) => a + b, 0);
    item.append(sw, `${s.stream} from ${s.server}: ${s.edges.length} links, ${viewers} viewers` +
      (s.repairing.length ? `, repairing at ${s.repairing.join(", ")}` : ""));
    legend.appendChild(item);
  });
  const failed = state.nodes.filter(n => !n.alive).map(n => n.name);
  document.getElementById("summary").textContent =
    `${state.nodes.length} nodes, ${state.links.length} links, ${state.streams.length} streams` +
    (failed.length ? `, failed: ${failed.join(", ")}` : "");
  updates += 1;
  document.body.dataset.updates = updates;
}

function status(text, bad) {
  const s = document.getElementById("status");
  s.textContent = text;
  s.className = bad ? "bad" : "";
}

function connect() {
  const source = new EventSource("/events");
  source.addEventListener("state", ev => {
    draw(JSON.parse(ev.data));
    status("live, updated " + new Date().toLocaleTimeString(), false);
  });
  source.onerror = () => status("connection to the bootstrapper lost; retrying", true);
}

fetch("/state").then(r => r.json()).then(draw).catch(() => status("no state from the bootstrapper", true));
connect();
