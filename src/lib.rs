//! Herald: an actor-based, distributed event processing runtime.
//!
//! Handlers are plain actix actors that handle [`handler::Delivery`]; a node binary registers them
//! by name and the runtime routes every event of a topic to every subscription of it, one instance
//! per subscription, with supervision, retries, dead letters and a write-ahead log.
//!
//! ```no_run
//! use herald::prelude::*;
//!
//! #[derive(Default)]
//! struct Audit { seen: u64 }
//! impl Actor for Audit { type Context = Context<Self>; }
//! impl Handler<Delivery> for Audit {
//!     type Result = HandlerResult;
//!     fn handle(&mut self, d: Delivery, _: &mut Context<Self>) -> HandlerResult {
//!         let login: serde_json::Value = d.event.json_data()?;
//!         self.seen += 1;
//!         Ok(())
//!     }
//! }
//!
//! fn main() -> std::process::ExitCode {
//!     Node::builder()
//!         .handler("audit-logins", Audit::default)
//!         .subscribe("user.login", "audit", "audit-logins")
//!         .main() // the whole `herald` CLI: `node`, `up`, `publish`, `subscribe`, `status`, …
//! }
//! ```
//!
//! # Layout
//!
//! The modules form layers (ARCHITECTURE.md, "Layers"; `tests/layering.rs` checks it): a module uses only modules
//! of its own layer or below, and no two modules use each other.
//!
//! * `types` — the shared vocabulary: `SubscriptionKey`, `NodeId`, `NodeStatus`, the FNV/SplitMix
//!   hash that placement and routing build on, and the constants the configuration's defaults
//!   need. Depends on nothing in the crate; re-exported at the old public paths.
//! * [`event`] — the [`Event`](event::Event) type, topic/group name rules, CloudEvents mapping.
//!   Pure; no I/O.
//! * [`subscription`] — subscription specs (`topic`, `group`, handler, `instances`,
//!   `max_attempts`) and their validation.
//! * [`handler`] — the user-facing handler API (`Delivery`, `HandlerResult`), the handler registry,
//!   the built-in `webhook` and `log` kinds, and the per-instance supervisor (restart with backoff,
//!   retries, dead-lettering). Knows nothing of HTTP, the WAL or Raft.
//! * `router` — the routing table (topic → subscriptions → instance by key affinity or least
//!   load) and the worker threads that run instances; reserves mailbox slots so a full mailbox
//!   refuses a publish instead of growing memory. Does not decide placement.
//! * [`ingress`] — accepting events: ack modes, the redb write-ahead log with group commit,
//!   per-event completion tracking, WAL replay on start, dead-letter storage and replay.
//! * [`proto`] — prost records for the WAL and dead letters (and later the wire).
//! * [`http`] — the actix-web API: routes, bearer-token auth, JSON errors, OpenAPI. No business
//!   logic.
//! * `control` — [`NodeCore`](node::NodeCore): the node's shared state and the control operations
//!   the API calls (subscriptions, node removal and drain, the cluster and placement views). Below
//!   both `http` and `node`, so those two do not use each other; re-exported from [`node`].
//! * [`node`] — the builder, start-up and graceful shutdown wiring. Embeddable: it does not read
//!   argv or install process-wide state (that is `cli`'s).
//! * [`config`] — the configuration struct, its defaults, TOML loading and `validate()`.
//! * [`metrics`] — metric names, descriptions and the Prometheus recorder installer.
//! * [`cli`] — the `herald` command line (node, up, publish, subscribe, status, health), logging
//!   set-up, and the process-owning entry points of `NodeBuilder` (`main`, `run`,
//!   `from_env_and_args`); the top layer. `src/bin/herald.rs` only calls it. The benchmark
//!   scenarios are the `herald-bench` crate (`bench/`), so that no handler binary carries them.
//! * `text` — aligned plain-text tables for the command line's output (`cli` and `up`).
//! * [`transport`] — peer connections: length-delimited prost frames, the HMAC handshake, write
//!   coalescing and reconnect with backoff; generic over the stream.
//! * [`membership`] — the Raft group: the pure membership state machine (`state`), `raft::Storage`
//!   on redb and in memory (`storage`), the driver loop that owns the `RawNode` (`raft_node`), and
//!   the service that runs it with the transport on its own thread and does the leader's duties
//!   (`service`).
//! * [`placement`] — the pure placement function: rendezvous hashing with a bounded load.
//! * `up` — `herald up` (its flags and its run), a local cluster of node processes.
//! * `harness` — local clusters of node processes (start, wait until ready, kill, stop, restart,
//!   leader, log tails) for `herald up`, `herald-bench` and the process tests; not API.
//!
//! * [`monitor`] — node monitoring: pings, the phi-accrual detector per peer, and the health that
//!   routers read (up, suspect, degraded).
//! * `relay` — the event plane between nodes: a front (`Relay`) over a sending side (batches of
//!   forwarded events, the pending table that redelivers unacked events, at-most-once lanes) and
//!   a receiving side (placement fencing, the dedup window, acks back).

