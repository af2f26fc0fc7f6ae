//! Starts a whole overlay of real `onode` processes on loopback addresses
//! for integration tests: the original topology (or any file in its
//! format) is rewritten so that each node owns one 127.x.y.z address, and
//! every process is killed when the [`Overlay`] is dropped, also on panic.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Overlays are heavy (ten processes, video encoders): one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let path = dir.join(name);
    assert!(path.exists(), "{} is missing: run `cargo build --workspace` first", path.display());
    path
}

pub fn seed_topology() -> Value {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../netns/labs/seed-overlay.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Rewrites a topology so node i owns the single address 127.<net>.<i+1>.
pub fn loopback_topology(original: &Value, net: (u8, u8)) -> (Value, BTreeMap<String, IpAddr>) {
    let obj = original.as_object().unwrap();
    let mut addr = BTreeMap::new();
    let mut owner = BTreeMap::new();
    for (i, (name, spec)) in obj.iter().enumerate() {
        let ip: IpAddr = format!("127.{}.{}.{}", net.0, net.1, i + 1).parse().unwrap();
        addr.insert(name.clone(), ip);
        for a in spec["names"].as_array().unwrap() {
            owner.insert(a.as_str().unwrap().to_string(), name.clone());
        }
    }
    let mut out = serde_json::Map::new();
    for (name, spec) in obj {
        let neighbours: Vec<String> = spec["neighbours"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                let a = a.as_str().unwrap();
                let (bare, mark) = a.strip_suffix('s').map(|b| (b, "s")).unwrap_or((a, ""));
                format!("{}{mark}", addr[&owner[bare]])
            })
            .collect();
        let mut node = serde_json::json!({"neighbours": neighbours, "names": [addr[name].to_string()]});
        if let Some(pop) = spec.get("pop") {
            let is_pop = !pop.as_array().unwrap().is_empty();
            node["pop"] = if is_pop { serde_json::json!([addr[name].to_string()]) } else { serde_json::json!([]) };
        }
        out.insert(name.clone(), node);
    }
    (Value::Object(out), addr)
}

/// Hop distance from every node to `target` over the overlay edges.
pub fn hops_to(topology: &Value, target: &str) -> BTreeMap<String, u32> {
    let obj = topology.as_object().unwrap();
    let mut owner = BTreeMap::new();
    for (name, spec) in obj {
        for a in spec["names"].as_array().unwrap() {
            owner.insert(a.as_str().unwrap().to_string(), name.clone());
        }
    }
    let neighbours = |n: &str| -> Vec<String> {
        obj[n]["neighbours"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| owner[a.as_str().unwrap().trim_end_matches('s')].clone())
            .collect()
    };
    let mut dist = BTreeMap::from([(target.to_string(), 0)]);
    let mut queue = VecDeque::from([target.to_string()]);
    while let Some(n) = queue.pop_front() {
        for m in neighbours(&n) {
            if !dist.contains_key(&m) {
                dist.insert(m.clone(), dist[&n] + 1);
                queue.push_back(m);
            }
        }
    }
    dist
}

pub fn neighbours_of(topology: &Value, node: &str) -> BTreeSet<String> {
    let obj = topology.as_object().unwrap();
    let owner =
        |a: &str| obj.iter().find(|(_, s)| s["names"].as_array().unwrap().iter().any(|x| x == a)).unwrap().0.clone();
    obj[node]["neighbours"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| owner(a.as_str().unwrap().trim_end_matches('s')))
        .collect()
}

pub struct Overlay {
    _serial: MutexGuard<'static, ()>,
    pub dir: tempdir::Dir,
    pub topology: Value,
    pub addr: BTreeMap<String, IpAddr>,
    procs: BTreeMap<String, Child>,
    media: Option<PathBuf>,
    /// Extra environment of every node process.
    env: Vec<(String, String)>,
}

pub mod tempdir {
    use std::path::{Path, PathBuf};

    /// A folder removed on drop.
    pub struct Dir(PathBuf);

    impl Dir {
        pub fn new(tag: &str) -> Dir {
            let path = std::env::temp_dir().join(format!("onode-test-{tag}-{}-{}", std::process::id(), rand_u32()));
            std::fs::create_dir_all(&path).unwrap();
            Dir(path)
        }
        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            // A failed test keeps its logs for whoever reads its message.
            if std::env::var_os("KEEP_TEST_DIRS").is_none() && !std::thread::panicking() {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    pub fn rand_u32() -> u32 {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
        t.subsec_nanos() ^ (std::process::id() << 8)
    }
}

impl Overlay {
    /// Starts every node of `original` on loopback and waits until the
    /// bootstrapper declares the overlay ready and routes exist.
    pub fn start(tag: &str, original: &Value, media: Option<&Path>) -> Overlay {
        Overlay::start_with_env(tag, original, media, &[])
    }

