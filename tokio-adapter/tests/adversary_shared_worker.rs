//! Adversarial tests of the *shared worker* rule of implicit mode: a task spawned at a shared
//! worker's site (the worker `tower::buffer::Buffer::new` spawns, or a site named with
//! `ImplicitSessions::shared_workers_spawned_at`) inside a session gets a session that is ended
//! from the start — never the spawning request's — keeps it across sweeps and resets, and hands
//! it to what it spawns; and of `reset_default_manager` racing polls that open and close scopes.
//!
//! The upstream is an in-process tower service that records, where it is *called* (inside the
//! buffer's worker), the session current there, `backed_up_ctx()`, the identity header the
//! client layer wrote, and the session a task it spawns sees.
//!
//! Implicit-mode tests need `--cfg tokio_unstable`; the safe-pattern load test also runs in
//! explicit mode (stable builds). The implicit table, the manager generation, the bridges'
//! switches and the hook panic counter are process-wide: every test takes `serial()`.
#![cfg(feature = "tower")]
#![allow(missing_docs)]

mod common;
use common::{Counted, outstanding};

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::task::{Context as TaskCx, Poll};
use std::time::Duration;

use http::{Request, Response};
use localsession_core::{Context, Key, MetaInfo, SessionCtx};
use localsession_std::{scope, with_current};
use localsession_tokio::tower::{ClientBackupError, ClientBackupLayer};
use tower::buffer::Buffer;
use tower::{BoxError, Layer, Service, ServiceExt};

/// A hang detector for a whole scenario, never a performance assertion.
const CAP: Duration = Duration::from_secs(60);

fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

static TENANT: Key<String> = Key::new("shared_worker_tenant");
static COUNTED: Key<Counted> = Key::new("shared_worker_counted");

/// A request's session: the tenant as a user value and as persistent metainfo (which
/// `ClientBackupLayer` sends as `rpc-persist-tenant`), and a drop-counted value.
fn request_session(tenant: &str) -> SessionCtx {
    let ctx = MetaInfo::with_persistent(&Context::background(), "TENANT", tenant);
    SessionCtx::new(&ctx).with(&TENANT, tenant.to_owned()).with(&COUNTED, Counted::new())
}

/// What the current session looks like here.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Seen {
    /// No session.
    Nothing,
    /// A valid session, with its tenant.
    Valid(Option<String>),
    /// An ended session: its `err()`, as text, and its tenant if it has one.
    Ended(String, Option<String>),
}

impl Seen {
    #[cfg_attr(not(tokio_unstable), allow(dead_code))]
    fn is_shared_worker_marker(&self) -> bool {
        matches!(self, Seen::Ended(err, None) if err.contains("shared worker"))
    }
}

fn seen_here() -> Seen {
    with_current(|s| match s {
        None => Seen::Nothing,
        Some(s) => match s.err() {
            None => Seen::Valid(s.get_cloned(&TENANT)),
            Some(e) => Seen::Ended(e.to_string(), s.get_cloned(&TENANT)),
        },
    })
}

/// What the upstream saw for one call.
#[derive(Clone, Debug)]
#[cfg_attr(not(tokio_unstable), allow(dead_code))]
struct Report {
    /// `rpc-persist-tenant`, as written by `ClientBackupLayer`.
    header_tenant: Option<String>,
    /// The session current where the upstream's `call` ran (the buffer's worker).
    at_call: Seen,
    /// `backed_up_ctx()` there.
    backed_up: bool,
    /// The session seen by a plain `tokio::spawn` made in `call`, on its first poll.
    child: Seen,
    /// The tracing span current in `call` (its id), and whether the request's OpenTelemetry
    /// context value was current there.
    span: Option<u64>,
    otel: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(dead_code)]
struct OtelMark(u32);

fn span_here() -> Option<u64> {
    #[cfg(feature = "tracing")]
    {
        tracing::Span::current().id().map(|id| id.into_u64())
    }
    #[cfg(not(feature = "tracing"))]
    {
        None
    }
}

fn otel_here() -> bool {
    #[cfg(feature = "opentelemetry")]
    {
        opentelemetry::Context::current().get::<OtelMark>().is_some()
    }
    #[cfg(not(feature = "opentelemetry"))]
    {
        false
    }
}

/// The in-process upstream: records what it sees where it is called.
#[derive(Clone, Default)]
struct Upstream {
    calls: Arc<AtomicUsize>,
}

/// The upstream's response future: waits for the child task it spawned.
struct UpFut {
    partial: Option<Report>,
    child: tokio::task::JoinHandle<Seen>,
}

impl Future for UpFut {
    type Output = Result<Response<Report>, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut TaskCx<'_>) -> Poll<Self::Output> {
        let child = match Pin::new(&mut self.child).poll(cx) {
            Poll::Ready(seen) => seen.expect("the child task"),
            Poll::Pending => return Poll::Pending,
        };
        let mut report = self.partial.take().expect("polled after completion");
        report.child = child;
        Poll::Ready(Ok(Response::new(report)))
    }
}

