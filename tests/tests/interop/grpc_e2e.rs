//! End to end over real gRPC (tonic's server and channel, HTTP/2 on 127.0.0.1): the tower layers
//! of `localsession_tokio::tower` as tonic layers. A client sends persistent values, transient
//! values and a W3C trace context to service A, whose handler calls service B from a spawned
//! task without passing any context; hostile metadata is answered `INVALID_ARGUMENT` naming the
//! header. The service is hand-written over `tonic::server::Grpc` with a UTF-8 string codec
//! (`localsession_examples::grpc`; no protoc).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use localsession_core::{AnySession, Context, MetaInfo, backed_up_ctx};
use localsession_examples::grpc::{UnaryService, call_unary};
use localsession_tokio::tower::{
    BackwardValues, ClientBackup, ClientBackupLayer, ServerBackupLayer, TraceContext, TraceParent, W3cBaggage,
    W3cTraceContext,
};
use tonic::metadata::MetadataValue;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint, Server};
use tonic::{Code, Request, Response, Status};
use tower::Layer;

const METHOD: &str = "/localsession.test.Relay/Call";
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

type Recover = fn(&Context, &Context) -> (Context, bool);

fn recover(_prev: &Context, cur: &Context) -> (Context, bool) {
    (cur.clone(), true)
}

/// Serves a unary method on an ephemeral port behind the server backup layer in gRPC mode, with
/// all three propagators; the HTTP/2 header list limit is raised so that oversize metadata
/// reaches the layer (rather than being refused by h2).
async fn serve<F, Fut>(handler: F) -> SocketAddr
where
    F: Fn(Request<String>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<String>, Status>> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let layer = ServerBackupLayer::new().with_propagator(W3cBaggage).with_propagator(W3cTraceContext::new()).grpc();
    let server = Server::builder()
        .http2_max_header_list_size(4 << 20)
        .layer(layer)
        .serve_with_incoming(UnaryService::new(METHOD, handler), TcpIncoming::from(listener));
    tokio::spawn(server);
    addr
}

fn channel(addr: SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}")).unwrap().connect_lazy()
}

fn client(channel: Channel) -> ClientBackup<Channel, Recover> {
    ClientBackupLayer::new(recover as Recover)
        .with_propagator(W3cBaggage)
        .with_propagator(W3cTraceContext::new())
        .layer(channel)
}

/// What the current request carries, read from its backup (no context parameter).
fn sees() -> String {
    let Some(ctx) = backed_up_ctx() else { return "no backup".to_owned() };
    let meta = MetaInfo::of(&ctx);
    let persistent: Vec<String> = meta.persistent_values().map(|(k, v)| format!("{k}={v}")).collect();
    let transient: Vec<String> = meta.transient_values().map(|(k, v)| format!("{k}={v}")).collect();
    let trace = TraceContext::of(&ctx).map_or_else(|| "-".to_owned(), |t| t.parent.to_string());
    format!("persistent[{}] transient[{}] trace {trace}", persistent.join(","), transient.join(","))
}

fn trace_of(i: u64) -> TraceParent {
    let mut trace_id = [0x11; 16];
    trace_id[8..].copy_from_slice(&i.to_be_bytes());
    TraceParent { version: 0, trace_id, parent_id: [0x22; 8], flags: 1 }
}

fn request_context(tenant: &str, trace: TraceParent) -> Context {
    let ctx = MetaInfo::with_persistent(&Context::background(), "TENANT", tenant);
    let ctx = MetaInfo::with_transient(&ctx, "HOP", "1");
    TraceContext { parent: trace, state: Some("congo=t61rcWkgMzE".to_owned()) }.attach(&ctx)
}

async fn call_with(channel: Channel, ctx: Context) -> Result<Response<String>, Status> {
    let mut req = Request::new(String::new());
    req.extensions_mut().insert(ctx);
    call_unary(client(channel), METHOD, req).await
}

