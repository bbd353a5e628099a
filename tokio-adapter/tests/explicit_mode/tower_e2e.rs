//! End to end over real HTTP on 127.0.0.1: a request's persistent metainfo reaches service A,
//! whose handler calls service B from a spawned task without passing any context; B sees the
//! metainfo (Kitex `WithContextBackup` on both sides).

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use localsession_core::{Context, MetaInfo, backed_up_ctx};
use localsession_tokio::tower::{BackwardValues, ClientBackup, ClientBackupLayer, ServerBackupLayer};
use tower::{Layer, Service, ServiceExt, service_fn};

type Body = Full<Bytes>;
type Handler = fn(&Context, &Context) -> (Context, bool);

/// Serves `svc` (behind the server backup layer) on an ephemeral port.
async fn serve<S>(svc: S) -> SocketAddr
where
    S: Service<Request<Incoming>, Response = Response<Body>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = ServerBackupLayer::new().layer(svc);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let svc = TowerToHyperService::new(svc.clone());
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    addr
}

fn client(handler: Handler) -> ClientBackup<Client<HttpConnector, Body>, Handler> {
    let http = Client::builder(TokioExecutor::new()).build_http::<Body>();
    ClientBackupLayer::new(handler).layer(http)
}

fn recover(_prev: &Context, cur: &Context) -> (Context, bool) {
    (cur.clone(), true)
}

/// Service B reports the metainfo of its backed-up context.
async fn service_b(_req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let ctx = backed_up_ctx().expect("the server layer backs the request up");
    let meta = MetaInfo::of(&ctx);
    let persistent: Vec<String> = meta.persistent_values().map(|(k, v)| format!("{k}={v}")).collect();
    let transient: Vec<String> = meta.transient_values().map(|(k, v)| format!("{k}={v}")).collect();
    Ok(Response::new(Body::from(format!("persistent[{}] transient[{}]", persistent.join(","), transient.join(",")))))
}

