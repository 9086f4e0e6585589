//! The membership table at scale: 100 nodes and 10,000 subscriptions (19,999 instances), built by
//! applying the real commands to a `MembershipState` and placing with the leader's own
//! `proposed_placement`, as the Raft leader would.
//!
//! Asserted (these are properties, not speeds):
//! * every instance is placed, on an up node, and no node exceeds the load bound;
//! * losing one node moves only the instances it held: at most `1/N + 5 %` of all instances;
//! * the node coming back, and a new node joining, each move at most `1/N + 5 %`;
//! * a snapshot of the whole table restores the same table and epoch;
//! * after the first placement the leader writes differences (`PatchPlacement`), not the whole
//!   table: a node loss's entry is at most its share of the table plus a little.
//!
//! Printed (for BENCHMARKS.md, "Scale"; `--nocapture` shows them): the time each placement takes,
//! the Raft log bytes of the build-up, the size of each placement entry next to the whole table's
//! `SetPlacement` it replaces, and of a snapshot.

use std::collections::BTreeMap;
use std::time::Instant;

use herald::membership::state::{Command, MembershipState};
use herald::placement::{NodeId, DEFAULT_LOAD_FACTOR};
use herald::subscription::{HandlerSpec, SubscriptionSpec};

const NODES: u64 = 100;
const SUBSCRIPTIONS: usize = 10_000;

/// The state machine plus its log, as one node applies it.
struct Log {
    state: MembershipState,
    index: u64,
    bytes: usize,
}

impl Log {
    fn apply(&mut self, cmd: Command) -> usize {
        let bytes = cmd.to_bytes();
        self.index += 1;
        self.bytes += bytes.len();
        self.state
            .apply_bytes(self.index, &bytes)
            .unwrap_or_else(|e| panic!("command {} refused: {e}", self.index));
        bytes.len()
    }

    /// The leader's placement step: propose, then commit it. Returns (instances moved, entry
    /// bytes, bytes of the whole table's `SetPlacement`, milliseconds to compute).
    fn place(&mut self) -> (u32, usize, usize, f64) {
        let start = Instant::now();
        let proposal = self
            .state
            .proposed_placement(DEFAULT_LOAD_FACTOR)
            .expect("the change needs a new placement");
        let ms = start.elapsed().as_secs_f64() * 1e3;
        assert!(proposal.unplaced.is_empty(), "unplaced: {:?}", proposal.unplaced);
        let moved = proposal.moved;
        let whole = Command::set_placement(proposal.epoch, &proposal.table).to_bytes().len();
        let bytes = self.apply(proposal.command());
        (moved, bytes, whole, ms)
    }

    fn instances(&self) -> usize {
        self.state.placement().values().map(Vec::len).sum()
    }

    fn loads(&self) -> BTreeMap<NodeId, usize> {
        let mut loads = BTreeMap::new();
        for nodes in self.state.placement().values() {
            for n in nodes {
                *loads.entry(*n).or_insert(0) += 1;
            }
        }
        loads
    }
}

fn join(id: NodeId) -> Command {
    Command::join(
        id,
        format!("10.0.{}.{}:7070", id / 250, id % 250),
        format!("10.0.{}.{}:7170", id / 250, id % 250),
        ["log"],
    )
}

/// Instances moved by a change, counted independently of the proposal's own count: the
/// instances whose node at the same index differs.
fn moved_between(before: &herald::placement::PlacementTable, after: &herald::placement::PlacementTable) -> usize {
    after
        .iter()
        .map(|(k, nodes)| {
            let old = before.get(k).map(Vec::as_slice).unwrap_or(&[]);
            nodes.iter().enumerate().filter(|(i, n)| old.get(*i) != Some(n)).count()
        })
        .sum()
}

