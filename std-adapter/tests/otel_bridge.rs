//! The OpenTelemetry context bridge on OS threads (feature `opentelemetry`): the session's
//! `OTEL_CONTEXT` is the current OpenTelemetry context wherever the session is installed.
#![cfg(feature = "opentelemetry")]
#![allow(missing_docs)]

use localsession_core::{Context, SessionCtx, SessionMap};
use localsession_std::{
    Builder, OTEL_CONTEXT, go, go_session, in_current_session, scope, set_carry_otel_context, with_session,
};
use opentelemetry::baggage::BaggageExt;
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use opentelemetry::{Context as OtelContext, KeyValue};

const TRACE: TraceId = TraceId::from_bytes([7; 16]);
const SPAN: SpanId = SpanId::from_bytes([9; 8]);

/// The request's OpenTelemetry context: a (remote) span and baggage.
fn request_context() -> OtelContext {
    let span = SpanContext::new(TRACE, SPAN, TraceFlags::SAMPLED, true, TraceState::default());
    OtelContext::new().with_remote_span_context(span).with_baggage(vec![KeyValue::new("tenant", "acme")])
}

/// What a unit sees as its current OpenTelemetry context.
fn seen() -> (TraceId, SpanId, Option<String>) {
    let cx = OtelContext::current();
    let span = cx.span().span_context().clone();
    (span.trace_id(), span.span_id(), cx.baggage().get("tenant").map(|v| v.to_string()))
}

fn expected() -> (TraceId, SpanId, Option<String>) {
    (TRACE, SPAN, Some("acme".to_owned()))
}

#[test]
fn the_sessions_context_is_current_in_threads_and_grandchildren() {
    set_carry_otel_context(true);
    let session = SessionCtx::new(&Context::background()).with(&OTEL_CONTEXT, request_context());
    let (child, grandchild) = scope(session.clone(), || go(|| (seen(), go(seen).join().unwrap())).join().unwrap());
    assert_eq!(child, expected());
    assert_eq!(grandchild, expected());
    assert_eq!(go_session(session.clone(), seen).join().unwrap(), expected());
    let built = Builder::new().session(session.clone()).spawn(seen).unwrap();
    assert_eq!(built.join().unwrap(), expected());
    let job = scope(session, || in_current_session(seen));
    assert_eq!(std::thread::spawn(job).join().unwrap(), expected());
    // This thread never had the context attached: the bridge attaches where the adapters
    // install the session, not on `scope`/`bind`.
    assert!(!OtelContext::current().has_active_span());
}

#[test]
fn an_inline_job_detaches_the_context_afterwards() {
    set_carry_otel_context(true);
    let map = SessionMap::new().with(&OTEL_CONTEXT, request_context());
    let job = with_session(Some(map.into()), seen);
    assert_eq!(job(), expected()); // run inline on this thread
    assert!(!OtelContext::current().has_active_span());
    assert!(OtelContext::current().baggage().is_empty());
}

#[test]
fn a_session_without_a_context_leaves_the_threads_context_alone() {
    set_carry_otel_context(true);
    let seen_in_thread = go_session(SessionMap::new(), || OtelContext::current().has_active_span());
    assert!(!seen_in_thread.join().unwrap());
}
