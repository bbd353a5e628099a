//! Adversarial tests of the rayon adapter: adaptor chains around `.in_current_session()`,
//! nested and cross-pool installs, inline `join`, panics everywhere, jobs that outlive the
//! caller's binding, `par_bridge`, `with_min_len(1)`, and work stealing while the caller blocks.
//!
//! Pattern used throughout: the iterator (or job) is *created* on a caller thread that has the
//! session bound, then *run* on a pool whose workers have nothing bound, so any closure the
//! adapter does not cover observes "no session" and is counted as a miss.
#![allow(missing_docs)]

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex, mpsc};
use std::time::{Duration, Instant};

use localsession_core::{AnySession, SessionMap};
use localsession_rayon::{ParallelIteratorExt, ScopeExt};
use localsession_std::{bind, current, scope, unbind, without_flow};
use rayon::prelude::*;
use rayon::{ThreadPool, ThreadPoolBuilder};

const N: usize = 10_000;

fn pool(threads: usize) -> ThreadPool {
    ThreadPoolBuilder::new().num_threads(threads).build().expect("a rayon pool")
}

/// A pool whose `spawn`ed panics are swallowed (rayon aborts the process otherwise).
fn tolerant_pool(threads: usize) -> ThreadPool {
    ThreadPoolBuilder::new().num_threads(threads).panic_handler(|_| {}).build().expect("a rayon pool")
}

fn session(name: &'static str) -> AnySession {
    SessionMap::new().with_value("name", name).into()
}

fn is_not(expected: &AnySession) -> bool {
    current().is_none_or(|s| !s.ptr_eq(expected))
}

fn name_of_current() -> String {
    current().and_then(|s| s.value_cloned::<&str, _>(&"name")).map_or_else(|| "<none>".to_owned(), str::to_owned)
}

/// Counts the calls that did not see `expected`.
struct Probe<'a> {
    expected: &'a AnySession,
    misses: AtomicUsize,
    calls: AtomicUsize,
}

impl<'a> Probe<'a> {
    fn new(expected: &'a AnySession) -> Self {
        Probe { expected, misses: AtomicUsize::new(0), calls: AtomicUsize::new(0) }
    }
    fn hit(&self) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if is_not(self.expected) {
            self.misses.fetch_add(1, Ordering::Relaxed);
        }
    }
    fn report(&self) -> (usize, usize) {
        (self.misses.load(Ordering::Relaxed), self.calls.load(Ordering::Relaxed))
    }
}

/// How many workers of `pool` (each once) and of `jobs` plain jobs see any session.
fn leaked(pool: &ThreadPool, jobs: usize) -> usize {
    let (tx, rx) = mpsc::channel();
    for _ in 0..jobs {
        let tx = tx.clone();
        pool.spawn(move || tx.send(current().is_some()).unwrap());
    }
    drop(tx);
    let seen = rx.iter().filter(|s| *s).count();
    seen + pool.broadcast(|_| current().is_some()).into_iter().filter(|s| *s).count()
}

// ---------------------------------------------------------------------------------------------
// A. Closures *before* a last `.in_current_session()`: README "Coverage" and iter.rs say every
//    closure before it sees the session when it is last before the terminal operation.
// ---------------------------------------------------------------------------------------------

