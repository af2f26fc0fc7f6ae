//! The lab folder `/tmp/netlab-<prefix>/` and its state file, which lets
//! `down`, `status`, `exec` and `client` work without the lab file (and
//! `down` work after a crash: it needs only the prefix).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::lab::{Lab, LabSpec, RoleKind};

/// Where every lab folder lives.
pub const RUN_ROOT: &str = "/tmp";

/// The folder of lab `prefix`.
pub fn lab_dir(prefix: &str) -> PathBuf {
    Path::new(RUN_ROOT).join(format!("netlab-{prefix}"))
}

fn state_path(prefix: &str) -> PathBuf {
    lab_dir(prefix).join("state.json")
}

/// How far `up` got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Building,
    Network,
    Starting,
    Ready,
}

/// A process the lab started inside a namespace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Process {
    pub host: String,
    pub role: RoleKind,
    /// Overlay node name, or the client's label.
    pub name: String,
    pub pid: i32,
    pub log: PathBuf,
    pub argv: Vec<String>,
}

/// A link emulator the lab started in a link namespace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Emulator {
    /// `a-b`: the link's hosts in lab-file order (linkem's a2b is a -> b).
    pub link: String,
    pub a: String,
    pub b: String,
    pub ns: String,
    pub pid: i32,
    pub control: PathBuf,
    pub stats: PathBuf,
    pub log: PathBuf,
    pub argv: Vec<String>,
}

/// The SSRCs of a stream, as `onode stream-ssrcs` gives them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamIds {
    pub stream: String,
    pub video: u32,
    pub audio: u32,
}

/// Everything a later netlab command needs to know about a running lab.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabState {
    pub prefix: String,
    pub lab_file: Option<PathBuf>,
    pub spec: LabSpec,
    pub overlay_path: Option<PathBuf>,
    pub overlay_text: Option<String>,
    pub namespaces: Vec<String>,
    pub phase: Phase,
    pub bin_dir: Option<PathBuf>,
    pub media_dir: Option<PathBuf>,
    /// `ip:port` of the bootstrapper's control service.
    pub bootstrap: Option<String>,
    pub processes: Vec<Process>,
    /// Streams whose per-link counters are installed.
    #[serde(default)]
    pub counted_streams: Vec<StreamIds>,
    /// The link emulators (one per impaired link).
    #[serde(default)]
    pub emulators: Vec<Emulator>,
}

impl LabState {
    pub fn new(prefix: &str, lab: &Lab, namespaces: Vec<String>) -> LabState {
        LabState {
            prefix: prefix.to_string(),
            lab_file: lab.file.clone(),
            spec: lab.spec.clone(),
            overlay_path: lab.overlay_path.clone(),
            overlay_text: lab.overlay_text.clone(),
            namespaces,
            phase: Phase::Building,
            bin_dir: None,
            media_dir: None,
            bootstrap: lab.bootstrap.map(|b: Ipv4Addr| format!("{b}:{}", lab.spec.control_port)),
            processes: Vec::new(),
            counted_streams: Vec::new(),
            emulators: Vec::new(),
        }
    }

    pub fn dir(&self) -> PathBuf {
        lab_dir(&self.prefix)
    }

    /// The lab as it was brought up (no file is read).
    pub fn lab(&self) -> Result<Lab> {
        let overlay = match (&self.overlay_path, &self.overlay_text) {
            (Some(p), Some(t)) => Some((p.clone(), t.clone())),
            _ => None,
        };
        Lab::from_parts(self.spec.clone(), self.lab_file.as_deref(), overlay)
            .context("the lab stored in the state file no longer validates")
    }

    /// Writes the state file (atomically).
    pub fn save(&self) -> Result<()> {
        let dir = self.dir();
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let tmp = dir.join("state.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, state_path(&self.prefix))?;
        Ok(())
    }

    /// Reads the state of lab `prefix`.
    pub fn load(prefix: &str) -> Result<LabState> {
        let p = state_path(prefix);
        let text = std::fs::read_to_string(&p)
            .with_context(|| format!("no lab {prefix} is up ({} is missing)", p.display()))?;
        let st: LabState = serde_json::from_str(&text).with_context(|| format!("{} is damaged", p.display()))?;
        crate::run::use_tls_dir(prefix);
        Ok(st)
    }

    /// Removes the state file (the logs stay).
    pub fn forget(prefix: &str) {
        let _ = std::fs::remove_file(state_path(prefix));
    }
}

/// Prefixes of the labs that have a state file.
pub fn known_prefixes() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(RUN_ROOT)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let prefix = name.strip_prefix("netlab-")?.to_string();
            e.path().join("state.json").exists().then_some(prefix)
        })
        .collect();
    v.sort();
    v
}

/// The prefix given, or the only lab that is up.
pub fn resolve_prefix(given: Option<&str>) -> Result<String> {
    if let Some(p) = given {
        return Ok(p.to_string());
    }
    let known = known_prefixes();
    match known.as_slice() {
        [one] => Ok(one.clone()),
        [] => {
            bail!("no lab is up (no {RUN_ROOT}/netlab-*/state.json); give --prefix for a lab whose state file is gone")
        }
        many => bail!("several labs are up ({}): give --prefix", many.join(", ")),
    }
}

/// A fresh prefix: `nl` and four base-36 digits from the pid and the clock.
pub fn new_prefix() -> String {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let mut n = (std::process::id().wrapping_mul(2_654_435_761) ^ nanos) % 36u32.pow(4);
    let mut s = String::new();
    for _ in 0..4 {
        let d = n % 36;
        n /= 36;
        s.push(char::from_digit(d, 36).expect("digit below 36"));
    }
    format!("nl{s}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_prefix_is_valid() {
        let p = new_prefix();
        assert_eq!(p.len(), 6);
        crate::plan::check_prefix(&p).unwrap();
    }
}