impl Service<Request<()>> for Upstream {
    type Response = Response<Report>;
    type Error = Infallible;
    type Future = UpFut;

    fn poll_ready(&mut self, _cx: &mut TaskCx<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<()>) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let header_tenant =
            req.headers().get("rpc-persist-tenant").map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        let at_call = seen_here();
        let backed_up = localsession_std::backed_up_ctx().is_some();
        let (span, otel) = (span_here(), otel_here());
        // A plain spawn from inside the worker (the pooled-connection pattern).
        let child = tokio::spawn(async { seen_here() });
        UpFut { partial: Some(Report { header_tenant, at_call, backed_up, child: Seen::Nothing, span, otel }), child }
    }
}

fn recover(_prev: &Context, cur: &Context) -> (Context, bool) {
    (cur.clone(), true)
}

type Recover = fn(&Context, &Context) -> (Context, bool);

fn backup_layer() -> ClientBackupLayer<Recover> {
    ClientBackupLayer::new(recover as Recover)
}

/// Calls through a buffer of the bare upstream.
#[cfg_attr(not(tokio_unstable), allow(dead_code))]
async fn call_bare(buf: Buffer<Request<()>, UpFut>) -> Report {
    buf.oneshot(Request::new(())).await.expect("the bare upstream never fails").into_body()
}

/// How a call through a buffer with `ClientBackupLayer` inside ended.
#[derive(Debug)]
#[allow(dead_code)]
enum Through {
    Sent(Box<Report>),
    Refused(String),
    Failed(String),
}

fn from_boxed(e: &BoxError) -> Through {
    match e.downcast_ref::<ClientBackupError<Infallible>>() {
        Some(ClientBackupError::EndedSession(_)) => Through::Refused(e.to_string()),
        _ => Through::Failed(e.to_string()),
    }
}

#[cfg(tokio_unstable)]
mod implicit {
    use super::*;

    use std::sync::atomic::{AtomicBool, AtomicU64};

    use localsession_core::AnySession;
    use localsession_std::{bind, default_manager_options, reset_default_manager, without_flow};
    use localsession_tokio::{ImplicitSessions, hook_drop_panics, sweep_ended_sessions};
    use tokio::runtime::{Builder, Runtime};
    use tokio::task::yield_now;

    pub(super) fn implicit_mt(workers: usize, hooks: ImplicitSessions) -> Runtime {
        let mut builder = Builder::new_multi_thread();
        builder.worker_threads(workers).enable_all();
        hooks.install(&mut builder);
        builder.build().unwrap()
    }

    async fn wait_outstanding(target: usize) {
        let start = std::time::Instant::now();
        while outstanding() != target && start.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[track_caller]
    fn assert_marker(what: &str, r: &Report) {
        assert!(r.at_call.is_shared_worker_marker(), "{what}: the worker saw {:?}, not the ended marker", r.at_call);
        assert!(!r.backed_up, "{what}: backed_up_ctx() is Some in a shared worker");
        assert!(
            r.child.is_shared_worker_marker(),
            "{what}: a task the worker spawned saw {:?}, not the ended marker",
            r.child
        );
        assert_eq!(r.header_tenant, None, "{what}: an identity header reached the upstream");
    }

    /// A `Buffer::new` built inside a request's session: its worker (and what it spawns) sees
    /// the ended marker — never that request's session, valid or not — for calls made inside
    /// that request while it is in flight, from other requests, and from no session; after a
    /// sweep and after a reset too (it never falls back to "no session"). The worker pins no
    /// request's values.
    fn buffer_built_inside_a_session(workers: usize) {
        let _serial = serial();
        let rt = implicit_mt(workers, ImplicitSessions::new());
        rt.block_on(async {
            let base = outstanding();
            let acme = request_session("acme");
            let buf = scope(acme.clone(), || Buffer::new(Upstream::default(), 64));
            // Inside the building request, which is still in flight (valid).
            let own = scope(acme.clone(), || tokio::spawn(call_owned(buf.clone()))).await.unwrap();
            assert!(acme.is_valid());
            assert_marker("the building request's own call", &own);
            // Other requests, concurrently, and callers with no session.
            let mut hs = Vec::new();
            for i in 0..64u32 {
                let other = request_session(&format!("t{i}"));
                hs.push(scope(other, || tokio::spawn(call_owned(buf.clone()))));
                hs.push(tokio::spawn(call_owned(buf.clone())));
            }
            for h in hs {
                assert_marker("a concurrent call", &h.await.unwrap());
            }
            // A sweep: the marker is ended by design, so nothing is cleared and it stays.
            acme.disable();
            let _ = sweep_ended_sessions();
            assert_marker("after a sweep", &call_bare(buf.clone()).await);
            // A reset: every request's session goes, the marker stays.
            reset_default_manager(default_manager_options()).unwrap();
            assert_marker("after a reset", &call_bare(buf.clone()).await);
            let _ = sweep_ended_sessions();
            reset_default_manager(default_manager_options()).unwrap();
            let r = scope(request_session("late"), || tokio::spawn(call_owned(buf.clone()))).await.unwrap();
            assert_marker("after a sweep and a second reset", &r);
            drop(acme);
            wait_outstanding(base).await;
            assert_eq!(outstanding(), base, "the shared worker keeps a request's values alive");
        });
        drop(rt);
    }

    fn call_owned(buf: Buffer<Request<()>, UpFut>) -> impl Future<Output = Report> + Send + 'static {
        call_bare(buf)
    }