async fn body_text(resp: Response<Incoming>) -> String {
    String::from_utf8(resp.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
}

/// Service A: its handler calls B from a spawned task with NO context (what library code does).
fn service_a(
    b: SocketAddr,
    override_tenant: bool,
) -> impl Service<Request<Incoming>, Response = Response<Body>, Error = Infallible, Future: Send> + Clone + Send + 'static
{
    service_fn(move |_req: Request<Incoming>| async move {
        let call = localsession_tokio::spawn(async move {
            let mut req = Request::get(format!("http://{b}/")).body(Body::default()).unwrap();
            if override_tenant {
                // A context the handler passes explicitly wins over the backup.
                let own = MetaInfo::with_persistent(&Context::background(), "TENANT", "override");
                req.extensions_mut().insert(own);
            }
            let resp = client(recover).ready().await.unwrap().call(req).await.unwrap();
            body_text(resp).await
        });
        Ok::<_, Infallible>(Response::new(Body::from(call.await.unwrap())))
    })
}

async fn send(addr: SocketAddr, headers: &[(&'static str, HeaderValue)]) -> (StatusCode, String) {
    let http = Client::builder(TokioExecutor::new()).build_http::<Body>();
    let mut req = Request::get(format!("http://{addr}/")).body(Body::default()).unwrap();
    for (name, value) in headers {
        req.headers_mut().insert(*name, value.clone());
    }
    let resp = http.request(req).await.unwrap();
    let status = resp.status();
    (status, body_text(resp).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_metainfo_reaches_the_second_service_and_transient_does_not() {
    let b = serve(service_fn(service_b)).await;
    let a = serve(service_a(b, false)).await;
    let (status, body) = send(
        a,
        &[("rpc-persist-tenant", HeaderValue::from_static("acme")), ("rpc-transit-hop", HeaderValue::from_static("1"))],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "persistent[TENANT=acme] transient[]");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_current_context_wins_over_the_backup() {
    let b = serve(service_fn(service_b)).await;
    let a = serve(service_a(b, true)).await;
    let (_, body) = send(
        a,
        &[
            ("rpc-persist-tenant", HeaderValue::from_static("acme")),
            ("rpc-persist-region", HeaderValue::from_static("eu")),
        ],
    )
    .await;
    // `tenant` comes from the explicit context; `region`, which it lacks, from the backup.
    assert_eq!(body, "persistent[REGION=eu,TENANT=override] transient[]");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_never_mix_metainfo() {
    let b = serve(service_fn(service_b)).await;
    let a = serve(service_a(b, false)).await;
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..64 {
        calls.spawn(async move {
            let tenant = HeaderValue::from_str(&format!("t{i}")).unwrap();
            let (_, body) = send(a, &[("rpc-persist-tenant", tenant)]).await;
            (i, body)
        });
    }
    while let Some(r) = calls.join_next().await {
        let (i, body) = r.unwrap();
        assert_eq!(body, format!("persistent[TENANT=t{i}] transient[]"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_metainfo_headers_are_rejected_with_a_clear_error() {
    let b = serve(service_fn(service_b)).await;
    let (status, body) = send(b, &[("rpc-persist-tenant", HeaderValue::from_bytes(b"caf\xe9").unwrap())]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.contains("\"rpc-persist-tenant\"") && body.contains("not UTF-8"), "{body}");
    // The server is still up and serving.
    let (status, _) = send(b, &[("rpc-persist-tenant", HeaderValue::from_static("ok"))]).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_declines_the_backup_gets_its_own_context() {
    fn decline(_prev: &Context, cur: &Context) -> (Context, bool) {
        (MetaInfo::with_persistent(cur, "CHOSEN", "by-handler"), false)
    }
    let b = serve(service_fn(service_b)).await;
    let a = serve(service_fn(move |_req: Request<Incoming>| async move {
        let call = localsession_tokio::spawn(async move {
            let req = Request::get(format!("http://{b}/")).body(Body::default()).unwrap();
            let resp = client(decline).ready().await.unwrap().call(req).await.unwrap();
            body_text(resp).await
        });
        Ok::<_, Infallible>(Response::new(Body::from(call.await.unwrap())))
    }))
    .await;
    let (_, body) = send(a, &[("rpc-persist-tenant", HeaderValue::from_static("acme"))]).await;
    // Go would drop the handler's context here; the port returns it (and merges nothing).
    assert_eq!(body, "persistent[CHOSEN=by-handler] transient[]");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsendable_metainfo_is_a_client_error_not_a_panic() {
    let b = serve(service_fn(service_b)).await;
    let mut req = Request::get(format!("http://{b}/")).body(Body::default()).unwrap();
    req.extensions_mut().insert(MetaInfo::with_persistent(&Context::background(), "bad key", "v"));
    let err = client(recover).ready().await.unwrap().call(req).await.unwrap_err();
    assert!(err.to_string().contains("not a valid HTTP header name"), "{err}");
}

/// gopkg's own convention examples, over real HTTP: `rpc-persist-abc-def: v` is the persistent
/// key `ABC_DEF`, `rpc-transit-x-y` the transient key `X_Y`; empty keys and values are skipped
/// (no `400`); and what A sends on to B uses the same mapping (`ABC_DEF` -> `rpc-persist-abc-def`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gopkg_cgi_key_convention_both_ways() {
    let b = serve(service_fn(service_b)).await;
    let (status, body) = send(
        b,
        &[
            ("rpc-persist-abc-def", HeaderValue::from_static("v")),
            ("rpc-transit-x-y", HeaderValue::from_static("w")),
            ("rpc-persist-", HeaderValue::from_static("no key")),
            ("rpc-persist-empty", HeaderValue::from_static("")),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, "persistent[ABC_DEF=v] transient[X_Y=w]");

    // Through A: the persistent key reaches B under the same name; the transient one stops at A.
    let a = serve(service_a(b, false)).await;
    let (_, body) = send(
        a,
        &[("rpc-persist-abc-def", HeaderValue::from_static("v")), ("rpc-transit-x-y", HeaderValue::from_static("w"))],
    )
    .await;
    assert_eq!(body, "persistent[ABC_DEF=v] transient[]");
}

/// What a Go (gopkg) client writes for `WithPersistentValue(ctx, "ABC_DEF", "v")` is exactly the
/// header this crate writes: the client side of the convention, checked on the wire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_writes_gopkg_header_names() {
    let echo = serve(service_fn(|req: Request<Incoming>| async move {
        let mut names: Vec<String> = req
            .headers()
            .iter()
            .filter(|(n, _)| n.as_str().starts_with("rpc-"))
            .map(|(n, v)| format!("{n}: {}", v.to_str().unwrap()))
            .collect();
        names.sort();
        Ok::<_, Infallible>(Response::new(Body::from(names.join("; "))))
    }))
    .await;
    let ctx = MetaInfo::with_persistent(&Context::background(), "ABC_DEF", "v");
    let ctx = MetaInfo::with_transient(&ctx, "X_Y", "w");
    let mut req = Request::get(format!("http://{echo}/")).body(Body::default()).unwrap();
    req.extensions_mut().insert(ctx);
    let resp = client(recover).ready().await.unwrap().call(req).await.unwrap();
    assert_eq!(body_text(resp).await, "rpc-persist-abc-def: v; rpc-transit-x-y: w");
}

/// Backward values, both ways over real HTTP: B's handler (deep, with no context parameter)
/// sends `CACHE_HIT` back; the response carries `rpc-backward-cache-hit`, and A's client exposes
/// it in the response extensions as `BackwardValues`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backward_values_travel_back_to_the_client() {
    fn deep_in_the_handler() {
        let ctx = backed_up_ctx().expect("backed up");
        assert!(MetaInfo::send_backward_value(&ctx, "CACHE_HIT", "1"));
        assert!(MetaInfo::send_backward_value(&ctx, "bad key", "dropped")); // not a header: dropped
    }
    let b = serve(service_fn(|_req: Request<Incoming>| async {
        // From a spawned task too: the cell is the request's.
        localsession_tokio::spawn(async { deep_in_the_handler() }).await.unwrap();
        Ok::<_, Infallible>(Response::new(Body::from("ok")))
    }))
    .await;

    // The raw response headers (a Go client reads these).
    let http = Client::builder(TokioExecutor::new()).build_http::<Body>();
    let resp = http.request(Request::get(format!("http://{b}/")).body(Body::default()).unwrap()).await.unwrap();
    assert_eq!(resp.headers()["rpc-backward-cache-hit"], "1");
    assert_eq!(resp.headers().keys().filter(|n| n.as_str().starts_with("rpc-backward-")).count(), 1);

    // Through the client layer.
    let req = Request::get(format!("http://{b}/")).body(Body::default()).unwrap();
    let resp = client(recover).ready().await.unwrap().call(req).await.unwrap();
    let back = resp.extensions().get::<BackwardValues>().expect("the client layer always inserts them");
    assert_eq!(back.iter().collect::<Vec<_>>(), [("CACHE_HIT", "1")]);
}

/// A Go server's backward headers (as gopkg writes them) are read by the client layer, with
/// the same key mapping; requests that send none get an empty set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_reads_gopkg_backward_headers() {
    let go_like = serve(service_fn(|_req: Request<Incoming>| async {
        let mut resp = Response::new(Body::from("ok"));
        resp.headers_mut().insert("rpc-backward-abc-def", HeaderValue::from_static("v"));
        resp.headers_mut().insert("rpc-backward-", HeaderValue::from_static("no key: skipped"));
        Ok::<_, Infallible>(resp)
    }))
    .await;
    let req = Request::get(format!("http://{go_like}/")).body(Body::default()).unwrap();
    let resp = client(recover).ready().await.unwrap().call(req).await.unwrap();
    assert_eq!(resp.extensions().get::<BackwardValues>().unwrap().iter().collect::<Vec<_>>(), [("ABC_DEF", "v")]);

    let plain = serve(service_fn(service_b)).await;
    let req = Request::get(format!("http://{plain}/")).body(Body::default()).unwrap();
    let resp = client(recover).ready().await.unwrap().call(req).await.unwrap();
    assert!(resp.extensions().get::<BackwardValues>().unwrap().is_empty());
}
