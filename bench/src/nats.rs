//! `herald-bench nats` and `herald-bench jetstream`: Herald next to NATS, measured in the same
//! run, alternating run by run (Herald first in odd runs, NATS first in even ones), with a table
//! of medians, ranges and Herald/NATS ratios (see `compare.rs`).
//!
//! The layout mirrors `herald-bench cluster`. Herald: three `herald-bench node` processes on
//! 127.0.0.1; the publisher posts HTTP batches to a node that runs no instance of the
//! subscription, and the `bench-sink` handlers run on the two other nodes, so every event crosses
//! the peer transport. NATS: three `nats-server` processes in one cluster routed over 127.0.0.1
//! (each routes to the two others, a full mesh like Herald's); the publisher connects to server
//! 1, and one receiver connects to each of servers 2 and 3, so every message crosses a route. A
//! 3-server cluster rather than 2 because Herald's benchmark runs 3 nodes, and its receivers sit
//! on the two nodes that are not the ingress.
//!
//! * `nats` (at-most-once): Herald `ack=none` vs NATS core publish. The two receivers are one
//!   queue group (each message to one of them, like the two instances of one Herald
//!   subscription). Publishers mirror Herald's HTTP batches: `--connections` tasks on one NATS
//!   connection each publish `--batch` messages and flush. Core NATS has no backpressure (a
//!   subscriber that falls behind is cut off by the server), so a publisher also waits while more
//!   than `--window` messages are published and not yet received; Herald's publisher is held back
//!   by its bounded mailboxes (429 answers) instead.
//! * `jetstream` (at-least-once): Herald `ack=accepted` (the ingress node's answer means the
//!   batch is in its WAL, on that one node) vs a JetStream stream with **one replica**, placed on
//!   server 1 (the publisher's, by a server tag): the ack also means one server holds it, and no
//!   replication. Storage `--js-storage memory` (default, as asked by the issue: no disk) or
//!   `file`; Herald's WAL fsyncs by default (`--wal-fsync never` for a like-for-like memory
//!   comparison of the protocol work). Work-queue retention (acked messages are removed, as Herald
//!   drops acked events from its WAL). Publishers send `--batch` messages with `publish` and then
//!   await all their acks; receivers share one durable pull consumer (explicit acks, up to 20,000
//!   unacked) and ack each message after recording it, as a Herald handler returns Ok.
//!
//! TLS: Herald's peers talk mutual TLS 1.3 (`--herald-peers mtls`, the default; checked from the
//! nodes' logs and certificate files), and NATS's client connections and routes talk TLS with
//! `verify: true`, with certificates issued by the Herald cluster's CA (see `tls.rs`); the NATS
//! clients present one. `--herald-peers both` adds a second Herald cluster with plaintext peers:
//! the three systems then take turns going first (see `order`), and the rows carry the
//! plaintext figures and the mTLS/plaintext ratio. `--nats-plaintext` runs NATS without TLS.
//!
//! Both systems carry the same payload bytes: exactly `size` bytes of JSON that hold the publish
//! time (see `cluster::payload`); both receivers record publish → receive latency in the same fine
//! buckets, and events/s is received / (last received − publish start). Latency percentiles come
//! from separate paced runs (`--latency-rate` events/s, a batch every 10 ms on both sides).

use super::PeerArgs;

/// Which comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Mode {
    /// Herald `ack=none` vs NATS core pub/sub.
    Core,
    /// Herald `ack=accepted` vs NATS JetStream.
    JetStream,
}

impl Mode {
    fn command(self) -> &'static str {
        match self {
            Mode::Core => "nats",
            Mode::JetStream => "jetstream",
        }
    }
}

/// Runs `herald-bench nats` or `herald-bench jetstream`.
pub(super) fn run(mut a: PeerArgs, mode: Mode) -> Result<(), String> {
    if a.smoke {
        a.runs = 1;
        a.sizes = vec![16, 1024];
        a.events = a.events.min(5_000);
        a.seconds = a.seconds.min(10);
        a.latency_rate = a.latency_rate.min(2_000);
        a.latency_seconds = 1;
    }
    if a.sizes.is_empty() {
        return Err("--sizes needs at least one payload size".into());
    }
    if let Some(bad) = a.sizes.iter().find(|s| !super::cluster::payload_size_ok(**s)) {
        return Err(format!(
            "payload size {bad} B: use 16, or 32 and more (the payload holds its publish time)"
        ));
    }
    if !(1..=1000).contains(&a.batch) {
        return Err("--batch must be 1 to 1000 (the nodes' http.max_batch_events)".into());
    }
    if a.connections == 0 || a.events == 0 || a.latency_rate == 0 || a.seconds == 0 || a.window == 0 {
        return Err("--connections, --events, --seconds, --latency-rate and --window must be positive".into());
    }
    imp::run(a, mode)
}

pub(super) use imp::find_server;

mod imp {
    use std::cell::{Cell, RefCell};
    use std::fs::File;
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::rc::Rc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use async_nats::jetstream;
    use bytes::Bytes;
    use futures_util::StreamExt;
    use serde_json::json;

    use super::super::cluster::{
        check_peers, free_ports, latency_buckets, measure_with, payload, prepare, start_on_free_ports, unix_nanos,
        Body, Cluster, Run, Sent, Sink, Sinks, Target, LOG_TAIL,
    };
    use super::super::compare::{self, fmt_size, Metric, Row};
    use super::super::stalls;
    use super::super::tls::{self, nats_tls_block, TlsFiles};
    use super::super::{JsStorage, PeerArgs};
    use super::Mode;
    use herald::config::FsyncPolicy;

