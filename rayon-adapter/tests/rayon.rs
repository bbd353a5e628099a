//! The rayon adapter end to end: every item and job sees the caller's session, inline runs keep
//! the caller's binding (also on panic), and no job's binding reaches a later job.
#![allow(missing_docs)]

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;

use localsession_core::{AnySession, SessionMap};
use localsession_rayon::{ParallelIteratorExt, ScopeExt};
use localsession_std::{bind, current, scope, without_flow};
use rayon::prelude::*;
use rayon::{ThreadPool, ThreadPoolBuilder};

fn pool(threads: usize) -> ThreadPool {
    ThreadPoolBuilder::new().num_threads(threads).build().expect("a rayon pool")
}

fn session(name: &'static str) -> AnySession {
    SessionMap::new().with_value("name", name).into()
}

/// Whether this thread's current session is not exactly `expected`.
fn is_not(expected: &AnySession) -> bool {
    current().is_none_or(|s| !s.ptr_eq(expected))
}

/// How many of `jobs` plain (unwrapped) jobs on `pool` see any session.
fn later_jobs_that_see_a_session(pool: &ThreadPool, jobs: usize) -> usize {
    let (tx, rx) = mpsc::channel();
    for _ in 0..jobs {
        let tx = tx.clone();
        pool.spawn(move || tx.send(current().is_some()).unwrap());
    }
    drop(tx);
    let seen = rx.iter().filter(|seen| *seen).count();
    // And every worker, once each.
    seen + pool.broadcast(|_| current().is_some()).into_iter().filter(|s| *s).count()
}

#[test]
fn ten_thousand_items_on_a_4_thread_pool_all_see_the_callers_session() {
    let pool = pool(4);
    let caller = session("caller");
    let items: Vec<u64> = (0..10_000).collect();
    // Created on the caller (outside the pool), run on the pool.
    let (consumer_path, producer_path) = scope(caller.clone(), || {
        let consumer_path = items.par_iter().filter(|_| is_not(&caller)).in_current_session();
        let producer_path = items.par_iter().in_current_session().filter(|_| is_not(&caller));
        pool.install(move || (consumer_path.count(), producer_path.count()))
    });
    assert_eq!((consumer_path, producer_path), (0, 0), "items that did not see the caller's session");
    // Unindexed source, `fold` + `reduce` (closures on the reduction side), and `zip`.
    let (folded, zipped) = scope(caller.clone(), || {
        let caller = &caller;
        let folded = (0..10_000u64)
            .into_par_iter()
            .filter(|i| i % 3 != 7)
            .fold(|| usize::from(is_not(caller)), |n, _| n + usize::from(is_not(caller)))
            .in_current_session();
        let zipped = items.par_iter().map(|_| is_not(caller)).in_current_session().zip(items.par_iter());
        pool.install(move || {
            (folded.reduce(|| 0, |a, b| a + b + usize::from(is_not(caller))), zipped.filter(|(bad, _)| *bad).count())
        })
    });
    assert_eq!((folded, zipped), (0, 0));
    assert_eq!(later_jobs_that_see_a_session(&pool, 64), 0, "a worker kept the session after the iterators");
}

#[test]
fn binding_inside_install_reaches_every_item() {
    let pool = pool(4);
    let mine = session("mine");
    let missed = pool.install(|| {
        scope(mine.clone(), || (0..10_000).into_par_iter().filter(|_| is_not(&mine)).in_current_session().count())
    });
    assert_eq!(missed, 0);
    // The same through `localsession_rayon::install`, with the session bound on the caller.
    let missed = scope(mine.clone(), || {
        localsession_rayon::install(&pool, || {
            (0..10_000).into_par_iter().filter(|_| is_not(&mine)).in_current_session().count()
        })
    });
    assert_eq!(missed, 0);
    assert_eq!(later_jobs_that_see_a_session(&pool, 64), 0);
}

#[test]
fn with_session_and_without_session_and_suppressed_flow() {
    let pool = pool(4);
    let given = session("given");
    let caller = session("caller");
    let (given_missed, none_seen, suppressed_seen) = scope(caller, || {
        pool.install(|| {
            let given_missed = (0..1000).into_par_iter().filter(|_| is_not(&given)).with_session(given.clone()).count();
            let none_seen = (0..1000).into_par_iter().filter(|_| current().is_some()).without_session().count();
            let it = without_flow(|| (0..1000).into_par_iter().filter(|_| current().is_some()).in_current_session());
            (given_missed, none_seen, it.count())
        })
    });
    assert_eq!((given_missed, none_seen, suppressed_seen), (0, 0, 0));
}

#[test]
fn the_caller_keeps_its_binding_after_an_inline_join() {
    // One worker: both closures run inline on it, the caller of `join`.
    let pool = pool(1);
    let caller = session("caller");
    pool.install(|| {
        scope(caller.clone(), || {
            let (a, b) = localsession_rayon::join(
                || {
                    let saw = !is_not(&caller);
                    bind(session("a")).unwrap();
                    saw
                },
                || {
                    let saw = !is_not(&caller);
                    bind(session("b")).unwrap();
                    saw
                },
            );
            assert!(a && b, "a closure did not see the caller's session");
            assert!(!is_not(&caller), "the caller lost its binding to an inline closure");

            for panicking in ["a", "b"] {
                let result = catch_unwind(AssertUnwindSafe(|| {
                    localsession_rayon::join(
                        || {
                            bind(session("a")).unwrap();
                            assert_ne!(panicking, "a", "closure a panics");
                        },
                        || {
                            bind(session("b")).unwrap();
                            assert_ne!(panicking, "b", "closure b panics");
                        },
                    )
                }));
                assert!(result.is_err());
                assert!(!is_not(&caller), "the caller lost its binding when closure {panicking} panicked");
            }
        });
    });
    assert_eq!(later_jobs_that_see_a_session(&pool, 64), 0);
}