#[test]
fn every_closure_before_a_last_in_current_session_sees_it_plain_adaptors() {
    let pool = pool(4);
    let caller = session("caller");
    let items: Vec<u64> = (0..N as u64).collect();
    let mut failures = Vec::new();
    let mut run = |name: &str, f: &(dyn Fn(&Probe<'_>) + Sync)| {
        let probe = Probe::new(&caller);
        // `f` builds the iterator on the caller (captures the session) and runs it on the pool.
        scope(caller.clone(), || f(&probe));
        let (misses, calls) = probe.report();
        assert!(calls > 0, "{name}: the probe never ran");
        if misses > 0 {
            failures.push(format!("{name}: {misses} of {calls} calls saw no/other session"));
        }
    };
    run("filter+map", &|p| {
        let it = items
            .par_iter()
            .filter(|_| {
                p.hit();
                true
            })
            .map(|x| {
                p.hit();
                x
            })
            .in_current_session();
        assert_eq!(pool.install(move || it.count()), N);
    });
    run("with_min_len(1)+filter", &|p| {
        let it = items
            .par_iter()
            .with_min_len(1)
            .filter(|_| {
                p.hit();
                true
            })
            .in_current_session();
        assert_eq!(pool.install(move || it.count()), N);
    });
    run("enumerate+rev+step_by before", &|p| {
        let it = items
            .par_iter()
            .map(|x| {
                p.hit();
                x
            })
            .enumerate()
            .rev()
            .step_by(1)
            .map(|(i, _)| {
                p.hit();
                i
            })
            .in_current_session();
        assert_eq!(pool.install(move || it.count()), N);
    });
    run("chain", &|p| {
        let it = items
            .par_iter()
            .map(|x| {
                p.hit();
                x
            })
            .chain(items.par_iter().filter(|_| {
                p.hit();
                true
            }))
            .in_current_session();
        assert_eq!(pool.install(move || it.count()), 2 * N);
    });
    run("zip+for_each", &|p| {
        let it = items
            .par_iter()
            .map(|x| {
                p.hit();
                x
            })
            .zip(items.par_iter().map(|x| {
                p.hit();
                x
            }))
            .in_current_session();
        pool.install(move || it.for_each(|_| p.hit()));
    });
    run("interleave", &|p| {
        let it = items
            .par_iter()
            .map(|x| {
                p.hit();
                x
            })
            .interleave(items.par_iter().map(|x| {
                p.hit();
                x
            }))
            .in_current_session();
        assert_eq!(pool.install(move || it.count()), 2 * N);
    });
    run("chunks", &|p| {
        let it = items
            .par_iter()
            .map(|x| {
                p.hit();
                *x
            })
            .chunks(7)
            .map(|c| {
                p.hit();
                c.len()
            })
            .in_current_session();
        assert_eq!(pool.install(move || it.sum::<usize>()), N);
    });
    run("map_init", &|p| {
        let it = items
            .par_iter()
            .map_init(
                || p.hit(),
                |_, x| {
                    p.hit();
                    x
                },
            )
            .in_current_session();
        assert_eq!(pool.install(move || it.count()), N);
    });
    run("fold+reduce", &|p| {
        let it = items
            .par_iter()
            .fold(
                || {
                    p.hit();
                    0usize
                },
                |n, _| {
                    p.hit();
                    n + 1
                },
            )
            .in_current_session();
        assert_eq!(
            pool.install(move || it.reduce(
                || {
                    p.hit();
                    0
                },
                |a, b| {
                    p.hit();
                    a + b
                }
            )),
            N
        );
    });
    run("flat_map_iter", &|p| {
        let it = (0..100usize)
            .into_par_iter()
            .flat_map_iter(|_| {
                p.hit();
                (0..100).inspect(|_| p.hit())
            })
            .in_current_session();
        assert_eq!(pool.install(move || it.count()), N);
    });
    run("par_bridge (std iterator's own closures too)", &|p| {
        let it = (0..N)
            .inspect(|_| p.hit())
            .par_bridge()
            .filter(|_| {
                p.hit();
                true
            })
            .in_current_session();
        assert_eq!(pool.install(move || it.count()), N);
    });
    run("collect into Vec", &|p| {
        let it = items
            .par_iter()
            .with_min_len(1)
            .map(|x| {
                p.hit();
                *x
            })
            .in_current_session();
        assert_eq!(pool.install(move || it.collect::<Vec<_>>()).len(), N);
    });
    assert!(
        failures.is_empty(),
        "closures before a last .in_current_session() missed the session:\n{}",
        failures.join("\n")
    );
    assert_eq!(leaked(&pool, 32), 0);
}

/// `flat_map`/`flatten`: the outer closure (and anything before it) runs in rayon's
/// `FlatMapFolder::consume`, i.e. inside the *outer* job's folder, whose base consumer is the
/// `SessionConsumer` not yet turned into a folder — so with the adaptor only last, nothing is
/// installed there (100 of 100 calls of each closure missed it). The documented form: the
/// adaptor right before the `flat_map` too.
#[test]
fn flat_map_with_the_adaptor_before_it_and_last_covers_every_closure() {
    let pool = pool(4);
    let caller = session("caller");
    let outer = Probe::new(&caller);
    let before = Probe::new(&caller);
    let inner_items = Probe::new(&caller);
    let count = scope(caller.clone(), || {
        let it = (0..100usize)
            .into_par_iter()
            .filter(|_| {
                before.hit();
                true
            })
            .in_current_session()
            .flat_map(|_| {
                outer.hit();
                (0..100usize).into_par_iter()
            })
            .filter(|_| {
                inner_items.hit();
                true
            })
            .in_current_session();
        pool.install(move || it.count())
    });
    assert_eq!(count, N);
    let (o, b, i) = (outer.report(), before.report(), inner_items.report());
    assert_eq!(
        (o.0, b.0, i.0),
        (0, 0, 0),
        "misses (of calls): flat_map closure {o:?}, filter before flat_map {b:?}, inner items {i:?}"
    );
}

/// As above for `flatten` (with the adaptor only last, the `map` before it missed 100 of 100).
#[test]
fn flatten_with_the_adaptor_before_it_and_last_covers_the_closure_before_it() {
    let pool = pool(4);
    let caller = session("caller");
    let probe = Probe::new(&caller);
    let count = scope(caller.clone(), || {
        let it = (0..100usize)
            .into_par_iter()
            .map(|_| {
                probe.hit();
                vec![0u8; 100]
            })
            .in_current_session()
            .flatten()
            .in_current_session();
        pool.install(move || it.count())
    });
    assert_eq!(count, N);
    assert_eq!(probe.report().0, 0, "map closure before flatten: (misses, calls) = {:?}", probe.report());
}

/// The workaround for `flat_map`: put `.in_current_session()` both before and after it.
#[test]
fn flat_map_bracketed_by_in_current_session_covers_everything() {
    let pool = pool(4);
    let caller = session("caller");
    let probe = Probe::new(&caller);
    let count = scope(caller.clone(), || {
        let it = (0..100usize)
            .into_par_iter()
            .in_current_session()
            .flat_map(|_| {
                probe.hit();
                (0..100usize).into_par_iter().with_max_len(1)
            })
            .filter(|_| {
                probe.hit();
                true
            })
            .in_current_session();
        pool.install(move || it.count())
    });
    assert_eq!(count, N);
    assert_eq!(probe.report().0, 0, "(misses, calls) = {:?}", probe.report());
}

// ---------------------------------------------------------------------------------------------
// B. Adaptors *after* `.in_current_session()`: iter.rs says "Followed by indexed adaptors
//    (`map`, `enumerate`, ...) that drive the producer: the producer path. The session covers
//    producing and folding the job's items", and followed by non-indexed adaptors: "the session
//    covers everything the job runs ... every closure before and after the adaptor".
// ---------------------------------------------------------------------------------------------

#[test]
fn map_and_filter_after_in_current_session_see_it() {
    let pool = pool(4);
    let caller = session("caller");
    let probe = Probe::new(&caller);
    let items: Vec<u64> = (0..N as u64).collect();
    scope(caller.clone(), || {
        let a = items
            .par_iter()
            .in_current_session()
            .map(|x| {
                probe.hit();
                x
            })
            .filter(|_| {
                probe.hit();
                true
            });
        let b = items.par_iter().in_current_session().with_min_len(1).map(|x| {
            probe.hit();
            *x
        });
        pool.install(move || {
            assert_eq!(a.count(), N);
            assert_eq!(b.collect::<Vec<_>>().len(), N);
        });
    });
    assert_eq!(probe.report().0, 0, "(misses, calls) = {:?}", probe.report());
}

/// `enumerate`, `rev` and `step_by` fold their producer through `into_iter`: placed before
/// them the adaptor installs per item while producing it and the `for_each` after them runs
/// without it (10 000 of 10 000 items missed). The documented form: the adaptor last.
#[test]
fn enumerate_rev_step_by_with_the_adaptor_last_see_the_session() {
    let pool = pool(4);
    let caller = session("caller");
    let items: Vec<u64> = (0..N as u64).collect();
    let mut failures = Vec::new();
    for (name, which) in [("enumerate", 0), ("rev", 1), ("step_by", 2)] {
        let probe = Probe::new(&caller);
        scope(caller.clone(), || {
            // Made here, where the caller's session is bound; run on the pool.
            let p = &probe;
            match which {
                0 => {
                    let it = items.par_iter().enumerate().in_current_session();
                    pool.install(|| it.for_each(|_| p.hit()));
                }
                1 => {
                    let it = items.par_iter().rev().in_current_session();
                    pool.install(|| it.for_each(|_| p.hit()));
                }
                _ => {
                    let it = items.par_iter().step_by(1).in_current_session();
                    pool.install(|| it.for_each(|_| p.hit()));
                }
            }
        });
        let (misses, calls) = probe.report();
        assert_eq!(calls, N);
        if misses > 0 {
            failures
                .push(format!("{name}().in_current_session().for_each(..): {misses} of {calls} items saw no session"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Non-indexed `flat_map` after the adaptor: the inner parallel iterators split with `join`;
/// a half stolen by an idle worker runs with whatever that worker has — nothing, with the
/// adaptor only before the `flat_map`. With it last as well (the documented form), the stolen
/// half sees the session. Forced here: inner item 0 waits until inner item 1 has run on another
/// thread.
#[test]
fn flat_map_inner_items_stolen_by_idle_workers_see_the_session_with_the_adaptor_last() {
    let pool = pool(4);
    let caller = session("caller");
    let seen: Mutex<Vec<(usize, bool, std::thread::ThreadId)>> = Mutex::new(Vec::new());
    let done1 = AtomicBool::new(false);
    scope(caller.clone(), || {
        let it = (0..1usize)
            .into_par_iter()
            .in_current_session()
            .flat_map(|_| (0..2usize).into_par_iter().with_max_len(1))
            .in_current_session();
        pool.install(|| {
            it.for_each(|i| {
                if i == 0 {
                    let deadline = Instant::now() + Duration::from_secs(3);
                    while !done1.load(Ordering::Acquire) && Instant::now() < deadline {
                        std::thread::yield_now();
                    }
                }
                seen.lock().unwrap().push((i, !is_not(&caller), std::thread::current().id()));
                if i == 1 {
                    done1.store(true, Ordering::Release);
                }
            })
        });
    });
    let seen = seen.into_inner().unwrap();
    let stolen = seen.len() == 2 && seen[0].2 != seen[1].2;
    let missed: Vec<_> = seen.iter().filter(|(_, ok, _)| !ok).map(|(i, ..)| *i).collect();
    assert!(missed.is_empty(), "inner items that saw no session: {missed:?} (stolen to another thread: {stolen})");
}

// ---------------------------------------------------------------------------------------------
// C. Nested pools, cross-pool install, work stealing while the caller blocks.
// ---------------------------------------------------------------------------------------------

#[test]
fn cross_pool_install_from_inside_jobs_with_distinct_sessions() {
    let a = pool(2);
    let b = pool(2);
    let names: Vec<&'static str> = (0..32).map(|i| &*Box::leak(format!("req{i}").into_boxed_str())).collect();
    let errors = Mutex::new(Vec::new());
    a.install(|| {
        names.par_iter().with_max_len(1).for_each(|&name| {
            let mine = session(name);
            scope(mine.clone(), || {
                let (inside, missed) = localsession_rayon::install(&b, || {
                    let inside = !is_not(&mine);
                    // A nested iterator on pool b, and a nested install back into... pool b.
                    let missed =
                        (0..500).into_par_iter().with_min_len(1).filter(|_| is_not(&mine)).in_current_session().count();
                    let again = localsession_rayon::install(&b, || !is_not(&mine));
                    (inside && again, missed)
                });
                let after = !is_not(&mine);
                if !(inside && missed == 0 && after) {
                    errors.lock().unwrap().push(format!(
                        "{name}: inside={inside} missed={missed} after={after} (after: {})",
                        name_of_current()
                    ));
                }
            });
        });
    });
    let errors = errors.into_inner().unwrap();
    assert!(errors.is_empty(), "{errors:#?}");
    assert_eq!(leaked(&a, 16), 0);
    assert_eq!(leaked(&b, 16), 0);
}

#[test]
fn join_while_the_caller_blocks_runs_other_sessions_jobs_on_its_stack() {
    let pool = pool(4);
    let errors = AtomicUsize::new(0);
    let names: Vec<&'static str> = (0..64).map(|i| &*Box::leak(format!("item{i}").into_boxed_str())).collect();
    pool.install(|| {
        names.par_iter().with_max_len(1).for_each(|&name| {
            let mine = session(name);
            scope(mine.clone(), || {
                let (a, b) = localsession_rayon::join(
                    || {
                        // Block long enough for other items' jobs to be stolen / run here.
                        let ok = !is_not(&mine);
                        let inner = (0..200).into_par_iter().filter(|_| is_not(&mine)).in_current_session().count();
                        bind(session("leak-a")).unwrap();
                        ok && inner == 0
                    },
                    || {
                        let ok = !is_not(&mine);
                        bind(session("leak-b")).unwrap();
                        ok
                    },
                );
                if !(a && b && !is_not(&mine)) {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            });
        });
    });
    assert_eq!(errors.load(Ordering::Relaxed), 0);
    assert_eq!(leaked(&pool, 32), 0);
}

#[test]
fn deeply_nested_joins_each_level_keeps_its_own_binding() {
    fn level(depth: usize, names: &[&'static str]) -> usize {
        if depth == names.len() {
            return 0;
        }
        let mine = session(names[depth]);
        scope(mine.clone(), || {
            let (a, b) = localsession_rayon::join(
                || usize::from(is_not(&mine)) + level(depth + 1, names),
                || usize::from(is_not(&mine)) + level(depth + 1, names),
            );
            a + b + usize::from(is_not(&mine))
        })
    }
    let names: Vec<&'static str> = (0..10).map(|i| &*Box::leak(format!("d{i}").into_boxed_str())).collect();
    let pool = pool(4);
    let caller = session("caller");
    let (misses, after) = pool.install(|| scope(caller.clone(), || (level(0, &names), !is_not(&caller))));
    assert_eq!(misses, 0);
    assert!(after);
    assert_eq!(leaked(&pool, 32), 0);
}

#[test]
fn inline_join_under_without_flow_and_with_no_caller_binding() {
    let pool = pool(1);
    let caller = session("caller");
    pool.install(|| {
        // Flow suppressed: the closures see nothing, the caller keeps its own binding.
        scope(caller.clone(), || {
            let (a, b) = without_flow(|| localsession_rayon::join(|| current().is_none(), || current().is_none()));
            assert!(a && b, "closures saw a session while the flow was suppressed");
            assert!(!is_not(&caller), "caller lost its binding: now {}", name_of_current());
        });
        // Nothing bound on the caller: nothing bound afterwards, even if the closures bind.
        assert!(current().is_none());
        localsession_rayon::join(|| bind(session("x")).unwrap(), || bind(session("y")).unwrap());
        assert!(current().is_none(), "the caller got {} from an inline closure", name_of_current());
    });
    assert_eq!(leaked(&pool, 8), 0);
}

#[test]
fn an_iterator_captured_elsewhere_runs_inline_with_its_session_and_restores_the_callers() {
    let pool = pool(1);
    let captured = session("captured");
    let other = session("other");
    let it = scope(captured.clone(), || {
        (0..N).into_par_iter().with_min_len(1).filter(|_| is_not(&captured)).in_current_session()
    });
    pool.install(|| {
        scope(other.clone(), || {
            assert_eq!(it.count(), 0, "items saw the runner's session instead of the captured one");
            assert!(!is_not(&other), "the runner lost its binding: now {}", name_of_current());
        })
    });
    assert_eq!(leaked(&pool, 8), 0);
}

// ---------------------------------------------------------------------------------------------
// D. Panics: the caller's own binding exactly restored, later jobs see no leak.
// ---------------------------------------------------------------------------------------------

#[test]
fn panics_in_items_fold_identity_and_reduce_with_min_len_1() {
    let pool = pool(4);
    let caller = session("caller");
    pool.install(|| {
        scope(caller.clone(), || {
            let cases: [(&str, &(dyn Fn() + Sync)); 4] = [
                ("item", &|| {
                    (0..N).into_par_iter().with_min_len(1).in_current_session().for_each(|i| {
                        bind(session("item")).unwrap();
                        assert!(i % 997 != 13, "item panics");
                    })
                }),
                ("fold identity", &|| {
                    let n = AtomicUsize::new(0);
                    let _ = (0..N)
                        .into_par_iter()
                        .with_min_len(1)
                        .fold(
                            || {
                                bind(session("identity")).unwrap();
                                // The second identity (a job's count of leaves varies: a
                                // later one may never come).
                                assert!(n.fetch_add(1, Ordering::Relaxed) != 1, "identity panics");
                                0usize
                            },
                            |a, _| a + 1,
                        )
                        .in_current_session()
                        .sum::<usize>();
                }),
                ("reduce", &|| {
                    let n = AtomicUsize::new(0);
                    let _ = (0..N).into_par_iter().with_min_len(1).in_current_session().reduce(
                        || 0,
                        |a, b| {
                            bind(session("reduce")).unwrap();
                            // The first reduction (at least one: 10^4 items split on 4 threads).
                            assert!(n.fetch_add(1, Ordering::Relaxed) != 0, "reduce panics");
                            a + b
                        },
                    );
                }),
                ("zip item", &|| {
                    (0..N)
                        .into_par_iter()
                        .map(|i| {
                            bind(session("zip")).unwrap();
                            assert!(i != 4321, "zip item panics");
                            i
                        })
                        .in_current_session()
                        .zip(0..N)
                        .for_each(|_| ());
                }),
            ];
            for (name, case) in cases {
                let result = catch_unwind(AssertUnwindSafe(case));
                assert!(result.is_err(), "{name}: did not panic");
                assert!(!is_not(&caller), "{name}: the caller now has {}", name_of_current());
            }
        })
    });
    assert_eq!(leaked(&pool, 64), 0);
}

#[test]
fn panics_in_join_scope_and_install_across_pools() {
    let a = pool(2);
    let b = pool(2);
    let caller = session("caller");
    a.install(|| {
        scope(caller.clone(), || {
            // join: b stolen or inline, panicking after a bind.
            for which in 0..2 {
                let r = catch_unwind(AssertUnwindSafe(|| {
                    localsession_rayon::join(
                        || {
                            bind(session("ja")).unwrap();
                            assert!(which != 0, "a panics")
                        },
                        || {
                            bind(session("jb")).unwrap();
                            assert!(which != 1, "b panics")
                        },
                    )
                }));
                assert!(r.is_err());
                assert!(!is_not(&caller), "join {which}: caller has {}", name_of_current());
            }
            // scope: a spawned job panics; the body binds too.
            let r = catch_unwind(AssertUnwindSafe(|| {
                localsession_rayon::scope(|s| {
                    bind(session("body")).unwrap();
                    for i in 0..16 {
                        s.spawn_in_current_session(move |_| {
                            bind(session("spawned")).unwrap();
                            assert!(i != 7, "spawned job panics");
                        });
                    }
                })
            }));
            assert!(r.is_err());
            assert!(!is_not(&caller), "scope: caller has {}", name_of_current());
            // install into another pool, panicking there.
            let r = catch_unwind(AssertUnwindSafe(|| {
                localsession_rayon::install(&b, || {
                    bind(session("in-b")).unwrap();
                    panic!("install panics");
                })
            }));
            assert!(r.is_err());
            assert!(!is_not(&caller), "cross-pool install: caller has {}", name_of_current());
            // install into the same pool (inline on this worker), panicking.
            let r = catch_unwind(AssertUnwindSafe(|| {
                localsession_rayon::install(&a, || {
                    bind(session("in-a")).unwrap();
                    panic!("inline install panics");
                })
            }));
            assert!(r.is_err());
            assert!(!is_not(&caller), "inline install: caller has {}", name_of_current());
        })
    });
    assert_eq!(leaked(&a, 32), 0);
    assert_eq!(leaked(&b, 32), 0);
}

#[test]
fn a_panicking_spawn_in_job_leaves_nothing_on_its_worker() {
    let pool = tolerant_pool(2);
    let (tx, rx) = mpsc::channel();
    scope(session("caller"), || {
        for i in 0..32 {
            let tx = tx.clone();
            localsession_rayon::spawn_in(&pool, move || {
                bind(session("leak")).unwrap();
                tx.send(()).unwrap();
                assert!(i % 2 == 1, "spawned job panics");
            });
        }
    });
    drop(tx);
    assert_eq!(rx.iter().count(), 32);
    // Let the panicking jobs finish unwinding before checking (they sent before panicking).
    pool.install(|| ());
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(leaked(&pool, 64), 0);
}

// ---------------------------------------------------------------------------------------------
// E. Jobs that outlive the caller's binding.
// ---------------------------------------------------------------------------------------------

#[test]
fn spawned_jobs_outliving_the_callers_scope_keep_the_captured_session() {
    let pool = pool(2);
    let captured = session("captured");
    let gate = Arc::new(Barrier::new(2));
    let (tx, rx) = mpsc::channel();
    scope(captured.clone(), || {
        let (gate, tx, captured) = (gate.clone(), tx.clone(), captured.clone());
        localsession_rayon::spawn_in(&pool, move || {
            gate.wait(); // runs on after the caller left its scope
            tx.send(!is_not(&captured)).unwrap();
        });
    });
    assert!(current().is_none());
    bind(session("caller-later")).unwrap(); // the caller moves on to something else
    gate.wait();
    assert!(rx.recv().unwrap(), "the job lost the session captured at spawn");
    unbind();
    // rayon::scope: the body returns while spawned jobs still run; the spawn captures the
    // binding current in the body *at the spawn*, and the caller keeps its own afterwards.
    let outer = session("outer");
    let inner = session("inner");
    let seen = Mutex::new(Vec::new());
    pool.install(|| {
        scope(outer.clone(), || {
            localsession_rayon::scope(|s| {
                bind(inner.clone()).unwrap();
                for _ in 0..8 {
                    s.spawn_in_current_session(|_| {
                        std::thread::sleep(Duration::from_millis(5));
                        seen.lock().unwrap().push(!is_not(&inner));
                    });
                }
                bind(session("late")).unwrap(); // after the spawns: must not reach them
            });
            assert!(!is_not(&outer), "after the scope the caller has {}", name_of_current());
        })
    });
    let seen = seen.into_inner().unwrap();
    assert_eq!(seen, vec![true; 8]);
    assert_eq!(leaked(&pool, 16), 0);
}

#[test]
fn global_spawn_and_join_from_outside_any_pool() {
    let caller = session("caller");
    let (tx, rx) = mpsc::channel();
    scope(caller.clone(), || {
        for _ in 0..16 {
            let (tx, caller) = (tx.clone(), caller.clone());
            localsession_rayon::spawn(move || {
                let ok = !is_not(&caller);
                bind(session("leak")).unwrap();
                tx.send(ok).unwrap();
            });
        }
        let (a, b) = localsession_rayon::join(|| !is_not(&caller), || !is_not(&caller));
        assert!(a && b);
        assert!(!is_not(&caller));
    });
    drop(tx);
    assert!(rx.iter().all(|ok| ok));
    let leaked = rayon::broadcast(|_| current().is_some()).into_iter().filter(|s| *s).count();
    assert_eq!(leaked, 0, "global pool workers kept a binding");
}

#[test]
fn par_bridge_ten_thousand_items_four_threads_all_see_the_session() {
    let pool = pool(4);
    let caller = session("caller");
    let (missed, total) = scope(caller.clone(), || {
        let it = (0..N).par_bridge().map(|_| usize::from(is_not(&caller))).in_current_session();
        let it2 = (0..N).par_bridge().in_current_session().filter(|_| is_not(&caller));
        pool.install(move || (it.sum::<usize>() + it2.count(), N))
    });
    assert_eq!(total, N);
    assert_eq!(missed, 0);
    assert_eq!(leaked(&pool, 32), 0);
}