    const SUBJECT_CORE: &str = "bench.nats";
    const SUBJECT_JS: &str = "bench.js";
    const STREAM: &str = "HERALD_BENCH";
    const CONSUMER: &str = "sink";
    const QUEUE: &str = "sink";
    /// Unacked messages a JetStream consumer may have out (the server default, 1,000, would
    /// throttle the consumer well below what the publishers send).
    const MAX_ACK_PENDING: i64 = 20_000;
    /// Batches a paced JetStream publisher awaits the acks of at most (Herald's paced publisher
    /// has as many HTTP requests in flight at most).
    const MAX_INFLIGHT: usize = 32;

    /// The configuration of server `i` (1-based) of 3: client port, route ports of all three,
    /// a JetStream store directory when JetStream is on, and the server's TLS files when TLS is
    /// on (then clients and routes both talk TLS and must present a certificate of the CA).
    pub(super) fn server_config(
        i: usize,
        client_port: u16,
        route_ports: &[u16],
        store: Option<&Path>,
        tls: Option<&TlsFiles>,
    ) -> String {
        let routes: Vec<String> = route_ports
            .iter()
            .enumerate()
            .filter(|(j, _)| j + 1 != i)
            .map(|(_, p)| format!("\"nats-route://127.0.0.1:{p}\""))
            .collect();
        let mut s = format!(
            "server_name: \"herald-bench-n{i}\"\nlisten: \"127.0.0.1:{client_port}\"\n\
             server_tags: [\"n{i}\"]\n{}\
             cluster {{\n  name: \"herald-bench\"\n  listen: \"127.0.0.1:{}\"\n  routes: [{}]\n{}}}\n",
            tls.map(|f| nats_tls_block(0, f)).unwrap_or_default(),
            route_ports[i - 1],
            routes.join(", "),
            tls.map(|f| nats_tls_block(2, f)).unwrap_or_default(),
        );
        if let Some(dir) = store {
            s.push_str(&format!(
                "jetstream {{\n  store_dir: \"{}\"\n  max_memory_store: 4294967296\n  max_file_store: 4294967296\n}}\n",
                dir.display()
            ));
        }
        s
    }

