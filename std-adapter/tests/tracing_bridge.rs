//! The span bridge and the session-fields layer on OS threads (feature `tracing`). One global
//! subscriber per process (spans created on spawned threads reach only the global default), with
//! a capturing layer; every test uses span names of its own.
#![cfg(feature = "tracing")]
#![allow(missing_docs)]

use std::sync::{Mutex, Once};

use localsession_core::{Context, Key, SessionCtx, SessionMap};
use localsession_std::{
    Builder, RecordedSessionFields, ScopeExt, SessionFields, go, in_current_session, scope, set_carry_spans,
    with_session, without_flow,
};
use tracing::span::{Attributes, Id};
use tracing::{Subscriber, info_span};
use tracing_subscriber::layer::{Context as LayerContext, Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

static REQUEST_ID: Key<u64> = Key::new("request_id");

/// A span as the subscriber saw it created.
#[derive(Clone, Debug)]
struct Created {
    name: &'static str,
    parent: Option<&'static str>,
    fields: Option<RecordedSessionFields>,
}

static CREATED: Mutex<Vec<Created>> = Mutex::new(Vec::new());

struct Capture;

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Capture {
    fn on_new_span(&self, _attrs: &Attributes<'_>, id: &Id, ctx: LayerContext<'_, S>) {
        let span = ctx.span(id).expect("a new span is in the registry");
        let created = Created {
            name: span.name(),
            parent: span.parent().map(|p| p.name()),
            fields: span.extensions().get::<RecordedSessionFields>().cloned(),
        };
        CREATED.lock().unwrap().push(created);
    }
}

fn init() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let subscriber = tracing_subscriber::registry()
            .with(SessionFields::new().key("request_id", &REQUEST_ID).layer())
            .with(Capture);
        tracing::subscriber::set_global_default(subscriber).unwrap();
        set_carry_spans(true);
    });
}

fn created(name: &str) -> Created {
    let all = CREATED.lock().unwrap();
    let found: Vec<&Created> = all.iter().filter(|c| c.name == name).collect();
    assert_eq!(found.len(), 1, "span {name} created once: {all:?}");
    found[0].clone()
}

#[test]
fn go_and_builder_threads_run_in_the_spawners_span() {
    init();
    let request = info_span!("go_request");
    request.in_scope(|| {
        go(|| info_span!("go_child").in_scope(|| ())).join().unwrap();
        Builder::new().spawn(|| drop(info_span!("builder_child"))).unwrap().join().unwrap();
        std::thread::scope(|s| {
            s.go(|| drop(info_span!("scoped_child"))).join().unwrap();
        });
    });
    assert_eq!(created("go_child").parent, Some("go_request"));
    assert_eq!(created("builder_child").parent, Some("go_request"));
    assert_eq!(created("scoped_child").parent, Some("go_request"));
}

#[test]
fn a_grandchild_thread_lands_under_the_childs_span() {
    init();
    info_span!("tree_root").in_scope(|| {
        go(|| {
            info_span!("tree_child").in_scope(|| {
                go(|| drop(info_span!("tree_grandchild"))).join().unwrap();
            });
        })
        .join()
        .unwrap();
    });
    assert_eq!(created("tree_child").parent, Some("tree_root"));
    assert_eq!(created("tree_grandchild").parent, Some("tree_child"));
}

#[test]
fn pool_jobs_enter_the_span_where_they_were_wrapped_and_leave_the_thread_as_it_was() {
    init();
    let job = info_span!("job_origin").in_scope(|| in_current_session(|| drop(info_span!("job_child"))));
    std::thread::spawn(job).join().unwrap();
    assert_eq!(created("job_child").parent, Some("job_origin"));

    // Run inline, inside another span: the job enters its own span, and the caller's current
    // span is back afterwards.
    let wrapped = info_span!("wrap_origin").in_scope(|| with_session(None, || tracing::Span::current().id()));
    let caller = info_span!("inline_caller");
    let (inside, after) = caller.in_scope(|| (wrapped(), tracing::Span::current().id()));
    assert_ne!(inside, caller.id());
    assert_eq!(after, caller.id());
}

#[test]
fn a_spawn_without_the_flow_captures_no_span() {
    init();
    info_span!("flow_request").in_scope(|| {
        without_flow(|| go(|| drop(info_span!("flow_detached")))).join().unwrap();
    });
    assert_eq!(created("flow_detached").parent, None);
}

#[test]
fn spans_record_the_session_fields_where_they_are_created() {
    init();
    let session = SessionCtx::new(&Context::background()).with(&REQUEST_ID, 4711);
    scope(session, || {
        let _outer = info_span!("fields_outer").entered();
        go(|| drop(info_span!("fields_in_thread"))).join().unwrap();
    });
    drop(info_span!("fields_none")); // no session: nothing recorded
    let outer = created("fields_outer").fields.expect("recorded");
    assert_eq!(outer.get("request_id"), Some("4711"));
    assert_eq!(outer.iter().collect::<Vec<_>>(), vec![("request_id", "4711")]);
    let in_thread = created("fields_in_thread");
    assert_eq!(in_thread.fields.unwrap().get("request_id"), Some("4711"));
    assert_eq!(in_thread.parent, Some("fields_outer"));
    assert!(created("fields_none").fields.is_none());
}

#[path = "support/span_parents.rs"]
mod support;
use support::Lines;

#[test]
fn log_lines_carry_the_session_fields_on_events_and_spans() {
    let fields = SessionFields::new()
        .key("request_id", &REQUEST_ID)
        .field("tenant", |s| s.value_cloned::<&str, _>(&"tenant").map(str::to_owned));
    let lines = Lines::default();
    let writer = lines.clone();
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(false)
        .event_format(fields.format(tracing_subscriber::fmt::format().without_time()))
        .with_writer(move || writer.clone());
    let subscriber = tracing_subscriber::registry().with(fields.layer()).with(fmt);
    tracing::subscriber::with_default(subscriber, || {
        let map = SessionMap::new().with(&REQUEST_ID, 99).with_value("tenant", "acme");
        scope(map, || {
            tracing::info!("outside any span");
            info_span!("handler", user = 3).in_scope(|| tracing::info!("inside"));
        });
        tracing::info!("no session");
    });
    let out = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(lines[0].starts_with("request_id=99 tenant=acme ") && lines[0].ends_with("outside any span"), "{out}");
    // The span keeps its own field, followed by the session's.
    assert!(lines[1].contains("handler{user=3 request_id=99 tenant=acme}"), "{out}");
    assert!(lines[1].starts_with("request_id=99 tenant=acme "), "{out}");
    assert!(!lines[2].contains("request_id") && lines[2].ends_with("no session"), "{out}");
}