#[test]
fn a_hundred_nodes_and_ten_thousand_subscriptions() {
    let mut log = Log {
        state: MembershipState::new("scale"),
        index: 0,
        bytes: 0,
    };
    for id in 1..=NODES {
        log.apply(join(id));
    }
    let joins = log.bytes;
    for i in 0..SUBSCRIPTIONS {
        log.apply(Command::subscribe(&SubscriptionSpec {
            topic: format!("tenant-{}.orders-{}", i % 97, i),
            group: format!("g{}", i % 7),
            handler: HandlerSpec::Log,
            // 1, 2 or 3 instances: 19,999 in all.
            instances: (i % 3) as u32 + 1,
            max_attempts: None,
        }));
    }
    let subscribes = log.bytes - joins;
    let (_, first_entry, _, first_ms) = log.place();
    let total = log.instances();
    let demanded: usize = (0..SUBSCRIPTIONS).map(|i| i % 3 + 1).sum();
    assert_eq!(total, demanded, "every instance is placed");
    let n = NODES as f64;
    let bound = (DEFAULT_LOAD_FACTOR * total as f64 / n).ceil() as usize;
    let loads = log.loads();
    assert_eq!(loads.len(), NODES as usize, "every node gets work");
    assert!(
        loads.values().all(|&l| l <= bound),
        "a node above the bound {bound}: {loads:?}"
    );

    // One node lost: only its instances move.
    let lost: NodeId = 37;
    let held = loads[&lost];
    let before = log.state.placement().clone();
    log.apply(Command::mark_down(lost));
    let (moved, down_entry, down_whole, down_ms) = log.place();
    let counted = moved_between(&before, log.state.placement());
    assert_eq!(moved as usize, counted);
    assert_eq!(counted, held, "only the lost node's instances move");
    let allowed = (total as f64 * (1.0 / n + 0.05)) as usize;
    assert!(counted <= allowed, "{counted} moved on a node loss, allowed {allowed}");
    assert!(log.state.placement().values().flatten().all(|id| *id != lost));
    // The loss is written as a difference: the entries of the subscriptions that moved (each
    // entry is small), not the whole table. Bound: the lost node's share of the whole table's
    // bytes, twice over, plus a KB.
    let share = down_whole * held / total;
    assert!(
        down_entry <= 2 * share + 1024,
        "the placement after a node loss is {down_entry} B; the whole table is {down_whole} B and the lost node held {held} of {total} instances"
    );

    // It comes back: it takes its share, and nothing else moves.
    let before = log.state.placement().clone();
    log.apply(Command::mark_up(lost));
    let (moved, up_entry, _, up_ms) = log.place();
    let counted = moved_between(&before, log.state.placement());
    assert_eq!(moved as usize, counted);
    assert!(
        counted <= allowed,
        "{counted} moved when a node came back, allowed {allowed}"
    );
    assert!(log.loads()[&lost] > 0, "the node that came back has work");

    // A new node joins.
    let before = log.state.placement().clone();
    log.apply(join(NODES + 1));
    let (moved, join_entry, _, join_ms) = log.place();
    let counted = moved_between(&before, log.state.placement());
    assert_eq!(moved as usize, counted);
    let allowed_join = (total as f64 * (1.0 / (n + 1.0) + 0.05)) as usize;
    assert!(
        counted <= allowed_join,
        "{counted} moved on a join, allowed {allowed_join}"
    );

    // The snapshot a new or lagging node would receive.
    let start = Instant::now();
    let snapshot = log.state.to_snapshot();
    let restored = MembershipState::from_snapshot(&snapshot).expect("the snapshot decodes");
    let snapshot_ms = start.elapsed().as_secs_f64() * 1e3;
    assert_eq!(restored.placement(), log.state.placement());
    assert_eq!(restored.epoch(), log.state.epoch());
    assert_eq!(restored.members().len(), NODES as usize + 1);

    println!(
        "scale: {NODES} nodes, {SUBSCRIPTIONS} subscriptions, {total} instances (bound {bound} per node)\n\
         placement compute: first {first_ms:.0} ms, node lost {down_ms:.0} ms ({held} moved), back {up_ms:.0} ms, join {join_ms:.0} ms\n\
         raft log: joins {joins} B, subscriptions {subscribes} B, first placement {first_entry} B; then differences: a loss {down_entry} B (the whole table: {down_whole} B), back {up_entry} B, a join {join_entry} B; total {} B over {} entries\n\
         snapshot: {} B, encode+decode {snapshot_ms:.0} ms",
        log.bytes,
        log.index,
        snapshot.len()
    );
}