    /// [`Overlay::start`] with extra environment variables for every node
    /// process (also the ones restarted later).
    pub fn start_with_env(tag: &str, original: &Value, media: Option<&Path>, env: &[(&str, &str)]) -> Overlay {
        let serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        let r = tempdir::rand_u32();
        let net = (20 + (r % 200) as u8, ((r >> 8) % 250) as u8);
        let (topology, addr) = loopback_topology(original, net);
        let dir = tempdir::Dir::new(tag);
        std::fs::write(dir.path().join("topology.json"), serde_json::to_string_pretty(&topology).unwrap()).unwrap();
        // The control plane runs over TLS with certificates of a CA made
        // for this overlay alone, as `onode certs` makes them for users.
        let certs = Command::new(bin("onode"))
            .arg("certs")
            .arg("--topology")
            .arg(dir.path().join("topology.json"))
            .arg("--out")
            .arg(dir.path().join("tls"))
            .output()
            .unwrap();
        assert!(certs.status.success(), "onode certs: {}", String::from_utf8_lossy(&certs.stderr));
        let mut o = Overlay {
            _serial: serial,
            dir,
            topology,
            addr,
            procs: BTreeMap::new(),
            media: media.map(Path::to_path_buf),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        };
        let servers: Vec<String> = o.addr.keys().filter(|n| n.starts_with('s')).cloned().collect();
        let boot = servers[0].clone();
        o.spawn_node(&boot);
        for n in o.addr.keys().cloned().collect::<Vec<_>>() {
            if n != boot {
                o.spawn_node(&n);
            }
        }
        o.wait_ready(Duration::from_secs(20));
        o
    }

    pub fn bootstrapper(&self) -> IpAddr {
        self.addr[self.addr.keys().find(|n| n.starts_with('s')).unwrap()]
    }

    pub fn role(&self, node: &str) -> &'static str {
        let spec = &self.topology[node];
        if node.starts_with('s') {
            "server"
        } else if spec["pop"].as_array().is_some_and(|p| !p.is_empty()) {
            "pop"
        } else {
            "node"
        }
    }

    /// Starts (or restarts) one node.
    pub fn spawn_node(&mut self, node: &str) {
        let ip = self.addr[node].to_string();
        let boot = self.bootstrapper().to_string();
        let role = self.role(node);
        let mut cmd = Command::new(bin("onode"));
        cmd.arg(role);
        let is_boot = boot == ip;
        if is_boot {
            cmd.arg("--topology").arg(self.dir.path().join("topology.json")).args(["--probe-interval-ms", "250"]);
        } else {
            cmd.args(["--bootstrap", &boot]);
        }
        if role == "server" {
            if let Some(m) = &self.media {
                cmd.arg("--media").arg(m);
            }
        }
        // Loopback delays are all noise: let hop counts decide.
        cmd.args(["--bind", &ip, "--tie-floor-us", "20000", "--session-timeout-s", "3", "--name", node]);
        cmd.arg("--tls-dir").arg(self.tls_dir());
        let log = std::fs::File::create(self.dir.path().join(format!("{node}.log"))).unwrap();
        cmd.stdout(Stdio::null()).stderr(log).env("RUST_LOG", "info");
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        let child = cmd.spawn().unwrap();
        self.procs.insert(node.to_string(), child);
    }

    /// The overlay's TLS folder (CA, node and operator certificates).
    pub fn tls_dir(&self) -> PathBuf {
        self.dir.path().join("tls")
    }

    /// An `onode` tool command (inspect, overview) with the operator's
    /// certificate.
    pub fn onode_tool(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(bin("onode"));
        cmd.args(args).arg("--tls-dir").arg(self.tls_dir());
        cmd
    }

    pub fn log(&self, node: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{node}.log"))).unwrap_or_default()
    }

    /// A scrape of `node`'s Prometheus metrics (`GET /metrics`, port 9998).
    pub fn metrics(&self, node: &str) -> String {
        http_get(&format!("{}:9998", self.addr[node]), "/metrics")
    }

    /// The value of one series (`name{labels}`, as written) in a scrape.
    pub fn metric(scrape: &str, series: &str) -> Option<f64> {
        scrape.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
    }

