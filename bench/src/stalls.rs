//! How long this machine stops a thread that wants to run: one thread per core the process may
//! use, pinned to it, reads the monotonic clock in a loop for a while and keeps every gap between
//! two reads longer than [`GAP`]. After each gap it reads how long it waited on its run queue so
//! far (`/proc/thread-self/schedstat`): that part of the gap went to another thread of this
//! machine (the idle systems' timers, the kernel's threads); the rest is time the core ran
//! nothing the guest kernel accounts to a thread — its virtual CPU descheduled by the host, or
//! interrupts — which no scheduling inside the machine can avoid. A latency tail shorter than
//! these gaps cannot be told apart from them: the `nats` and `jetstream` reports print them next
//! to their percentiles.

use std::time::{Duration, Instant};

/// `herald-bench stalls`.
#[derive(clap::Args, Debug)]
pub(super) struct StallsArgs {
    /// Seconds to spin on each core (at most 600).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
}

/// Measures and prints the stalls of every core.
pub(super) fn run(a: StallsArgs) -> Result<(), String> {
    if a.seconds == 0 || a.seconds > 600 {
        return Err("--seconds must be between 1 and 600".into());
    }
    let spin = Duration::from_secs(a.seconds);
    let stalls = measure(spin).ok_or("cannot pin a thread to each core here (Linux only)")?;
    println!("{}", describe(&stalls, spin));
    Ok(())
}

/// Gaps shorter than this are the loop's own noise (a timer interrupt, a page fault).
const GAP: Duration = Duration::from_micros(200);

/// What one core's spinning thread saw.
#[derive(Debug, Clone)]
pub(super) struct CoreStalls {
    pub(super) cpu: usize,
    /// Gaps longer than 1 ms.
    pub(super) over_1ms: usize,
    /// Gaps whose host part (not spent on another thread) is longer than 1 ms.
    pub(super) host_over_1ms: usize,
    /// The longest gap.
    pub(super) longest: Duration,
    /// The longest host part of a gap.
    pub(super) longest_host: Duration,
    /// Sum of the gaps longer than [`GAP`].
    pub(super) lost: Duration,
    /// Sum of their host parts.
    pub(super) lost_host: Duration,
}

/// Spins one pinned thread on each core this process may run on for `spin`, all at once.
/// `None` where the cores cannot be listed or pinned to (not Linux, or refused).
pub(super) fn measure(spin: Duration) -> Option<Vec<CoreStalls>> {
    let cpus = allowed_cpus()?;
    std::thread::scope(|s| {
        let spinners: Vec<_> = cpus.iter().map(|&cpu| s.spawn(move || spin_on(cpu, spin))).collect();
        spinners.into_iter().map(|h| h.join().ok().flatten()).collect()
    })
}

/// Milliseconds, for the line and the JSON.
fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Milliseconds of `d` per second of `spin`.
fn per_second(d: Duration, spin: Duration) -> f64 {
    ms(d) / spin.as_secs_f64()
}

/// One line for a report: per core, its gaps over 1 ms, the longest and the time lost per second,
/// all gaps and then their host parts.
pub(super) fn describe(stalls: &[CoreStalls], spin: Duration) -> String {
    let cores: Vec<String> = stalls
        .iter()
        .map(|c| {
            format!(
                "cpu {}: {} gaps > 1 ms, longest {:.2} ms, {:.2} ms lost per second; of which the host's (no other \
                 thread ran): {} > 1 ms, longest {:.2} ms, {:.2} ms per second",
                c.cpu,
                c.over_1ms,
                ms(c.longest),
                per_second(c.lost, spin),
                c.host_over_1ms,
                ms(c.longest_host),
                per_second(c.lost_host, spin)
            )
        })
        .collect();
    format!(
        "machine stalls (a thread pinned to each core, spinning on the clock for {} s, gaps > {} us): {}",
        spin.as_secs_f64(),
        GAP.as_micros(),
        cores.join("; ")
    )
}

/// The same as JSON, for the reports' metadata (`line` is [`describe`]'s).
pub(super) fn json(stalls: &[CoreStalls], spin: Duration) -> serde_json::Value {
    serde_json::json!({
        "line": describe(stalls, spin),
        "spin_seconds": spin.as_secs_f64(),
        "gap_us": GAP.as_micros() as u64,
        "cores": stalls.iter().map(|c| serde_json::json!({
            "cpu": c.cpu,
            "gaps_over_1ms": c.over_1ms,
            "longest_ms": ms(c.longest),
            "lost_ms_per_second": per_second(c.lost, spin),
            "host_gaps_over_1ms": c.host_over_1ms,
            "host_longest_ms": ms(c.longest_host),
            "host_lost_ms_per_second": per_second(c.lost_host, spin),
        })).collect::<Vec<_>>(),
    })
}

