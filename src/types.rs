//! The shared vocabulary: small types and constants that several layers name.
//!
//! A subscription's key, a node's id and status, the hash that placement and routing build on, and
//! the constants the configuration's defaults and checks need. They live here, at the bottom of
//! the crate, so that the modules that use them do not have to reach into each other for them:
//! `placement` and `metrics` need `SubscriptionKey` without depending on `handler`, and `config`
//! gets its defaults without depending on `placement` or `monitor` (see ARCHITECTURE.md, "Layers").
//!
//! This module owns plain values only. It must not depend on any other module of the crate, do
//! I/O or hold state; anything with behaviour beyond formatting and parsing belongs to the module
//! that owns that behaviour. Public items are re-exported at their historical paths
//! (`handler::SubscriptionKey`, `placement::NodeStatus`, `placement::NodeId`,
//! `placement::DEFAULT_LOAD_FACTOR`, `monitor::MAX_PHI`); code inside the crate imports them from
//! here.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Identifies a subscription: its topic and group.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SubscriptionKey {
    /// The topic.
    pub topic: String,
    /// The group.
    pub group: String,
}

impl fmt::Display for SubscriptionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.topic, self.group)
    }
}

/// A node's id in the cluster (the Raft id; never 0).
pub type NodeId = u64;

/// A member's status as placement and routing see it (the `status` of `GET /v1/cluster`).
///
/// Only [`NodeStatus::Up`] nodes receive instances. The replicated membership state uses `Up`,
/// `Down` and `Draining`; `Suspect` and `Degraded` are a node's local failure-detector view and
/// `Leaving` is what a node reports while it hands off work before its `Leave` commits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeStatus {
    /// Alive and accepting work.
    Up,
    /// Over the phi-accrual threshold; routers skip it until it answers again or is marked down.
    Suspect,
    /// Answers pings but makes no handler progress with a backlog (gray failure); like suspect.
    Degraded,
    /// Marked down through Raft after `down_after` of suspicion; its instances are moved.
    Down,
    /// Handing off its work before leaving the cluster.
    Leaving,
    /// Asked (by an operator) to give up its work; stays a member.
    Draining,
}

impl NodeStatus {
    /// The lowercase name used in JSON, metrics labels and snapshots.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeStatus::Up => "up",
            NodeStatus::Suspect => "suspect",
            NodeStatus::Degraded => "degraded",
            NodeStatus::Down => "down",
            NodeStatus::Leaving => "leaving",
            NodeStatus::Draining => "draining",
        }
    }

    /// Whether placement may put instances on a node with this status (only `Up`).
    pub fn accepts_work(self) -> bool {
        self == NodeStatus::Up
    }
}

impl fmt::Display for NodeStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A status name that is not one of `up`, `suspect`, `degraded`, `down`, `leaving`, `draining`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown node status {0:?}; expected one of up, suspect, degraded, down, leaving, draining")]
pub struct UnknownStatus(pub String);

impl FromStr for NodeStatus {
    type Err = UnknownStatus;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "up" => NodeStatus::Up,
            "suspect" => NodeStatus::Suspect,
            "degraded" => NodeStatus::Degraded,
            "down" => NodeStatus::Down,
            "leaving" => NodeStatus::Leaving,
            "draining" => NodeStatus::Draining,
            other => return Err(UnknownStatus(other.to_string())),
        })
    }
}

/// The default load factor `c` of placement (`raft.load_factor`): no node gets more than
/// `ceil(1.25 × average)` instances. Here rather than in `placement` because the configuration's
/// default is taken from it.
pub const DEFAULT_LOAD_FACTOR: f64 = 1.25;

/// Phi is capped here (an endless silence would give infinity, which metrics render poorly). Here
/// rather than in `monitor` because the configuration refuses a `cluster.phi_threshold` above it:
/// a threshold no phi can reach would never suspect anyone.
pub const MAX_PHI: f64 = 1000.0;

/// How many peers each node watches by default (`cluster.monitors`), like Akka's "monitored by
/// 5". Here rather than in `monitor` because the configuration's default is taken from it.
pub const DEFAULT_MONITORS: usize = 5;

