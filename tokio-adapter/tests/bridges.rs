//! The bridges on tokio tasks (features `tracing` and `opentelemetry`): the spawner's span is
//! entered and the session's OpenTelemetry context attached around every poll — for the
//! explicit helpers on any build, and for plain `tokio::spawn` in implicit mode
//! (`--cfg tokio_unstable`). One global subscriber per process, capturing every span's parent;
//! each test uses span names of its own.
#![cfg(all(feature = "tracing", feature = "opentelemetry"))]
#![allow(missing_docs)]

#[cfg(tokio_unstable)]
use std::collections::BTreeSet;
use std::sync::{Mutex, Once};

use localsession_core::{Context, SessionCtx};
use localsession_std::{OTEL_CONTEXT, scope, set_carry_otel_context, set_carry_spans};
use localsession_tokio::JoinSetExt;
use opentelemetry::baggage::BaggageExt;
use opentelemetry::trace::{Span as _, SpanId, TraceContextExt, TraceId, Tracer, TracerProvider};
use opentelemetry::{Context as OtelContext, KeyValue};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracer, SdkTracerProvider};
use tokio::runtime::Runtime;
use tokio::task::yield_now;
#[cfg(tokio_unstable)]
use tracing::Instrument;
use tracing::info_span;

/// Keeps the provider alive: dropping the last handle shuts it down (nothing is exported).
static PROVIDERS: Mutex<Vec<SdkTracerProvider>> = Mutex::new(Vec::new());

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

/// The parent of the one span called `name`.
fn parent_of(name: &str) -> Option<&'static str> {
    let all = PARENTS.lock().unwrap();
    let found: Vec<_> = all.iter().filter(|(n, _)| *n == name).collect();
    assert_eq!(found.len(), 1, "span {name} created once: {all:?}");
    found[0].1
}

/// The (child, parent) pairs of the spans whose names start with `prefix`, without it.
#[cfg(tokio_unstable)]
fn tree(prefix: &str) -> BTreeSet<(String, Option<String>)> {
    let strip = |n: &str| n.strip_prefix(prefix).map(str::to_owned);
    PARENTS.lock().unwrap().iter().filter_map(|(n, p)| Some((strip(n)?, p.and_then(strip)))).collect()
}

fn multi_thread() -> Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

#[test]
fn explicit_helpers_run_in_the_spawners_span() {
    init();
    let rt = multi_thread();
    rt.block_on(async {
        let request = info_span!("ex_request");
        let (task, blocking, set) = request.in_scope(|| {
            let task = localsession_tokio::spawn(async {
                yield_now().await; // may resume on the other worker: entered again
                drop(info_span!("ex_task"));
            });
            let blocking = localsession_tokio::spawn_blocking(|| drop(info_span!("ex_blocking")));
            let mut set = tokio::task::JoinSet::new();
            set.spawn_current(async { drop(info_span!("ex_join_set")) });
            (task, blocking, set)
        });
        task.await.unwrap();
        blocking.await.unwrap();
        set.join_all().await;
        // A task spawned outside any span runs in none.
        localsession_tokio::spawn(async { drop(info_span!("ex_outside")) }).await.unwrap();
    });
    assert_eq!(parent_of("ex_task"), Some("ex_request"));
    assert_eq!(parent_of("ex_blocking"), Some("ex_request"));
    assert_eq!(parent_of("ex_join_set"), Some("ex_request"));
    assert_eq!(parent_of("ex_outside"), None);
}

