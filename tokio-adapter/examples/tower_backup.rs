//! Context backup across real HTTP (Kitex `WithContextBackup`), with tower and hyper.
//!
//! `cargo run -p localsession-tokio --features tower --example tower_backup`
//!
//! Service B reports the tenant it sees. Service A's handler calls B from a spawned task without
//! passing any context; the server layer backed A's request up, and the client layer recovers
//! the request's persistent metainfo from that backup and sends it on.

use std::convert::Infallible;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use localsession_core::{Context, MetaInfo, backed_up_ctx};
use localsession_tokio::tower::{ClientBackupLayer, ServerBackupLayer};
use tower::{Layer, Service, ServiceExt, service_fn};

type Body = Full<Bytes>;

async fn serve<S>(svc: S) -> std::net::SocketAddr
where
    S: Service<Request<Incoming>, Response = Response<Body>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind 127.0.0.1");
    let addr = listener.local_addr().expect("local address");
    let svc = ServerBackupLayer::new().layer(svc);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let svc = TowerToHyperService::new(svc.clone());
            tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc));
        }
    });
    addr
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    localsession_tokio::init(localsession_std::default_manager_options())?;

    // Service B: what tenant does it see?
    let b = serve(service_fn(|_req: Request<Incoming>| async {
        let tenant = backed_up_ctx().and_then(|ctx| MetaInfo::of(&ctx).persistent("TENANT").map(str::to_owned));
        Ok::<_, Infallible>(Response::new(Body::from(format!("B sees tenant {tenant:?}"))))
    }))
    .await;

    // Service A: calls B from a spawned task, passing no context at all.
    let a = serve(service_fn(move |_req: Request<Incoming>| async move {
        let reply = localsession_tokio::spawn(async move {
            let http = Client::builder(TokioExecutor::new()).build_http::<Body>();
            let mut client = ClientBackupLayer::new(|_prev: &Context, cur: &Context| (cur.clone(), true)).layer(http);
            let req = Request::get(format!("http://{b}/")).body(Body::default()).expect("request");
            let ready = match client.ready().await {
                Ok(ready) => ready,
                Err(e) => return format!("client not ready: {e}"),
            };
            match ready.call(req).await {
                Ok(resp) => {
                    let body = resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                    String::from_utf8_lossy(&body).into_owned()
                }
                Err(e) => format!("call to B failed: {e}"),
            }
        })
        .await
        .unwrap_or_else(|e| format!("task failed: {e}"));
        Ok::<_, Infallible>(Response::new(Body::from(reply)))
    }))
    .await;

    // A client request with persistent metainfo, sent to A.
    let http = Client::builder(TokioExecutor::new()).build_http::<Body>();
    let req = Request::get(format!("http://{a}/")).header("rpc-persist-tenant", "acme").body(Body::default())?;
    let resp = http.request(req).await?;
    let body = resp.into_body().collect().await?.to_bytes();
    println!("{}", String::from_utf8_lossy(&body));
    Ok(())
}
