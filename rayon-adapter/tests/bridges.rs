//! The bridges on rayon (features `tracing` and `opentelemetry`): parallel-iterator jobs,
//! `join`, `scope` spawns and pool jobs enter the span where they were created and attach the
//! session's OpenTelemetry context. One global subscriber per process; span names per test.
#![cfg(all(feature = "tracing", feature = "opentelemetry"))]
#![allow(missing_docs)]

use std::sync::Once;

use localsession_core::{Context, SessionCtx};
use localsession_rayon::{ParallelIteratorExt, ScopeExt};
use localsession_std::{OTEL_CONTEXT, scope, set_carry_otel_context, set_carry_spans};
use opentelemetry::Context as OtelContext;
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use rayon::prelude::*;
use tracing::info_span;

#[path = "../../std-adapter/tests/support/span_parents.rs"]
mod support;
use support::{PARENTS, install_capture};

fn init() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        install_capture();
        set_carry_spans(true);
        set_carry_otel_context(true);
    });
}

/// The parents of every span called `name`.
fn parents_of(name: &str) -> Vec<Option<&'static str>> {
    PARENTS.lock().unwrap().iter().filter(|(n, _)| *n == name).map(|(_, p)| *p).collect()
}

#[test]
fn parallel_iterator_jobs_run_in_the_callers_span() {
    init();
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    let request = info_span!("par_request");
    // `localsession_rayon::install`: a plain `pool.install` would run the closure, and create
    // the iterator, on a worker outside the caller's span and session.
    let sum: u64 = request.in_scope(|| {
        localsession_rayon::install(&pool, || {
            (0..1000u32)
                .into_par_iter()
                .with_min_len(10)
                .map(|x| {
                    drop(info_span!("par_item"));
                    u64::from(x)
                })
                .in_current_session()
                .sum()
        })
    });
    assert_eq!(sum, (0..1000).sum());
    let parents = parents_of("par_item");
    assert_eq!(parents.len(), 1000);
    assert!(parents.iter().all(|p| *p == Some("par_request")), "{parents:?}");
}

#[test]
fn join_scope_and_pool_jobs_run_in_the_span_they_were_created_in() {
    init();
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    info_span!("jobs_request").in_scope(|| {
        localsession_rayon::join(|| drop(info_span!("jobs_join_a")), || drop(info_span!("jobs_join_b")));
        localsession_rayon::scope(|s| {
            s.spawn_in_current_session(|_| drop(info_span!("jobs_scope_spawn")));
        });
        localsession_rayon::spawn_in(&pool, move || {
            drop(info_span!("jobs_pool_spawn"));
            tx.send(()).unwrap();
        });
    });
    rx.recv().unwrap();
    for name in ["jobs_join_a", "jobs_join_b", "jobs_scope_spawn", "jobs_pool_spawn"] {
        assert_eq!(parents_of(name), vec![Some("jobs_request")], "{name}");
    }
}

#[test]
fn jobs_see_the_sessions_opentelemetry_context() {
    init();
    let trace = TraceId::from_bytes([3; 16]);
    let span = SpanContext::new(trace, SpanId::from_bytes([4; 8]), TraceFlags::SAMPLED, true, TraceState::default());
    let session =
        SessionCtx::new(&Context::background()).with(&OTEL_CONTEXT, OtelContext::new().with_remote_span_context(span));
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    let seen: Vec<TraceId> = scope(session, || {
        localsession_rayon::install(&pool, || {
            (0..100)
                .into_par_iter()
                .map(|_| OtelContext::current().span().span_context().trace_id())
                .in_current_session()
                .collect()
        })
    });
    assert!(seen.iter().all(|t| *t == trace));
    // Afterwards, the pool's workers have no context attached.
    let after: Vec<bool> =
        pool.install(|| (0..100).into_par_iter().map(|_| OtelContext::current().has_active_span()).collect());
    assert!(after.iter().all(|attached| !attached));
}
