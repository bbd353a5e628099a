//! Request lifecycle and session-free spawning, at the tower level (no network): sessions end
//! with their response (completion, error, or drop), `ClientBackup` refuses an ended session,
//! and long-lived work (`spawn_without_session`, `NoSessionExecutor`, the `Buffer::pair` pattern)
//! carries no session.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use http::{Request, Response};
use hyper::rt::Executor;
use localsession_core::{AnySession, Context, ContextError, MetaInfo, SessionCtx, SessionMap};
use localsession_std::{current, scope};
use localsession_tokio::hyper::NoSessionExecutor;
use localsession_tokio::tower::{ClientBackupError, ClientBackupLayer, ServerBackupLayer, SessionLayer};
use tower::buffer::Buffer;
use tower::{Layer, Service, ServiceExt, service_fn};

type Recover = fn(&Context, &Context) -> (Context, bool);

fn recover(_prev: &Context, cur: &Context) -> (Context, bool) {
    (cur.clone(), true)
}

/// A `SessionLayer` handing every request (a clone of) `map`.
fn layer_of(map: &SessionMap) -> SessionLayer<impl Fn(&Request<()>) -> SessionMap + Clone> {
    let map = map.clone();
    SessionLayer::new(move |_: &Request<()>| map.clone())
}

#[tokio::test]
async fn session_layer_binds_around_call_and_polls_and_ends_on_ok() {
    let map = SessionMap::new().with_value("tenant", "acme");
    let svc = layer_of(&map).layer(service_fn(|_req: Request<()>| {
        let at_call = current().is_some_and(|s| s.value_cloned::<&str, _>(&"tenant") == Some("acme"));
        async move {
            tokio::task::yield_now().await;
            let at_poll = current().is_some_and(|s| s.value_cloned::<&str, _>(&"tenant") == Some("acme"));
            Ok::<_, Infallible>(Response::new((at_call, at_poll)))
        }
    }));
    assert_eq!(svc.oneshot(Request::new(())).await.unwrap().into_body(), (true, true));
    assert!(!map.is_valid(), "the session must end with the response");
    assert!(current().is_none());
}

#[tokio::test]
async fn session_layer_ends_the_session_on_error() {
    let map = SessionMap::new();
    let svc = layer_of(&map).layer(service_fn(|_req: Request<()>| async { Err::<Response<()>, _>("boom") }));
    assert_eq!(svc.oneshot(Request::new(())).await.unwrap_err(), "boom");
    assert!(!map.is_valid());
}

