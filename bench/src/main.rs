//! `herald-bench`: benchmark scenarios that print figures next to a peer measured in the same run.
//!
//! A crate of its own (not a `herald` subcommand), so that the scenarios and what only they need
//! (the NATS client, the plotting crate, the HTTP load generator) are in no handler binary. It uses
//! herald's public API, plus `herald::harness` (hidden) to start and stop node processes. Run it with
//! `cargo run --release -p herald-bench -- <scenario>`.
//!
//! `local`: events/s from publish to a no-op Rust handler in one node (in-process publish, no
//! HTTP), with `ack=none` and `ack=accepted`, next to raw actix `do_send` to a no-op actor (the
//! "vs raw" column), and two more raw rows that carry what Herald's rows carry: `do_send` of a
//! clone of the same event, and `send` of it with each answer awaited (request/response). Then
//! what a Rust user would pick instead of Herald for in-process publish/subscribe on actix:
//! `actix-broker`'s system broker, to one subscriber and fanned out to three, next to Herald
//! publishing to one subscription and to three subscriptions of one topic. The rows alternate run
//! by run (each round runs every selected row once), so a drift of the machine's speed during an
//! invocation moves Herald and its peers alike.
//!
//! `membership`: a 3-node loopback cluster; subscribe → placed, join → placed, leader failover.
//!
//! `cluster`: a 3-node loopback cluster of `herald-bench node` processes (this binary, see below).
//! Cross-node events/s over HTTP batches with `ack=none` and `ack=accepted` (the publisher talks to
//! a node that runs no instance of the subscription, so every event crosses the peer transport),
//! publish → handler latency, and failover time: SIGKILL the node running the subscription's only
//! instance while events flow, and time kill → first event handled on a surviving node.
//!
//! `nats` and `jetstream`: Herald next to NATS (core pub/sub, and JetStream) with the same process
//! layout, payload sizes and publishing pattern, alternating run by run; see `nats.rs`. They need
//! `nats-server` (on PATH, or Debian's /usr/sbin/nats-server). Herald's peers talk mutual TLS
//! and NATS's clients and routes TLS, with certificates of one CA (`tls.rs`);
//! `--herald-peers both` also measures Herald with plaintext peers in the same run.
//!
//! `http`: HTTP publish to one node vs a bare actix-web server (`bare-http`, hidden); see `http.rs`.
//!
//! `soak`: a 3-node cluster under paced mixed load for a bounded time, sampling each node's RSS,
//! fds, threads, store file, backlog and p99 latency; fails when a resource grows past its warm-up
//! level plus a margin; see `soak.rs`.
//!
//! `scale`: many node processes on this machine (default 20): the last node's join → placed, idle
//! CPU, write syscalls and RSS per node, leader kill → agreement, and the `cluster` scenario's
//! failover rounds over all of them; see `scale.rs`.
//!
//! `memory`: heap bytes per idle subscription instance and per in-flight event in one in-process
//! node, counted by this binary's allocator; see `memory.rs`.
//!
//! `report`: runs every scenario as a child process and writes `BENCHMARKS.md` (appending the last
//! soak's section, `benchmarks/soak.md`); see `report.rs`.
//!
//! `node` (hidden): runs a node exactly like `herald node` (same flags) with one more Rust handler,
//! `bench-sink`: a no-op actor that reads `{"t": unix_nanos, "r": round?}` from the event and
//! exports, on the node's `/metrics`, a counter of handled events, a fine-bucket histogram of
//! publish → handle latency, the wall-clock time of the last handled event, and per failover round
//! the wall-clock time of the first handled event of that round. The `cluster` scenario reads those
//! from every node, so it needs no side channel and measures where the events are handled. The
//! scenarios that start node processes (`cluster`, `membership`, `scale`, `nats`, `jetstream`, `http`) run
//! this binary's `node`, so its nodes are the `herald` binary's nodes plus `bench-sink`.

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_broker::{Broker, BrokerSubscribe, SystemBroker};
use clap::{Args, Parser, Subcommand};
use tokio::sync::Notify;

use herald::cli::NodeArgs;
use herald::config::{Config, FsyncPolicy, LogFormat};
use herald::event::Event;
use herald::handler::{Delivery, HandlerResult};
use herald::ingress::{AckMode, PublishError};
use herald::node::{Node, Publisher};
use herald::subscription::SubscriptionSpec;

// The `herald` binary's allocator (the `node` processes must be the nodes users run), counting
// the bytes it hands out only for the `memory` scenario (off: one relaxed load per call).
#[global_allocator]
static ALLOCATOR: memory::Counting = memory::Counting;

/// Herald's benchmark scenarios: each prints figures next to a peer measured in the same run.
#[derive(Parser, Debug)]
#[command(name = "herald-bench", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