    #[test]
    fn buffer_new_inside_a_session_worker_sees_only_the_ended_marker_2_workers() {
        buffer_built_inside_a_session(2);
    }

    #[test]
    fn buffer_new_inside_a_session_worker_sees_only_the_ended_marker_4_workers() {
        buffer_built_inside_a_session(4);
    }

    /// A `Buffer::new` built outside any session gets no session — not the marker — and what it
    /// spawns gets none either, also when the calls come from inside sessions.
    #[test]
    fn buffer_new_outside_any_session_gets_no_session_not_the_marker() {
        let _serial = serial();
        let rt = implicit_mt(2, ImplicitSessions::new());
        rt.block_on(async {
            assert!(localsession_std::current().is_none());
            let buf = Buffer::new(Upstream::default(), 16);
            let r = scope(request_session("acme"), || tokio::spawn(call_owned(buf.clone()))).await.unwrap();
            assert_eq!((&r.at_call, &r.child, r.backed_up), (&Seen::Nothing, &Seen::Nothing, false), "{r:?}");
            // Built inside a session with the flow suppressed: no session either.
            let buf2 = scope(request_session("globex"), || without_flow(|| Buffer::new(Upstream::default(), 16)));
            let r = scope(request_session("initech"), || tokio::spawn(call_owned(buf2.clone()))).await.unwrap();
            assert_eq!((&r.at_call, &r.child), (&Seen::Nothing, &Seen::Nothing), "{r:?}");
        });
    }

