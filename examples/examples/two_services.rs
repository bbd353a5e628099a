//! One request crossing two services, over HTTP and over gRPC, with no context parameter.
//!
//! `cargo run -p localsession-examples --example two_services --features grpc`
//!
//! The client sends a persistent value (`TENANT`, travels every hop), a transient one (`HOP`,
//! one hop) and a W3C trace context (`traceparent`). Service A's handler calls service B from a
//! spawned task without passing any context: the server layer backed A's request up, and the
//! client layer recovers what the call lacks from that backup. Each service prints what it sees:
//! A sees all three; B sees the tenant and the trace, not the transient value. The same layers
//! serve HTTP (hyper) and gRPC (tonic: a hand-written service, see `localsession_examples::grpc`);
//! in gRPC mode a malformed `traceparent` is answered with the status `INVALID_ARGUMENT`.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use localsession_core::{Context, MetaInfo, backed_up_ctx};
use localsession_examples::grpc::{UnaryService, call_unary};
use localsession_tokio::tower::{ClientBackupLayer, ServerBackupLayer, TraceContext, TraceParent, W3cTraceContext};
use tonic::transport::{Channel, Endpoint, Server};
use tower::{Layer, ServiceExt, service_fn};

type Body = Full<Bytes>;
type Recover = fn(&Context, &Context) -> (Context, bool);

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const METHOD: &str = "/demo.Service/Call";

/// Kitex's backup handler: the call's own context, plus what it lacks from the backup.
fn recover(_prev: &Context, cur: &Context) -> (Context, bool) {
    (cur.clone(), true)
}

/// What the current request carries, read from its backup (no context parameter).
fn sees(service: &str) -> String {
    let Some(ctx) = backed_up_ctx() else { return format!("{service} sees no request") };
    let meta = MetaInfo::of(&ctx);
    let persistent: Vec<String> = meta.persistent_values().map(|(k, v)| format!("{k}={v}")).collect();
    let transient: Vec<String> = meta.transient_values().map(|(k, v)| format!("{k}={v}")).collect();
    let trace = TraceContext::of(&ctx).map_or_else(|| "-".to_owned(), |t| t.parent.to_string());
    format!("{service} sees persistent[{}] transient[{}] trace {trace}", persistent.join(","), transient.join(","))
}

/// The client's request context: a tenant (every hop), a hop counter (one hop), a trace.
fn request_context() -> Context {
    let ctx = MetaInfo::with_persistent(&Context::background(), "TENANT", "acme");
    let ctx = MetaInfo::with_transient(&ctx, "HOP", "1");
    let parent = TraceParent::parse(TRACEPARENT.as_bytes()).expect("a valid traceparent");
    TraceContext { parent, state: None }.attach(&ctx)
}

// ---- HTTP (hyper) ----

type HttpClient = localsession_tokio::tower::ClientBackup<Client<HttpConnector, Body>, Recover>;

fn http_client() -> HttpClient {
    let http = Client::builder(TokioExecutor::new()).build_http::<Body>();
    ClientBackupLayer::new(recover as Recover).with_propagator(W3cTraceContext::new()).layer(http)
}

async fn http_call(client: HttpClient, addr: SocketAddr, ctx: Option<Context>) -> String {
    let mut req = http::Request::get(format!("http://{addr}/")).body(Body::default()).expect("request");
    if let Some(ctx) = ctx {
        req.extensions_mut().insert(ctx);
    }
    match client.oneshot(req).await {
        Ok(resp) => {
            let body = resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            String::from_utf8_lossy(&body).into_owned()
        }
        Err(e) => format!("HTTP call failed: {e}"),
    }
}

async fn http_serve<F, Fut>(handler: F) -> SocketAddr
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = String> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind 127.0.0.1");
    let addr = listener.local_addr().expect("local address");
    let layer = ServerBackupLayer::new().with_propagator(W3cTraceContext::new());
    let svc = layer.layer(service_fn(move |_req: http::Request<Incoming>| {
        let handler = handler.clone();
        async move { Ok::<_, Infallible>(http::Response::new(Body::from(handler().await))) }
    }));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let svc = TowerToHyperService::new(svc.clone());
            tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc));
        }
    });
    addr
}

// ---- gRPC (tonic) ----

async fn grpc_serve<F, Fut>(handler: F) -> SocketAddr
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = String> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind 127.0.0.1");
    let addr = listener.local_addr().expect("local address");
    let svc = UnaryService::new(METHOD, move |_req: tonic::Request<String>| {
        let handler = handler.clone();
        async move { Ok(tonic::Response::new(handler().await)) }
    });
    // gRPC mode: unreadable metadata is answered INVALID_ARGUMENT, not HTTP 400.
    let layer = ServerBackupLayer::new().with_propagator(W3cTraceContext::new()).grpc();
    let server =
        Server::builder().layer(layer).serve_with_incoming(svc, tonic::transport::server::TcpIncoming::from(listener));
    tokio::spawn(server);
    addr
}

async fn grpc_channel(addr: SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}")).expect("an http URI").connect_lazy()
}

async fn grpc_call(channel: Channel, ctx: Option<Context>) -> String {
    let client = ClientBackupLayer::new(recover as Recover).with_propagator(W3cTraceContext::new()).layer(channel);
    let mut req = tonic::Request::new(String::new());
    if let Some(ctx) = ctx {
        req.extensions_mut().insert(ctx);
    }
    match call_unary(client, METHOD, req).await {
        Ok(resp) => resp.into_inner(),
        Err(status) => format!("gRPC call failed: {:?}: {}", status.code(), status.message()),
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    localsession_tokio::init(localsession_std::default_manager_options())?;

    // HTTP: B reports; A reports, then calls B from a spawned task with no context.
    let http_b = http_serve(|| async { sees("HTTP B") }).await;
    let a_client = http_client(); // built at startup, outside any request
    let http_a = http_serve(move || {
        let client = a_client.clone();
        async move {
            let a = sees("HTTP A");
            let b = localsession_tokio::spawn(http_call(client, http_b, None)).await.unwrap_or_else(|e| e.to_string());
            format!("{a}\n{b}")
        }
    })
    .await;
    println!("client sends TENANT=acme (persistent), HOP=1 (transient), traceparent {TRACEPARENT}");
    println!("{}", http_call(http_client(), http_a, Some(request_context())).await);

    // gRPC: the same over tonic.
    let grpc_b = grpc_serve(|| async { sees("gRPC B") }).await;
    let to_b = grpc_channel(grpc_b).await; // built at startup, outside any request
    let grpc_a = grpc_serve(move || {
        let to_b = to_b.clone();
        async move {
            let a = sees("gRPC A");
            let b = localsession_tokio::spawn(grpc_call(to_b, None)).await.unwrap_or_else(|e| e.to_string());
            format!("{a}\n{b}")
        }
    })
    .await;
    let to_a = grpc_channel(grpc_a).await;
    println!("{}", grpc_call(to_a.clone(), Some(request_context())).await);

    // A hostile request: a malformed traceparent is refused with INVALID_ARGUMENT naming it.
    let mut bad = tonic::Request::new(String::new());
    bad.metadata_mut().insert("traceparent", tonic::metadata::MetadataValue::from_static("00-not-a-trace"));
    match call_unary(to_a, METHOD, bad).await {
        Ok(resp) => println!("gRPC hostile request accepted?! {}", resp.into_inner()),
        Err(status) => println!("gRPC hostile request -> {:?}: {}", status.code(), status.message()),
    }
    Ok(())
}