// Parsed once per process: the size of the node variant costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum Scenario {
    /// Publish → no-op Rust handler in one node, vs raw actix do_send.
    Local(LocalArgs),
    /// A 3-node loopback cluster: subscribe → placed, join → placed, leader failover.
    Membership(MembershipArgs),
    /// A 3-node loopback cluster: cross-node events/s, publish → handler latency, node failover.
    Cluster(ClusterArgs),
    /// Cross-node at-most-once: Herald ack=none vs NATS core pub/sub, 3-node clusters on loopback
    /// (needs nats-server).
    Nats(PeerArgs),
    /// Cross-node at-least-once: Herald ack=accepted vs NATS JetStream (acked publish, acked
    /// consume), 3-node clusters on loopback (needs nats-server).
    Jetstream(PeerArgs),
    /// HTTP publish (one event per request) to one node vs a bare actix-web handler answering 202:
    /// events/s at several concurrencies (closed loop), latency percentiles at a fixed rate (open loop).
    Http(http::HttpArgs),
    /// A bare actix-web server answering 202 on the publish path (the peer of `http`).
    #[command(hide = true)]
    BareHttp(http::BareHttpArgs),
    /// A 3-node cluster under steady mixed load for a bounded time (default 180 s), sampling RSS,
    /// fds, threads, store size and p99 latency per node; fails when a resource grows past its
    /// warm-up level plus a margin.
    Soak(soak::SoakArgs),
    /// Many node processes on this machine (default 20): join -> placed for the last node, idle CPU,
    /// writes and RSS per node, leader kill -> agreement, and failover over 10 kills.
    Scale(scale::ScaleArgs),
    /// Heap bytes per idle subscription instance and per in-flight event, in one in-process node.
    Memory(memory::MemoryArgs),
    /// How long this machine stops a running thread (a pinned thread per core spinning on the
    /// clock): the floor under every latency tail measured here (`nats` and `jetstream` print it).
    Stalls(stalls::StallsArgs),
    /// Runs every scenario and writes BENCHMARKS.md with the figures, the machine, the commands and
    /// SVG plots (needs nats-server).
    Report(report::ReportArgs),
    /// Runs a node like `herald node`, with the `bench-sink` handler registered (the node processes of
    /// the scenarios).
    #[command(hide = true)]
    Node(BenchNodeArgs),
}

#[derive(Args, Debug)]
struct BenchNodeArgs {
    #[command(flatten)]
    node: NodeArgs,
}

#[derive(Args, Debug)]
struct ClusterArgs {
    /// HTTP port of node 1; node i uses base+i-1 and peer port base+100+i-1 (127.0.0.1 only).
    #[arg(long, default_value_t = 7300)]
    base_port: u16,
    /// Events per throughput run (one run with ack=none, one with ack=accepted).
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    /// Stop publishing a throughput run after this many seconds, even if not all events were sent.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// Events per HTTP batch request (at most the nodes' http.max_batch_events, 1000).
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// Concurrent HTTP connections of the publisher.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Handler instances of the throughput subscription (placed on nodes other than the ingress).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=2))]
    instances: u32,
    /// Events/s of the paced latency runs (one per ack mode).
    #[arg(long, default_value_t = 20_000)]
    latency_rate: u64,
    /// Seconds of each paced latency run.
    #[arg(long, default_value_t = 3)]
    latency_seconds: u64,
    /// Failover rounds: each SIGKILLs the node running the subscription, then restarts it.
    #[arg(long, default_value_t = 10)]
    failovers: usize,
    /// Events/s published (ack=accepted) to a surviving node during a failover round.
    #[arg(long, default_value_t = 2000)]
    failover_rate: u64,
    /// WAL fsync policy of the nodes (default: the node default, always).
    #[arg(long, value_enum)]
    wal_fsync: Option<FsyncPolicy>,
    /// The peer transport: mutual TLS (the default), plaintext (`--insecure-peers`), or both
    /// (then the max-rate runs are also made on a second, plaintext cluster on free ports,
    /// alternating with the first; latency and failover run on the mTLS cluster).
    #[arg(long, value_enum, default_value = "mtls")]
    herald_peers: tls::HeraldPeers,
    /// A few seconds in all: 20,000 events per run, 1 s latency runs, 2 failover rounds.
    #[arg(long)]
    smoke: bool,
    /// Keep the nodes' data directories and logs (the path is printed) instead of removing them.
    #[arg(long)]
    keep: bool,
    /// Also write the figures and every failover round's time as JSON to this file (for
    /// `herald-bench report`).
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Instead of the scenario, the cost of traces: this many rounds of cross-node ack=none
    /// max-rate runs, each round alternating three clusters on free ports (tracing off; exporting
    /// to an in-bench OTLP sink that discards, sample ratio 1 %; the same at 100 %); prints each
    /// run and the median ratios.
    #[arg(long, default_value_t = 0)]
    tracing_rounds: usize,
}

