//! The layering of `src/` (ARCHITECTURE.md, "Layers"): the top-level modules form layers, a module uses only
//! modules of its own layer or below, and no two modules use each other, directly or through
//! others.
//!
//! A module *uses* another when one of its files names `crate::<other>` — in code, in a `use`
//! (`crate::{a, b}` included) or in an intra-doc link — outside the `#[cfg(test)] mod tests` at
//! the end of a file. That is the edge `tools/module_cycles.py` counts (plus the grouped form),
//! so the two agree. `src/lib.rs` (the module list and the prelude's re-exports) and `src/bin/`
//! (the binaries) are not modules of the library's graph.
//!
//! A new top-level module must be given a layer in `LAYERS` (and in ARCHITECTURE.md, "Layers") before this passes.
//!
//! Also here, as it reads the same files: the modules that decide (failure detection, elections,
//! placement, redelivery, retries, timeouts) read no wall clock (ARCHITECTURE.md, "Time").

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};

/// The layers, bottom first: a module may use the modules of its own layer and of the layers
/// before it. Keep in step with ARCHITECTURE.md, "Layers".
const LAYERS: &[(&str, &[&str])] = &[
    ("vocabulary", &["types", "error", "event", "subscription", "proto"]),
    ("foundations", &["config", "metrics", "telemetry", "pki", "transport"]),
    ("cluster", &["placement", "monitor", "membership"]),
    ("events", &["handler", "router", "relay", "ingress", "event_sim"]),
    ("node", &["control", "http", "node"]),
    ("process", &["text", "top", "harness", "up", "cli"]),
];

/// The modules whose decisions run on the monotonic clock only, so that a step of the wall clock
/// (NTP, a VM resumed, an operator) cannot change them. Keep in step with ARCHITECTURE.md, "Time".
const MONOTONIC_ONLY: &[&str] = &[
    "transport",
    "placement",
    "monitor",
    "membership",
    "handler",
    "router",
    "relay",
];

/// Reads of the wall clock (a ULID is made from it too).
const WALL_CLOCK: &[&str] = &[
    "SystemTime::now",
    "Utc::now",
    "Local::now",
    "OffsetDateTime::now_utc",
    "Ulid::new",
];

/// Top-level modules the check skips, each with the reason; an entry may name a module that is
/// already gone.
const EXEMPT: &[(&str, &str)] = &[];

/// One `crate::<module>` reference: the module it names and where.
#[derive(Debug, Clone)]
struct Use {
    from: String,
    to: String,
    file: String,
    line: usize,
}

/// The top-level module a file under `src/` belongs to (`None` for `lib.rs`, `main.rs` and `bin/`).
fn module_of(rel: &Path) -> Option<String> {
    let parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    match parts.as_slice() {
        [file] => {
            let stem = file.strip_suffix(".rs")?;
            (stem != "lib" && stem != "main").then(|| stem.to_string())
        }
        [dir, ..] if dir == "bin" => None,
        [dir, ..] => Some(dir.clone()),
        [] => None,
    }
}

fn is_ident_start(c: u8) -> bool {
    c.is_ascii_lowercase() || c == b'_'
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_'
}

fn is_word(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// The module names a file's `crate::…` paths start with, each with its byte offset:
/// `crate::a::b` gives `a`; `crate::{a, b::c, self}` gives `a` and `b`.
fn crate_paths(src: &str) -> Vec<(String, usize)> {
    let bytes = src.as_bytes();
    let mut found = Vec::new();
    let mut from = 0;
    while let Some(pos) = src[from..].find("crate::") {
        let start = from + pos;
        from = start + "crate::".len();
        if start > 0 && is_word(bytes[start - 1]) {
            continue; // `mycrate::…`, `$crate::…`'s neighbours and the like are not ours
        }
        let mut i = from;
        if bytes.get(i) == Some(&b'{') {
            // A grouped import: the first segment of every path at depth 1.
            let mut depth = 1;
            let mut expect_segment = true;
            i += 1;
            while i < bytes.len() && depth > 0 {
                let c = bytes[i];
                match c {
                    b'{' => depth += 1,
                    b'}' => depth -= 1,
                    b',' if depth == 1 => expect_segment = true,
                    _ if expect_segment && depth == 1 && is_ident_start(c) => {
                        let end = (i..bytes.len()).find(|&j| !is_ident(bytes[j])).unwrap_or(bytes.len());
                        found.push((src[i..end].to_string(), i));
                        expect_segment = false;
                        i = end;
                        continue;
                    }
                    _ if c.is_ascii_whitespace() => {}
                    _ => expect_segment = false,
                }
                i += 1;
            }
        } else if bytes.get(i).is_some_and(|&c| is_ident_start(c)) {
            let end = (i..bytes.len()).find(|&j| !is_ident(bytes[j])).unwrap_or(bytes.len());
            found.push((src[i..end].to_string(), i));
        }
    }
    found
}

/// A file without the unit tests at its end, which may use anything (as module_cycles.py assumes)
/// and read any clock.
fn code_of(src: &str) -> &str {
    match src.find("#[cfg(test)]\nmod tests") {
        Some(cut) => &src[..cut],
        None => src,
    }
}

/// Every read of the wall clock in the code of `modules`, as `file:line: what`.
fn wall_clock_reads(files: &[(PathBuf, String)], modules: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    for (rel, src) in files {
        if !module_of(rel).is_some_and(|m| modules.contains(&m.as_str())) {
            continue;
        }
        for (n, line) in code_of(src).lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for what in WALL_CLOCK.iter().filter(|w| code.contains(*w)) {
                out.push(format!("src/{}:{}: {what}", rel.display(), n + 1));
            }
        }
    }
    out
}

