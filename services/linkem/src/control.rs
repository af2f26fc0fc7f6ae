//! The control protocol and the counters it reports.
//!
//! A running linkem listens on a unix stream socket (`--control PATH`).
//! Each request is one JSON object on a line, each reply one JSON object on
//! a line; a connection may carry several. Requests:
//!
//! - `{"op": "stats"}`: the counters and settings of both directions.
//! - `{"op": "set", "dir": "a2b" | "b2a" | "both", "update": {"delay_ms": 30}}`:
//!   changes the given fields (see [`Update`]) for packets that arrive from
//!   then on; the reply carries the new snapshot.
//!
//! Replies are `{"ok": true, "stats": {...}}` or `{"ok": false, "error": "..."}`.
//! The same snapshot is written to the stats file (`--stats PATH`) every
//! 500 ms, replaced atomically, so a reader never sees half a file.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::schedule::{Settings, Update};

/// Which direction a request is about: `a2b` is what arrives on interface
/// a and leaves on b.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dir {
    A2b,
    B2a,
    Both,
}

impl std::str::FromStr for Dir {
    type Err = String;
    fn from_str(s: &str) -> Result<Dir, String> {
        match s {
            "a2b" => Ok(Dir::A2b),
            "b2a" => Ok(Dir::B2a),
            "both" => Ok(Dir::Both),
            other => Err(format!("{other:?}: a direction is a2b, b2a or both")),
        }
    }
}

impl Dir {
    /// Whether the direction a2b (`false`: b2a) is included.
    pub fn includes(self, a2b: bool) -> bool {
        matches!((self, a2b), (Dir::Both, _) | (Dir::A2b, true) | (Dir::B2a, false))
    }
}

/// A request on the control socket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    Stats,
    Set { dir: Dir, update: Update },
}

/// A reply on the control socket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<Snapshot>,
}

/// Counters and settings of one direction.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DirStats {
    pub settings: Settings,
    /// Frames that arrived (ARP, IP, anything) and their bytes.
    pub packets: u64,
    pub bytes: u64,
    /// Frames sent on to the other side and their bytes.
    pub sent_packets: u64,
    pub sent_bytes: u64,
    /// Dropped by the random loss.
    pub dropped_loss: u64,
    /// Dropped because the rate limit's queue, or the delay line's
    /// capacity (`--max-queued`), was full.
    pub dropped_queue: u64,
    /// Dropped by the kernel before linkem read them (socket buffer full).
    pub dropped_kernel: u64,
    /// Frames larger than a buffer (offloads left on?), dropped.
    pub dropped_oversize: u64,
    /// Sends the kernel refused (the other side down, say).
    pub send_errors: u64,
    /// In linkem now, waiting for their departure time.
    pub queued_packets: u64,
    pub queued_bytes: u64,
}

/// Everything a running linkem reports.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub name: String,
    pub iface_a: String,
    pub iface_b: String,
    pub pid: u32,
    pub uptime_s: f64,
    pub a2b: DirStats,
    pub b2a: DirStats,
}

/// A failed exchange with a running linkem.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("control socket {path}: unreadable reply {reply:?}: {message}")]
    BadReply { path: String, reply: String, message: String },
    #[error("control socket {path}: linkem refused: {message}")]
    Refused { path: String, message: String },
}

/// Sends one request to the linkem listening on `path` and returns its
/// snapshot.
pub fn request(path: &Path, req: &Request, timeout: Duration) -> Result<Snapshot, ControlError> {
    let p = path.display().to_string();
    let io = |source| ControlError::Io { path: p.clone(), source };
    let mut stream = UnixStream::connect(path).map_err(io)?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut line = serde_json::to_string(req).expect("a request serializes");
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(io)?;
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply).map_err(io)?;
    let parsed: Reply = serde_json::from_str(reply.trim()).map_err(|e| ControlError::BadReply {
        path: p.clone(),
        reply: reply.trim().to_string(),
        message: e.to_string(),
    })?;
    match (parsed.ok, parsed.stats) {
        (true, Some(s)) => Ok(s),
        (_, _) => Err(ControlError::Refused { path: p, message: parsed.error.unwrap_or_else(|| "no stats".into()) }),
    }
}

/// Reads a stats file written by a running (or stopped) linkem.
pub fn read_stats_file(path: &Path) -> Result<Snapshot, ControlError> {
    let p = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ControlError::Io { path: p.clone(), source })?;
    serde_json::from_str(&text).map_err(|e| ControlError::BadReply {
        path: p,
        reply: text.chars().take(80).collect(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_a_stable_wire_form() {
        let set = Request::Set { dir: Dir::A2b, update: Update { delay_ms: Some(30.0), ..Update::default() } };
        let text = serde_json::to_string(&set).unwrap();
        assert_eq!(text, r#"{"op":"set","dir":"a2b","update":{"delay_ms":30.0}}"#);
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), set);
        assert_eq!(serde_json::from_str::<Request>(r#"{"op":"stats"}"#).unwrap(), Request::Stats);
        assert!(serde_json::from_str::<Request>(r#"{"op":"set","dir":"up","update":{}}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"op":"set","dir":"both","update":{"delay":3}}"#).is_err());
    }

    #[test]
    fn directions() {
        assert_eq!("b2a".parse::<Dir>(), Ok(Dir::B2a));
        assert!("ba".parse::<Dir>().is_err());
        assert!(Dir::Both.includes(true) && Dir::Both.includes(false));
        assert!(Dir::A2b.includes(true) && !Dir::A2b.includes(false));
    }
}