    /// The naive arrangement (`Buffer::new` inside a request, `ClientBackupLayer` inside the
    /// buffer) while another thread resets the default manager and sweeps in a loop: every call
    /// must be refused with `EndedSession` — none may reach the upstream, not even without an
    /// identity (the docs: resets keep the marker "so the worker never falls back to 'no
    /// session', which would send no identity silently").
    fn naive_buffer_under_resets(workers: usize) {
        let _serial = serial();
        let rt = implicit_mt(workers, ImplicitSessions::new());
        let upstream = Upstream::default();
        let calls = upstream.calls.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let resets = Arc::new(AtomicU64::new(0));
        let outcomes = rt.block_on(async {
            let first = request_session("acme");
            let buf = scope(first.clone(), || Buffer::new(backup_layer().layer(upstream), 256));
            let resetter = {
                let (stop, resets) = (stop.clone(), resets.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::SeqCst) && resets.load(Ordering::SeqCst) < 3_000 {
                        reset_default_manager(default_manager_options()).unwrap();
                        if resets.fetch_add(1, Ordering::SeqCst).is_multiple_of(8) {
                            let _ = sweep_ended_sessions();
                        }
                        std::thread::yield_now();
                    }
                })
            };
            let mut hs = Vec::new();
            for i in 0..2_000u32 {
                let buf = buf.clone();
                let fut = async move {
                    // Re-bind after a reset may have unbound the task's session.
                    let mine = request_session(&format!("t{i}"));
                    bind(mine).unwrap();
                    yield_now().await;
                    match buf.oneshot(Request::new(())).await {
                        Ok(resp) => Through::Sent(Box::new(resp.into_body())),
                        Err(e) => from_boxed(&e),
                    }
                };
                hs.push(tokio::spawn(fut));
            }
            let mut out = Vec::new();
            for h in hs {
                out.push(tokio::time::timeout(CAP, h).await.expect("hang").unwrap());
            }
            stop.store(true, Ordering::SeqCst);
            resetter.join().unwrap();
            drop(first);
            out
        });
        drop(rt);
        let sent: Vec<_> =
            outcomes.iter().filter(|o| !matches!(o, Through::Refused(m) if m.contains("shared worker"))).collect();
        assert!(
            sent.is_empty(),
            "{} of {} calls through a naive buffer were not refused (with {} resets racing); first: {:#?}",
            sent.len(),
            outcomes.len(),
            resets.load(Ordering::SeqCst),
            &sent[..sent.len().min(4)]
        );
        assert_eq!(calls.load(Ordering::SeqCst), 0, "calls reached the upstream through a naive buffer");
    }

    /// Deterministic: a `reset_default_manager` lands while the worker of a `Buffer::new` built
    /// inside a session is inside its poll (the inner service's `call` waits for it). The docs:
    /// resets keep the marker, "so the worker never falls back to 'no session'". Checked: what
    /// `call` sees right after the reset (same poll), and what the worker sees on its next polls.
    #[test]
    fn a_reset_during_a_shared_workers_poll_does_not_strip_its_marker() {
        let _serial = serial();
        let rt = implicit_mt(2, ImplicitSessions::new());
        let (entered_tx, entered_rx) = std::sync::mpsc::channel::<()>();
        let (resume_tx, resume_rx) = std::sync::mpsc::channel::<()>();
        let gate = Arc::new(Mutex::new(Some((entered_tx, resume_rx))));
        let svc = tower::service_fn(move |_req: Request<()>| {
            let before = seen_here();
            let gated = gate.lock().unwrap().take();
            if let Some((entered, resume)) = gated {
                entered.send(()).unwrap();
                resume.recv_timeout(CAP).expect("the test resumes the call");
            }
            let after = seen_here();
            std::future::ready(Ok::<_, Infallible>((before, after)))
        });
        let seen = rt.block_on(async {
            let acme = request_session("acme");
            let buf = scope(acme.clone(), || Buffer::new(svc, 8));
            let first = tokio::spawn(buf.clone().oneshot(Request::new(())));
            entered_rx.recv_timeout(CAP).expect("the worker calls the service");
            reset_default_manager(default_manager_options()).unwrap();
            resume_tx.send(()).unwrap();
            let first = first.await.unwrap().unwrap();
            let mut later = Vec::new();
            for _ in 0..3 {
                tokio::time::sleep(Duration::from_millis(2)).await;
                later.push(tokio::spawn(buf.clone().oneshot(Request::new(()))).await.unwrap().unwrap());
            }
            (first, later)
        });
        drop(rt);
        let (first, later) = seen;
        assert!(first.0.is_shared_worker_marker(), "before the reset the worker saw {:?}", first.0);
        let later_ok = later.iter().all(|(b, a)| b.is_shared_worker_marker() && a.is_shared_worker_marker());
        assert!(
            first.1.is_shared_worker_marker() && later_ok,
            "the worker fell back from the ended marker after a reset that landed during its poll: in that poll \
             it saw {:?}; in its next three polls {:?}",
            first.1,
            later
        );
    }

    #[test]
    fn naive_buffer_refuses_every_call_while_resets_and_sweeps_race_its_polls_2_workers() {
        naive_buffer_under_resets(2);
    }

    #[test]
    fn naive_buffer_refuses_every_call_while_resets_and_sweeps_race_its_polls_4_workers() {
        naive_buffer_under_resets(4);
    }

    /// `shared_workers_spawned_at` with a predicate that panics: each spawn made inside a
    /// session counts as a shared worker (the side that cannot leak) and as one
    /// `hook_drop_panics`; spawns outside any session do not ask it; the runtime lives on.
    #[test]
    fn a_panicking_shared_worker_predicate_marks_the_task_and_the_runtime_lives() {
        let _serial = serial();
        let asked = Arc::new(AtomicUsize::new(0));
        let a2 = asked.clone();
        let hooks = ImplicitSessions::new().shared_workers_spawned_at(move |_| {
            a2.fetch_add(1, Ordering::SeqCst);
            panic!("hostile shared-worker predicate")
        });
        let rt = implicit_mt(2, hooks);
        let before = hook_drop_panics();
        let (inside, outside) = rt.block_on(async {
            let mut inside = Vec::new();
            for i in 0..20u32 {
                let s = request_session(&format!("t{i}"));
                inside.push(scope(s, || {
                    tokio::spawn(async { (seen_here(), tokio::spawn(async { seen_here() }).await) })
                }));
            }
            let outside: Vec<_> = (0..10).map(|_| tokio::spawn(async { seen_here() })).collect();
            let mut a = Vec::new();
            for h in inside {
                let (own, grandchild) = h.await.expect("the runtime lives");
                a.push((own, grandchild.expect("the runtime lives")));
            }
            let mut b = Vec::new();
            for h in outside {
                b.push(h.await.unwrap());
            }
            (a, b)
        });
        // The runtime still works after all those panics.
        assert_eq!(rt.block_on(async { tokio::spawn(async { 7 }).await.unwrap() }), 7);
        drop(rt);
        for (own, grandchild) in &inside {
            assert!(own.is_shared_worker_marker(), "a spawn inside a session saw {own:?}");
            assert!(grandchild.is_shared_worker_marker(), "its child saw {grandchild:?}");
        }
        assert!(outside.iter().all(|s| *s == Seen::Nothing), "{outside:?}");
        // 20 spawns inside sessions and their 20 children (inside the marker): 40 questions.
        let asked = asked.load(Ordering::SeqCst);
        assert_eq!(asked, 40, "the predicate runs once per spawn made inside a session");
        assert_eq!(hook_drop_panics() - before, asked, "each predicate panic counts once in hook_drop_panics");
    }

    /// A predicate that names every spawn site: no plain spawn inside a session inherits it
    /// (each gets the marker, and so do their children); spawns outside sessions or with the
    /// flow suppressed get none; an explicit `spawn_with` still runs with its own session.
    #[test]
    fn a_predicate_matching_every_site_leaves_nothing_to_inherit() {
        let _serial = serial();
        let rt = implicit_mt(4, ImplicitSessions::new().shared_workers_spawned_at(|_| true));
        rt.block_on(async {
            let mut hs = Vec::new();
            for i in 0..50u32 {
                let s = request_session(&format!("t{i}"));
                hs.push(scope(s, || {
                    tokio::spawn(async {
                        let own = seen_here();
                        let child = tokio::spawn(async { seen_here() }).await.unwrap();
                        (own, child)
                    })
                }));
            }
            for h in hs {
                let (own, child) = h.await.unwrap();
                assert!(own.is_shared_worker_marker(), "a plain spawn inside a session saw {own:?}");
                assert!(child.is_shared_worker_marker(), "its child saw {child:?}");
            }
            let none = tokio::spawn(async { seen_here() }).await.unwrap();
            assert_eq!(none, Seen::Nothing);
            let suppressed =
                scope(request_session("x"), || without_flow(|| tokio::spawn(async { seen_here() }))).await.unwrap();
            assert_eq!(suppressed, Seen::Nothing);
            let explicit = scope(request_session("outer"), || {
                localsession_tokio::spawn_with(request_session("given"), async { seen_here() })
            })
            .await
            .unwrap();
            assert_eq!(explicit, Seen::Valid(Some("given".into())), "spawn_with's own session");
            // A task bound by the task itself: its own binding, and its children inherit... the
            // marker (every site is a shared worker's).
            let rebound = tokio::spawn(async {
                bind(request_session("own")).unwrap();
                (seen_here(), tokio::spawn(async { seen_here() }).await.unwrap())
            })
            .await
            .unwrap();
            assert_eq!(rebound.0, Seen::Valid(Some("own".into())));
            assert!(rebound.1.is_shared_worker_marker(), "{:?}", rebound.1);
        });
    }

    /// The tracing and OpenTelemetry bridges enter nothing for a shared worker: neither the
    /// span current where `Buffer::new` ran nor the request's OpenTelemetry context — while a
    /// plain spawn made at the same place carries both (the bridges are on).
    #[cfg(all(feature = "tracing", feature = "opentelemetry"))]
    #[test]
    fn bridges_enter_nothing_for_a_shared_worker() {
        let _serial = serial();
        static SUBSCRIBER: OnceLock<()> = OnceLock::new();
        SUBSCRIBER.get_or_init(|| {
            tracing::subscriber::set_global_default(tracing_subscriber::registry()).expect("one global subscriber");
        });
        struct Switches;
        impl Drop for Switches {
            fn drop(&mut self) {
                localsession_std::set_carry_spans(false);
                localsession_std::set_carry_otel_context(false);
            }
        }
        let _switches = Switches;
        localsession_std::set_carry_spans(true);
        localsession_std::set_carry_otel_context(true);
        let rt = implicit_mt(2, ImplicitSessions::new());
        rt.block_on(async {
            let otel = opentelemetry::Context::new().with_value(OtelMark(7));
            let request = request_session("acme").with(&localsession_std::OTEL_CONTEXT, otel);
            let span = tracing::info_span!("request");
            let span_id = span.id().expect("a registry span has an id").into_u64();
            let (buf, plain) = span.in_scope(|| {
                scope(request.clone(), || {
                    let buf = Buffer::new(Upstream::default(), 8);
                    let plain = tokio::spawn(async { (span_here(), otel_here(), seen_here()) });
                    (buf, plain)
                })
            });
            let plain = plain.await.unwrap();
            assert_eq!(
                plain,
                (Some(span_id), true, Seen::Valid(Some("acme".into()))),
                "a plain spawn carries the span and the context (the bridges are on)"
            );
            let r = scope(request.clone(), || tokio::spawn(call_owned(buf.clone()))).await.unwrap();
            assert_marker("bridges", &r);
            assert_ne!(r.span, Some(span_id), "the shared worker entered the request's span");
            assert!(!r.otel, "the shared worker attached the request's OpenTelemetry context");
            let r = call_bare(buf.clone()).await;
            assert!(r.span.is_none() && !r.otel, "a call from no session: {r:?}");
        });
    }

    // -----------------------------------------------------------------------------------------
    // reset_default_manager racing polls that open and close scopes
    // -----------------------------------------------------------------------------------------

    /// Resets started and completed.
    static STARTED: AtomicU64 = AtomicU64::new(0);
    static DONE: AtomicU64 = AtomicU64::new(0);
    const UNVERIFIED: u64 = u64::MAX;

    static TAG: Key<Arc<AtomicU64>> = Key::new("reset_tag");

    /// A session tagged with the number of resets started before its binding began; the tag is
    /// confirmed (`confirm`) once the binding is in place, if no reset started meanwhile.
    fn tagged() -> (SessionCtx, Arc<AtomicU64>, u64) {
        let tag = Arc::new(AtomicU64::new(UNVERIFIED));
        let started = STARTED.load(Ordering::SeqCst);
        (SessionCtx::new(&Context::background()).with(&TAG, tag.clone()), tag, started)
    }

    fn confirm(tag: &AtomicU64, started: u64) {
        if STARTED.load(Ordering::SeqCst) == started {
            tag.store(started, Ordering::SeqCst);
        }
    }

    /// Reads the current session; counts a violation if it was bound before a reset that had
    /// completed before this read began.
    fn check(violations: &AtomicUsize, what: &'static str, log: &Mutex<Vec<String>>) {
        let done = DONE.load(Ordering::SeqCst);
        let tag = with_current(|s: Option<&AnySession>| s.and_then(|s| s.get_cloned(&TAG)));
        if let Some(tag) = tag {
            let t = tag.load(Ordering::SeqCst);
            if t != UNVERIFIED && t < done {
                violations.fetch_add(1, Ordering::SeqCst);
                let mut log = log.lock().unwrap();
                if log.len() < 8 {
                    log.push(format!("{what}: read a session bound before reset #{} after {done} resets", t + 1));
                }
            }
        }
    }

    /// Parked by `gate_hook` (a reset hook registered after the adapter's): while the gate is
    /// set, a reset waits inside its hooks — after the adapter's hook cleared every task entry,
    /// before the generation is bumped — until the test lets it go.
    static GATE: Mutex<Option<(std::sync::mpsc::Sender<()>, std::sync::mpsc::Receiver<()>)>> = Mutex::new(None);

    fn gate_hook() {
        let gate = GATE.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some((in_hook, release)) = gate {
            in_hook.send(()).unwrap();
            release.recv_timeout(CAP).expect("the test releases the reset");
        }
    }

    /// Deterministic version of a race the test below hits under load: a task closes a
    /// `scope` while a reset runs between clearing the task entries and bumping the generation
    /// (a reset hook of the test's own parks it there). The scope's close restores the task's
    /// session bound before the reset — into the slot and, through the task's sink, into its
    /// entry, which the reset has already cleared. Once the reset has returned, the task's next
    /// poll must not read that pre-reset session (README: "every task entry is cleared and no
    /// pre-reset binding comes back (not at a task's next poll ...)").
    #[test]
    fn a_scope_closed_while_a_reset_clears_the_entries_does_not_bring_back_the_old_session() {
        let _serial = serial();
        let rt = implicit_mt(2, ImplicitSessions::new());
        localsession_std::register_reset_hook(gate_hook);
        let (in_hook_tx, in_hook_rx) = std::sync::mpsc::channel::<()>();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let (in_scope_tx, in_scope_rx) = std::sync::mpsc::channel::<()>();
        let (close_tx, close_rx) = std::sync::mpsc::channel::<()>();
        let (closed_tx, closed_rx) = std::sync::mpsc::channel::<()>();
        let (reset_done_tx, reset_done_rx) = tokio::sync::oneshot::channel::<()>();
        let seen = rt.block_on(async move {
            let task = tokio::spawn(async move {
                bind(request_session("before-reset")).unwrap();
                scope(request_session("scoped"), || {
                    in_scope_tx.send(()).unwrap();
                    close_rx.recv_timeout(CAP).expect("the test closes the scope");
                });
                closed_tx.send(()).unwrap();
                reset_done_rx.await.unwrap();
                let next_poll = seen_here();
                yield_now().await;
                (next_poll, seen_here())
            });
            in_scope_rx.recv_timeout(CAP).expect("the task opens its scope");
            *GATE.lock().unwrap() = Some((in_hook_tx, release_rx));
            let resetter = std::thread::spawn(|| reset_default_manager(default_manager_options()).unwrap());
            in_hook_rx.recv_timeout(CAP).expect("the reset runs its hooks");
            // The entries are cleared, the generation not bumped yet: the scope closes now.
            close_tx.send(()).unwrap();
            closed_rx.recv_timeout(CAP).expect("the task closes its scope");
            release_tx.send(()).unwrap();
            resetter.join().unwrap();
            reset_done_tx.send(()).unwrap();
            task.await.unwrap()
        });
        drop(rt);
        assert_eq!(
            seen,
            (Seen::Nothing, Seen::Nothing),
            "after the reset returned, the task's next polls read a session bound before it"
        );
    }

    /// `reset_default_manager` from another thread while tasks on 4 workers bind, open and close
    /// `scope`s, wake themselves, and run nested polls (a hooked current-thread runtime driven
    /// from `block_in_place`, whose task's after-poll hook restores the outer task's session).
    /// Once a reset has returned, no read anywhere may see a session bound before it: not inside
    /// a scope, not after the scope closed, not at the next poll, not after a nested poll.
    #[test]
    fn after_a_reset_returns_no_task_reads_a_session_bound_before_it() {
        let _serial = serial();
        let rt = implicit_mt(4, ImplicitSessions::new());
        let stop = Arc::new(AtomicBool::new(false));
        let violations = Arc::new(AtomicUsize::new(0));
        let log = Arc::new(Mutex::new(Vec::new()));
        let resetter = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut n: u64 = 0;
                while !stop.load(Ordering::SeqCst) && n < 2_000 {
                    STARTED.fetch_add(1, Ordering::SeqCst);
                    reset_default_manager(default_manager_options()).unwrap();
                    DONE.fetch_add(1, Ordering::SeqCst);
                    n += 1;
                    if n.is_multiple_of(4) {
                        std::thread::sleep(Duration::from_micros(50));
                    } else {
                        std::thread::yield_now();
                    }
                }
                n
            })
        };
        rt.block_on(async {
            let mut hs = Vec::new();
            for task in 0..64u64 {
                let (violations, log) = (violations.clone(), log.clone());
                hs.push(tokio::spawn(async move {
                    for round in 0..150u64 {
                        let (outer, tag, started) = tagged();
                        bind(outer).unwrap();
                        confirm(&tag, started);
                        check(&violations, "after bind", &log);
                        let (inner, itag, istarted) = tagged();
                        scope(inner, || {
                            confirm(&itag, istarted);
                            check(&violations, "inside a scope", &log);
                            std::hint::black_box((0..200).sum::<u64>());
                            check(&violations, "inside a scope, later", &log);
                        });
                        check(&violations, "after a scope closed", &log);
                        yield_now().await;
                        check(&violations, "at the next poll", &log);
                        if (task + round).is_multiple_of(12) {
                            let (violations2, log2) = (violations.clone(), log.clone());
                            let (violations3, log3) = (violations.clone(), log.clone());
                            tokio::task::block_in_place(move || {
                                let inner_rt = {
                                    let mut b = Builder::new_current_thread();
                                    b.enable_all();
                                    ImplicitSessions::new().install(&mut b);
                                    b.build().unwrap()
                                };
                                inner_rt.block_on(async move {
                                    // Spawned with the flow suppressed: a spawn racing a reset may
                                    // inherit a session read before it (as a `bind` of a clone made
                                    // after the reset may), which is not what this test is about.
                                    let h = without_flow(|| {
                                        tokio::spawn(async move {
                                            let (own, ot, ost) = tagged();
                                            bind(own).unwrap();
                                            confirm(&ot, ost);
                                            check(&violations2, "nested task", &log2);
                                            let (s, t, st) = tagged();
                                            scope(s, || {
                                                confirm(&t, st);
                                                check(&violations2, "nested task scope", &log2);
                                            });
                                            yield_now().await;
                                            check(&violations2, "nested task next poll", &log2);
                                        })
                                    });
                                    h.await.unwrap();
                                });
                                check(&violations3, "after the nested runtime", &log3);
                            });
                            check(&violations, "after block_in_place", &log);
                        }
                        tokio::spawn(async {}).await.unwrap();
                        check(&violations, "after awaiting a child", &log);
                    }
                }));
            }
            for h in hs {
                tokio::time::timeout(CAP, h).await.expect("hang").unwrap();
            }
        });
        stop.store(true, Ordering::SeqCst);
        let resets = resetter.join().unwrap();
        drop(rt);
        assert!(resets > 0);
        assert_eq!(
            violations.load(Ordering::SeqCst),
            0,
            "reads of pre-reset sessions after the reset returned ({resets} resets): {:#?}",
            log.lock().unwrap()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The documented safe pattern under load (implicit and explicit mode)
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    #[cfg_attr(not(tokio_unstable), allow(dead_code))]
    Implicit,
    Explicit,
}

