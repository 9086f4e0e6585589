//! The webhook egress policy: which hosts and addresses a webhook may call
//! (`handlers.webhook_allow`, `handlers.webhook_deny`).
//!
//! A rule is a host name (`hooks.example.com`, case-insensitive), a wildcard (`*.example.com`:
//! any name under it, not the name itself), an IP address or a CIDR block (`10.0.0.0/8`,
//! `fd00::/8`). The built-in rules ([`BUILT_IN_DENY`]) refuse link-local and cloud-metadata
//! addresses: `169.254.0.0/16` (IPv4 link-local, where AWS, GCP and Azure serve instance
//! metadata and credentials), `fe80::/10` (IPv6 link-local) and `fd00:ec2::254` (AWS's IPv6
//! metadata address).
//!
//! **Precedence**, for a destination (the URL's host name and, once resolved, its address):
//!
//! 1. a match in `webhook_deny` refuses it, whatever else matches;
//! 2. when `webhook_allow` is not empty it is an allow list: a match permits the destination —
//!    even one the built-in rules refuse (an operator's explicit choice) — and anything else is
//!    refused;
//! 3. otherwise a match of a built-in rule refuses it;
//! 4. anything else is permitted.
//!
//! A host name is checked twice: when a subscription is created (its name against the name
//! rules; a literal IP against every rule) and when the webhook is called (every address the
//! name resolves to, with the name). An IPv4-mapped IPv6 address counts as its IPv4 address.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// The rules every node applies unless `webhook_allow` permits the destination.
pub const BUILT_IN_DENY: &[&str] = &["169.254.0.0/16", "fe80::/10", "fd00:ec2::254"];

/// One rule of the policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rule {
    /// A host name, lower case; `*.example.com` matches the names under `example.com`.
    Host(String),
    /// An address block (a single address is a /32 or /128).
    Net {
        /// The block's address, its host bits cleared.
        addr: IpAddr,
        /// The prefix length.
        prefix: u8,
    },
}

impl FromStr for Rule {
    type Err = String;

    fn from_str(s: &str) -> Result<Rule, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("an empty rule".into());
        }
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => {
                let addr: IpAddr = a.parse().map_err(|_| format!("{s:?}: {a:?} is not an IP address"))?;
                let prefix: u8 = p.parse().map_err(|_| format!("{s:?}: {p:?} is not a prefix length"))?;
                (addr, Some(prefix))
            }
            None => match s.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
                Ok(addr) => (addr, None),
                Err(_) => return host_rule(s),
            },
        };
        let addr = addr.to_canonical();
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        if prefix > max {
            return Err(format!("{s:?}: the prefix length must be at most {max}"));
        }
        Ok(Rule::Net {
            addr: mask(addr, prefix),
            prefix,
        })
    }
}

fn host_rule(s: &str) -> Result<Rule, String> {
    let name = s.to_ascii_lowercase();
    let bare = name.strip_prefix("*.").unwrap_or(&name);
    let valid = !bare.is_empty()
        && bare.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if valid {
        Ok(Rule::Host(name))
    } else {
        Err(format!(
            "{s:?} is neither a host name (or *.domain), an IP address nor a CIDR block"
        ))
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rule::Host(h) => f.write_str(h),
            Rule::Net { addr, prefix } if *prefix == if addr.is_ipv4() { 32 } else { 128 } => write!(f, "{addr}"),
            Rule::Net { addr, prefix } => write!(f, "{addr}/{prefix}"),
        }
    }
}

fn mask(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let bits = u32::from(a);
            let m = if prefix == 0 { 0 } else { u32::MAX << (32 - prefix) };
            IpAddr::V4((bits & m).into())
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a);
            let m = if prefix == 0 { 0 } else { u128::MAX << (128 - prefix) };
            IpAddr::V6((bits & m).into())
        }
    }
}

impl Rule {
    fn matches_name(&self, name: &str) -> bool {
        match self {
            Rule::Host(h) => match h.strip_prefix("*.") {
                Some(domain) => {
                    name.len() > domain.len() + 1 && name.ends_with(domain) && {
                        let cut = name.len() - domain.len();
                        name.as_bytes()[cut - 1] == b'.'
                    }
                }
                None => name == h,
            },
            Rule::Net { .. } => false,
        }
    }

    fn matches_addr(&self, ip: IpAddr) -> bool {
        match self {
            Rule::Net { addr, prefix } => {
                let ip = ip.to_canonical();
                ip.is_ipv4() == addr.is_ipv4() && mask(ip, *prefix) == *addr
            }
            Rule::Host(_) => false,
        }
    }

    fn matches(&self, name: Option<&str>, ip: Option<IpAddr>) -> bool {
        name.is_some_and(|n| self.matches_name(n)) || ip.is_some_and(|a| self.matches_addr(a))
    }
}

/// Why the policy refused a destination; the message names the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// The webhook egress policy of a node (see the module docs for the precedence).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressPolicy {
    allow: Vec<Rule>,
    deny: Vec<Rule>,
    built_in: Vec<Rule>,
}