/// Arguments of the peer scenarios (`nats`, `jetstream`).
#[derive(Args, Debug, Clone)]
struct PeerArgs {
    /// Runs per system and figure, alternating Herald and the peer (the median is reported).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=100))]
    runs: u64,
    /// Payload sizes in bytes (16, or 32 and more: the payload carries its publish time).
    #[arg(long, value_delimiter = ',', default_values_t = [16usize, 128, 1024])]
    sizes: Vec<usize>,
    /// Events per throughput run.
    #[arg(long, default_value_t = 200_000)]
    events: u64,
    /// Stop publishing a throughput run after this many seconds, even if not all events were sent.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Events per batch: per HTTP request to Herald, per flush (core) or per wait for the acks
    /// (JetStream) of a NATS publisher.
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// Concurrent publishers (HTTP connections to Herald; tasks on one NATS connection).
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Receivers: Herald handler instances, NATS queue subscribers / JetStream consumer clients;
    /// each on a node other than the publisher's.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=2))]
    instances: u32,
    /// Events/s of the paced latency runs.
    #[arg(long, default_value_t = 10_000)]
    latency_rate: u64,
    /// Seconds of each paced latency run.
    #[arg(long, default_value_t = 2)]
    latency_seconds: u64,
    /// NATS core: most events published and not yet received (core NATS has no backpressure;
    /// without a bound the server cuts a slow subscriber off).
    #[arg(long, default_value_t = 64_000)]
    window: u64,
    /// JetStream stream storage.
    #[arg(long, value_enum, default_value = "memory")]
    js_storage: JsStorage,
    /// WAL fsync policy of the Herald nodes (default: the node default, always).
    #[arg(long, value_enum)]
    wal_fsync: Option<FsyncPolicy>,
    /// The nats-server program (default: nats-server on PATH, or /usr/sbin/nats-server).
    #[arg(long)]
    nats_server: Option<std::path::PathBuf>,
    /// Herald's peer transport: mutual TLS (the default), plaintext (`--insecure-peers`), or both
    /// (two Herald clusters, alternating with NATS run by run; the table adds the plaintext
    /// figures and the mTLS/plaintext ratio).
    #[arg(long, value_enum, default_value = "mtls")]
    herald_peers: tls::HeraldPeers,
    /// Run NATS without TLS (by default its client connections and routes use TLS with
    /// certificates from Herald's CA, and clients present a certificate).
    #[arg(long)]
    nats_plaintext: bool,
    /// Also write the table's rows as JSON to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// A few seconds in all: 1 run, 16 B and 1 KiB, 5,000 events per run, 1 s latency runs.
    #[arg(long)]
    smoke: bool,
    /// Keep the data directories and logs (the paths are printed) instead of removing them.
    #[arg(long)]
    keep: bool,
}

/// JetStream storage of the benchmark stream.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum JsStorage {
    Memory,
    File,
}