type SafeClient = localsession_tokio::tower::ClientBackup<Buffer<Request<()>, UpFut>, Recover>;
type NaiveClient = Buffer<Request<()>, localsession_tokio::tower::ClientBackupFuture<UpFut>>;

struct Clients {
    safe: OnceLock<SafeClient>,
    naive: OnceLock<NaiveClient>,
    upstream: Upstream,
    naive_upstream: Upstream,
}

/// One request: its own tenant; builds the clients lazily (inside the first request that needs
/// them), calls through the safe one and, in implicit mode, every third request through a naive
/// `Buffer::new` built inside a request. Returns (tenant seen by the request after its calls,
/// the safe call's report, the naive call's outcome).
async fn one_request(mode: Mode, clients: Arc<Clients>, i: u32) -> (Seen, Report, Option<Through>) {
    let safe = clients
        .safe
        .get_or_init(|| {
            let (svc, worker) = Buffer::pair(clients.upstream.clone(), 64);
            localsession_tokio::spawn_without_session(worker);
            backup_layer().layer(svc)
        })
        .clone();
    tokio::task::yield_now().await;
    let report = safe.oneshot(Request::new(())).await.expect("the safe client").into_body();
    let naive = if mode == Mode::Implicit && i.is_multiple_of(3) {
        let naive =
            clients.naive.get_or_init(|| Buffer::new(backup_layer().layer(clients.naive_upstream.clone()), 64)).clone();
        Some(match naive.oneshot(Request::new(())).await {
            Ok(resp) => Through::Sent(Box::new(resp.into_body())),
            Err(e) => from_boxed(&e),
        })
    } else {
        None
    };
    tokio::task::yield_now().await;
    (seen_here(), report, naive)
}