#[cfg(tokio_unstable)]
#[test]
fn implicit_spawns_build_the_same_span_tree_as_in_current_span() {
    init();

    // With the bridge: plain `tokio::spawn` on a hooked runtime.
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(2).enable_all();
    let rt = localsession_tokio::enable_implicit_sessions(&mut builder).build().unwrap();
    rt.block_on(async {
        let request = info_span!("im_request");
        let child = request.in_scope(|| {
            tokio::spawn(async {
                yield_now().await;
                let inner = info_span!("im_child");
                let grandchild = inner.in_scope(|| {
                    tokio::spawn(async {
                        yield_now().await;
                        drop(info_span!("im_grandchild"));
                    })
                });
                drop(info_span!("im_sibling")); // after the child span was exited
                grandchild.await.unwrap();
            })
        });
        child.await.unwrap();
    });
    drop(rt);

    // By hand: `.in_current_span()` at every spawn, on a plain runtime.
    let rt = multi_thread();
    rt.block_on(async {
        let request = info_span!("ic_request");
        let child = request.in_scope(|| {
            tokio::spawn(
                async {
                    yield_now().await;
                    let inner = info_span!("ic_child");
                    let grandchild = inner.in_scope(|| {
                        tokio::spawn(
                            async {
                                yield_now().await;
                                drop(info_span!("ic_grandchild"));
                            }
                            .in_current_span(),
                        )
                    });
                    drop(info_span!("ic_sibling"));
                    grandchild.await.unwrap();
                }
                .in_current_span(),
            )
        });
        child.await.unwrap();
    });

    let implicit = tree("im_");
    assert_eq!(implicit, tree("ic_"));
    let expected: BTreeSet<(String, Option<String>)> =
        [("request", None), ("child", Some("request")), ("grandchild", Some("child")), ("sibling", Some("request"))]
            .into_iter()
            .map(|(c, p)| (c.to_owned(), p.map(str::to_owned)))
            .collect();
    assert_eq!(implicit, expected);
}

/// An SDK tracer exporting into memory, and the request's context: its span and baggage.
fn otel_request(name: &'static str) -> (SdkTracer, InMemorySpanExporter, OtelContext, TraceId, SpanId) {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder().with_simple_exporter(exporter.clone()).build();
    let tracer = provider.tracer("bridges");
    PROVIDERS.lock().unwrap().push(provider);
    let root = tracer.start(name);
    let (trace_id, span_id) = (root.span_context().trace_id(), root.span_context().span_id());
    let cx = OtelContext::current_with_span(root).with_baggage(vec![KeyValue::new("tenant", "acme")]);
    (tracer, exporter, cx, trace_id, span_id)
}

/// Starts and ends a span named `name` in the current OpenTelemetry context; returns the
/// baggage value seen there.
fn deep_callee(tracer: &SdkTracer, name: &'static str) -> Option<String> {
    drop(tracer.start(name)); // ended and exported on drop
    OtelContext::current().baggage().get("tenant").map(|v| v.to_string())
}

fn exported_parent(exporter: &InMemorySpanExporter, name: &str) -> (TraceId, SpanId) {
    let spans = exporter.get_finished_spans().unwrap();
    let span = spans.iter().find(|s| s.name == name).unwrap_or_else(|| panic!("{name} not exported: {spans:?}"));
    (span.span_context.trace_id(), span.parent_span_id)
}

#[test]
fn explicit_grandchild_spans_have_the_requests_span_as_parent() {
    init();
    let (tracer, exporter, cx, trace_id, span_id) = otel_request("otel_ex_request");
    let session = SessionCtx::new(&Context::background()).with(&OTEL_CONTEXT, cx);
    let rt = multi_thread();
    let baggage = rt.block_on(async move {
        scope(session, || {
            localsession_tokio::spawn(async move {
                yield_now().await;
                localsession_tokio::spawn(async move {
                    yield_now().await;
                    deep_callee(&tracer, "otel_ex_deep")
                })
                .await
                .unwrap()
            })
        })
        .await
        .unwrap()
    });
    assert_eq!(baggage.as_deref(), Some("acme"));
    assert_eq!(exported_parent(&exporter, "otel_ex_deep"), (trace_id, span_id));
}

#[cfg(tokio_unstable)]
#[test]
fn implicit_grandchild_spans_have_the_requests_span_as_parent_and_workers_keep_nothing() {
    init();
    let (tracer, exporter, cx, trace_id, span_id) = otel_request("otel_im_request");
    let session = SessionCtx::new(&Context::background()).with(&OTEL_CONTEXT, cx);
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(2).enable_all();
    let rt = localsession_tokio::enable_implicit_sessions(&mut builder).build().unwrap();
    let (baggage, leftovers) = rt.block_on(async move {
        let baggage = scope(session, || {
            tokio::spawn(async move {
                yield_now().await;
                tokio::spawn(async move {
                    yield_now().await;
                    deep_callee(&tracer, "otel_im_deep")
                })
                .await
                .unwrap()
            })
        })
        .await
        .unwrap();
        // Tasks without a session, on the same two workers, see no context and no span.
        let mut probes = tokio::task::JoinSet::new();
        for _ in 0..16 {
            probes.spawn(async {
                yield_now().await;
                OtelContext::current().has_active_span() || !tracing::Span::current().is_none()
            });
        }
        (baggage, probes.join_all().await.into_iter().filter(|&leftover| leftover).count())
    });
    assert_eq!(baggage.as_deref(), Some("acme"));
    assert_eq!(exported_parent(&exporter, "otel_im_deep"), (trace_id, span_id));
    assert_eq!(leftovers, 0);
    assert!(!OtelContext::current().has_active_span());
}

