//! Cluster membership over Raft (ARCHITECTURE.md, "Membership rules").
//!
//! * [`state`] — the replicated membership table (members, subscriptions, placement with its
//!   epoch) and the commands that change it. Pure: `apply(index, command) -> effects`.
//! * [`storage`] — `raft::Storage` on redb (durable) and in memory (tests), one conformance suite.
//! * [`raft_node`] — the one task that owns the `RawNode`: tick, step, propose, persist, send,
//!   apply, advance; proposals on followers are forwarded to the leader.
//!
//! * [`service`] — the driver, the transport and the state machine wired together on their own
//!   thread; joining; the leader's duties (Raft configuration changes, placement proposals).

pub mod raft_node;
pub mod service;
pub mod state;
pub mod storage;