#[derive(Args, Debug)]
struct MembershipArgs {
    /// Subscriptions created (each timed from the POST to its placement being in force).
    #[arg(long, default_value_t = 50)]
    subscriptions: usize,
    /// Nodes joined one after another (each timed from its start to its first placed instance).
    #[arg(long, default_value_t = 5)]
    joins: usize,
    /// Leaders killed with SIGKILL (each timed until the survivors agree on a new leader).
    #[arg(long, default_value_t = 5)]
    failovers: usize,
    /// HTTP port of node 1; node i uses base+i-1 and peer port base+100+i-1.
    #[arg(long, default_value_t = 7800)]
    base_port: u16,
    /// Also write every timing as JSON to this file (for `herald-bench report`).
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

#[derive(Args, Debug)]
struct LocalArgs {
    /// Events per run (the `send` row, which awaits each answer and runs some 50× slower, runs
    /// at most 200,000), published in 10 slices that take turns with the other rows' slices.
    /// Runs of the fast rows last about a second: at 200,000 events they lasted 0.1 to 0.3 s,
    /// and one invocation's runs of `do_send(Event)` spread over 5×.
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    /// Runs per figure (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Concurrent publishers for ack=accepted (each waits for its group commit).
    #[arg(long, default_value_t = 256)]
    publishers: usize,
    /// Events per publish call in the batched ack=accepted run (like one HTTP batch request).
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Handler instances of each benchmark subscription. One, like for like with the raw actix
    /// rows (one actor) and actix-broker's (its subscribers on one arbiter); with two, Herald's
    /// handlers run on two worker threads beside the publisher's, three busy threads on a 2-core
    /// machine.
    #[arg(long, default_value_t = 1)]
    instances: u32,
    /// WAL fsync policy for ack=accepted.
    #[arg(long, value_enum, default_value = "always")]
    wal_fsync: FsyncPolicy,
    /// Give up on a run after this many seconds.
    #[arg(long, default_value_t = 120)]
    max_seconds: u64,
    /// Also write every run's figures as JSON to this file (for `herald-bench report`).
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// A second or two: 20,000 events per run, 1 run, 32 publishers.
    #[arg(long)]
    smoke: bool,
    /// Install the Prometheus recorder, as `herald node` does (without it every metric call of
    /// the event path is a no-op, so the rows leave out what metrics cost a real node).
    #[arg(long)]
    prometheus: bool,
    /// Only these rows (for profiling one path, e.g. `--only none` under callgrind).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [LocalRow::Raw, LocalRow::RawEvent, LocalRow::RawSend, LocalRow::None, LocalRow::Emit, LocalRow::Accepted, LocalRow::Batch, LocalRow::Broker, LocalRow::EmitFanout, LocalRow::BrokerFanout])]
    only: Vec<LocalRow>,
}

/// The topic of `local`'s fan-out rows (three subscriptions).
const FANOUT_TOPIC: &str = "bench.fanout";

/// A row of `herald-bench local`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum LocalRow {
    /// Raw actix `do_send` of an empty message.
    Raw,
    /// Raw actix `do_send` of a clone of the benchmark event (the payload Herald's rows carry).
    RawEvent,
    /// Raw actix `send` of a clone of the event, awaiting each answer before the next (a
    /// request/response per event, without a supervisor, mailbox bound or completion tracking).
    RawSend,
    /// `ack=none`, one event per publish call.
    None,
    /// `Publisher::emit`: `ack=none` answering only accepted or refused, one event per call.
    Emit,
    /// `ack=accepted`, one event per call, concurrent publishers.
    Accepted,
    /// `ack=accepted`, batched calls.
    Batch,
    /// `actix-broker`: one subscriber actor of the system broker.
    Broker,
    /// `Publisher::emit` (`ack=none`, no answer), one event per call to a topic of three
    /// subscriptions.
    EmitFanout,
    /// `actix-broker`: three subscriber actors of one message type.
    BrokerFanout,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `node` is a node: it installs logging from its own configuration.
    if !matches!(cli.scenario, Scenario::Node(_)) {
        herald::cli::init_logging(LogFormat::Text);
    }
    let outcome = match cli.scenario {
        Scenario::Local(a) => actix_rt::System::new().block_on(local(a)),
        Scenario::Membership(a) => membership(a),
        Scenario::Cluster(a) => cluster::run(a),
        Scenario::Nats(a) => nats::run(a, nats::Mode::Core),
        Scenario::Jetstream(a) => nats::run(a, nats::Mode::JetStream),
        Scenario::Http(a) => http::run(a),
        Scenario::BareHttp(a) => http::bare_http(a),
        Scenario::Soak(a) => soak::run(a),
        Scenario::Scale(a) => scale::run(a),
        Scenario::Memory(a) => memory::run(a),
        Scenario::Stalls(a) => stalls::run(a),
        Scenario::Report(a) => report::run(a),
        // The built-in handler kinds, as in the `herald` binary; `node` adds `bench-sink`.
        Scenario::Node(a) => cluster::node(a, Node::builder()),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("herald-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Counts handled events and wakes the benchmark when a target is reached.
struct Tally {
    seen: AtomicU64,
    target: AtomicU64,
    done: Notify,
}

impl Tally {
    fn hit(&self) {
        let n = self.seen.fetch_add(1, Ordering::Relaxed) + 1;
        if n == self.target.load(Ordering::Relaxed) {
            self.done.notify_one();
        }
    }

    async fn reset_and_wait(&self, target: u64, max: Duration, start: impl FnOnce()) -> Result<(), String> {
        self.seen.store(0, Ordering::SeqCst);
        self.target.store(target, Ordering::SeqCst);
        let notified = self.done.notified();
        start();
        tokio::time::timeout(max, notified).await.map_err(|_| {
            format!(
                "only {} of {target} events were handled within {max:?}",
                self.seen.load(Ordering::Relaxed)
            )
        })
    }
}

struct NoOp(Arc<Tally>);

impl Actor for NoOp {
    type Context = Context<Self>;
}

impl Handler<Delivery> for NoOp {
    type Result = HandlerResult;
    fn handle(&mut self, _: Delivery, _: &mut Context<Self>) -> HandlerResult {
        self.0.hit();
        Ok(())
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct Ping;

struct RawNoOp(Arc<Tally>);

impl Actor for RawNoOp {
    type Context = Context<Self>;
}

/// The benchmark event, carried as a plain actix message.
#[derive(Message)]
#[rtype(result = "()")]
struct Carry(#[allow(dead_code)] Event);

impl Handler<Carry> for RawNoOp {
    type Result = ();
    fn handle(&mut self, _: Carry, _: &mut Context<Self>) {
        self.0.hit();
    }
}

/// The benchmark event as an `actix-broker` message; `N` tells the one-subscriber run from the
/// fan-out run (the broker keeps its subscribers per message type).
#[derive(Clone)]
struct Issued<const N: usize>(#[allow(dead_code)] Event);

impl<const N: usize> Message for Issued<N> {
    type Result = ();
}

/// A no-op subscriber of the system broker, subscribed to `Issued<N>` before it handles any
/// message (so a `Ready` answered means its subscription is in the broker's mailbox, ahead of
/// anything issued after).
struct BrokerSub<const N: usize>(Arc<Tally>);

impl<const N: usize> Actor for BrokerSub<N> {
    type Context = Context<Self>;
    fn started(&mut self, ctx: &mut Context<Self>) {
        self.subscribe_system_async::<Issued<N>>(ctx);
    }
}

impl<const N: usize> Handler<Issued<N>> for BrokerSub<N> {
    type Result = ();
    fn handle(&mut self, _: Issued<N>, _: &mut Context<Self>) {
        self.0.hit();
    }
}

impl<const N: usize> Handler<Ping> for BrokerSub<N> {
    type Result = ();
    fn handle(&mut self, _: Ping, _: &mut Context<Self>) {}
}

/// Starts `N` no-op subscribers of the system broker on `arbiter`, each subscribed before this
/// returns.
async fn broker_subscribers<const N: usize>(tally: &Arc<Tally>, arbiter: &ArbiterHandle) -> Result<(), String> {
    for _ in 0..N {
        let t = tally.clone();
        let sub = BrokerSub::<N>::start_in_arbiter(arbiter, move |_| BrokerSub(t));
        sub.send(Ping).await.map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Raw actix `do_send`, `events` times from this task: events handled per second.
async fn do_send_run(tally: &Tally, events: u64, max: Duration, send: impl Fn()) -> Result<f64, String> {
    let started = Instant::now();
    tally
        .reset_and_wait(events, max, || {
            for _ in 0..events {
                send();
            }
        })
        .await?;
    Ok(events as f64 / started.elapsed().as_secs_f64())
}

/// One run of `actix-broker` to its `N` subscribers: issues `events` clones of `payload` through
/// the system broker (`Broker::issue_async`, as code outside an actor does) and lasts until every
/// subscriber has handled every event; events/s.
async fn broker_run<const N: usize>(tally: &Tally, payload: &Event, events: u64, max: Duration) -> Result<f64, String> {
    let started = Instant::now();
    tally
        .reset_and_wait(events * N as u64, max, || {
            for _ in 0..events {
                Broker::<SystemBroker>::issue_async(Issued::<N>(payload.clone()));
            }
        })
        .await?;
    Ok(events as f64 / started.elapsed().as_secs_f64())
}

impl Handler<Ping> for RawNoOp {
    type Result = ();
    fn handle(&mut self, _: Ping, _: &mut Context<Self>) {
        self.0.hit();
    }
}

fn median(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

/// Publishes the events `make` builds, again (freshly built) while the node answers Overloaded.
/// `make` runs once per attempt: the publisher owns each event it hands over, as a caller that
/// builds its events would, and keeps no spare copy for a retry that is usually not needed.
async fn publish_until_accepted(
    publisher: &Publisher,
    make: impl Fn() -> Vec<Event>,
    ack: AckMode,
) -> Result<(), String> {
    loop {
        match publisher.publish_batch(make(), ack).await {
            Ok(_) => return Ok(()),
            // Full mailboxes: the handlers are behind; let them run and retry (closed loop).
            Err(PublishError::Overloaded(_)) => make_room().await,
            Err(other) => return Err(other.to_string()),
        }
    }
}

/// What a publisher refused with `Overloaded` does before it tries again: gives its core away
/// (`sched_yield`), then lets its runtime's other tasks run. Yielding only to the runtime keeps
/// the core: when the handlers' worker thread shares it (one CPU, or both threads put on one by
/// the scheduler) the handlers cannot run until the publisher's time slice ends. Pinned to one
/// CPU (`taskset -c 0`), `emit` ran 0.76M events/s with the runtime's yield alone and 2.3M with
/// this, against 4.1M and 4.8M for raw actix's `do_send` (whose mailbox never refuses).
async fn make_room() {
    std::thread::yield_now();
    tokio::task::yield_now().await;
}

/// Emits a clone of `event` (a fresh copy per attempt, as `publish_until_accepted` builds one),
/// again while the node answers Overloaded.
async fn emit_until_accepted(publisher: &Publisher, event: &Event) -> Result<(), String> {
    loop {
        match publisher.emit(event.clone()) {
            Ok(()) => return Ok(()),
            Err(PublishError::Overloaded(_)) => make_room().await,
            Err(other) => return Err(other.to_string()),
        }
    }
}

/// The events [`publish_concurrently`] publishes for `events`: whole calls of `batch` by each of
/// `publishers`, at least one each.
fn concurrent_total(events: u64, publishers: usize, batch: usize) -> u64 {
    (events / (publishers * batch) as u64).max(1) * (publishers * batch) as u64
}

/// `publishers` concurrent tasks publish `events` in calls of `batch` with `ack=accepted`; events/s
/// until the handler has seen them all.
async fn publish_concurrently(
    publisher: &Publisher,
    tally: &Tally,
    payload: &Event,
    events: u64,
    publishers: usize,
    batch: usize,
    max: Duration,
) -> Result<f64, String> {
    let total = concurrent_total(events, publishers, batch);
    let calls = total / (publishers * batch) as u64;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..publishers {
        let ing = publisher.clone();
        let payload = payload.clone();
        tasks.push(actix_rt::spawn(async move {
            // A fresh id per event, as every real publish has: the hosting node de-duplicates
            // `(subscription, event id)` for acknowledged publishes (README "Idempotency"), so
            // copies of one event would be handled once.
            let fresh = || {
                (0..batch)
                    .map(|_| {
                        let mut e = payload.clone();
                        e.id = herald::event::new_id().into();
                        e
                    })
                    .collect()
            };
            for _ in 0..calls {
                publish_until_accepted(&ing, fresh, AckMode::Accepted).await?;
            }
            Ok::<(), String>(())
        }));
    }
    tally.reset_and_wait(total, max, || {}).await?;
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

/// Slices of each `local` run (see the loop in [`local`]).
const SLICES: u64 = 10;

/// Most events of one run of the `send` row (each answer awaited: some 20,000 a second).
const ANSWERED_EVENTS: u64 = 200_000;

async fn local(mut a: LocalArgs) -> Result<(), String> {
    if a.smoke {
        a.events = a.events.min(20_000);
        a.runs = 1;
        a.publishers = a.publishers.min(32);
    }
    if a.events == 0 || a.runs == 0 || a.publishers == 0 || a.batch == 0 {
        return Err("--events, --runs, --publishers and --batch must be positive".into());
    }
    let max = Duration::from_secs(a.max_seconds);
    if a.prometheus {
        herald::metrics::install_prometheus();
    }
    let dir = std::env::temp_dir().join(format!("herald-bench-{}", std::process::id()));
    let tally = Arc::new(Tally {
        seen: AtomicU64::new(0),
        target: AtomicU64::new(u64::MAX),
        done: Notify::new(),
    });
    let mut config = Config::default();
    config.http.addr = "127.0.0.1:0".into();
    config.data_dir = dir.clone();
    config.wal.fsync = a.wal_fsync;
    // One node, in this process: no peers to protect.
    config.peer_tls.insecure = true;
    let t = tally.clone();
    let node = Node::builder()
        .config(config)
        .handler("noop", move || NoOp(t.clone()))
        .subscription(SubscriptionSpec::rust("bench", "noop", "noop").instances(a.instances))
        // The fan-out rows' topic: three subscriptions (groups), each handling every event.
        .subscription(SubscriptionSpec::rust(FANOUT_TOPIC, "fan-a", "noop").instances(a.instances))
        .subscription(SubscriptionSpec::rust(FANOUT_TOPIC, "fan-b", "noop").instances(a.instances))
        .subscription(SubscriptionSpec::rust(FANOUT_TOPIC, "fan-c", "noop").instances(a.instances))
        .start()
        .await
        .map_err(|e| e.to_string())?;
    node.ready().await;
    // What an application publishes through (it holds nothing of the node alive).
    let publisher = node.publisher();
    let body = serde_json::json!({"user_id": 1, "username": "bench"});
    let payload = Event::json("bench", &body).map_err(|e| e.to_string())?;
    let fanout = Event::json(FANOUT_TOPIC, &body).map_err(|e| e.to_string())?;
    println!(
        "herald-bench local: {} events per run ({} for the send row), {} runs, {} instances, wal.fsync={:?}, metrics {}",
        a.events,
        a.events.min(ANSWERED_EVENTS),
        a.runs,
        a.instances,
        a.wal_fsync,
        if a.prometheus {
            "recorded (Prometheus)"
        } else {
            "not recorded"
        }
    );

    // The rows take turns (each slice of a round runs every row once, in this order), so a drift
    // of the machine's speed during the invocation moves Herald and its peers alike: run `i` of
    // a row and run `i` of its peer are interleaved.
    let order = [
        LocalRow::Raw,
        LocalRow::RawEvent,
        LocalRow::RawSend,
        LocalRow::Broker,
        LocalRow::BrokerFanout,
        LocalRow::None,
        LocalRow::Emit,
        LocalRow::EmitFanout,
        LocalRow::Accepted,
        LocalRow::Batch,
    ];
    let selected: Vec<LocalRow> = order.into_iter().filter(|r| a.only.contains(r)).collect();
    // Raw actix: do_send from one task to one no-op actor on another thread; actix-broker's
    // subscribers on the same arbiter, the broker on the system arbiter (where `SystemBroker`
    // runs), as the publisher.
    let arbiter = Arbiter::new();
    let t = tally.clone();
    let addr = RawNoOp::start_in_arbiter(&arbiter.handle(), move |_| RawNoOp(t));
    if selected.contains(&LocalRow::Broker) {
        broker_subscribers::<1>(&tally, &arbiter.handle()).await?;
    }
    if selected.contains(&LocalRow::BrokerFanout) {
        broker_subscribers::<3>(&tally, &arbiter.handle()).await?;
    }
    // Herald `ack=none`, one event per call from one task (`publish`, whose answer is the
    // event's id, topic and subscription count; or `emit`, accepted or refused only);
    // `subscriptions` is how many subscriptions the event's topic has (each handles every event).
    let publish_run = |event: &Event, subscriptions: u64, emit: bool, events: u64| {
        let (ing, ev, tally) = (publisher.clone(), event.clone(), tally.clone());
        async move {
            let started = Instant::now();
            let publisher = actix_rt::spawn(async move {
                for _ in 0..events {
                    if emit {
                        emit_until_accepted(&ing, &ev).await?;
                    } else {
                        publish_until_accepted(&ing, || vec![ev.clone()], AckMode::None).await?;
                    }
                }
                Ok::<(), String>(())
            });
            tally.reset_and_wait(events * subscriptions, max, || {}).await?;
            publisher.await.map_err(|e| e.to_string())??;
            Ok::<f64, String>(events as f64 / started.elapsed().as_secs_f64())
        }
    };
    let mut figures: std::collections::HashMap<LocalRow, Vec<f64>> = Default::default();
    // Each run is made of `SLICES` slices, and the rows take turns slice by slice: this machine
    // flips between a fast and a slow mode for seconds at a time (the publisher and the handler
    // on two cores, or sharing one), so whole runs in turn still paired a fast run of one row
    // with a slow run of its peer (ratios of 0.2 and 2.6 in one invocation); slices in turn give
    // both rows the same mix of modes.
    let slices = if a.smoke { 1 } else { SLICES.min(a.events) };
    for _ in 0..a.runs {
        let mut seconds: std::collections::HashMap<LocalRow, f64> = Default::default();
        let mut counted: std::collections::HashMap<LocalRow, u64> = Default::default();
        for slice in 0..slices {
            for &row in &selected {
                // This slice's share of the run's events (the last slice takes the remainder).
                let share = |total: u64| {
                    let per = total / slices;
                    if slice + 1 == slices {
                        total - per * (slices - 1)
                    } else {
                        per
                    }
                };
                let events = share(a.events);
                let per_second = match row {
                    LocalRow::Raw => do_send_run(&tally, events, max, || addr.do_send(Ping)).await?,
                    LocalRow::RawEvent => {
                        do_send_run(&tally, events, max, || addr.do_send(Carry(payload.clone()))).await?
                    }
                    LocalRow::RawSend => {
                        let events = share(a.events.min(ANSWERED_EVENTS));
                        let started = Instant::now();
                        let (to, ev) = (addr.clone(), payload.clone());
                        let sender = actix_rt::spawn(async move {
                            for _ in 0..events {
                                to.send(Carry(ev.clone())).await.map_err(|e| e.to_string())?;
                            }
                            Ok::<(), String>(())
                        });
                        tally.reset_and_wait(events, max, || {}).await?;
                        sender.await.map_err(|e| e.to_string())??;
                        events as f64 / started.elapsed().as_secs_f64()
                    }
                    LocalRow::Broker => broker_run::<1>(&tally, &payload, events, max).await?,
                    LocalRow::BrokerFanout => broker_run::<3>(&tally, &payload, events, max).await?,
                    LocalRow::None => publish_run(&payload, 1, false, events).await?,
                    LocalRow::Emit => publish_run(&payload, 1, true, events).await?,
                    LocalRow::EmitFanout => publish_run(&fanout, 3, true, events).await?,
                    LocalRow::Accepted => {
                        publish_concurrently(&publisher, &tally, &payload, events, a.publishers, 1, max).await?
                    }
                    LocalRow::Batch => {
                        publish_concurrently(&publisher, &tally, &payload, events, a.publishers.min(16), a.batch, max)
                            .await?
                    }
                };
                // Events this slice counted (the ack=accepted rows publish whole calls).
                let n = match row {
                    LocalRow::RawSend => share(a.events.min(ANSWERED_EVENTS)),
                    LocalRow::Accepted => concurrent_total(events, a.publishers, 1),
                    LocalRow::Batch => concurrent_total(events, a.publishers.min(16), a.batch),
                    _ => events,
                };
                *seconds.entry(row).or_default() += n as f64 / per_second;
                *counted.entry(row).or_default() += n;
            }
        }
        for &row in &selected {
            figures
                .entry(row)
                .or_default()
                .push(counted[&row] as f64 / seconds[&row]);
        }
    }
    arbiter.stop();
    // Each row's runs, in `order`'s order (empty for a row not selected).
    let [raw, raw_event, raw_send, broker, broker_fanout, none, emitted, emitted_fanout, accepted, batched] =
        order.map(|row| figures.remove(&row).unwrap_or_default());
    node.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);

    let json_rows = a.json.as_ref().map(|_| {
        // Raw actix is the peer of the like-for-like row (at most once, one event per call), in
        // its three forms; the acked rows wait for the WAL and stand alone.
        let row = |mode: &str, case: &str, runs: &[f64], peer: &[f64]| {
            let peer = (!peer.is_empty()).then_some(("raw actix", peer));
            record::row("local", mode, case, "events_per_second", true, runs, peer)
        };
        vec![
            row(
                "ack=none",
                "1 event per publish vs do_send() of an empty message",
                &none,
                &raw,
            ),
            row("ack=none", "1 event per emit vs do_send(Event)", &emitted, &raw_event),
            row("ack=none", "1 event per publish vs do_send(Event)", &none, &raw_event),
            row(
                "ack=none",
                "1 event per publish vs send(Event), each answer awaited",
                &none,
                &raw_send,
            ),
            row(
                "ack=none",
                "1 event per emit vs actix-broker, 1 subscriber",
                &emitted,
                &broker,
            ),
            row(
                "ack=none",
                "1 event per emit to 3 subscriptions vs actix-broker, 3 subscribers",
                &emitted_fanout,
                &broker_fanout,
            ),
            row(
                "ack=accepted",
                &format!("1 event per publish, {} publishers", a.publishers),
                &accepted,
                &[],
            ),
            row(
                "ack=accepted",
                &format!("{} events per publish", a.batch),
                &batched,
                &[],
            ),
        ]
        .into_iter()
        .filter(|r| r["herald"]["median"].is_number())
        .collect::<Vec<_>>()
    });
    let raw_median = (!raw.is_empty()).then(|| median(raw.clone()).0);
    let rows = [
        ("raw actix do_send".to_string(), raw),
        ("raw actix do_send(Event)".to_string(), raw_event),
        ("raw actix send(Event), awaited".to_string(), raw_send),
        ("actix-broker, 1 subscriber".to_string(), broker),
        ("actix-broker, 3 subscribers".to_string(), broker_fanout),
        ("herald ack=none".to_string(), none),
        ("herald emit".to_string(), emitted),
        ("herald emit, 3 subs".to_string(), emitted_fanout),
        (format!("herald ack=accepted x{}", a.publishers), accepted),
        (format!("herald ack=accepted batch {}", a.batch), batched),
    ];
    println!(
        "\n{:<30} {:>12} {:>12} {:>12} {:>8}",
        "scenario", "median ev/s", "min ev/s", "max ev/s", "vs raw"
    );
    for (name, runs) in rows.into_iter().filter(|(_, runs)| !runs.is_empty()) {
        let (m, lo, hi) = median(runs);
        let ratio = raw_median.map_or_else(|| "-".to_string(), |r| format!("{:.2}x", m / r));
        println!("{name:<30} {m:>12.0} {lo:>12.0} {hi:>12.0} {ratio:>8}");
    }
    if let (Some(path), Some(rows)) = (&a.json, json_rows) {
        let meta = serde_json::json!({
            "command": "herald-bench local",
            "time": chrono::Utc::now().to_rfc3339(),
            "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
            "runs": a.runs,
            "events": a.events,
            "instances": a.instances,
            "wal_fsync": format!("{:?}", a.wal_fsync).to_lowercase(),
            "smoke": a.smoke,
        });
        record::write(path, meta, rows)?;
    }
    Ok(())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn latency_row(name: &str, mut ms: Vec<f64>) -> String {
    ms.sort_by(|a, b| a.total_cmp(b));
    format!(
        "{name:<40} {:>6} {:>10.1} {:>10.1} {:>10.1}",
        ms.len(),
        percentile(&ms, 0.5),
        percentile(&ms, 0.99),
        ms.last().copied().unwrap_or(f64::NAN)
    )
}

fn membership(a: MembershipArgs) -> Result<(), String> {
    use herald::harness::{Harness, NodeSpec, Ports};
    /// How long a node gets to stop after SIGTERM.
    const GRACE: Duration = Duration::from_secs(15);
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut h = Harness::temporary(exe, "herald-bench-membership")?.progress(true);
    let ports = Ports::Base(a.base_port);
    h.start_cluster(3, &ports)?;
    let http = |id: u64| ports.of(id).map(|(http, _)| http).unwrap_or_default();
    let outcome = actix_rt::System::new().block_on(async {
        h.wait_ready(Duration::from_secs(60)).await?;
        // A connection that a node closed while it stopped must not be reused (see node_client).
        let client = cluster::node_client(Duration::from_secs(30), cluster::CONNECTIONS);
        let get = |url: String| {
            let client = client.clone();
            async move {
                let mut r = client.get(&url).send().await.map_err(|e| format!("GET {url}: {e}"))?;
                r.json::<serde_json::Value>()
                    .limit(16 << 20)
                    .await
                    .map_err(|e| format!("GET {url}: {e}"))
            }
        };
        println!("herald-bench membership: 3-node cluster on loopback ({})", h.dir().display());
        // Subscribe → placed, through a follower half of the time.
        let mut subscribe = Vec::new();
        for i in 0..a.subscriptions {
            let target = http(1 + (i % 3) as u64);
            let spec = serde_json::json!({"topic": format!("bench.t{i}"), "group": "g", "handler": {"kind": "log"}, "instances": 1});
            let t0 = Instant::now();
            let r = client
                .post(format!("http://{target}/v1/subscriptions"))
                .send_json(&spec)
                .await
                .map_err(|e| e.to_string())?;
            if !r.status().is_success() {
                return Err(format!("subscribe answered {}", r.status()));
            }
            subscribe.push(t0.elapsed().as_secs_f64() * 1000.0);
        }
        // Join → first placed instance on the new node.
        let mut joins = Vec::new();
        for j in 0..a.joins {
            let id = 4 + j as u64;
            let t0 = Instant::now();
            let (node_http, peer) = ports.of(id)?;
            h.start(NodeSpec {
                id,
                http: node_http,
                peer,
                join: vec![ports.of(1)?.1],
                args: Vec::new(),
            })?;
            let placed = loop {
                let p = get(format!("http://{}/v1/cluster/placements", http(1))).await?;
                let on_new = p
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|s| s["nodes"].as_array().into_iter().flatten().any(|n| n == id));
                if on_new {
                    break t0.elapsed();
                }
                if t0.elapsed() > Duration::from_secs(30) {
                    return Err(format!("node {id} got no instance within 30 s"));
                }
                actix_rt::time::sleep(Duration::from_millis(5)).await;
            };
            joins.push(placed.as_secs_f64() * 1000.0);
            let _ = client
                // It still runs (stopped next): removing a running node needs force.
                .delete(format!("http://{}/v1/cluster/nodes/{id}?force=true", http(1)))
                .send()
                .await;
            h.stop(id, GRACE).await?;
        }
        // Leader failover.
        let mut failovers = Vec::new();
        for _ in 0..a.failovers {
            let old = h.leader().await?;
            let (leader, old_term) = (old.id, old.term);
            h.kill(leader)?;
            let t0 = Instant::now();
            loop {
                let mut leaders = Vec::new();
                for n in h.nodes().iter().filter(|n| n.running()) {
                    if let Ok(v) = get(format!("{}/v1/cluster", n.url())).await {
                        if v["term"].as_u64().unwrap_or(0) > old_term {
                            leaders.push(v["leader"].as_u64());
                        }
                    }
                }
                if leaders.len() == 2 && leaders[0].is_some() && leaders[0] == leaders[1] && leaders[0] != Some(leader) {
                    break;
                }
                if t0.elapsed() > Duration::from_secs(30) {
                    return Err("no new leader within 30 s".into());
                }
                actix_rt::time::sleep(Duration::from_millis(5)).await;
            }
            failovers.push(t0.elapsed().as_secs_f64() * 1000.0);
            h.restart(leader)?;
            h.wait_ready(Duration::from_secs(60)).await?;
        }
        println!("\n{:<40} {:>6} {:>10} {:>10} {:>10}", "scenario", "n", "p50 ms", "p99 ms", "max ms");
        let (subscribe_ms, joins_ms) = (subscribe.clone(), joins.clone());
        println!("{}", latency_row("subscribe -> placed (HTTP)", subscribe));
        println!("{}", latency_row("join -> placed", joins));
        println!("{}", latency_row("leader kill -> new leader", failovers.clone()));
        if let Some(path) = &a.json {
            let row = |case: &str, ms: &[f64]| record::row("membership", "", case, "samples_ms", false, ms, None);
            let meta = serde_json::json!({
                "command": "herald-bench membership",
                "time": chrono::Utc::now().to_rfc3339(),
                "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
                "subscriptions": a.subscriptions,
                "joins": a.joins,
                "failovers": a.failovers,
            });
            let rows = vec![
                row("subscribe -> placed (HTTP)", &subscribe_ms),
                row("join -> placed", &joins_ms),
                row("leader kill -> new leader", &failovers),
            ];
            record::write(path, meta, rows)?;
        }
        Ok(())
    });
    if outcome.is_err() {
        h.print_logs(15);
    }
    outcome
}

mod cluster;
mod compare;
mod http;
mod memory;
mod nats;
mod plot;
mod record;
mod report;
mod scale;
mod soak;
mod stalls;
mod tls;