/// Many concurrent requests, each with its own span and OpenTelemetry context, hopping between
/// four workers: every task of a request — child and grandchild, after every yield — runs in
/// its request's span and context, never another request's.
#[cfg(tokio_unstable)]
#[test]
fn concurrent_requests_never_see_each_others_span_or_context() {
    use opentelemetry::trace::{SpanContext, TraceFlags, TraceState};
    init();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(4).enable_all();
    let rt = localsession_tokio::enable_implicit_sessions(&mut builder).build().unwrap();
    let mismatches = rt.block_on(async {
        let mut requests = tokio::task::JoinSet::new();
        for i in 0..200u32 {
            let mut trace = [0u8; 16];
            trace[..4].copy_from_slice(&(i + 1).to_be_bytes());
            let trace_id = TraceId::from_bytes(trace);
            let remote = SpanContext::new(
                trace_id,
                SpanId::from_bytes([1; 8]),
                TraceFlags::SAMPLED,
                true,
                TraceState::default(),
            );
            let session = SessionCtx::new(&Context::background())
                .with(&OTEL_CONTEXT, OtelContext::new().with_remote_span_context(remote));
            let span = info_span!("stress_request", i);
            let span_id = span.id();
            let check = move || {
                let same_span = tracing::Span::current().id() == span_id;
                let same_trace = OtelContext::current().span().span_context().trace_id() == trace_id;
                u32::from(!(same_span && same_trace))
            };
            let task = scope(session, || {
                span.in_scope(|| {
                    tokio::spawn(async move {
                        let mut bad = check();
                        for _ in 0..3 {
                            yield_now().await;
                            bad += check();
                        }
                        let grandchild = tokio::spawn(async move {
                            yield_now().await;
                            check()
                        });
                        bad + grandchild.await.unwrap()
                    })
                })
            });
            requests.spawn(async move { task.await.unwrap() });
        }
        requests.join_all().await.into_iter().sum::<u32>()
    });
    assert_eq!(mismatches, 0);
}

/// A subscriber that panics when a span is entered on a runtime worker: the implicit hooks
/// catch it (counted in `hook_drop_panics`), and the task, the runtime and the worker live on.
#[cfg(tokio_unstable)]
#[test]
fn a_panicking_subscriber_does_not_unwind_into_tokio() {
    use tracing::{Subscriber, span::Id};
    use tracing_subscriber::layer::{Context as LayerContext, Layer, SubscriberExt};
    struct PanicsOnWorkers;
    impl<S: Subscriber> Layer<S> for PanicsOnWorkers {
        fn on_enter(&self, _id: &Id, _ctx: LayerContext<'_, S>) {
            if std::thread::current().name().is_some_and(|n| n.starts_with("panicky")) {
                panic!("this subscriber panics on enter");
            }
        }
    }
    init();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(2).thread_name("panicky-worker").enable_all();
    let rt = localsession_tokio::enable_implicit_sessions(&mut builder).build().unwrap();
    let before = localsession_tokio::hook_drop_panics();
    let subscriber = tracing_subscriber::registry().with(PanicsOnWorkers);
    let results = tracing::subscriber::with_default(subscriber, || {
        rt.block_on(async {
            let span = info_span!("panicky_request");
            let tasks: Vec<_> = (0..4u32)
                .map(|i| {
                    span.in_scope(|| {
                        tokio::spawn(async move {
                            yield_now().await;
                            i
                        })
                    })
                })
                .collect();
            let mut results = Vec::new();
            for task in tasks {
                results.push(task.await.unwrap());
            }
            results
        })
    });
    assert_eq!(results, vec![0, 1, 2, 3]);
    assert!(localsession_tokio::hook_drop_panics() > before);
    // The workers still run tasks.
    assert_eq!(rt.block_on(async { tokio::spawn(async { 7 }).await.unwrap() }), 7);
}
