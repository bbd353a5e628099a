//! Adversarial tests of the tower layers' request lifecycle, the metainfo namespaces across
//! hops, user sessions on the client side, and configuration values at their extremes.
#![cfg(feature = "tower")]
#![allow(missing_docs)]

use std::any::Any;
use std::convert::Infallible;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};

use http::{HeaderMap, Request, Response};
use localsession_core::{
    AnySession, Context, ContextError, DynKey, KeyQuery, ManagerOptions, MetaInfo, Session, ShardedStore,
    config::{ConfigField, MAX_SHARD_NUMBER},
};
use localsession_tokio::tower::{ClientBackupError, ClientBackupLayer, ServerBackupLayer, SessionLayer};
use tower::{Layer, Service, ServiceExt, service_fn};

fn recover(_prev: &Context, cur: &Context) -> (Context, bool) {
    (cur.clone(), true)
}

fn header(h: &HeaderMap, name: &str) -> Option<String> {
    h.get(name).map(|v| v.to_str().unwrap_or("<bin>").to_owned())
}

/// A service whose `poll_ready` fails once, then is ready.
#[derive(Clone)]
struct FailsReadyOnce {
    failed: bool,
    calls: Arc<Mutex<Vec<bool>>>,
}

impl Service<Request<()>> for FailsReadyOnce {
    type Response = Response<String>;
    type Error = &'static str;
    type Future = std::future::Ready<Result<Response<String>, &'static str>>;

    fn poll_ready(&mut self, _cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        if self.failed {
            Poll::Ready(Ok(()))
        } else {
            self.failed = true;
            Poll::Ready(Err("not ready"))
        }
    }

    fn call(&mut self, _req: Request<()>) -> Self::Future {
        self.calls.lock().unwrap().push(localsession_std::current().is_some());
        std::future::ready(Ok(Response::new(String::new())))
    }
}

#[tokio::test(flavor = "current_thread")]
async fn poll_ready_failure_passes_through_and_binds_nothing() {
    let calls = Arc::new(Mutex::new(Vec::new()));
    let made = Arc::new(Mutex::new(0usize));
    let inner = FailsReadyOnce { failed: false, calls: calls.clone() };
    let mut server = ServerBackupLayer::new().layer(inner.clone());
    assert_eq!(server.ready().await.err(), Some("not ready"));
    assert!(localsession_std::current().is_none());
    server.ready().await.unwrap().call(Request::new(())).await.unwrap();

    let layer = SessionLayer::new({
        let made = made.clone();
        move |_: &Request<()>| {
            *made.lock().unwrap() += 1;
            localsession_core::SessionMap::new()
        }
    });
    let mut svc = layer.layer(inner);
    assert_eq!(svc.ready().await.err(), Some("not ready"));
    assert_eq!(*made.lock().unwrap(), 0, "make must not run for a request that never reached call");
    svc.ready().await.unwrap().call(Request::new(())).await.unwrap();
    assert_eq!(*made.lock().unwrap(), 1);
    assert_eq!(*calls.lock().unwrap(), [true, true]);
    assert!(localsession_std::current().is_none());
}

#[tokio::test(flavor = "current_thread")]
async fn cloned_server_interleaved_requests_each_see_only_their_own_backup() {
    let handler = service_fn(|req: Request<()>| async move {
        let want = header(req.headers(), "rpc-persist-tenant").unwrap();
        let mut seen = Vec::new();
        for _ in 0..8 {
            let ctx = localsession_core::backed_up_ctx().expect("backup bound at every poll");
            seen.push(MetaInfo::of(&ctx).persistent("TENANT").unwrap_or("").to_owned());
            tokio::task::yield_now().await;
        }
        let bad: Vec<_> = seen.into_iter().filter(|t| *t != want).collect();
        Ok::<_, Infallible>(Response::new(bad.join(",")))
    });
    let server = ServerBackupLayer::new().layer(handler);
    let mk = |t: &str| Request::builder().header("rpc-persist-tenant", t).body(()).unwrap();
    let (a, b, c) = futures::join!(
        server.clone().oneshot(mk("a")),
        server.clone().oneshot(mk("b")),
        server.clone().oneshot(mk("c"))
    );
    for r in [a, b, c] {
        assert!(r.unwrap().into_body().is_empty(), "a request saw another request's tenant");
    }
    assert!(localsession_std::current().is_none());
}

/// A user session (`AnySession::Custom`) that carries a tenant and may be invalid.
struct Custom {
    valid: bool,
}

impl Session for Custom {
    fn is_valid(&self) -> bool {
        self.valid
    }
    fn get_with(&self, _key: &KeyQuery<'_>, f: &mut dyn FnMut(Option<&(dyn Any + Send + Sync)>)) {
        f(None)
    }
    fn with_value_dyn(&self, _key: DynKey, _value: Arc<dyn Any + Send + Sync>) -> AnySession {
        AnySession::custom(Custom { valid: self.valid })
    }
}

