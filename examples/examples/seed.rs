//! The seed program of Go's localsession README, in Rust (see `src/seed.rs` for the code).
//!
//! Run with `cargo run -p localsession-examples --example seed`. Pass `map` to run it with a
//! `SessionMap` instead of a `SessionCtx`. The output is the same on every run.

use localsession_examples::seed::{Kind, run};
use localsession_std::{default_manager_options, init_default_manager};

fn main() {
    // Go: `func init() { InitDefaultManager(DefaultManagerOptions()) }`
    if let Err(e) = init_default_manager(default_manager_options()) {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
    let kind = match std::env::args().nth(1).as_deref() {
        None | Some("ctx") => Kind::Ctx,
        Some("map") => Kind::Map,
        Some(other) => {
            eprintln!("error: unknown session kind {other:?} (expected \"ctx\" or \"map\")");
            std::process::exit(2);
        }
    };
    let name = if kind == Kind::Ctx { "SessionCtx" } else { "SessionMap" };
    println!("seed program with a {name} (g0 = the main thread; g1, g2, g3 = the threads it starts)");
    run(kind, |line| println!("{line}"));
}