/// Service B reports what it sees; service A reports, keeps its session (to check it ends),
/// then calls B from a spawned task with no context.
async fn two_services() -> (SocketAddr, Arc<Mutex<Vec<AnySession>>>) {
    let b = serve(|_req: Request<String>| async { Ok(Response::new(sees())) }).await;
    let to_b = channel(b); // built outside any request
    let kept = Arc::new(Mutex::new(Vec::new()));
    let a = serve({
        let kept = kept.clone();
        move |_req: Request<String>| {
            let (to_b, kept) = (to_b.clone(), kept.clone());
            async move {
                kept.lock().unwrap().extend(localsession_std::current());
                let a = sees();
                let b = localsession_tokio::spawn(async move {
                    // The call's own context is empty: everything comes from the backup.
                    call_unary(client(to_b), METHOD, Request::new(String::new())).await
                })
                .await
                .map_err(|e| Status::internal(e.to_string()))??;
                Ok(Response::new(format!("A: {a} | B: {}", b.into_inner())))
            }
        }
    })
    .await;
    (a, kept)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_values_and_the_trace_reach_the_second_service_transient_values_stop_at_the_first() {
    let (a, kept) = two_services().await;
    let trace = TraceParent::parse(TRACEPARENT.as_bytes()).unwrap();
    let reply = call_with(channel(a), request_context("acme", trace)).await.unwrap().into_inner();
    assert_eq!(
        reply,
        format!(
            "A: persistent[TENANT=acme] transient[HOP=1] trace {TRACEPARENT} | \
             B: persistent[TENANT=acme] transient[] trace {TRACEPARENT}"
        )
    );
    // A's request session ended with its response: a task it left behind cannot use it.
    let kept = kept.lock().unwrap();
    assert_eq!(kept.len(), 1);
    assert!(!kept[0].is_valid());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tracestate_and_raw_metadata_arrive_as_sent() {
    // Raw gRPC metadata (what a Go/Kitex or OpenTelemetry client sends), no client layer.
    let addr = serve(|req: Request<String>| async move {
        let ctx = req.extensions().get::<Context>().cloned().unwrap_or_default();
        let trace = TraceContext::of(&ctx).cloned().unwrap();
        let meta = MetaInfo::of(&ctx);
        Ok(Response::new(format!(
            "{} {} {:?} {:?} {:?}",
            trace.parent,
            trace.state.unwrap_or_default(),
            meta.persistent("TENANT"),
            meta.persistent("user"),
            meta.transient("X_Y")
        )))
    })
    .await;
    let mut req = Request::new(String::new());
    let md = req.metadata_mut();
    md.insert("traceparent", MetadataValue::from_static(TRACEPARENT));
    md.insert("tracestate", MetadataValue::from_static("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"));
    md.insert("rpc-persist-tenant", MetadataValue::from_static("acme"));
    md.insert("rpc-transit-x-y", MetadataValue::from_static("w"));
    md.insert("baggage", MetadataValue::from_static("user=J%C3%BCrgen"));
    let reply = call_unary(channel(addr), METHOD, req).await.unwrap().into_inner();
    assert_eq!(
        reply,
        format!("{TRACEPARENT} rojo=00f067aa0ba902b7,congo=t61rcWkgMzE Some(\"acme\") Some(\"Jürgen\") Some(\"w\")")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_grpc_requests_never_mix_their_values() {
    let (a, _kept) = two_services().await;
    let to_a = channel(a);
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..1000u64 {
        let to_a = to_a.clone();
        calls.spawn(async move {
            let reply = call_with(to_a, request_context(&format!("t{i}"), trace_of(i))).await;
            (i, reply.map(Response::into_inner))
        });
    }
    let mut seen = 0;
    while let Some(joined) = calls.join_next().await {
        let (i, reply) = joined.unwrap();
        let trace = trace_of(i);
        assert_eq!(
            reply.unwrap(),
            format!(
                "A: persistent[TENANT=t{i}] transient[HOP=1] trace {trace} | \
                 B: persistent[TENANT=t{i}] transient[] trace {trace}"
            )
        );
        seen += 1;
    }
    assert_eq!(seen, 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_metadata_gets_invalid_argument_naming_the_header() {
    let handled = Arc::new(AtomicUsize::new(0));
    let addr = serve({
        let handled = handled.clone();
        move |_req: Request<String>| {
            handled.fetch_add(1, Ordering::SeqCst);
            async { Ok(Response::new(sees())) }
        }
    })
    .await;
    let to = channel(addr);
    let members: Vec<String> = (0..200).map(|i| format!("k{i}=v")).collect();
    let cases: Vec<(&'static str, Vec<u8>, &str)> = vec![
        ("traceparent", b"garbage".to_vec(), "shorter than 55 characters"),
        ("traceparent", b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_vec(), "version ff is invalid"),
        ("traceparent", b"00-00000000000000000000000000000000-00f067aa0ba902b7-01".to_vec(), "trace-id is all zeros"),
        ("traceparent", vec![b'0'; 1 << 20], "version 00 must be exactly 55 characters"),
        ("baggage", format!("k={}", "v".repeat(10_000)).into_bytes(), "longer than 8192 bytes"),
        ("baggage", vec![b'x'; 1 << 20], "longer than 8192 bytes"),
        ("baggage", members.join(",").into_bytes(), "more than 180 list-members"),
        ("baggage", b"k=%zz".to_vec(), "percent-encoding"),
        ("rpc-persist-big", vec![b'x'; 20_000], "exceed 16384 bytes"),
        ("rpc-persist-tenant", b"caf\xe9".to_vec(), "not UTF-8"),
    ];
    for (header, value, reason) in cases {
        let mut req = Request::new(String::new());
        req.metadata_mut().insert(header, MetadataValue::try_from(value).unwrap());
        let status = call_unary(to.clone(), METHOD, req).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{header} {reason}: {status:?}");
        let message = status.message();
        assert!(message.contains(&format!("\"{header}\"")) && message.contains(reason), "{header} {reason}: {message}");
    }
    assert_eq!(handled.load(Ordering::SeqCst), 0, "no hostile request reached the handler");
    // Still serving.
    let mut req = Request::new(String::new());
    req.metadata_mut().insert("rpc-persist-tenant", MetadataValue::from_static("ok"));
    let reply = call_unary(to, METHOD, req).await.unwrap().into_inner();
    assert_eq!(reply, "persistent[TENANT=ok] transient[] trace -");
    assert_eq!(handled.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backward_values_come_back_in_the_grpc_response() {
    let addr = serve(|_req: Request<String>| async {
        // Deep in the handler, from a spawned task, with no context parameter.
        localsession_tokio::spawn(async {
            let ctx = backed_up_ctx().expect("backed up");
            assert!(MetaInfo::send_backward_value(&ctx, "CACHE_HIT", "1"));
        })
        .await
        .unwrap();
        Ok(Response::new(String::new()))
    })
    .await;
    let resp = call_with(channel(addr), Context::background()).await.unwrap();
    assert_eq!(resp.metadata().get("rpc-backward-cache-hit").unwrap(), "1");
    let back = resp.extensions().get::<BackwardValues>().expect("the client layer inserts them");
    assert_eq!(back.iter().collect::<Vec<_>>(), [("CACHE_HIT", "1")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsendable_metainfo_is_a_client_side_status_naming_the_header() {
    let handled = Arc::new(AtomicUsize::new(0));
    let addr = serve({
        let handled = handled.clone();
        move |_req: Request<String>| {
            handled.fetch_add(1, Ordering::SeqCst);
            async { Ok(Response::new(String::new())) }
        }
    })
    .await;
    let ctx = MetaInfo::with_persistent(&Context::background(), "bad key", "v");
    let status = call_with(channel(addr), ctx).await.unwrap_err();
    assert!(status.message().contains("\"rpc-persist-bad key\""), "{status:?}");
    assert_eq!(handled.load(Ordering::SeqCst), 0);
}
