//! The `herald` binary: the CLI with the built-in handler kinds only (`webhook`, `log`).
//! A binary with Rust handlers calls `Node::builder().handler(...).main()` the same way.

#[global_allocator]
static ALLOCATOR: herald::Allocator = herald::Allocator;

fn main() -> std::process::ExitCode {
    herald::node::Node::builder().main()
}
