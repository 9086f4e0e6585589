//! W3C Trace Context (`traceparent`, `tracestate`): the trace an event belongs to.
//!
//! Plain vocabulary: parsing and formatting, no spans and no I/O. Where the context comes from
//! (HTTP headers, the CloudEvents distributed-tracing extension), how it travels (the WAL record
//! and the forwarded frame, `proto`) and which spans continue it are described in
//! ARCHITECTURE.md ("Trace context").
//!
//! Input is untrusted (publishers, peers, disk). Whatever does not parse is no context at all —
//! the publish then starts a new trace, as the W3C recommendation says a receiver should — never
//! an error to the publisher.

use std::fmt;

/// Length of a version-00 `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`).
pub const TRACEPARENT_LEN: usize = 55;
/// Longest `tracestate` kept (the W3C limit a propagator must at least carry); longer is dropped.
pub const MAX_TRACESTATE_LEN: usize = 512;
/// Most list members of a `tracestate` kept (the W3C limit); more and it is dropped.
const MAX_TRACESTATE_MEMBERS: usize = 32;

/// The `sampled` bit of the trace flags.
pub const SAMPLED: u8 = 0x01;

/// A W3C trace context: the trace id, the id of the parent span, the trace flags and the
/// vendor-specific `tracestate` (kept as given, if it is well-formed enough to pass on).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TraceContext {
    /// The trace id (never all zeros).
    pub trace_id: [u8; 16],
    /// The id of the span this context names as parent (never all zeros).
    pub span_id: [u8; 8],
    /// Trace flags; bit 0 is `sampled`.
    pub flags: u8,
    /// `tracestate`, if any (at most [`MAX_TRACESTATE_LEN`] bytes of printable ASCII).
    pub state: Option<String>,
}

impl TraceContext {
    /// Parses a `traceparent` header value and an optional `tracestate`. `None` when the
    /// `traceparent` is not valid: wrong length, version `ff`, a version 00 with trailing data,
    /// upper-case or non-hex digits, an all-zero trace or span id. An unusable `tracestate` is
    /// dropped (the W3C rule: a bad `tracestate` does not invalidate the `traceparent`).
    pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Option<Self> {
        let b = traceparent.trim_matches([' ', '\t']).as_bytes();
        if b.len() < TRACEPARENT_LEN {
            return None;
        }
        let version = hex_byte(&b[0..2])?;
        if version == 0xff {
            return None;
        }
        // Version 00 is exactly 55 bytes; a later version may append fields after a dash.
        if (version == 0 && b.len() != TRACEPARENT_LEN) || (b.len() > TRACEPARENT_LEN && b[TRACEPARENT_LEN] != b'-') {
            return None;
        }
        if b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
            return None;
        }
        let mut trace_id = [0u8; 16];
        for (i, out) in trace_id.iter_mut().enumerate() {
            *out = hex_byte(&b[3 + 2 * i..5 + 2 * i])?;
        }
        let mut span_id = [0u8; 8];
        for (i, out) in span_id.iter_mut().enumerate() {
            *out = hex_byte(&b[36 + 2 * i..38 + 2 * i])?;
        }
        let flags = hex_byte(&b[53..55])?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(TraceContext {
            trace_id,
            span_id,
            // A later version's flags are read as version 00's: only the bits we know.
            flags: if version == 0 { flags } else { flags & SAMPLED },
            state: tracestate.and_then(clean_state),
        })
    }

    /// A context with these ids, flags and no `tracestate`; `None` if an id is all zeros.
    pub fn new(trace_id: [u8; 16], span_id: [u8; 8], flags: u8) -> Option<Self> {
        (trace_id != [0; 16] && span_id != [0; 8]).then_some(TraceContext {
            trace_id,
            span_id,
            flags,
            state: None,
        })
    }

    /// Whether the `sampled` flag is set: the trace is recorded, so spans are made for it.
    pub fn sampled(&self) -> bool {
        self.flags & SAMPLED != 0
    }

    /// The same trace, with `span_id` as the parent span (the flags and `tracestate` kept).
    pub fn child(&self, span_id: [u8; 8]) -> Self {
        TraceContext {
            span_id,
            ..self.clone()
        }
    }

    /// The `traceparent` value (version 00), in a fixed buffer: no allocation.
    pub fn traceparent_bytes(&self) -> [u8; TRACEPARENT_LEN] {
        let mut out = [b'-'; TRACEPARENT_LEN];
        out[0] = b'0';
        out[1] = b'0';
        put_hex(&self.trace_id, &mut out[3..35]);
        put_hex(&self.span_id, &mut out[36..52]);
        put_hex(&[self.flags], &mut out[53..55]);
        out
    }

    /// The `traceparent` value (version 00).
    pub fn traceparent(&self) -> String {
        String::from_utf8_lossy(&self.traceparent_bytes()).into_owned()
    }

    /// The trace id in lower-case hex (32 characters).
    pub fn trace_id_hex(&self) -> String {
        let mut out = [0u8; 32];
        put_hex(&self.trace_id, &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    /// The parent span id in lower-case hex (16 characters).
    pub fn span_id_hex(&self) -> String {
        let mut out = [0u8; 16];
        put_hex(&self.span_id, &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }
}

impl fmt::Display for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.traceparent())
    }
}