#[test]
fn a_panicking_item_leaves_the_caller_and_the_workers_as_they_were() {
    let pool = pool(4);
    let caller = session("caller");
    pool.install(|| {
        scope(caller.clone(), || {
            let result = catch_unwind(AssertUnwindSafe(|| {
                (0..10_000).into_par_iter().in_current_session().for_each(|i| {
                    bind(session("item")).unwrap();
                    assert!(i != 5_000, "item 5000 panics");
                })
            }));
            assert!(result.is_err());
            assert!(!is_not(&caller));
        })
    });
    assert_eq!(later_jobs_that_see_a_session(&pool, 64), 0);
}

#[test]
fn no_binding_leaks_from_one_job_to_later_jobs() {
    let pool = pool(4);
    let leak = session("leak");
    // Jobs that bind and never unbind, through every wrapper.
    let (tx, rx) = mpsc::channel();
    for _ in 0..16 {
        let (tx, leak) = (tx.clone(), leak.clone());
        localsession_rayon::spawn_in(&pool, move || {
            bind(leak).unwrap();
            tx.send(()).unwrap();
        });
    }
    drop(tx);
    assert_eq!(rx.iter().count(), 16);
    localsession_rayon::install(&pool, || {
        bind(leak.clone()).unwrap();
        localsession_rayon::join(|| bind(leak.clone()).unwrap(), || bind(leak.clone()).unwrap());
        localsession_rayon::scope(|s| {
            for _ in 0..16 {
                s.spawn_in_current_session(|_| bind(leak.clone()).unwrap());
            }
        });
        (0..1000).into_par_iter().in_current_session().for_each(|_| bind(leak.clone()).unwrap());
    });
    assert_eq!(later_jobs_that_see_a_session(&pool, 64), 0, "later plain jobs saw a leaked binding");
}

#[test]
fn without_the_wrappers_a_plain_job_leaks_into_later_jobs() {
    // The reproduction, and proof that the check above detects a leak.
    let pool = pool(1);
    let (tx, rx) = mpsc::channel();
    pool.spawn(move || {
        bind(session("leak")).unwrap();
        tx.send(()).unwrap();
    });
    rx.recv().unwrap();
    assert_eq!(later_jobs_that_see_a_session(&pool, 64), 65);
    pool.broadcast(|_| localsession_std::unbind());
}

#[test]
fn nested_par_iter_with_another_session_inside_a_job() {
    let pool = pool(4);
    let outer = session("outer");
    let mismatches = scope(outer.clone(), || {
        localsession_rayon::install(&pool, || {
            (0..64)
                .into_par_iter()
                .map(|_| {
                    let before = usize::from(is_not(&outer));
                    let inner = session("inner");
                    let inner_missed =
                        (0..1000).into_par_iter().filter(|_| is_not(&inner)).with_session(inner.clone()).count();
                    // While the inner loop blocked, this worker may have run other outer items
                    // and inner jobs on its stack: it is back to the outer session.
                    before + inner_missed + usize::from(is_not(&outer))
                })
                .in_current_session()
                .sum::<usize>()
        })
    });
    assert_eq!(mismatches, 0);
    assert_eq!(later_jobs_that_see_a_session(&pool, 64), 0);
}

#[test]
fn scope_and_spawn_carry_the_callers_session() {
    let pool = pool(4);
    let caller = session("caller");
    let missed = AtomicUsize::new(0);
    scope(caller.clone(), || {
        localsession_rayon::install(&pool, || {
            localsession_rayon::scope(|s| {
                missed.fetch_add(usize::from(is_not(&caller)), Ordering::Relaxed);
                for _ in 0..100 {
                    s.spawn_in_current_session(|s| {
                        missed.fetch_add(usize::from(is_not(&caller)), Ordering::Relaxed);
                        s.spawn_in_current_session(|_| {
                            missed.fetch_add(usize::from(is_not(&caller)), Ordering::Relaxed);
                        });
                    });
                }
            });
        });
    });
    assert_eq!(missed.load(Ordering::Relaxed), 0);
    let (tx, rx) = mpsc::channel();
    scope(caller.clone(), || {
        for _ in 0..32 {
            let (tx, caller) = (tx.clone(), caller.clone());
            localsession_rayon::spawn(move || tx.send(is_not(&caller)).unwrap());
        }
    });
    drop(tx);
    assert_eq!(rx.iter().filter(|missed| *missed).count(), 0);
    assert_eq!(later_jobs_that_see_a_session(&pool, 64), 0);
}

/// The example of the README's "rayon" section, verbatim (the README is not compiled).
#[test]
fn the_readme_example() {
    use localsession_core::{Context, Key, SessionCtx};

    static TENANT: Key<&str> = Key::new("tenant");

    fn price(item: u64) -> u64 {
        // Deep in the call tree, on any worker: no ctx parameter.
        let tenant = current().and_then(|s| s.get_cloned(&TENANT));
        if tenant == Some("acme") { item * 9 / 10 } else { item }
    }

    let pool = rayon::ThreadPoolBuilder::new().num_threads(4).build().unwrap();
    let request = SessionCtx::new(&Context::background()).with(&TENANT, "acme");
    let items: Vec<u64> = (1..=10_000).collect();
    let total: u64 = scope(request, || {
        localsession_rayon::install(&pool, || {
            // Last before the terminal operation: every closure above it, every job, every
            // reduction runs with the request's session.
            items.par_iter().map(|&i| price(i * 10)).in_current_session().sum()
        })
    });
    assert_eq!(total, 9 * (1..=10_000u64).sum::<u64>());
}