#![warn(missing_docs, unreachable_pub)]

pub mod cli;
pub mod config;
mod control;
mod error;
pub mod event;
#[cfg(test)]
mod event_sim;
pub mod handler;
// Public only for `herald-bench` and the process tests, which start, wait for, kill and stop node
// processes with the same harness as `herald up`; not part of the API.
#[doc(hidden)]
pub mod harness;
pub mod http;
pub mod ingress;
pub mod membership;
pub mod metrics;
pub mod monitor;
pub mod node;
pub mod pki;
pub mod placement;
pub mod proto;
mod relay;
mod router;
pub mod subscription;
pub mod telemetry;
mod text;
mod top;
pub mod transport;
mod types;
mod up;

pub use error::{Error, Result};

/// The allocator Herald is tuned for (mimalloc): a node allocates a few small buffers per event,
/// which glibc's malloc handles several times slower under load. Use it in your node binary:
///
/// ```no_run
/// #[global_allocator]
/// static ALLOCATOR: herald::Allocator = herald::Allocator;
/// # fn main() {}
/// ```
///
/// It is mimalloc with one option changed before its first allocation: arena memory is committed
/// as it is used, not whole arenas up front (mimalloc's default where the OS overcommits, as
/// Linux does), unless `MIMALLOC_ARENA_EAGER_COMMIT` is set. Measured with idle nodes on one
/// machine (`herald-bench scale`, BENCHMARKS.md): eager commit costs each node about 20 MiB of RSS.
#[derive(Debug, Clone, Copy, Default)]
pub struct Allocator;

/// mimalloc's `arena_eager_commit` option in mimalloc v3 (`mi_option_e` in its `mimalloc.h`, as
/// bundled by libmimalloc-sys 0.1.49, whose Rust bindings name no constant for it).
const MI_OPTION_ARENA_EAGER_COMMIT: std::ffi::c_int = 4;

/// Whether [`Allocator`] has set its options.
static ALLOCATOR_READY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

impl Allocator {
    /// Sets the options once, before the first allocation (mimalloc reserves its first arena
    /// then; an option set later applies only to later arenas).
    #[inline]
    fn ready() {
        if !ALLOCATOR_READY.load(std::sync::atomic::Ordering::Relaxed) {
            Self::set_options();
        }
    }

    #[cold]
    fn set_options() {
        // Nothing here may allocate (it would come back here): the environment is read with
        // libc's `getenv`, not `std::env`. Two threads racing here both set the same value.
        // SAFETY: `getenv` reads the environment with a NUL-terminated name; `mi_option_set`
        // sets one integer option of the allocator. No memory is touched.
        unsafe {
            if libc::getenv(c"MIMALLOC_ARENA_EAGER_COMMIT".as_ptr()).is_null() {
                libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 0);
            }
        }
        ALLOCATOR_READY.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether mimalloc commits whole arenas up front (for the tests).
    #[doc(hidden)]
    pub fn eager_commit() -> bool {
        // SAFETY: reads one integer option.
        unsafe { libmimalloc_sys::mi_option_is_enabled(MI_OPTION_ARENA_EAGER_COMMIT) }
    }
}

// SAFETY: every call is mimalloc's, unchanged; `ready` only sets an option first.
unsafe impl std::alloc::GlobalAlloc for Allocator {
    #[inline]
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        Self::ready();
        mimalloc::MiMalloc.alloc(layout)
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        Self::ready();
        mimalloc::MiMalloc.alloc_zeroed(layout)
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        mimalloc::MiMalloc.dealloc(ptr, layout)
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        mimalloc::MiMalloc.realloc(ptr, layout, new_size)
    }
}

/// What handler code needs, listed item by item: the actix items a handler actor is written
/// with, and Herald's handler and node API. Anything else from actix is `herald::actix` (or the
/// `actix` crate itself).
pub mod prelude {
    pub use actix::{Actor, ActorContext, Addr, AsyncContext, Context, Handler, Message, Supervised, SyncContext};

    pub use crate::event::Event;
    pub use crate::handler::{Delivery, HandlerError, HandlerResult, SubscriptionKey};
    pub use crate::ingress::{AckMode, PublishError, Published};
    pub use crate::node::{Node, NodeBuilder, Publisher, RunningNode};
    pub use crate::subscription::{HandlerSpec, SubscriptionSpec};
}

/// The actix version Herald's handlers are written against, for items the prelude leaves out.
pub use actix;
