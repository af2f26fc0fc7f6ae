//! The bootstrapper's view of who is in the overlay: which declared nodes
//! registered, which are alive, which failed, and when the overlay became
//! ready. A node's registrations are numbered so that the end of an old
//! watch stream cannot declare a re-registered node failed.

use std::collections::{BTreeMap, BTreeSet};

/// What a membership change means for the rest of the overlay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Joined(String),
    /// Every declared node has registered (once).
    Ready,
    Failed(String),
}

#[derive(Debug, Clone)]
pub struct Membership {
    declared: BTreeSet<String>,
    alive: BTreeMap<String, u64>,
    failed: BTreeSet<String>,
    ever: BTreeSet<String>,
    generation: u64,
    ready: bool,
}

impl Membership {
    pub fn new(declared: impl IntoIterator<Item = String>) -> Self {
        Membership {
            declared: declared.into_iter().collect(),
            alive: BTreeMap::new(),
            failed: BTreeSet::new(),
            ever: BTreeSet::new(),
            generation: 0,
            ready: false,
        }
    }

    /// A node registered; returns its registration number and the changes.
    pub fn register(&mut self, name: &str) -> (u64, Vec<Change>) {
        self.generation += 1;
        self.alive.insert(name.to_string(), self.generation);
        self.failed.remove(name);
        self.ever.insert(name.to_string());
        let mut changes = vec![Change::Joined(name.to_string())];
        if !self.ready && self.declared.iter().all(|d| self.ever.contains(d)) {
            self.ready = true;
            changes.push(Change::Ready);
        }
        (self.generation, changes)
    }

    /// The node's watch of registration `generation` ended. Returns the
    /// failure to announce, unless the node registered again since.
    pub fn watch_ended(&mut self, name: &str, generation: u64) -> Option<Change> {
        if self.alive.get(name) != Some(&generation) {
            return None;
        }
        self.alive.remove(name);
        self.failed.insert(name.to_string());
        Some(Change::Failed(name.to_string()))
    }

    pub fn is_ready(&self) -> bool {
        self.ready
    }

    /// The current registration number of a live node.
    pub fn generation(&self, name: &str) -> Option<u64> {
        self.alive.get(name).copied()
    }

    pub fn is_alive(&self, name: &str) -> bool {
        self.alive.contains_key(name)
    }

    pub fn alive(&self) -> impl Iterator<Item = &String> {
        self.alive.keys()
    }

    pub fn failed(&self) -> impl Iterator<Item = &String> {
        self.failed.iter()
    }

    pub fn missing(&self) -> impl Iterator<Item = &String> {
        self.declared.iter().filter(|d| !self.ever.contains(*d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_once_all_registered_and_failures_tracked() {
        let mut m = Membership::new(["s1".to_string(), "o2".to_string()]);
        let (_, c) = m.register("s1");
        assert_eq!(c, [Change::Joined("s1".into())]);
        assert_eq!(m.missing().collect::<Vec<_>>(), ["o2"]);
        let (g1, c) = m.register("o2");
        assert_eq!(c, [Change::Joined("o2".into()), Change::Ready]);
        assert_eq!(m.watch_ended("o2", g1), Some(Change::Failed("o2".into())));
        assert_eq!(m.failed().collect::<Vec<_>>(), ["o2"]);
        assert!(m.is_ready(), "ready stays once reached");
        let (g2, c) = m.register("o2");
        assert_eq!(c, [Change::Joined("o2".into())]);
        assert!(m.failed().next().is_none());
        // The old watch ending late must not fail the new registration.
        assert_eq!(m.watch_ended("o2", g1), None);
        assert!(m.is_alive("o2"));
        assert_eq!(m.watch_ended("o2", g2), Some(Change::Failed("o2".into())));
    }
}