#[tokio::test(flavor = "current_thread")]
async fn client_backup_under_a_custom_session_sends_the_call_context_or_refuses_when_invalid() {
    let transport = service_fn(|req: Request<()>| async move {
        Ok::<_, Infallible>(Response::new(header(req.headers(), "rpc-persist-tenant")))
    });
    let client = ClientBackupLayer::new(recover).layer(transport);
    let with_ctx = || {
        let mut req = Request::new(());
        req.extensions_mut().insert(MetaInfo::with_persistent(&Context::background(), "TENANT", "own"));
        req
    };

    // A valid user session cannot be exported: nothing is recovered, the call's context is sent.
    let fut = localsession_std::scope(AnySession::custom(Custom { valid: true }), || client.clone().call(with_ctx()));
    assert_eq!(fut.await.unwrap().into_body().as_deref(), Some("own"));
    let fut =
        localsession_std::scope(AnySession::custom(Custom { valid: true }), || client.clone().call(Request::new(())));
    assert_eq!(fut.await.unwrap().into_body(), None);

    // An invalid user session: the call is refused, not sent.
    let fut = localsession_std::scope(AnySession::custom(Custom { valid: false }), || client.clone().call(with_ctx()));
    match fut.await {
        Err(ClientBackupError::EndedSession(cause)) => assert_eq!(cause, ContextError::Canceled),
        other => panic!("expected EndedSession, got {other:?}"),
    }
}

