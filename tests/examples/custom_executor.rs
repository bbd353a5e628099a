//! Embedding localsession in a hand-written executor, with `localsession-core` alone.
//!
//! Run with `cargo run -p localsession-tests --example custom_executor`. The executor is in
//! `src/mini_executor.rs`; this program spawns requests whose tasks hop between two workers and
//! read their session through `localsession_core::current()` — the call library code makes.

use localsession_core::{Context, Key, SessionCtx, current};
use localsession_tests::mini_executor::{MiniExecutor, yield_now};

static REQUEST_ID: Key<u64> = Key::new("request_id");

/// Library code deep in a call stack: no context parameter.
fn log(step: &str) {
    let id = current().and_then(|s| s.get_cloned(&REQUEST_ID));
    println!("request {id:?}: {step} on {:?}", std::thread::current().id());
}

fn main() {
    let executor = MiniExecutor::new();
    for id in 1..=3u64 {
        let session = SessionCtx::new(&Context::background()).with(&REQUEST_ID, id);
        let child_executor = executor.clone();
        executor.spawn_with(Some(session.into()), async move {
            log("start");
            yield_now().await;
            log("after a yield");
            // A child task inherits the request's session.
            child_executor.spawn(async {
                yield_now().await;
                log("child");
            });
        });
    }
    executor.run(2);
}
