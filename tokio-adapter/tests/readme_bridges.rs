//! The README's bridge examples ("Tracing and OpenTelemetry"), as tests: the code is the
//! README's, with the log lines written to a buffer that the test checks, and the exported spans
//! checked.
#![cfg(all(feature = "tracing", feature = "opentelemetry"))]
#![allow(missing_docs)]

#[path = "../../std-adapter/tests/support/span_parents.rs"]
mod support;
use support::Lines;

#[test]
fn readme_tracing() {
    let lines = Lines::default();
    let writer = lines.clone();

    // ---- the README's example ----
    use localsession_core::{Context, Key, SessionCtx};
    use localsession_std::{SessionFields, scope, set_carry_spans};
    use tracing_subscriber::layer::SubscriberExt;

    static REQUEST_ID: Key<u64> = Key::new("request_id");

    async fn load_user() {
        // Deep in the call tree, in a task on any worker: no span and no id passed in.
        tracing::info!("loading user");
    }

    // Once, at start-up: the request id on every span and log line; spans follow spawns.
    let fields = SessionFields::new().key("request_id", &REQUEST_ID);
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(false)
        .event_format(fields.format(tracing_subscriber::fmt::format().without_time()))
        .with_writer(move || writer.clone()); // (the README writes to stdout)
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(fields.layer()).with(fmt)).unwrap();
    set_carry_spans(true);

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let request = SessionCtx::new(&Context::background()).with(&REQUEST_ID, 7);
        let task = scope(request, || {
            let span = tracing::info_span!("handle");
            span.in_scope(|| localsession_tokio::spawn(load_user()))
        });
        task.await.unwrap();
    });
    // prints: request_id=7  INFO handle{request_id=7}: readme_bridges: loading user
    // ---- end ----

    let out = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
    assert!(out.starts_with("request_id=7 "), "{out}");
    assert!(out.contains("handle{request_id=7}:"), "{out}");
    assert!(out.trim_end().ends_with("loading user"), "{out}");
}

#[test]
fn readme_opentelemetry() {
    let exporter = opentelemetry_sdk::trace::InMemorySpanExporter::default();

    // ---- the README's example ----
    use localsession_core::{Context, SessionCtx};
    use localsession_std::{OTEL_CONTEXT, scope, set_carry_otel_context};
    use opentelemetry::baggage::BaggageExt;
    use opentelemetry::trace::{TraceContextExt, Tracer, TracerProvider};
    use opentelemetry::{Context as OtelContext, KeyValue};

    fn query_db(tracer: &impl Tracer) -> Option<String> {
        let _span = tracer.start("query_db"); // a child of the request's span
        OtelContext::current().baggage().get("tenant").map(|v| v.to_string())
    }

    set_carry_otel_context(true);
    let provider =
        opentelemetry_sdk::trace::SdkTracerProvider::builder().with_simple_exporter(exporter.clone()).build();
    let tracer = provider.tracer("server");

    let rt = tokio::runtime::Runtime::new().unwrap();
    let tenant = rt.block_on(async {
        // The server's span and the caller's baggage: the request's context, in its session.
        let cx =
            OtelContext::current_with_span(tracer.start("GET /orders")).with_baggage([KeyValue::new("tenant", "acme")]);
        let request = SessionCtx::new(&Context::background()).with(&OTEL_CONTEXT, cx);
        let task = scope(request, || {
            localsession_tokio::spawn(async move {
                // A grandchild task: the request's context is current here too.
                localsession_tokio::spawn(async move { query_db(&tracer) }).await.unwrap()
            })
        });
        task.await.unwrap()
    });
    assert_eq!(tenant.as_deref(), Some("acme"));
    // ---- end ----

    let spans = exporter.get_finished_spans().unwrap();
    let query = spans.iter().find(|s| s.name == "query_db").expect("query_db exported");
    // The request's span ended when its session (the last holder of its context) was dropped.
    let request = spans.iter().find(|s| s.name == "GET /orders").expect("the request's span exported");
    assert_eq!(query.parent_span_id, request.span_context.span_id());
    assert_eq!(query.span_context.trace_id(), request.span_context.trace_id());
    drop(provider);
}