#[tokio::test]
async fn session_layer_ends_the_session_when_the_response_future_is_dropped() {
    let map = SessionMap::new();
    let seen_valid_at_drop = Arc::new(AtomicUsize::new(0));
    let flag = seen_valid_at_drop.clone();
    let mut svc = layer_of(&map).layer(service_fn(move |_req: Request<()>| {
        let flag = flag.clone();
        async move {
            // Dropped while pending: the session is still bound (and valid) during the drop.
            let _on_drop = OnDrop(move || {
                if current().is_some_and(|s| s.is_valid()) {
                    flag.fetch_add(1, Ordering::SeqCst);
                }
            });
            std::future::pending::<()>().await;
            Ok::<_, Infallible>(Response::new(()))
        }
    }));
    let mut fut = Box::pin(svc.call(Request::new(())));
    assert!(futures::poll!(fut.as_mut()).is_pending());
    assert!(map.is_valid());
    drop(fut); // the client disconnected
    assert!(!map.is_valid());
    assert_eq!(seen_valid_at_drop.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn session_layer_keep_alive_leaves_the_session_valid() {
    let map = SessionMap::new();
    let svc = layer_of(&map)
        .keep_alive()
        .layer(service_fn(|_req: Request<()>| async { Ok::<_, Infallible>(Response::new(())) }));
    svc.oneshot(Request::new(())).await.unwrap();
    assert!(map.is_valid());
}

#[tokio::test]
async fn session_layer_reads_headers_and_extensions() {
    let layer = SessionLayer::new(|req: &Request<()>| {
        let tenant = req.headers().get("x-tenant").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        let user = req.extensions().get::<u64>().copied().unwrap_or(0);
        SessionCtx::new(&Context::background()).with_value("tenant", tenant).with_value("user", user)
    });
    let svc = layer.layer(service_fn(|_req: Request<()>| async {
        let s = current().unwrap();
        Ok::<_, Infallible>(Response::new((s.value_cloned::<String, _>(&"tenant"), s.value_cloned::<u64, _>(&"user"))))
    }));
    let mut req = Request::builder().header("x-tenant", "acme").body(()).unwrap();
    req.extensions_mut().insert(7u64);
    assert_eq!(svc.oneshot(req).await.unwrap().into_body(), (Some("acme".to_owned()), Some(7)));
}

/// A response body that carries the session the handler ran with (what a leftover task would
/// hold); `ServerBackup` needs `From<String>` for its `400` answers.
struct Kept(Option<AnySession>);

impl From<String> for Kept {
    fn from(_: String) -> Kept {
        Kept(None)
    }
}

fn backup_leaking_handler()
-> impl Service<Request<String>, Response = Response<Kept>, Error = Infallible, Future: Send> + Clone {
    service_fn(|_req: Request<String>| async { Ok::<_, Infallible>(Response::new(Kept(current()))) })
}

#[tokio::test]
async fn server_backup_ends_the_backup_with_the_response() {
    let svc = ServerBackupLayer::new().layer(backup_leaking_handler());
    let session = svc.oneshot(Request::new(String::new())).await.unwrap().into_body().0.unwrap();
    assert_eq!(session.err(), Some(ContextError::Canceled), "a leftover task must not find a valid backup");
}

#[tokio::test]
async fn server_backup_ends_the_backup_when_the_response_future_is_dropped() {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let mut tx = Some(tx);
    let mut svc = ServerBackupLayer::new().layer(service_fn(move |_req: Request<String>| {
        let _ = tx.take().map(|tx| tx.send(current().unwrap()));
        std::future::pending::<Result<Response<String>, Infallible>>()
    }));
    let fut = svc.call(Request::new(String::new()));
    let session = rx.await.unwrap();
    assert!(session.is_valid());
    drop(fut);
    assert!(!session.is_valid());
}

#[tokio::test]
async fn server_backup_keep_alive_leaves_the_backup_valid() {
    let svc = ServerBackupLayer::new().keep_alive().layer(backup_leaking_handler());
    let session = svc.oneshot(Request::new(String::new())).await.unwrap().into_body().0.unwrap();
    assert!(session.is_valid());
}

#[tokio::test]
async fn client_backup_refuses_to_send_from_an_ended_session() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let transport = service_fn(move |_req: Request<()>| {
        counted.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, Infallible>(Response::new(())) }
    });
    let mut client = ClientBackupLayer::new(recover as Recover).layer(transport);
    let request_ctx = MetaInfo::with_persistent(&Context::background(), "tenant", "first");
    let ended = SessionCtx::new(&request_ctx);
    ended.disable();
    let err = scope(ended, || client.call(Request::new(()))).await.unwrap_err();
    assert!(matches!(err, ClientBackupError::EndedSession(ContextError::Canceled)), "{err}");
    let msg = err.to_string();
    for part in
        ["has ended (context canceled)", "outlived the request", "Buffer", "without_flow", "spawn_without_session"]
    {
        assert!(msg.contains(part), "message lacks {part:?}: {msg}");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 0, "nothing may be sent");
    // A valid session, or none at all, still goes through.
    let live = SessionCtx::new(&request_ctx);
    scope(live, || client.call(Request::new(()))).await.unwrap();
    client.call(Request::new(())).await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawn_without_session_hides_the_spawners_session() {
    let map = SessionMap::new().with_value("tenant", "acme");
    let h = scope(map, || {
        localsession_tokio::spawn_without_session(async {
            tokio::task::yield_now().await;
            current().is_none()
        })
    });
    assert!(h.await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_session_executor_spawns_without_the_callers_session() {
    let (tx, rx) = tokio::sync::oneshot::channel();
    scope(SessionMap::new().with_value("tenant", "acme"), || {
        NoSessionExecutor::new().execute(async move {
            tokio::task::yield_now().await;
            let _ = tx.send(current().is_none());
        });
    });
    assert!(rx.await.unwrap());
}

/// The safe `Buffer` pattern: `Buffer::pair` + `spawn_without_session(worker)`, with
/// `ClientBackupLayer` outside the buffer: the worker has no session, and each call still sends
/// its own caller's tenant (written in the caller's task).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buffer_built_inside_a_request_with_the_safe_pattern_keeps_no_session() {
    let transport = service_fn(|req: Request<()>| async move {
        let tenant = req.headers().get("rpc-persist-tenant").map(|v| v.to_str().unwrap_or("?").to_owned());
        Ok::<_, Infallible>(Response::new((tenant, current().is_none())))
    });
    let first = SessionCtx::new(&MetaInfo::with_persistent(&Context::background(), "tenant", "first"));
    let client = scope(first.clone(), || {
        let (svc, worker) = Buffer::pair(transport, 8);
        localsession_tokio::spawn_without_session(worker);
        ClientBackupLayer::new(recover as Recover).layer(svc)
    });
    first.disable(); // the request that built it has ended
    let second = SessionCtx::new(&MetaInfo::with_persistent(&Context::background(), "tenant", "second"));
    let mut c = client.clone();
    let ready = c.ready().await.unwrap();
    let sent = scope(second, || ready.call(Request::new(()))).await.unwrap().into_body();
    assert_eq!(sent, (Some("second".to_owned()), true));
}

#[cfg(tokio_unstable)]
fn implicit_runtime() -> tokio::runtime::Runtime {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(2).enable_all();
    localsession_tokio::enable_implicit_sessions(&mut builder).build().unwrap()
}

/// In implicit mode a plain `tokio::spawn` inherits; the session-free helpers must not.
#[cfg(tokio_unstable)]
#[test]
fn implicit_mode_session_free_spawns_inherit_nothing() {
    implicit_runtime().block_on(async {
        let outer = tokio::spawn(async {
            localsession_std::bind(SessionMap::new().with_value("tenant", "acme")).unwrap();
            let inherited = tokio::spawn(async { current().is_some() });
            let detached = localsession_tokio::spawn_without_session(async {
                tokio::task::yield_now().await;
                current().is_none()
            });
            let (tx, rx) = tokio::sync::oneshot::channel();
            NoSessionExecutor::new().execute(async move {
                tokio::task::yield_now().await;
                let _ = tx.send(current().is_none());
            });
            (inherited.await.unwrap(), detached.await.unwrap(), rx.await.unwrap())
        });
        assert_eq!(outer.await.unwrap(), (true, true, true));
    });
}

/// `with_session(None, f)()` inside an implicit task hides the session from `f` only: the
/// handler keeps its own afterwards (issue part A, on tokio).
#[cfg(tokio_unstable)]
#[test]
fn implicit_mode_inline_with_session_keeps_the_tasks_session() {
    implicit_runtime().block_on(async {
        let task = tokio::spawn(async {
            localsession_std::bind(SessionMap::new().with_value("tenant", "acme")).unwrap();
            let inside = localsession_std::with_session(None, || current().is_none())();
            tokio::task::yield_now().await;
            (inside, current().and_then(|s| s.value_cloned::<&str, _>(&"tenant")))
        });
        assert_eq!(task.await.unwrap(), (true, Some("acme")));
    });
}

/// Runs a closure on drop.
struct OnDrop<F: FnMut()>(F);

impl<F: FnMut()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        (self.0)();
    }
}