/// Three hops, the same key in both namespaces: persistent travels every hop, transient one hop,
/// whether hop 2 forwards the request context explicitly or relies on the backup.
#[tokio::test(flavor = "current_thread")]
async fn same_key_in_both_namespaces_across_three_hops() {
    let c = ServerBackupLayer::new().layer(service_fn(|req: Request<()>| async move {
        let ctx = req.extensions().get::<Context>().cloned().unwrap();
        let m = MetaInfo::of(&ctx);
        Ok::<_, Infallible>(Response::new(format!("{:?}", (m.persistent("K"), m.transient("K"), m.count_transient()))))
    }));
    for explicit in [false, true] {
        let to_c = ClientBackupLayer::new(recover).layer(c.clone());
        let b = ServerBackupLayer::new().layer(service_fn(move |req: Request<()>| {
            let to_c = to_c.clone();
            async move {
                let ctx = req.extensions().get::<Context>().cloned().unwrap();
                let seen = format!("{:?}", (MetaInfo::of(&ctx).persistent("K"), MetaInfo::of(&ctx).transient("K")));
                let mut out = Request::new(());
                if explicit {
                    out.extensions_mut().insert(ctx);
                }
                let c_saw = to_c.oneshot(out).await.map_err(|e| e.to_string())?.into_body();
                Ok::<_, String>(Response::new(format!("B={seen} C={c_saw}")))
            }
        }));
        let to_b = ClientBackupLayer::new(recover).layer(b);
        let a_ctx = MetaInfo::with_persistent(&Context::background(), "K", "p");
        let a_ctx = MetaInfo::with_transient(&a_ctx, "K", "t");
        let mut req = Request::new(());
        req.extensions_mut().insert(a_ctx);
        let saw = to_b.oneshot(req).await.unwrap().into_body();
        assert_eq!(saw, r#"B=(Some("p"), Some("t")) C=(Some("p"), None, 0)"#, "explicit={explicit}");
    }
}

/// A gateway that forwards the request it received (headers included) through the client
/// layer: the module docs promise that transient values received from upstream are not
/// forwarded (they travel one hop).
#[tokio::test(flavor = "current_thread")]
async fn forwarded_request_does_not_carry_upstream_transient_past_one_hop() {
    let c = ServerBackupLayer::new().layer(service_fn(|req: Request<()>| async move {
        let ctx = req.extensions().get::<Context>().cloned().unwrap();
        Ok::<_, Infallible>(Response::new(format!("{:?}", MetaInfo::of(&ctx).transient("HOP"))))
    }));
    let to_c = ClientBackupLayer::new(recover).layer(c);
    let b = ServerBackupLayer::new().layer(service_fn(move |req: Request<()>| {
        let to_c = to_c.clone();
        async move {
            // B's own view: HOP is an upstream (received) value, not one of B's outgoing ones.
            let ctx = req.extensions().get::<Context>().unwrap();
            assert_eq!(MetaInfo::of(ctx).transient("HOP"), Some("1"));
            assert_eq!(MetaInfo::of(ctx).outgoing_transient_values().count(), 0);
            to_c.oneshot(req).await.map_err(|e| e.to_string())
        }
    }));
    let req = Request::builder().header("rpc-transit-hop", "1").body(()).unwrap();
    let c_saw = b.oneshot(req).await.unwrap().into_body();
    assert_eq!(c_saw, "None", "the transient value from hop 1 reached hop 3");
}

/// The request's backup must end once the request is over. Here the inner `call` panics (a
/// bug in the handler, caught by a CatchPanic-style layer that answers 500): there is no
/// response future, so nothing ends the session that `call` already handed out.
#[test]
fn server_backup_ends_the_backup_when_inner_call_panics() {
    let leaked: Arc<Mutex<Option<AnySession>>> = Arc::default();
    let inner = {
        let leaked = leaked.clone();
        service_fn(move |_req: Request<()>| {
            // e.g. `localsession_tokio::spawn(..)` of a task that keeps the session.
            *leaked.lock().unwrap() = localsession_std::current();
            if leaked.lock().is_ok() {
                panic!("handler bug in call");
            }
            std::future::ready(Ok::<_, Infallible>(Response::new(String::new())))
        })
    };
    let mut server = ServerBackupLayer::new().layer(inner);
    let caught = catch_unwind(AssertUnwindSafe(|| drop(server.call(Request::new(())))));
    assert!(caught.is_err());
    assert!(localsession_std::current().is_none(), "the scope guard unbinds on unwind");
    let s = leaked.lock().unwrap().clone().expect("the session was bound in call");
    assert!(!s.is_valid(), "the request is over (its call panicked) but its backup is still valid");
}

#[test]
fn session_layer_ends_the_session_when_inner_call_panics() {
    let map = localsession_core::SessionMap::new();
    let layer = SessionLayer::new({
        let map = map.clone();
        move |_: &Request<()>| map.clone()
    });
    let mut svc = layer.layer(service_fn(|_req: Request<()>| {
        if localsession_std::current().is_some() {
            panic!("handler bug in call");
        }
        std::future::ready(Ok::<_, Infallible>(Response::new(())))
    }));
    let caught = catch_unwind(AssertUnwindSafe(|| drop(svc.call(Request::new(())))));
    assert!(caught.is_err());
    assert!(!map.is_valid(), "the request is over (its call panicked) but its session is still valid");
}

/// `shards` is documented as "a decimal integer of at least 1" and parses up to `usize::MAX`;
/// `ShardedStore::new` documents a `ConfigError` as its only failure. A hostile but accepted
/// value must not panic.
#[test]
fn a_huge_shard_number_is_an_error_naming_it_never_a_panic() {
    // Failed before: `parse_env` accepted `usize::MAX` shards and `ShardedStore::new` then
    // panicked ("capacity overflow"); 10^12 would have aborted on allocation.
    for n in [usize::MAX.to_string(), "1000000000000".to_owned(), (MAX_SHARD_NUMBER + 1).to_string()] {
        let err = ManagerOptions::parse_env(&format!(",{n}"), ManagerOptions::default()).unwrap_err();
        assert_eq!(err.field(), ConfigField::Shards);
        assert!(err.to_string().contains(&n) && err.to_string().contains("too large"), "{err}");
        let opts = ManagerOptions { shard_number: n.parse().unwrap(), ..ManagerOptions::default() };
        let built = catch_unwind(|| ShardedStore::new(opts, || None).map(|_| ()));
        let err = built.expect("ShardedStore::new must not panic").unwrap_err();
        assert_eq!(err.field(), ConfigField::Shards);
    }
    let opts = ManagerOptions::parse_env(&format!(",{MAX_SHARD_NUMBER}"), ManagerOptions::default()).unwrap();
    assert!(ShardedStore::new(opts, || None).is_ok());
}

#[test]
fn hostile_config_strings_are_errors_or_values_never_panics() {
    let base = ManagerOptions::default();
    let cases = [
        "",
        ",",
        ",,",
        " , , ",
        "true,+0",
        "true,-0",
        "true,-1",
        "true,+-1",
        "true,00000000000000000000000000000000000000001",
        "true,18446744073709551616",
        "true,99999999999999999999999999999999",
        "true,\u{0663}",
        "true,１",
        ",,1e3s",
        ",,.s",
        ",,.5",
        ",,1.s",
        ",,.5s",
        ",,-1s",
        ",,+1s",
        ",,0",
        ",,18446744073709551615ns",
        ",,18446744073709551616ns",
        ",,99999999999999999999h",
        ",,5124095576h",
        ",,1.99999999999999999999999999999999999s",
        ",,1µs1s",
        ",,1μs1s",
        ",,1h-1m",
        ",,\u{0}",
        "tRuE",
        "true,1,1s,",
        "\u{feff}true",
    ];
    for s in cases {
        let r = catch_unwind(|| ManagerOptions::parse_env(s, base));
        match r {
            Ok(Ok(opts)) => assert!(opts.validate().is_ok(), "{s:?} gave invalid options {opts:?}"),
            Ok(Err(e)) => assert!(!e.to_string().is_empty()),
            Err(_) => panic!("parse_env panicked on {s:?}"),
        }
    }
}