/// Every use of another top-level module in `files` (path relative to `src/`, contents).
fn uses(files: &[(PathBuf, String)]) -> (BTreeSet<String>, Vec<Use>) {
    let modules: BTreeSet<String> = files.iter().filter_map(|(rel, _)| module_of(rel)).collect();
    let mut out = Vec::new();
    for (rel, src) in files {
        let Some(me) = module_of(rel) else { continue };
        let code = code_of(src);
        for (to, at) in crate_paths(code) {
            if to != me && modules.contains(&to) {
                out.push(Use {
                    from: me.clone(),
                    to,
                    file: format!("src/{}", rel.display()),
                    line: code[..at].matches('\n').count() + 1,
                });
            }
        }
    }
    (modules, out)
}

/// What is wrong with the layering of `files`, one message per problem (empty when it is right).
fn problems(files: &[(PathBuf, String)], layers: &[(&str, &[&str])], exempt: &[&str]) -> Vec<String> {
    let (modules, uses) = uses(files);
    let mut problems = Vec::new();
    let layer_of: BTreeMap<&str, (usize, &str)> = layers
        .iter()
        .enumerate()
        .flat_map(|(i, (name, mods))| mods.iter().map(move |m| (*m, (i, *name))))
        .collect();
    for m in &modules {
        if !layer_of.contains_key(m.as_str()) && !exempt.contains(&m.as_str()) {
            problems.push(format!(
                "module `{m}` has no layer: add it to LAYERS in tests/layering.rs and to the Layers of ARCHITECTURE.md"
            ));
        }
    }
    for m in layer_of.keys() {
        if !modules.contains(*m) {
            problems.push(format!("LAYERS names `{m}`, which is not a module of src/ any more"));
        }
    }
    let checked: Vec<&Use> = uses
        .iter()
        .filter(|u| !exempt.contains(&u.from.as_str()) && !exempt.contains(&u.to.as_str()))
        .collect();
    // (a) No use of a higher layer.
    for u in &checked {
        if let (Some(&(from, from_layer)), Some(&(to, to_layer))) =
            (layer_of.get(u.from.as_str()), layer_of.get(u.to.as_str()))
        {
            if to > from {
                problems.push(format!(
                    "{} -> {} at {}:{}: `{}` (layer {from_layer}) must not use `{}` (layer {to_layer}, above it)",
                    u.from, u.to, u.file, u.line, u.from, u.to
                ));
            }
        }
    }
    // (b) No cycle: for every edge a -> b, b must not reach a.
    let mut first: BTreeMap<(&str, &str), &Use> = BTreeMap::new();
    for u in &checked {
        first.entry((u.from.as_str(), u.to.as_str())).or_insert(u);
    }
    let mut next: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (a, b) in first.keys() {
        next.entry(a).or_default().push(b);
    }
    let mut reported: BTreeSet<Vec<&str>> = BTreeSet::new();
    for &(a, b) in first.keys() {
        // Breadth first from b, so the cycle shown is a shortest one.
        let mut parent: BTreeMap<&str, &str> = BTreeMap::new();
        let mut queue = VecDeque::from([b]);
        let mut seen = BTreeSet::from([b]);
        while let Some(v) = queue.pop_front() {
            if v == a {
                break;
            }
            for &w in next.get(v).map(Vec::as_slice).unwrap_or_default() {
                if seen.insert(w) {
                    parent.insert(w, v);
                    queue.push_back(w);
                }
            }
        }
        if !seen.contains(a) {
            continue;
        }
        let mut path = vec![a];
        let mut v = a;
        while v != b {
            v = parent[v];
            path.push(v);
        }
        path.push(a);
        path.reverse(); // a -> b -> … -> a
        let mut key: Vec<&str> = path[1..].to_vec();
        key.sort_unstable();
        if !reported.insert(key) {
            continue;
        }
        let steps: Vec<String> = path
            .windows(2)
            .map(|w| {
                let u = first[&(w[0], w[1])];
                format!("  {} -> {} at {}:{}", w[0], w[1], u.file, u.line)
            })
            .collect();
        problems.push(format!("import cycle {}:\n{}", path.join(" -> "), steps.join("\n")));
    }
    problems
}

