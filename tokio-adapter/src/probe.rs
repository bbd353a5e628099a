//! tokio's task probe for the std store: which task runs on this thread, so that a sticky
//! `bind` inside a plain task of a runtime without hooks stays that task's (see
//! [`localsession_std::register_task_probe`]).

use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::task::Id;

/// The `u64` inside a tokio task id (its `Hash` writes exactly that number; never 0).
pub(crate) fn raw_id(id: Id) -> u64 {
    #[derive(Default)]
    struct Capture(u64);
    impl Hasher for Capture {
        fn finish(&self) -> u64 {
            self.0
        }
        fn write(&mut self, bytes: &[u8]) {
            for b in bytes {
                self.0 = (self.0 << 8) | u64::from(*b);
            }
        }
        fn write_u64(&mut self, n: u64) {
            self.0 = n;
        }
    }
    let mut capture = Capture::default();
    id.hash(&mut capture);
    capture.finish()
}

fn running_task() -> u64 {
    tokio::task::try_id().map_or(0, raw_id)
}

/// Whether [`register`] has run (a relaxed flag: the spawn helpers call it on every spawn).
static REGISTERED: AtomicBool = AtomicBool::new(false);

/// Registers tokio's probe with the std store (once; one relaxed load afterwards).
#[inline]
pub(crate) fn register() {
    if !REGISTERED.load(Ordering::Relaxed) {
        register_once();
    }
}

#[cold]
fn register_once() {
    // The first registration wins (`register_task_probe`); ours was made or lost here, and
    // trying again would change nothing.
    let _ = localsession_std::register_task_probe(running_task);
    REGISTERED.store(true, Ordering::Relaxed);
}