/// A `tracestate` worth passing on: non-empty, at most [`MAX_TRACESTATE_LEN`] bytes of
/// printable ASCII, at most 32 list members. Anything else is dropped (not repaired).
fn clean_state(s: &str) -> Option<String> {
    let s = s.trim_matches([' ', '\t']);
    let ok = !s.is_empty()
        && s.len() <= MAX_TRACESTATE_LEN
        && s.bytes().all(|b| (0x20..0x7f).contains(&b))
        && s.split(',').filter(|m| !m.trim().is_empty()).count() <= MAX_TRACESTATE_MEMBERS;
    ok.then(|| s.to_string())
}

/// Two lower-case hex digits (upper case is invalid in a `traceparent`).
fn hex_byte(two: &[u8]) -> Option<u8> {
    fn digit(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    Some(digit(two[0])? << 4 | digit(two[1])?)
}

fn put_hex(bytes: &[u8], out: &mut [u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = HEX[usize::from(b >> 4)];
        out[2 * i + 1] = HEX[usize::from(b & 15)];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_parses_and_formats_back() {
        let c = TraceContext::parse(GOOD, Some("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE")).unwrap();
        assert_eq!(c.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(c.span_id_hex(), "00f067aa0ba902b7");
        assert!(c.sampled());
        assert_eq!(c.traceparent(), GOOD);
        assert_eq!(c.state.as_deref(), Some("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"));
        let unsampled = TraceContext::parse(&GOOD.replace("-01", "-00"), None).unwrap();
        assert!(!unsampled.sampled());
        assert_eq!(unsampled.state, None);
        let child = c.child([1; 8]);
        assert_eq!(child.trace_id, c.trace_id);
        assert_eq!(child.span_id_hex(), "0101010101010101");
    }

    #[test]
    fn malformed_traceparents_are_no_context() {
        let bad = [
            "",
            "00",
            &GOOD[..54],                                                  // too short
            &format!("{GOOD}0"),                                          // version 00 with a trailing byte
            &format!("{GOOD}-extra"),                                     // version 00 with a field more
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",    // version ff
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",    // upper case
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00F067AA0BA902B7-01",    // upper case
            "0A-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",    // upper-case version
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",    // zero trace id
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",    // zero span id
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",    // not hex
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",    // separator
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7_01",    // separator
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",    // flags
            "00-4bf92f3577b34da6a3ce929d0e0e47é6-00f067aa0ba902b7-01",    // multi-byte
            "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01xyz", // later version, no dash
        ];
        for s in bad {
            assert_eq!(TraceContext::parse(s, None), None, "{s:?}");
        }
        assert_eq!(TraceContext::new([0; 16], [1; 8], 1), None);
        assert_eq!(TraceContext::new([1; 16], [0; 8], 1), None);
    }

    #[test]
    fn a_later_version_is_read_as_version_00() {
        let c = TraceContext::parse(
            "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-09-what-ever",
            None,
        )
        .unwrap();
        assert_eq!(c.flags, SAMPLED);
        assert_eq!(c.traceparent(), GOOD);
        // Surrounding blanks (optional whitespace of an HTTP header) are ignored.
        assert!(TraceContext::parse(&format!(" {GOOD}\t"), None).is_some());
    }

    #[test]
    fn an_unusable_tracestate_is_dropped_and_the_traceparent_kept() {
        let long = "a=".to_string() + &"b".repeat(MAX_TRACESTATE_LEN);
        let many = (0..33).map(|i| format!("k{i}=v")).collect::<Vec<_>>().join(",");
        for state in ["", "  ", long.as_str(), "a=\u{7f}", "a=\n", "a=é", many.as_str()] {
            let c = TraceContext::parse(GOOD, Some(state)).unwrap();
            assert_eq!(c.state, None, "{state:?}");
        }
        let ok = "a=".to_string() + &"b".repeat(MAX_TRACESTATE_LEN - 2);
        assert_eq!(
            TraceContext::parse(GOOD, Some(&ok)).unwrap().state.as_deref(),
            Some(ok.as_str())
        );
    }
}
