//! DESIGN §7 stress over a plain thread pool: requests whose work hops between pool threads as
//! jobs wrapped with `in_current_session`, with random hops and fan-out. No job ever sees another
//! request's session, no pool thread keeps a session between jobs, and every session is released
//! (a live counter returns to 0). 10 000 requests by default, 100 000 with `LOCALSESSION_STRESS=1`.
#![allow(missing_docs)]

mod common;

use std::sync::atomic::{AtomicIsize, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};

use localsession_core::{Context, Key, SessionCtx, SessionMap};
use localsession_std::{current, in_current_session, scope};

static REQUEST: Key<Tracked> = Key::new("request");
static LIVE: AtomicIsize = AtomicIsize::new(0);

/// A request id whose lifetime is counted.
struct Tracked(u64);

impl Tracked {
    fn new(id: u64) -> Tracked {
        LIVE.fetch_add(1, Ordering::SeqCst);
        Tracked(id)
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        LIVE.fetch_sub(1, Ordering::SeqCst);
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// A fixed pool of threads taking jobs from one queue.
struct Pool {
    tx: Option<Sender<Job>>,
    threads: Vec<std::thread::JoinHandle<usize>>,
}

impl Pool {
    fn new(n: usize) -> Pool {
        let (tx, rx) = channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let threads = (0..n)
            .map(|_| {
                let rx: Arc<Mutex<Receiver<Job>>> = Arc::clone(&rx);
                std::thread::spawn(move || {
                    // Counts jobs that found the pool thread holding a session (there must be none).
                    let mut dirty = 0;
                    loop {
                        let job = match rx.lock().unwrap().recv() {
                            Ok(job) => job,
                            Err(_) => return dirty,
                        };
                        if current().is_some() {
                            dirty += 1;
                        }
                        job();
                        if current().is_some() {
                            dirty += 1;
                        }
                    }
                })
            })
            .collect();
        Pool { tx: Some(tx), threads }
    }

    fn submit(&self, job: impl FnOnce() + Send + 'static) {
        self.tx.as_ref().expect("pool is open").send(Box::new(job)).expect("pool threads alive");
    }

    /// Closes the queue and returns how many times a pool thread was found holding a session.
    fn join(mut self) -> usize {
        drop(self.tx.take());
        self.threads.drain(..).map(|t| t.join().expect("pool thread panicked")).sum()
    }
}

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

fn cur_id() -> Option<u64> {
    current().and_then(|s| s.read_key(&REQUEST, |v| v.map(|t| t.0)))
}

/// One step of a request: check the session, hop to 0..=2 more jobs, then retire itself.
fn step(pool: Arc<Pool>, id: u64, mut rng: u64, depth: u32, errors: Arc<AtomicUsize>, pending: Arc<AtomicUsize>) {
    if cur_id() != Some(id) {
        errors.fetch_add(1, Ordering::SeqCst);
    }
    let hops = if depth >= 4 { 0 } else { xorshift(&mut rng) % 3 };
    pending.fetch_add(usize::try_from(hops).unwrap(), Ordering::SeqCst);
    for h in 0..hops {
        // Each hop carries the current session (captured now, installed on whichever pool thread
        // runs it, removed after).
        let (p, e, d) = (Arc::clone(&pool), Arc::clone(&errors), Arc::clone(&pending));
        let r = rng.wrapping_add(h);
        pool.submit(in_current_session(move || step(p, id, r, depth + 1, e, d)));
    }
    pending.fetch_sub(1, Ordering::SeqCst);
}

#[test]
fn requests_over_a_thread_pool_never_see_each_other() {
    let requests: u64 = if std::env::var_os("LOCALSESSION_STRESS").is_some() { 100_000 } else { 10_000 };
    let pool = Arc::new(Pool::new(4));
    let errors = Arc::new(AtomicUsize::new(0));
    let pending = Arc::new(AtomicUsize::new(usize::try_from(requests).unwrap()));
    for id in 0..requests {
        let session: localsession_core::AnySession = if id % 3 == 0 {
            SessionMap::new().with(&REQUEST, Tracked::new(id)).into()
        } else {
            SessionCtx::new(&Context::background()).with(&REQUEST, Tracked::new(id)).into()
        };
        let (p, e, d) = (Arc::clone(&pool), Arc::clone(&errors), Arc::clone(&pending));
        let seed = id.wrapping_mul(0x9E37_79B9) | 1;
        let job = scope(session, || in_current_session(move || step(p, id, seed, 0, e, d)));
        pool.submit(job);
    }
    let cap = std::time::Duration::from_secs(60);
    common::wait_until("every request's jobs finished", cap, || pending.load(Ordering::SeqCst) == 0);
    common::wait_until("every job released the pool", cap, || Arc::strong_count(&pool) == 1);
    let pool = Arc::into_inner(pool).expect("no job holds the pool any more");
    let dirty = pool.join();
    assert_eq!(errors.load(Ordering::SeqCst), 0, "a job saw another request's session (or none)");
    assert_eq!(dirty, 0, "a pool thread held a session between jobs");
    common::wait_until("every session released", cap, || LIVE.load(Ordering::SeqCst) == 0);
}