/// Every `.rs` file under `dir`, with its path relative to `root`.
fn read_tree(root: &Path, dir: &Path, out: &mut Vec<(PathBuf, String)>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
    for entry in entries {
        let path = entry
            .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
            .path();
        if path.is_dir() {
            read_tree(root, &path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
            let rel = path.strip_prefix(root).unwrap_or(&path).to_path_buf();
            out.push((rel, text));
        }
    }
}

/// Every `.rs` file under `src/`, by path relative to it, in order.
fn source_files() -> Vec<(PathBuf, String)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    read_tree(&src, &src, &mut files);
    files.sort();
    files
}

#[test]
fn top_level_modules_keep_their_layers_and_have_no_cycles() {
    let files = source_files();
    let exempt: Vec<&str> = EXEMPT.iter().map(|(m, _)| *m).collect();
    let problems = problems(&files, LAYERS, &exempt);
    assert!(
        problems.is_empty(),
        "the module layering of src/ is broken (see the Layers of ARCHITECTURE.md):\n{}",
        problems.join("\n")
    );
}

/// The check itself: it must see the edges and report them with their place.
#[test]
fn the_check_reports_an_upward_use_and_a_cycle() {
    let file = |path: &str, text: &str| (PathBuf::from(path), text.to_string());
    let files = vec![
        file("low.rs", "//! Uses [`crate::high::X`].\nuse crate::mid::Y;\n"),
        file("mid/mod.rs", "use crate::{low, other::Z};\n"),
        file("mid/deep.rs", "fn f() { crate::low::g(); mycrate::high::h(); }\n"),
        file("high.rs", "#[cfg(test)]\nmod tests { use crate::low::X; }\n"),
        file("other.rs", ""),
        file("lib.rs", "pub use crate::high::X;\n"),
        file("bin/tool.rs", "use crate::high::X;\n"),
    ];
    let layers: &[(&str, &[&str])] = &[("bottom", &["low", "other"]), ("top", &["mid", "high"])];
    let found = problems(&files, layers, &[]);
    let all = found.join("\n");
    assert!(
        all.contains("low -> high at src/low.rs:1"),
        "upward use in a doc link:\n{all}"
    );
    assert!(all.contains("low -> mid at src/low.rs:2"), "upward use:\n{all}");
    assert!(all.contains("import cycle"), "cycle low <-> mid:\n{all}");
    assert!(all.contains("mid -> low at src/mid/mod.rs:1"), "grouped import:\n{all}");
    assert!(
        !all.contains("high ->"),
        "the unit tests and lib.rs/bin/ are not edges:\n{all}"
    );
    assert!(!all.contains("mid -> high"), "`mycrate::` is not `crate::`:\n{all}");
    assert_eq!(found.len(), 3, "{all}");

    let unplaced = problems(&[file("new.rs", "")], layers, &[]);
    assert!(
        unplaced.iter().any(|p| p.contains("module `new` has no layer")),
        "{unplaced:?}"
    );
    assert!(
        problems(&files, layers, &["low"]).is_empty(),
        "exempt modules are skipped"
    );
}

#[test]
fn the_modules_that_decide_read_no_wall_clock() {
    let files = source_files();
    let reads = wall_clock_reads(&files, MONOTONIC_ONLY);
    assert!(
        reads.is_empty(),
        "the wall clock is read where decisions are made (use monitor::now; ARCHITECTURE.md, \"Time\"):\n{}",
        reads.join("\n")
    );
}

/// The clock check itself: it sees a read in code, and not in a comment or the unit tests.
#[test]
fn the_clock_check_reports_a_wall_clock_read_in_code_only() {
    let file = |path: &str, text: &str| (PathBuf::from(path), text.to_string());
    let files = vec![
        file(
            "relay/outbound.rs",
            "fn a() {\n    let t = std::time::SystemTime::now();\n}\n// Utc::now is not read here\n#[cfg(test)]\nmod tests {\n    fn b() { chrono::Utc::now(); }\n}\n",
        ),
        file("http/mod.rs", "fn c() { chrono::Utc::now(); }\n"),
    ];
    assert_eq!(
        wall_clock_reads(&files, &["relay"]),
        vec!["src/relay/outbound.rs:2: SystemTime::now".to_string()]
    );
}