impl Default for EgressPolicy {
    /// The built-in rules only.
    fn default() -> Self {
        EgressPolicy::new(&[], &[]).expect("the built-in rules parse")
    }
}

impl EgressPolicy {
    /// The policy of `handlers.webhook_allow` and `handlers.webhook_deny`; the error names the
    /// rule that does not parse and its list.
    pub fn new(allow: &[String], deny: &[String]) -> Result<EgressPolicy, String> {
        let parse = |key: &str, rules: &[String]| {
            rules
                .iter()
                .map(|r| r.parse::<Rule>().map_err(|e| format!("handlers.{key}: {e}")))
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(EgressPolicy {
            allow: parse("webhook_allow", allow)?,
            deny: parse("webhook_deny", deny)?,
            built_in: BUILT_IN_DENY
                .iter()
                .map(|r| r.parse().expect("a built-in rule"))
                .collect(),
        })
    }

    /// The decision for a destination known by `name` and/or address `ip`. `None` when it cannot
    /// be decided yet: a host name that only an address rule of the allow list could permit (it
    /// is decided once resolved).
    fn decide(&self, name: Option<&str>, ip: Option<IpAddr>) -> Option<Result<(), Refused>> {
        let what = match (name, ip) {
            (Some(n), Some(a)) => format!("{n} ({a})"),
            (Some(n), None) => n.to_string(),
            (None, Some(a)) => a.to_string(),
            (None, None) => return Some(Ok(())),
        };
        if let Some(rule) = self.deny.iter().find(|r| r.matches(name, ip)) {
            return Some(Err(Refused(format!(
                "{what} is refused by handlers.webhook_deny rule {rule}"
            ))));
        }
        if !self.allow.is_empty() {
            if self.allow.iter().any(|r| r.matches(name, ip)) {
                return Some(Ok(()));
            }
            if ip.is_none() && self.allow.iter().any(|r| matches!(r, Rule::Net { .. })) {
                return None;
            }
            return Some(Err(Refused(format!("{what} matches no handlers.webhook_allow rule"))));
        }
        if let Some(rule) = self.built_in.iter().find(|r| r.matches(name, ip)) {
            return Some(Err(Refused(format!(
                "{what} is a link-local or cloud-metadata address (built-in rule {rule}); \
                 list it in handlers.webhook_allow to permit it"
            ))));
        }
        Some(Ok(()))
    }

    /// Checks a URL's host (a subscription being created): a literal IP against every rule, a
    /// host name against the name rules (its addresses are checked when it is called).
    pub fn check_host(&self, host: &url::Host<&str>) -> Result<(), Refused> {
        let decision = match host {
            url::Host::Domain(d) => self.decide(Some(&d.to_ascii_lowercase()), None),
            url::Host::Ipv4(a) => self.decide(None, Some(IpAddr::V4(*a))),
            url::Host::Ipv6(a) => self.decide(None, Some(IpAddr::V6(*a))),
        };
        decision.unwrap_or(Ok(()))
    }

    /// Checks a URL (see [`EgressPolicy::check_host`]); a URL without a host passes (it is
    /// refused as invalid elsewhere).
    pub fn check_url(&self, url: &str) -> Result<(), Refused> {
        match url::Url::parse(url) {
            Ok(u) => u.host().map_or(Ok(()), |h| self.check_host(&h)),
            Err(_) => Ok(()),
        }
    }

    /// Checks an address that `name` resolved to (a webhook being called).
    pub fn check_resolved(&self, name: &str, ip: IpAddr) -> Result<(), Refused> {
        self.decide(Some(&name.to_ascii_lowercase()), Some(ip))
            .unwrap_or(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow: &[&str], deny: &[&str]) -> EgressPolicy {
        let s = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        EgressPolicy::new(&s(allow), &s(deny)).expect("valid rules")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn rules_parse_hosts_addresses_and_cidr_blocks() {
        assert_eq!(
            "Hooks.Example.COM".parse::<Rule>(),
            Ok(Rule::Host("hooks.example.com".into()))
        );
        assert_eq!("*.example.com".parse::<Rule>(), Ok(Rule::Host("*.example.com".into())));
        assert_eq!(
            "10.1.2.3/8".parse::<Rule>(),
            Ok(Rule::Net {
                addr: ip("10.0.0.0"),
                prefix: 8
            }),
            "host bits are cleared"
        );
        assert_eq!(
            "192.168.0.7".parse::<Rule>(),
            Ok(Rule::Net {
                addr: ip("192.168.0.7"),
                prefix: 32
            })
        );
        assert_eq!(
            "fd00:ec2::254".parse::<Rule>(),
            Ok(Rule::Net {
                addr: ip("fd00:ec2::254"),
                prefix: 128
            })
        );
        assert_eq!("fe80::1/10".parse::<Rule>().unwrap().to_string(), "fe80::/10");
        assert_eq!("[::1]".parse::<Rule>().unwrap().to_string(), "::1");
        for bad in [
            "",
            "10.0.0.0/33",
            "fe80::/129",
            "10.0.0.0/x",
            "300.1.1.1/8",
            "a b",
            "http://x/",
            "x..y",
        ] {
            assert!(bad.parse::<Rule>().is_err(), "{bad:?} must not parse");
        }
        let err = EgressPolicy::new(&[], &["10.0.0.0/40".into()]).unwrap_err();
        assert!(err.contains("handlers.webhook_deny"), "{err}");
    }

    #[test]
    fn cidr_blocks_match_v4_and_v6_and_mapped_addresses() {
        let r: Rule = "10.0.0.0/8".parse().unwrap();
        assert!(r.matches_addr(ip("10.255.1.2")));
        assert!(!r.matches_addr(ip("11.0.0.1")));
        assert!(
            r.matches_addr(ip("::ffff:10.0.0.1")),
            "an IPv4-mapped IPv6 address is its IPv4 address"
        );
        assert!(!r.matches_addr(ip("::a00:1")), "an IPv6 address is not an IPv4 one");
        let r: Rule = "fe80::/10".parse().unwrap();
        assert!(r.matches_addr(ip("fe80::1")));
        assert!(r.matches_addr(ip("febf::1")));
        assert!(!r.matches_addr(ip("fec0::1")));
        let all: Rule = "0.0.0.0/0".parse().unwrap();
        assert!(all.matches_addr(ip("8.8.8.8")) && !all.matches_addr(ip("::1")));
        let w: Rule = "*.example.com".parse().unwrap();
        assert!(w.matches_name("a.example.com") && w.matches_name("a.b.example.com"));
        assert!(!w.matches_name("example.com") && !w.matches_name("badexample.com"));
    }

    #[test]
    fn by_default_link_local_and_metadata_addresses_are_refused() {
        let p = EgressPolicy::default();
        for refused in [
            "169.254.169.254",
            "169.254.0.1",
            "fe80::1",
            "fd00:ec2::254",
            "::ffff:169.254.169.254",
        ] {
            let err = p.check_resolved("metadata", ip(refused)).unwrap_err();
            assert!(err.0.contains("built-in rule"), "{refused}: {err}");
        }
        let err = p.check_url("http://169.254.169.254/latest/meta-data/").unwrap_err();
        assert!(err.0.contains("169.254.0.0/16"), "the message names the rule: {err}");
        assert!(p.check_url("http://[fd00:ec2::254]/").is_err());
        for allowed in ["127.0.0.1", "10.0.0.1", "8.8.8.8", "::1", "fd00:ec2::253"] {
            assert_eq!(p.check_resolved("h", ip(allowed)), Ok(()), "{allowed}");
        }
        assert_eq!(p.check_url("http://127.0.0.1:8080/hook"), Ok(()));
        assert_eq!(p.check_url("https://hooks.example.com/in"), Ok(()));
    }

    #[test]
    fn deny_wins_over_allow_and_allow_wins_over_the_built_in_rules() {
        // An explicit deny beats everything.
        let p = policy(&["*.example.com", "10.0.0.0/8"], &["bad.example.com", "10.9.0.0/16"]);
        let err = p.check_url("https://bad.example.com/").unwrap_err();
        assert!(err.0.contains("webhook_deny rule bad.example.com"), "{err}");
        assert!(
            p.check_resolved("ok.example.com", ip("10.9.1.1")).is_err(),
            "the deny block wins"
        );
        assert_eq!(p.check_resolved("ok.example.com", ip("10.1.1.1")), Ok(()));
        // A non-empty allow list refuses the rest…
        let err = p.check_resolved("other.org", ip("8.8.8.8")).unwrap_err();
        assert!(err.0.contains("matches no handlers.webhook_allow rule"), "{err}");
        assert!(p.check_url("http://192.168.1.1/").is_err());
        let names_only = policy(&["*.example.com"], &[]);
        assert!(
            names_only.check_url("https://other.org/").is_err(),
            "no address rule could permit it"
        );
        // …a name it cannot judge before resolving passes creation and is judged when called.
        assert_eq!(p.check_url("https://internal.corp/"), Ok(()));
        assert_eq!(p.check_resolved("internal.corp", ip("10.3.3.3")), Ok(()));
        assert!(p.check_resolved("internal.corp", ip("192.168.3.3")).is_err());
        // An allowed block opens part of the built-in refusal.
        let p = policy(&["169.254.10.0/24"], &[]);
        assert_eq!(p.check_url("http://169.254.10.5/"), Ok(()));
        assert!(p.check_url("http://169.254.169.254/").is_err());
        // A deny list alone keeps the built-in rules.
        let p = policy(&[], &["*.internal"]);
        assert!(p.check_url("http://db.internal/").is_err());
        assert!(p.check_url("http://169.254.169.254/").is_err());
        assert_eq!(p.check_url("http://10.0.0.1/"), Ok(()));
    }
}