    /// The nats-server program: `--nats-server`, else on PATH, else Debian's /usr/sbin.
    pub(crate) fn find_server(given: Option<&Path>) -> Result<PathBuf, String> {
        if let Some(p) = given {
            return Ok(p.to_path_buf());
        }
        let on_path = std::env::var_os("PATH")
            .map(|p| {
                std::env::split_paths(&p)
                    .map(|d| d.join("nats-server"))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        on_path
            .into_iter()
            .chain(["/usr/sbin/nats-server".into(), "/usr/local/bin/nats-server".into()])
            .find(|p| p.is_file())
            .ok_or_else(|| {
                "nats-server was not found: install it (Debian: apt-get install nats-server) or pass --nats-server PATH"
                    .to_string()
            })
    }

    /// Three nats-server processes. Dropping it SIGKILLs each (by its pid) and removes the directory.
    struct NatsCluster {
        dir: PathBuf,
        keep: bool,
        client_ports: Vec<u16>,
        procs: Vec<(Child, PathBuf)>,
        /// The benchmark client's TLS identity, when the servers talk TLS.
        client_tls: Option<TlsFiles>,
    }

    impl NatsCluster {
        /// With `ca`, TLS on the client connections and the routes, with certificates it issues.
        fn start(
            program: &Path,
            jetstream: bool,
            ca: Option<&herald::pki::Ca>,
            keep: bool,
        ) -> Result<NatsCluster, String> {
            let ports = free_ports(6)?;
            // Not `herald-bench-nats-<pid>-<n>`: that is the Herald cluster's directory of `bench nats`,
            // and each start empties its own directory.
            let dir = std::env::temp_dir().join(format!("herald-bench-nats-servers-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            let mut c = NatsCluster {
                dir,
                keep,
                client_ports: ports[..3].to_vec(),
                procs: Vec::new(),
                client_tls: None,
            };
            let server_tls = match ca {
                Some(ca) => {
                    let (servers, client) = tls::issue_nats(ca, &c.dir.join("tls"), 3)?;
                    c.client_tls = Some(client);
                    servers.into_iter().map(Some).collect()
                }
                None => vec![None; 3],
            };
            for i in 1..=3 {
                let store = c.dir.join(format!("js-{i}"));
                let conf = c.dir.join(format!("n{i}.conf"));
                let text = server_config(
                    i,
                    ports[i - 1],
                    &ports[3..],
                    jetstream.then_some(store.as_path()),
                    server_tls[i - 1].as_ref(),
                );
                std::fs::write(&conf, text).map_err(|e| format!("cannot write {}: {e}", conf.display()))?;
                let log = c.dir.join(format!("n{i}.log"));
                let out = File::create(&log).map_err(|e| format!("cannot create {}: {e}", log.display()))?;
                let err = out.try_clone().map_err(|e| e.to_string())?;
                let child = Command::new(program)
                    .arg("-c")
                    .arg(&conf)
                    .stdin(Stdio::null())
                    .stdout(out)
                    .stderr(err)
                    .spawn()
                    .map_err(|e| format!("cannot start {}: {e}", program.display()))?;
                c.procs.push((child, log));
            }
            Ok(c)
        }

        fn url(&self, i: usize) -> String {
            format!("nats://127.0.0.1:{}", self.client_ports[i - 1])
        }

        fn log_tails(&self) -> String {
            let mut out = String::new();
            for (i, (_, log)) in self.procs.iter().enumerate() {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                out.push_str(&format!("--- nats-server {} ({}), last lines:\n", i + 1, log.display()));
                for l in &lines[lines.len().saturating_sub(15)..] {
                    out.push_str(l);
                    out.push('\n');
                }
            }
            out
        }
    }

    impl Drop for NatsCluster {
        fn drop(&mut self) {
            for (child, _) in &mut self.procs {
                if let Ok(None) = child.try_wait() {
                    let _ = child.kill();
                }
                let _ = child.wait();
            }
            if self.keep {
                eprintln!("kept the NATS servers' data and logs in {}", self.dir.display());
            } else {
                let _ = std::fs::remove_dir_all(&self.dir);
            }
        }
    }

    /// A client of `url`; with `tls`, over TLS (required), trusting the CA and presenting the
    /// client certificate (the servers verify it).
    async fn connect(url: &str, tls: Option<&TlsFiles>, within: Duration) -> Result<async_nats::Client, String> {
        let deadline = Instant::now() + within;
        loop {
            let mut options = async_nats::ConnectOptions::new().subscription_capacity(1 << 18);
            if let Some(f) = tls {
                options = options
                    .require_tls(true)
                    .add_root_certificates(f.ca.clone())
                    .add_client_certificate(f.cert.clone(), f.key.clone());
            }
            match options.connect(url).await {
                Ok(c) => return Ok(c),
                Err(e) if Instant::now() >= deadline => return Err(format!("cannot connect to {url}: {e}")),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// What one receiver saw: count, last receive time and latency buckets (same bounds as the
    /// Herald sink's histogram).
    struct Counts {
        received: AtomicU64,
        last_ns: AtomicU64,
        bounds: Vec<f64>,
        /// Per bucket (not cumulative); the last one is +Inf.
        buckets: Vec<AtomicU64>,
    }

    impl Counts {
        fn new() -> Counts {
            let bounds = latency_buckets();
            let buckets = (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect();
            Counts {
                received: AtomicU64::new(0),
                last_ns: AtomicU64::new(0),
                bounds,
                buckets,
            }
        }

        fn record(&self, data: &[u8]) {
            let now = unix_nanos();
            self.received.fetch_add(1, Ordering::Relaxed);
            self.last_ns.fetch_max(now, Ordering::Relaxed);
            if let Some(stamp) = super::super::cluster::stamp_of(data) {
                let seconds = now.saturating_sub(stamp.t) as f64 / 1e9;
                let i = self.bounds.partition_point(|b| *b < seconds);
                self.buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }

        fn snapshot(&self) -> Sink {
            let mut cumulative = 0.0;
            let buckets = self
                .bounds
                .iter()
                .copied()
                .chain([f64::INFINITY])
                .zip(&self.buckets)
                .map(|(le, n)| {
                    cumulative += n.load(Ordering::Relaxed) as f64;
                    (le.to_bits(), cumulative)
                })
                .collect();
            Sink::new(
                self.received.load(Ordering::Relaxed) as f64,
                self.last_ns.load(Ordering::Relaxed) as f64 / 1e9,
                buckets,
            )
        }
    }

    /// A receiving client on its own thread (its own current-thread runtime, as a Herald
    /// handler runs in its own node process). Dropping it stops and joins the thread.
    struct Receiver {
        counts: Arc<Counts>,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl Receiver {
        fn spawn(url: String, tls: Option<TlsFiles>, mode: Mode) -> Result<Receiver, String> {
            let counts = Arc::new(Counts::new());
            let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            let c = counts.clone();
            let thread = std::thread::Builder::new()
                .name("nats-receiver".into())
                .spawn(move || {
                    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                        Ok(rt) => rt,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e.to_string()));
                            return;
                        }
                    };
                    rt.block_on(async move {
                        if let Err(e) = receive(url, tls, mode, c, ready_tx.clone(), stop_rx).await {
                            eprintln!("nats receiver: {e}");
                            let _ = ready_tx.send(Err(e));
                        }
                    });
                })
                .map_err(|e| e.to_string())?;
            let mut r = Receiver {
                counts,
                stop: Some(stop_tx),
                thread: Some(thread),
            };
            match ready_rx.recv_timeout(Duration::from_secs(30)) {
                Ok(Ok(())) => Ok(r),
                Ok(Err(e)) => Err(e),
                Err(_) => {
                    r.stop.take();
                    Err("a NATS receiver was not ready within 30 s".into())
                }
            }
        }
    }

    impl Drop for Receiver {
        fn drop(&mut self) {
            if let Some(s) = self.stop.take() {
                let _ = s.send(());
            }
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    async fn receive(
        url: String,
        tls: Option<TlsFiles>,
        mode: Mode,
        counts: Arc<Counts>,
        ready: std::sync::mpsc::Sender<Result<(), String>>,
        mut stop: tokio::sync::oneshot::Receiver<()>,
    ) -> Result<(), String> {
        let client = connect(&url, tls.as_ref(), Duration::from_secs(20)).await?;
        match mode {
            Mode::Core => {
                let mut sub = client
                    .queue_subscribe(SUBJECT_CORE, QUEUE.into())
                    .await
                    .map_err(|e| format!("subscribe: {e}"))?;
                client.flush().await.map_err(|e| format!("flush: {e}"))?;
                let _ = ready.send(Ok(()));
                loop {
                    tokio::select! {
                        m = sub.next() => match m {
                            Some(m) => counts.record(&m.payload),
                            None => return Ok(()),
                        },
                        _ = &mut stop => return Ok(()),
                    }
                }
            }
            Mode::JetStream => {
                let js = jetstream::new(client);
                // Right after the cluster started, a lookup through servers 2 and 3 can time out
                // while JetStream's routes settle (seen in CI): retry for a while, as the stream's
                // creation does.
                let started = Instant::now();
                let consumer: jetstream::consumer::PullConsumer = loop {
                    match js.get_consumer_from_stream(CONSUMER, STREAM).await {
                        Ok(c) => break c,
                        Err(e) if started.elapsed() > Duration::from_secs(30) => {
                            return Err(format!("consumer: not found within 30 s: {e}"))
                        }
                        Err(_) => actix_rt::time::sleep(Duration::from_millis(200)).await,
                    }
                };
                let mut messages = consumer
                    .stream()
                    .max_messages_per_batch(1000)
                    .messages()
                    .await
                    .map_err(|e| format!("pull: {e}"))?;
                let _ = ready.send(Ok(()));
                let mut errors = 0u64;
                loop {
                    tokio::select! {
                        m = messages.next() => match m {
                            Some(Ok(m)) => {
                                counts.record(&m.payload);
                                m.ack().await.map_err(|e| format!("ack: {e}"))?;
                            }
                            Some(Err(e)) => {
                                // Missed heartbeats and the like: the stream goes on.
                                errors += 1;
                                if errors <= 3 {
                                    eprintln!("nats receiver: {e}");
                                }
                            }
                            None => return Ok(()),
                        },
                        _ = &mut stop => return Ok(()),
                    }
                }
            }
        }
    }

    struct Receivers(Vec<Receiver>);

    impl Receivers {
        fn received(counts: &[Arc<Counts>]) -> u64 {
            counts.iter().map(|c| c.received.load(Ordering::Relaxed)).sum()
        }

        fn counts(&self) -> Vec<Arc<Counts>> {
            self.0.iter().map(|r| r.counts.clone()).collect()
        }
    }

    impl Sinks for Receivers {
        async fn scrape(&self) -> Result<Vec<Sink>, String> {
            Ok(self.0.iter().map(|r| r.counts.snapshot()).collect())
        }
    }

    fn fail(sent: &RefCell<Sent>, e: impl std::fmt::Display) {
        let mut s = sent.borrow_mut();
        s.failed += 1;
        s.error = Some(e.to_string());
    }

    /// The publisher side of NATS: core or JetStream.
    struct Publisher {
        client: async_nats::Client,
        js: Option<jetstream::Context>,
    }

    impl Publisher {
        /// `events` messages as fast as they are taken (at most `seconds`): `connections`
        /// tasks each publish `batch` and flush (core; each waits while more than `window`
        /// are unreceived) or await the batch's acks (JetStream).
        #[allow(clippy::too_many_arguments)]
        async fn max_rate(
            &self,
            receivers: &Receivers,
            size: usize,
            events: u64,
            batch: usize,
            connections: usize,
            window: u64,
            seconds: u64,
        ) -> Sent {
            let deadline = Instant::now() + Duration::from_secs(seconds);
            let counts = receivers.counts();
            let base = Receivers::received(&counts);
            let next = Rc::new(Cell::new(0u64));
            let published = Rc::new(Cell::new(0u64));
            let sent = Rc::new(RefCell::new(Sent::default()));
            let mut tasks = Vec::new();
            for _ in 0..connections {
                let (client, js, counts) = (self.client.clone(), self.js.clone(), counts.clone());
                let (next, published, sent) = (next.clone(), published.clone(), sent.clone());
                tasks.push(actix_rt::spawn(async move {
                    loop {
                        let start = next.get();
                        if start >= events || Instant::now() >= deadline {
                            return;
                        }
                        let n = (events - start).min(batch as u64);
                        next.set(start + n);
                        let ok = match &js {
                            None => {
                                while published.get().saturating_sub(Receivers::received(&counts) - base) > window {
                                    if Instant::now() >= deadline {
                                        return;
                                    }
                                    actix_rt::time::sleep(Duration::from_millis(1)).await;
                                }
                                let body = Bytes::from(payload(size, unix_nanos()));
                                let mut ok = 0;
                                for _ in 0..n {
                                    match client.publish(SUBJECT_CORE, body.clone()).await {
                                        Ok(()) => ok += 1,
                                        Err(e) => fail(&sent, e),
                                    }
                                }
                                if let Err(e) = client.flush().await {
                                    fail(&sent, e);
                                    return;
                                }
                                ok
                            }
                            Some(js) => {
                                let body = Bytes::from(payload(size, unix_nanos()));
                                let mut acks = Vec::with_capacity(n as usize);
                                for _ in 0..n {
                                    match js.publish(SUBJECT_JS, body.clone()).await {
                                        Ok(ack) => acks.push(ack),
                                        Err(e) => fail(&sent, e),
                                    }
                                }
                                let mut ok = 0;
                                for ack in acks {
                                    match ack.await {
                                        Ok(_) => ok += 1,
                                        Err(e) => fail(&sent, e),
                                    }
                                }
                                ok
                            }
                        };
                        published.set(published.get() + ok);
                        let mut s = sent.borrow_mut();
                        s.requests += 1;
                        s.accepted += ok;
                        if s.failed >= 5 {
                            return;
                        }
                    }
                }));
            }
            for t in tasks {
                let _ = t.await;
            }
            let s = sent.borrow().clone();
            s
        }

        /// `rate` messages/s for `seconds`: every 10 ms what is due, in batches of at most
        /// `batch`, each batch stamped when it is published (as Herald's paced publisher stamps
        /// each HTTP batch); core flushes each tick, JetStream awaits each batch's acks in a
        /// task (at most [`MAX_INFLIGHT`] at once).
        async fn paced(&self, size: usize, rate: u64, batch: usize, seconds: u64) -> Sent {
            let started = Instant::now();
            let deadline = started + Duration::from_secs(seconds);
            let sent = Rc::new(RefCell::new(Sent::default()));
            let inflight = Rc::new(Cell::new(0usize));
            let mut issued = 0u64;
            let mut interval = actix_rt::time::interval(Duration::from_millis(10));
            while Instant::now() < deadline {
                interval.tick().await;
                let due = (started.elapsed().as_secs_f64() * rate as f64) as u64;
                while issued < due && inflight.get() < MAX_INFLIGHT {
                    let n = (due - issued).min(batch as u64);
                    issued += n;
                    let body = Bytes::from(payload(size, unix_nanos()));
                    match &self.js {
                        None => {
                            let mut ok = 0;
                            for _ in 0..n {
                                match self.client.publish(SUBJECT_CORE, body.clone()).await {
                                    Ok(()) => ok += 1,
                                    Err(e) => fail(&sent, e),
                                }
                            }
                            let mut s = sent.borrow_mut();
                            s.requests += 1;
                            s.accepted += ok;
                        }
                        Some(js) => {
                            let mut acks = Vec::with_capacity(n as usize);
                            for _ in 0..n {
                                match js.publish(SUBJECT_JS, body.clone()).await {
                                    Ok(ack) => acks.push(ack),
                                    Err(e) => fail(&sent, e),
                                }
                            }
                            inflight.set(inflight.get() + 1);
                            let (sent, inflight) = (sent.clone(), inflight.clone());
                            actix_rt::spawn(async move {
                                for ack in acks {
                                    match ack.await {
                                        Ok(_) => sent.borrow_mut().accepted += 1,
                                        Err(e) => fail(&sent, e),
                                    }
                                }
                                sent.borrow_mut().requests += 1;
                                inflight.set(inflight.get() - 1);
                            });
                        }
                    }
                }
                if self.js.is_none() {
                    if let Err(e) = self.client.flush().await {
                        fail(&sent, e);
                    }
                }
            }
            let wait = Instant::now() + Duration::from_secs(35);
            while inflight.get() > 0 && Instant::now() < wait {
                actix_rt::time::sleep(Duration::from_millis(5)).await;
            }
            let s = sent.borrow().clone();
            s
        }

        /// Publishes one message every 20 ms until every receiver has received one (routes up,
        /// interest propagated, consumers pulling).
        async fn probe(&self, receivers: &Receivers) -> Result<(), String> {
            let started = Instant::now();
            let base: Vec<u64> = receivers
                .counts()
                .iter()
                .map(|c| c.received.load(Ordering::Relaxed))
                .collect();
            loop {
                let done = receivers
                    .counts()
                    .iter()
                    .zip(&base)
                    .all(|(c, b)| c.received.load(Ordering::Relaxed) > *b);
                if done {
                    return Ok(());
                }
                if started.elapsed() > Duration::from_secs(30) {
                    return Err("the NATS receivers got no probe message within 30 s".into());
                }
                let body = Bytes::from(payload(16, unix_nanos()));
                match &self.js {
                    None => {
                        let _ = self.client.publish(SUBJECT_CORE, body).await;
                        let _ = self.client.flush().await;
                    }
                    Some(js) => {
                        if let Ok(ack) = js.publish(SUBJECT_JS, body).await {
                            let _ = ack.await;
                        }
                    }
                }
                actix_rt::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    /// Creates the one-replica stream on server 1 (tag `n1`) and the shared durable pull
    /// consumer, retrying while JetStream elects its meta leader.
    async fn create_stream(js: &jetstream::Context, storage: JsStorage) -> Result<(), String> {
        let started = Instant::now();
        let config = jetstream::stream::Config {
            name: STREAM.into(),
            subjects: vec![SUBJECT_JS.into()],
            storage: match storage {
                JsStorage::Memory => jetstream::stream::StorageType::Memory,
                JsStorage::File => jetstream::stream::StorageType::File,
            },
            num_replicas: 1,
            retention: jetstream::stream::RetentionPolicy::WorkQueue,
            placement: Some(jetstream::stream::Placement {
                cluster: None,
                tags: vec!["n1".into()],
            }),
            ..Default::default()
        };
        let stream = loop {
            match js.create_stream(config.clone()).await {
                Ok(s) => break s,
                Err(e) if started.elapsed() > Duration::from_secs(30) => {
                    return Err(format!("cannot create the JetStream stream within 30 s: {e}"))
                }
                Err(_) => actix_rt::time::sleep(Duration::from_millis(200)).await,
            }
        };
        stream
            .create_consumer(jetstream::consumer::pull::Config {
                durable_name: Some(CONSUMER.into()),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                max_ack_pending: MAX_ACK_PENDING,
                ..Default::default()
            })
            .await
            .map_err(|e| format!("cannot create the JetStream consumer: {e}"))?;
        Ok(())
    }

    /// One Herald cluster of the comparison: mTLS peers, or plaintext (`--insecure-peers`).
    struct Herald {
        insecure: bool,
        c: Cluster,
    }

    impl Herald {
        fn name(&self) -> &'static str {
            tls::variant_name(self.insecure)
        }
    }

    pub(super) fn run(a: PeerArgs, mode: Mode) -> Result<(), String> {
        let program = find_server(a.nats_server.as_deref())?;
        let mut heralds = Vec::new();
        for &insecure in a.herald_peers.variants() {
            let name = format!(
                "herald-bench-{}-{}",
                mode.command(),
                if insecure { "plaintext" } else { "mtls" }
            );
            let c = start_on_free_ports(&name, 3, a.wal_fsync, insecure, a.keep)?;
            heralds.push(Herald { insecure, c });
        }
        // NATS trusts the CA of Herald's mTLS cluster (the harness made it before node 1 started).
        let ca = match (a.nats_plaintext, heralds.iter().find(|h| !h.insecure)) {
            (true, _) => None,
            (false, Some(h)) => Some(
                herald::pki::Ca::load(&tls::harness_ca_dir(h.c.dir()))
                    .map_err(|e| format!("the Herald cluster's CA: {e}"))?,
            ),
            (false, None) => Some(herald::pki::Ca::generate("herald").map_err(|e| e.to_string())?),
        };
        let nats = NatsCluster::start(&program, mode == Mode::JetStream, ca.as_ref(), a.keep)?;
        let started = Instant::now();
        let outcome = actix_rt::System::new().block_on(async {
            let signal = herald::node::shutdown_signal();
            tokio::select! {
                r = scenario(&mut heralds, &nats, &a, mode) => r,
                _ = signal => Err("interrupted".to_string()),
            }
        });
        if outcome.is_err() {
            for h in &heralds {
                eprint!("--- {}:\n{}", h.name(), h.c.log_tails(LOG_TAIL));
            }
            eprint!("{}", nats.log_tails());
        }
        drop(nats);
        drop(heralds);
        if outcome.is_ok() {
            println!("done in {:.1} s", started.elapsed().as_secs_f64());
        }
        outcome
    }

    /// The order in which `n` systems run in run `run` (1-based): rotated by one each run, so
    /// each system goes first, second, … in turn (with 2: Herald first in odd runs).
    pub(super) fn order(n: usize, run: u64) -> Vec<usize> {
        let shift = ((run.max(1) - 1) % n.max(1) as u64) as usize;
        (0..n).map(|i| (i + shift) % n).collect()
    }

    fn missing(r: &Run) -> u64 {
        r.sent.accepted.saturating_sub(r.handled)
    }

    async fn scenario(heralds: &mut [Herald], nats: &NatsCluster, a: &PeerArgs, mode: Mode) -> Result<(), String> {
        let mut targets: Vec<Target> = Vec::new();
        for h in heralds.iter_mut() {
            targets.push(prepare(&mut h.c, a.connections, a.instances).await?);
            check_peers(&h.c, h.insecure)?;
        }
        let heralds: &[Herald] = heralds;
        let tls = nats.client_tls.as_ref();
        let client = connect(&nats.url(1), tls, Duration::from_secs(30)).await?;
        let js = match mode {
            Mode::Core => None,
            Mode::JetStream => {
                let js = jetstream::ContextBuilder::new()
                    .max_ack_inflight(a.connections * a.batch + MAX_INFLIGHT * a.batch)
                    .build(client.clone());
                create_stream(&js, a.js_storage).await?;
                Some(js)
            }
        };
        let publisher = Publisher { client, js };
        let mut receivers = Vec::new();
        for i in 0..a.instances as usize {
            receivers.push(Receiver::spawn(nats.url(2 + i), tls.cloned(), mode)?);
        }
        let receivers = Receivers(receivers);
        publisher.probe(&receivers).await?;

        let (ack, peer_base, peer_kind) = match mode {
            Mode::Core => ("none", "nats", "NATS core publish, queue group"),
            Mode::JetStream => (
                "accepted",
                "jetstream",
                match a.js_storage {
                    JsStorage::Memory => "JetStream, memory storage, 1 replica, acked publish + acked pull consume",
                    JsStorage::File => "JetStream, file storage, 1 replica, acked publish + acked pull consume",
                },
            ),
        };
        let peer = format!("{peer_base}{}", if tls.is_some() { "+tls" } else { "" });
        let peer = peer.as_str();
        let peer_what = format!(
            "{peer_kind}; {}",
            if tls.is_some() {
                "TLS on client connections and routes (verify: true), certificates from Herald's CA"
            } else {
                "plaintext"
            }
        );
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        let fsync = match a.wal_fsync {
            Some(FsyncPolicy::Never) => "never",
            _ => "always",
        };
        println!(
            "herald-bench {}: Herald ack={ack} vs {peer_what}; {cores} cores, 127.0.0.1 only",
            mode.command()
        );
        for (h, t) in heralds.iter().zip(&targets) {
            println!(
                "  {}: 3 nodes, peers {}; publisher -> node {} (HTTP batches of {}, {} connections) -> peer transport -> bench-sink x{} on nodes {:?}; wal.fsync={fsync}",
                h.name(),
                if h.insecure {
                    "plaintext (--insecure-peers)"
                } else {
                    "mutual TLS 1.3 (certificates of one CA, checked)"
                },
                t.ingress,
                a.batch,
                a.connections,
                a.instances,
                t.hosts
            );
        }
        println!(
            "  {peer}: 3 nats-server ({}) in one cluster; publisher -> server 1 ({} tasks, {} per {}) -> route -> {} receiver(s) on server(s) {:?}",
            nats_version(&find_server(a.nats_server.as_deref())?),
            a.connections,
            a.batch,
            if mode == Mode::Core { "flush" } else { "wait for acks" },
            a.instances,
            (2..2 + a.instances).collect::<Vec<_>>()
        );
        println!(
            "  {} runs per figure, alternating; {} events per throughput run; latency paced at {}/s for {} s; sizes {}\n",
            a.runs,
            a.events,
            a.latency_rate,
            a.latency_seconds,
            a.sizes.iter().map(|s| fmt_size(*s)).collect::<Vec<_>>().join(", ")
        );

        // Warm-up of all: connections, route and peer-link buffers (and TLS sessions), the WAL file.
        let warm = (a.events / 10).clamp(1_000, 20_000);
        let size = a.sizes[0];
        for (h, t) in heralds.iter().zip(&targets) {
            t.max_rate(
                &h.c,
                "warm-up".into(),
                ack,
                Body::sized(size),
                warm,
                a.batch,
                a.connections,
                a.seconds,
            )
            .await?;
        }
        let pubs = publisher.max_rate(&receivers, size, warm, a.batch, a.connections, a.window, a.seconds);
        measure_with(&receivers, None, "warm-up".into(), pubs).await?;

        // What the machine itself stops threads for, with every system idle: a latency tail
        // within these gaps is the machine's, not a system's (see `stalls`).
        let spin = if a.smoke {
            Duration::from_millis(500)
        } else {
            Duration::from_secs(3)
        };
        let stalls = stalls::measure(spin);
        if let Some(st) = &stalls {
            println!("  {}\n", stalls::describe(st, spin));
        }

        // Systems 0.. are the Herald clusters (the first is `herald` in the rows, a second one
        // `plain`), the last is NATS.
        let systems = heralds.len() + 1;
        let nats_at = heralds.len();
        let sys_name = |s: usize| if s == nats_at { peer } else { heralds[s].name() };
        let mut rows = Vec::new();
        let mut warnings = Vec::new();
        let mut check = |name: &str, r: &Run| {
            if missing(r) > 0 {
                warnings.push(format!(
                    "{name}: {} of {} accepted events were not received",
                    missing(r),
                    r.sent.accepted
                ));
            }
            if r.sent.failed > 0 {
                warnings.push(format!(
                    "{name}: {} failures; last error: {}",
                    r.sent.failed,
                    r.sent.error.as_deref().unwrap_or("-")
                ));
            }
        };
        let assign = |row: &mut Row, runs: &[f64]| {
            row.herald.push(runs[0]);
            if nats_at > 1 {
                row.plain.push(runs[1]);
            }
            row.peer.push(runs[nats_at]);
        };
        for &size in &a.sizes {
            let row = |metric| Row {
                payload_bytes: size,
                label: None,
                metric,
                herald: vec![],
                peer: vec![],
                plain: vec![],
            };
            let mut rate = row(Metric::EventsPerSecond);
            let mut lat = [Metric::P50Ms, Metric::P99Ms, Metric::P999Ms].map(row);
            for run in 1..=a.runs {
                let mut got: Vec<Option<Run>> = (0..systems).map(|_| None).collect();
                for s in order(systems, run) {
                    let name = format!("{} {} max rate run {run}", sys_name(s), fmt_size(size));
                    let r = if s == nats_at {
                        let pubs =
                            publisher.max_rate(&receivers, size, a.events, a.batch, a.connections, a.window, a.seconds);
                        measure_with(&receivers, None, name.clone(), pubs).await?
                    } else {
                        targets[s]
                            .max_rate(
                                &heralds[s].c,
                                name.clone(),
                                ack,
                                Body::sized(size),
                                a.events,
                                a.batch,
                                a.connections,
                                a.seconds,
                            )
                            .await?
                    };
                    check(&name, &r);
                    got[s] = Some(r);
                }
                let got: Vec<Run> = got.into_iter().flatten().collect();
                let line: Vec<String> = got
                    .iter()
                    .enumerate()
                    .map(|(s, r)| {
                        format!(
                            "{} {:>9} ev/s",
                            sys_name(s),
                            compare::fmt_value(Metric::EventsPerSecond, r.rate)
                        )
                    })
                    .collect();
                println!(
                    "{:>6} run {run}/{}: max rate   {}",
                    fmt_size(size),
                    a.runs,
                    line.join("   ")
                );
                assign(&mut rate, &got.iter().map(|r| r.rate).collect::<Vec<_>>());

                let mut got: Vec<Option<Run>> = (0..systems).map(|_| None).collect();
                for s in order(systems, run).into_iter().rev() {
                    let name = format!("{} {} paced run {run}", sys_name(s), fmt_size(size));
                    let r = if s == nats_at {
                        let pubs = publisher.paced(size, a.latency_rate, a.batch, a.latency_seconds);
                        measure_with(&receivers, None, name.clone(), pubs).await?
                    } else {
                        targets[s]
                            .paced(
                                &heralds[s].c,
                                name.clone(),
                                ack,
                                Body::sized(size),
                                a.latency_rate,
                                a.batch,
                                a.latency_seconds,
                            )
                            .await?
                    };
                    check(&name, &r);
                    got[s] = Some(r);
                }
                let got: Vec<Run> = got.into_iter().flatten().collect();
                let line: Vec<String> = got
                    .iter()
                    .enumerate()
                    .map(|(s, r)| {
                        format!(
                            "{} p50/p99/p99.9 {}/{}/{} ms",
                            sys_name(s),
                            compare::fmt_value(Metric::P50Ms, r.p50_ms),
                            compare::fmt_value(Metric::P50Ms, r.p99_ms),
                            compare::fmt_value(Metric::P50Ms, r.p999_ms),
                        )
                    })
                    .collect();
                println!(
                    "{:>6} run {run}/{}: paced      {}",
                    fmt_size(size),
                    a.runs,
                    line.join("   ")
                );
                for (row, pick) in lat.iter_mut().zip([
                    (|r: &Run| r.p50_ms) as fn(&Run) -> f64,
                    |r: &Run| r.p99_ms,
                    |r: &Run| r.p999_ms,
                ]) {
                    assign(row, &got.iter().map(pick).collect::<Vec<_>>());
                }
            }
            rows.push(rate);
            rows.extend(lat);
        }
        println!(
            "\n{} ack={ack} vs {peer} ({peer_what}), {} runs each; events/s received at max rate; \
             publish -> receive latency at {}/s",
            heralds[0].name(),
            a.runs,
            a.latency_rate
        );
        println!("{}", compare::table(peer, &rows));
        println!(
            "(ratio = {} median / {peer} median; per-run ratios pair runs made back to back;{} latency from \
             {} fine buckets, ±6 %)",
            heralds[0].name(),
            if nats_at > 1 {
                " MTLS/PLAINTEXT = herald-mtls median / herald-plaintext median;"
            } else {
                ""
            },
            latency_buckets().len()
        );
        for r in rows.iter().filter(|r| r.metric == Metric::EventsPerSecond) {
            let fmt = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{x:.2}x"));
            let mut goals = vec![format!(
                "{} / {peer} {} (goal >= 1.00x)",
                heralds[0].name(),
                fmt(r.ratio())
            )];
            if nats_at > 1 {
                goals.push(format!(
                    "herald-mtls / herald-plaintext {} (goal >= 0.85x: within 15 %)",
                    fmt(r.tls_ratio())
                ));
            }
            println!(
                "{:>6} ack={ack} events/s: {}",
                fmt_size(r.payload_bytes),
                goals.join("; ")
            );
        }
        for w in &warnings {
            println!("warning: {w}");
        }
        if let Some(path) = &a.json {
            let meta = json!({
                "command": format!("herald-bench {}", mode.command()),
                "time": chrono::Utc::now().to_rfc3339(),
                "cores": cores,
                "runs": a.runs,
                "events": a.events,
                "batch": a.batch,
                "connections": a.connections,
                "instances": a.instances,
                "latency_rate": a.latency_rate,
                "latency_seconds": a.latency_seconds,
                "window": a.window,
                "wal_fsync": fsync,
                "js_storage": format!("{:?}", a.js_storage).to_lowercase(),
                "herald_peers": heralds.iter().map(|h| h.name()).collect::<Vec<_>>(),
                "nats_tls": tls.is_some(),
                "peer_description": peer_what,
                "smoke": a.smoke,
                "warnings": warnings,
                "stalls": stalls.as_ref().map(|st| stalls::json(st, spin)),
            });
            let doc = compare::json_rows(mode.command(), &format!("ack={ack}"), peer, &meta, &rows);
            let text = serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?;
            std::fs::write(path, text + "\n").map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            println!("wrote {}", path.display());
        }
        Ok(())
    }

    fn nats_version(program: &Path) -> String {
        Command::new(program)
            .arg("--version")
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "nats-server".into())
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn server_configs_route_to_the_two_others() {
            let c = server_config(2, 4222, &[6001, 6002, 6003], Some(Path::new("/tmp/js")), None);
            assert!(c.contains("listen: \"127.0.0.1:4222\""));
            assert!(c.contains("listen: \"127.0.0.1:6002\""));
            assert!(c.contains("nats-route://127.0.0.1:6001") && c.contains("nats-route://127.0.0.1:6003"));
            assert!(!c.contains("nats-route://127.0.0.1:6002"));
            assert!(c.contains("server_tags: [\"n2\"]") && c.contains("store_dir: \"/tmp/js\""));
            assert!(!server_config(1, 4222, &[1, 2, 3], None, None).contains("jetstream"));
            assert!(!c.contains("tls"));
        }

        #[test]
        fn tls_server_configs_secure_clients_and_routes() {
            let f = TlsFiles {
                ca: "/d/ca.pem".into(),
                cert: "/d/n1/node.pem".into(),
                key: "/d/n1/node.key".into(),
            };
            let c = server_config(1, 4222, &[6001, 6002, 6003], None, Some(&f));
            // One block for the clients at the top level, one for the routes inside `cluster`.
            assert_eq!(c.matches("tls {").count(), 2, "{c}");
            assert_eq!(c.matches("verify: true").count(), 2, "{c}");
            let cluster = &c[c.find("cluster {").unwrap()..];
            assert!(cluster.contains("  tls {\n    cert_file: \"/d/n1/node.pem\""), "{c}");
            let top = &c[..c.find("cluster {").unwrap()];
            assert!(top.contains("tls {\n  cert_file: \"/d/n1/node.pem\""), "{c}");
            assert!(top.contains("ca_file: \"/d/ca.pem\""), "{c}");
            // Braces balance: nats-server would refuse the file otherwise.
            assert_eq!(c.matches('{').count(), c.matches('}').count(), "{c}");
        }

        #[test]
        fn every_system_goes_first_in_turn() {
            assert_eq!(order(2, 1), [0, 1]);
            assert_eq!(order(2, 2), [1, 0]);
            assert_eq!(order(3, 1), [0, 1, 2]);
            assert_eq!(order(3, 2), [1, 2, 0]);
            assert_eq!(order(3, 3), [2, 0, 1]);
            assert_eq!(order(3, 4), [0, 1, 2]);
        }

        #[test]
        fn counts_snapshot_cumulative_buckets() {
            let c = Counts::new();
            c.record(payload(128, unix_nanos() - 2_000_000).as_bytes());
            c.record(b"not a stamp");
            let s = c.snapshot();
            assert_eq!(s.events, 2.0);
            let total = s.buckets.values().copied().fold(0.0, f64::max);
            assert_eq!(total, 1.0, "only the stamped message has a latency");
            let q = super::super::super::cluster::quantile(&s.buckets, 0.5);
            assert!(q > 0.0015 && q < 0.1, "{q}");
        }
    }
}