fn safe_pattern_load(mode: Mode, workers: usize) {
    const REQUESTS: u32 = 1_000;
    let _serial = serial();
    // The startup call the README asks for: it registers the store, so that library code
    // (`ClientBackup`, `localsession_core::current()`) sees the sessions the helpers install.
    localsession_std::ensure_default_manager(localsession_std::default_manager_options()).unwrap();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(workers).enable_all();
    if mode == Mode::Implicit {
        #[cfg(tokio_unstable)]
        localsession_tokio::ImplicitSessions::new().install(&mut builder);
        #[cfg(not(tokio_unstable))]
        unreachable!("implicit mode needs --cfg tokio_unstable");
    }
    let rt = builder.build().unwrap();
    let clients = Arc::new(Clients {
        safe: OnceLock::new(),
        naive: OnceLock::new(),
        upstream: Upstream::default(),
        naive_upstream: Upstream::default(),
    });
    let base = outstanding();
    let wrong = rt.block_on(async {
        let mut hs = Vec::new();
        for i in 0..REQUESTS {
            let tenant = format!("t{i}");
            let session = request_session(&tenant);
            let fut = one_request(mode, clients.clone(), i);
            let h = match mode {
                Mode::Implicit => scope(session, || tokio::spawn(fut)),
                Mode::Explicit => localsession_tokio::spawn_with(session, fut),
            };
            hs.push((tenant, h));
        }
        let mut wrong = Vec::new();
        for (tenant, h) in hs {
            let (after, r, naive) = tokio::time::timeout(CAP, h).await.expect("hang").unwrap();
            if after != Seen::Valid(Some(tenant.clone())) {
                wrong.push(format!("{tenant}: after its calls the request saw {after:?}"));
            }
            if r.header_tenant.as_deref() != Some(tenant.as_str()) {
                wrong.push(format!("{tenant}: the upstream got tenant {:?}", r.header_tenant));
            }
            if r.at_call != Seen::Nothing || r.child != Seen::Nothing || r.backed_up {
                wrong.push(format!("{tenant}: the safe worker saw {:?} / its child {:?}", r.at_call, r.child));
            }
            match naive {
                None => {}
                Some(Through::Refused(m)) if m.contains("shared worker") => {}
                Some(other) => wrong.push(format!("{tenant}: a naive-buffer call was not refused: {other:?}")),
            }
        }
        wrong
    });
    drop(rt);
    drop(clients);
    let start = std::time::Instant::now();
    while outstanding() != base && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(wrong.is_empty(), "{} wrong of {REQUESTS}; first: {:#?}", wrong.len(), &wrong[..wrong.len().min(8)]);
    assert_eq!(outstanding(), base, "request values leaked");
}

#[cfg(tokio_unstable)]
#[test]
fn a_thousand_requests_through_a_safe_lazy_buffer_keep_their_identity_implicit_2_workers() {
    safe_pattern_load(Mode::Implicit, 2);
}

#[cfg(tokio_unstable)]
#[test]
fn a_thousand_requests_through_a_safe_lazy_buffer_keep_their_identity_implicit_4_workers() {
    safe_pattern_load(Mode::Implicit, 4);
}

#[test]
fn a_thousand_requests_through_a_safe_lazy_buffer_keep_their_identity_explicit_2_workers() {
    safe_pattern_load(Mode::Explicit, 2);
}

#[test]
fn a_thousand_requests_through_a_safe_lazy_buffer_keep_their_identity_explicit_4_workers() {
    safe_pattern_load(Mode::Explicit, 4);
}
