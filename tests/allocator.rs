//! `herald::Allocator` (lib.rs): mimalloc, committing arena memory as it is used unless
//! `MIMALLOC_ARENA_EAGER_COMMIT` says otherwise. The option must be set before the first
//! allocation, so this test binary uses the allocator as its global one, as the `herald` binary and
//! a user's node binary do; the environment case runs in a child process of this binary.

#[global_allocator]
static ALLOCATOR: herald::Allocator = herald::Allocator;

/// The child's marker: it checks the eager case only when started by the parent test.
const CHILD: &str = "HERALD_ALLOCATOR_TEST_CHILD";

#[test]
fn arena_memory_is_committed_as_it_is_used() {
    if std::env::var_os(CHILD).is_some() {
        return;
    }
    let v = vec![0u8; 1 << 20];
    assert_eq!(v.len(), 1 << 20);
    assert!(!herald::Allocator::eager_commit());
}

#[test]
fn the_environment_variable_still_turns_eager_commit_on() {
    if std::env::var_os(CHILD).is_some() {
        // In the child: the variable was set before this process allocated anything.
        assert!(herald::Allocator::eager_commit());
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().expect("the test binary's path"))
        .args([
            "--exact",
            "the_environment_variable_still_turns_eager_commit_on",
            "--nocapture",
        ])
        .env(CHILD, "1")
        .env("MIMALLOC_ARENA_EAGER_COMMIT", "1")
        .output()
        .expect("the child test runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the child failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The child ran the test (a filter that matched nothing would pass too).
    assert!(text.contains("1 passed"), "{text}");
}