    /// The last `n` lines above DEBUG of every node's log, colours stripped.
    pub fn log_tails(&self, n: usize) -> String {
        let mut out = String::new();
        for node in self.addr.keys() {
            let text = self.log(node);
            let lines: Vec<String> =
                text.lines().map(strip_colours).filter(|l| !l.contains(" DEBUG ") && !l.contains(" TRACE ")).collect();
            out.push_str(&format!("---- {node}.log (last {n} lines)\n"));
            for l in &lines[lines.len().saturating_sub(n)..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    fn wait_ready(&self, limit: Duration) {
        let start = Instant::now();
        loop {
            if self.overview().is_some_and(|o| o["ready"] == true) && self.routes_settled() {
                break;
            }
            assert!(
                start.elapsed() < limit,
                "overlay not ready after {limit:?}; logs in {}",
                self.dir.path().display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Every node's best route to every server has as few hops as the
    /// topology allows: the probes have been everywhere, so trees built
    /// from now on follow hop counts (the tie floor makes loopback delays
    /// a tie) and not the order in which probes happened to arrive.
    fn routes_settled(&self) -> bool {
        let servers: Vec<&String> = self.addr.keys().filter(|n| n.starts_with('s')).collect();
        servers.iter().all(|server| {
            let hops = hops_to(&self.topology, server);
            self.addr.keys().filter(|n| !n.starts_with('s')).all(|n| {
                let Some(state) = self.try_inspect(n) else { return false };
                state["routes"][server.as_str()]["hops"].as_u64() == Some(u64::from(hops[n]))
            })
        })
    }

    pub fn try_inspect(&self, node: &str) -> Option<Value> {
        let out = self.onode_tool(&["inspect", &self.addr[node].to_string()]).output().ok()?;
        serde_json::from_slice(&out.stdout).ok()
    }

    pub fn overview(&self) -> Option<Value> {
        let out = self.onode_tool(&["overview", &self.bootstrapper().to_string()]).output().ok()?;
        serde_json::from_slice(&out.stdout).ok()
    }

    pub fn inspect(&self, node: &str) -> Value {
        let out = self.onode_tool(&["inspect", &self.addr[node].to_string()]).output().unwrap();
        assert!(out.status.success(), "inspect {node}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Polls `check` until it holds or `limit` passes (then panics with `what`).
    pub fn wait_for(&self, what: &str, limit: Duration, mut check: impl FnMut(&Overlay) -> bool) {
        let start = Instant::now();
        while !check(self) {
            if start.elapsed() >= limit {
                // CI keeps only the test's output: what the nodes said goes there.
                eprintln!("{}", self.log_tails(12));
                panic!("{what}: not true after {limit:?}; logs in {}", self.dir.path().display());
            }
            std::thread::sleep(Duration::from_millis(150));
        }
    }

    /// The stream branch a node carries, if any.
    pub fn branch(&self, node: &str, stream: &str) -> Option<Value> {
        self.inspect(node)["streams"].as_array().unwrap().iter().find(|s| s["stream"] == stream).cloned()
    }

    pub fn kill(&mut self, node: &str) {
        if let Some(mut c) = self.procs.remove(node) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGSTOP: the node hangs with its sockets open (no reset tells the
    /// neighbours), like a wedged host.
    pub fn freeze(&self, node: &str) {
        unsafe { libc_kill(self.procs[node].id() as i32, 19) };
    }

    /// SIGCONT after [`Overlay::freeze`].
    pub fn thaw(&self, node: &str) {
        unsafe { libc_kill(self.procs[node].id() as i32, 18) };
    }

    /// SIGTERM and wait: a clean stop.
    pub fn stop(&mut self, node: &str) -> std::process::ExitStatus {
        let mut c = self.procs.remove(node).expect("node running");
        unsafe { libc_kill(c.id() as i32, 15) };
        let start = Instant::now();
        loop {
            if let Some(status) = c.try_wait().unwrap() {
                return status;
            }
            if start.elapsed() > Duration::from_secs(5) {
                let _ = c.kill();
                panic!("{node} did not stop within 5 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A headless client command for `stream` at `pop` (None: it picks).
    pub fn client(&self, name: &str, stream: &str, pop: Option<&str>, secs: f64) -> Command {
        let mut cmd = Command::new(bin("oclient"));
        cmd.args(["--bootstrap", &self.bootstrapper().to_string(), stream, "--headless", "--name", name]);
        cmd.args(["--duration", &secs.to_string(), "--stats-line", "false"]);
        cmd.arg("--stats-json").arg(self.stats_path(name));
        cmd.arg("--tls-dir").arg(self.tls_dir());
        if let Some(p) = pop {
            cmd.args(["--pop", &self.addr[p].to_string()]);
        }
        cmd.stderr(std::fs::File::create(self.dir.path().join(format!("client-{name}.log"))).unwrap());
        cmd.stdout(Stdio::null());
        cmd
    }

    pub fn stats_path(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("client-{name}.json"))
    }

    pub fn stats(&self, name: &str) -> Value {
        let text = std::fs::read_to_string(self.stats_path(name))
            .unwrap_or_else(|_| panic!("client {name} wrote no stats; see {}", self.dir.path().display()));
        serde_json::from_str(&text).unwrap()
    }

    pub fn client_log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("client-{name}.log"))).unwrap_or_default()
    }
}

pub fn wait_output(child: Child, limit: Duration) -> Output {
    let id = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            unsafe { libc_kill(id as i32, 9) };
            panic!("process {id} did not finish within {limit:?}");
        }
    }
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

impl Drop for Overlay {
    fn drop(&mut self) {
        for (_, mut c) in std::mem::take(&mut self.procs) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `line` without its ANSI colour sequences (ESC [ ... m).
fn strip_colours(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The body of `GET path` at `addr` (HTTP/1.1; anything but 200 panics,
/// showing the reply).
pub fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("{addr}: {e}"));
    conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(conn, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut reply = String::new();
    conn.read_to_string(&mut reply).unwrap_or_else(|e| panic!("GET {path} at {addr}: {e}"));
    match reply.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => body.to_string(),
        _ => panic!("GET {path} at {addr}: {reply}"),
    }
}