/// The FNV-1a offset basis: the seed of a hash that starts from nothing.
pub(crate) const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a over `bytes`, continuing from `seed` ([`FNV_OFFSET`] to start). Placement's rendezvous
/// weights and the router's key affinity are built on it, and both must give the same answer on
/// every node, platform and version, so it is spelled out here rather than taken from a hasher
/// whose algorithm may change.
pub(crate) fn fnv1a(seed: u64, bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(seed, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
}

/// SplitMix64 finaliser: spreads FNV's weak low bits.
pub(crate) fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

thread_local! {
    /// This thread's state of [`random_u64`].
    static RANDOM: std::cell::Cell<u64> = std::cell::Cell::new(rand::random::<u64>() | 1);
}

/// A fast random `u64` from a per-thread xorshift64* generator (Vigna) seeded once from the OS:
/// for choices that need spread, not unpredictability (the router's two random choices, delivery
/// ids and lanes, which only need to differ from a previous run's). The event-plane simulation
/// seeds it ([`seed_random`]) so that a seed replays exactly.
pub(crate) fn random_u64() -> u64 {
    RANDOM.with(|s| {
        let mut x = s.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        s.set(x);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    })
}

/// Seeds this thread's [`random_u64`] (the simulation).
#[cfg(test)]
pub(crate) fn seed_random(seed: u64) {
    RANDOM.with(|s| s.set(mix(seed) | 1));
}

/// Says when to log something that may repeat often (a failing duty, refused peer messages): the
/// first time, then at most once per [`LogLimit::EVERY`], with how many were not logged since.
/// Pure: the clock is an argument.
#[derive(Debug, Default, Clone)]
pub struct LogLimit {
    /// When a line was last logged.
    logged_at: Option<std::time::Instant>,
    /// Occurrences not logged since then.
    suppressed: u64,
}

impl LogLimit {
    /// At most one log line per this long.
    pub const EVERY: std::time::Duration = std::time::Duration::from_secs(30);

    /// Records one occurrence at `now`: `Some(occurrences not logged before it)` when this one
    /// should be logged.
    pub fn hit(&mut self, now: std::time::Instant) -> Option<u64> {
        match self.logged_at {
            Some(at) if now.saturating_duration_since(at) < Self::EVERY => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.logged_at = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// Test only: a disk that changed one bit of a closed database file. For each of `n` offsets
/// spread over the file at `path`, flips one bit there, runs `open` on the damaged file, and puts
/// the file back; answers how many opens panicked, and the errors the others returned.
#[cfg(test)]
pub(crate) fn damage_each_of(
    path: &std::path::Path,
    n: u64,
    open: impl Fn() -> Result<(), String> + std::panic::RefUnwindSafe,
) -> (usize, Vec<String>) {
    let good = std::fs::read(path).expect("read the file");
    let (mut panicked, mut errors) = (0, Vec::new());
    for i in 0..n {
        let mut bytes = good.clone();
        let at = (i * 245_489) as usize % bytes.len();
        bytes[at] ^= 0x10;
        std::fs::write(path, &bytes).expect("damage the file");
        match std::panic::catch_unwind(&open) {
            Err(_) => panicked += 1,
            Ok(Err(e)) => errors.push(e),
            Ok(Ok(())) => {}
        }
    }
    std::fs::write(path, &good).expect("put the file back");
    (panicked, errors)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn a_log_limit_logs_the_first_hit_then_once_per_period_with_the_count_it_held_back() {
        let mut limit = LogLimit::default();
        let t0 = Instant::now();
        assert_eq!(limit.hit(t0), Some(0), "the first one is logged");
        for s in 1..30 {
            assert_eq!(
                limit.hit(t0 + Duration::from_secs(s)),
                None,
                "within the period: held back"
            );
        }
        assert_eq!(
            limit.hit(t0 + LogLimit::EVERY),
            Some(29),
            "a period later, with the 29 held back"
        );
        assert_eq!(limit.hit(t0 + LogLimit::EVERY), None);
        assert_eq!(
            limit.hit(t0 + 3 * LogLimit::EVERY),
            Some(1),
            "a quiet spell: the next one is logged"
        );
    }
}