#[cfg(target_os = "linux")]
fn allowed_cpus() -> Option<Vec<usize>> {
    // SAFETY: `cpu_set_t` is plain data (all zeroes is the empty set), and the call writes at most
    // `size_of::<cpu_set_t>()` bytes into it.
    let set = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return None;
        }
        set
    };
    // SAFETY: reads bits of the initialised set, below `CPU_SETSIZE`.
    let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect();
    (!cpus.is_empty()).then_some(cpus)
}

#[cfg(not(target_os = "linux"))]
fn allowed_cpus() -> Option<Vec<usize>> {
    None
}

#[cfg(target_os = "linux")]
fn pin(cpu: usize) -> bool {
    // SAFETY: as in `allowed_cpus`; `cpu` came from this process's own set, below `CPU_SETSIZE`.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

#[cfg(not(target_os = "linux"))]
fn pin(_cpu: usize) -> bool {
    false
}

/// How long the calling thread has waited on a run queue so far (runnable, another thread on
/// its core); `None` where the kernel does not say.
fn waited() -> Option<Duration> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: u64 = text.split_whitespace().nth(1)?.parse().ok()?;
    Some(Duration::from_nanos(ns))
}

/// Pins the calling thread to `cpu` and spins for `spin`, keeping the gaps.
fn spin_on(cpu: usize, spin: Duration) -> Option<CoreStalls> {
    if !pin(cpu) {
        return None;
    }
    waited()?;
    Some(gaps(cpu, spin, Instant::now, || waited().unwrap_or_default()))
}

/// The gaps between successive readings of `now` over `spin`, each split by how much `waited`
/// (the thread's run-queue wait) grew across it (the clock and the wait are arguments, so a test
/// can give a clock that jumps).
fn gaps(
    cpu: usize,
    spin: Duration,
    mut now: impl FnMut() -> Instant,
    mut waited: impl FnMut() -> Duration,
) -> CoreStalls {
    let start = now();
    let end = start + spin;
    let mut last = start;
    let mut wait = waited();
    let mut out = CoreStalls {
        cpu,
        over_1ms: 0,
        host_over_1ms: 0,
        longest: Duration::ZERO,
        longest_host: Duration::ZERO,
        lost: Duration::ZERO,
        lost_host: Duration::ZERO,
    };
    const MS: Duration = Duration::from_millis(1);
    while last < end {
        let t = now();
        let gap = t.saturating_duration_since(last);
        if gap > GAP {
            let w = waited();
            let others = w.saturating_sub(wait).min(gap);
            wait = w;
            let host = gap - others;
            out.lost += gap;
            out.lost_host += host;
            out.longest = out.longest.max(gap);
            out.longest_host = out.longest_host.max(host);
            out.over_1ms += usize::from(gap > MS);
            out.host_over_1ms += usize::from(host > MS);
            // The wait's read is not part of the next gap.
            last = now();
            continue;
        }
        last = t;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_count_only_the_jumps_of_the_clock() {
        // A clock that advances 1 us per reading, with jumps of 3 ms and 0.5 ms and 0.1 ms.
        let start = Instant::now();
        let mut t = start;
        let mut i = 0u32;
        let clock = move || {
            i += 1;
            t += match i {
                100 => Duration::from_millis(3),
                200 => Duration::from_micros(500),
                300 => Duration::from_micros(100),
                _ => Duration::from_micros(1),
            };
            t
        };
        // Another thread had the core for 2 ms of the 3 ms gap, none of the 0.5 ms one.
        let mut reads = 0u32;
        let waited = move || {
            reads += 1;
            // Read once at the start, then once after each gap.
            Duration::from_millis(if reads >= 2 { 12 } else { 10 })
        };
        let g = gaps(1, Duration::from_millis(10), clock, waited);
        assert_eq!(g.cpu, 1);
        assert_eq!(g.over_1ms, 1);
        assert_eq!(g.longest, Duration::from_millis(3));
        assert_eq!(g.lost, Duration::from_micros(3_500));
        // Host parts: 1 ms of the first gap, all of the second.
        assert_eq!(g.host_over_1ms, 0);
        assert_eq!(g.longest_host, Duration::from_millis(1));
        assert_eq!(g.lost_host, Duration::from_micros(1_500));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn every_allowed_core_is_measured() {
        let cpus = allowed_cpus().expect("this process's cores");
        let stalls = measure(Duration::from_millis(20)).expect("pinned threads");
        assert_eq!(stalls.iter().map(|c| c.cpu).collect::<Vec<_>>(), cpus);
        let line = describe(&stalls, Duration::from_millis(20));
        assert!(line.contains(&format!("cpu {}:", cpus[0])), "{line}");
    }
}
