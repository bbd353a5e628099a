//! Adversarial tests of the CLIENT side and of pooled work.
//!
//! A real upstream server on 127.0.0.1 (hyper) echoes the identity headers it received: the
//! Kitex metainfo `rpc-persist-tenant` / `rpc-persist-req` written by `ClientBackupLayer`, and
//! `x-tenant` / `x-req` written by user code from the (valid) current session. A client-side
//! proxy handler runs behind `SessionLayer` (each request gets a `SessionCtx` over its metainfo,
//! with a drop-counted value) and calls the upstream through a client it builds *lazily inside
//! the first request* (`OnceLock::get_or_init`), in one of these arrangements:
//!
//! - `Pooled`: hyper-util's legacy pooled `Client` with `NoSessionExecutor` (and a pool timer, so
//!   its idle-interval task is spawned too), `ClientBackupLayer` around it;
//! - `PooledNaive`: the same with `TokioExecutor` (the hazard the `hyper` module docs describe);
//! - `BufferSafe`: `Buffer::pair` + `spawn_without_session(worker)`, `ClientBackupLayer` outside;
//! - `BufferInsideSafe`: the safe worker, but `ClientBackupLayer` *inside* the buffer;
//! - `BufferNaive`: `Buffer::new` (worker spawned with a plain `tokio::spawn`), backup inside.
//!
//! The client's connector wraps every connection's IO: each `poll_read`/`poll_write` — run by the
//! pooled connection task — records the session current there, and the request that opened the
//! connection. Every test ends with the runtime idle and checks that the implicit task table
//! holds no session, that the live-session count is back to its baseline and that every
//! drop-counted session value was dropped.
//!
//! Implicit-mode tests need `--cfg tokio_unstable`; explicit-mode tests (spawn helpers on a
//! runtime without hooks) run in every build.
#![allow(missing_docs)]
#![cfg(all(feature = "tower", feature = "hyper"))]

mod common;
use common::{Counted, XorShift, outstanding};

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::task::{Context as TaskCx, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::legacy::{Client, ResponseFuture};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use localsession_core::{Context, Key, MetaInfo, SessionCtx, backed_up_ctx};
use localsession_std::with_current;
use localsession_tokio::hyper::NoSessionExecutor;
use localsession_tokio::tower::{ClientBackup, ClientBackupError, ClientBackupFuture, ClientBackupLayer, SessionLayer};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{JoinError, JoinHandle};
use tower::buffer::Buffer;
use tower::util::BoxCloneService;
use tower::{BoxError, Layer, Service, ServiceExt};

type Body = Full<Bytes>;
type Recover = fn(&Context, &Context) -> (Context, bool);
type Pooled = Client<Recording, Body>;

/// Wall-time cap of a whole scenario (debug build, loaded 2-core VM): a hang fails the test.
const CAP: Duration = Duration::from_secs(60);
/// How long the process-wide counters may take to settle once the runtime is idle.
const SETTLE: Duration = Duration::from_secs(5);

const TENANTS: [&str; 7] = ["acme", "globex", "initech", "umbrella", "hooli", "stark", "wayne"];

/// The user-level identity of a request (read by user code from the current session).
static USER_TENANT: Key<String> = Key::new("tenant");
static REQ_ID: Key<u64> = Key::new("req");
/// A value whose drops are counted, one per request session.
static COUNTED: Key<Counted> = Key::new("counted");

/// The implicit table, the live-session count and the drop counters are process-wide.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

fn recover(_prev: &Context, cur: &Context) -> (Context, bool) {
    (cur.clone(), true)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    #[cfg_attr(not(tokio_unstable), allow(dead_code))]
    Implicit,
    Explicit,
}

fn runtime(mode: Mode, workers: usize) -> tokio::runtime::Runtime {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(workers).enable_all();
    if mode == Mode::Implicit {
        #[cfg(tokio_unstable)]
        localsession_tokio::enable_implicit_sessions(&mut builder);
        #[cfg(not(tokio_unstable))]
        panic!("implicit mode needs --cfg tokio_unstable");
    }
    builder.build().unwrap()
}

/// A child task: a plain `tokio::spawn` in implicit mode (it inherits through the hooks), the
/// explicit helper otherwise.
fn spawn_in<F>(mode: Mode, fut: F) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    match mode {
        Mode::Implicit => tokio::spawn(fut),
        Mode::Explicit => localsession_tokio::spawn(fut),
    }
}

/// The request id of the session current here (valid or not).
fn current_req() -> Option<u64> {
    with_current(|s| s.and_then(|s| s.get_cloned(&REQ_ID)))
}

async fn hop() {
    tokio::task::yield_now().await;
    tokio::time::sleep(Duration::from_micros(200)).await;
}

async fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while !cond() {
        if start.elapsed() > SETTLE {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    true
}

// ---------------------------------------------------------------------------------------------
// Connections whose IO records the session current in the pooled connection task.
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct IoLog {
    conns: AtomicU64,
    polls: AtomicUsize,
    /// Polls that found a session current (valid or ended).
    with_session: AtomicUsize,
    /// Polls that found the session of a request other than the connection's opener.
    foreign: AtomicUsize,
    /// The first few polls that found a session.
    samples: Mutex<Vec<String>>,
    /// Connection id -> the request id current where the connector was called.
    openers: Mutex<HashMap<u64, Option<u64>>>,
}

#[derive(Clone)]
struct Recording {
    inner: HttpConnector,
    log: Arc<IoLog>,
}

impl Service<Uri> for Recording {
    type Response = Recorded;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Recorded, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut TaskCx<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let opener = current_req();
        let fut = self.inner.call(uri);
        let log = self.log.clone();
        Box::pin(async move {
            let io = fut.await?;
            let id = log.conns.fetch_add(1, Ordering::SeqCst);
            log.openers.lock().unwrap().insert(id, opener);
            Ok(Recorded { io, id, opener, log })
        })
    }
}

struct Recorded {
    io: TokioIo<tokio::net::TcpStream>,
    id: u64,
    opener: Option<u64>,
    log: Arc<IoLog>,
}

impl Recorded {
    fn observe(&self, what: &str) {
        self.log.polls.fetch_add(1, Ordering::Relaxed);
        let seen = with_current(|s| s.map(|s| (s.get_cloned(&REQ_ID), s.is_valid())));
        if let Some((req, valid)) = seen {
            self.log.with_session.fetch_add(1, Ordering::Relaxed);
            if req != self.opener {
                self.log.foreign.fetch_add(1, Ordering::Relaxed);
            }
            let mut samples = self.log.samples.lock().unwrap();
            if samples.len() < 8 {
                samples.push(format!(
                    "{what} on connection {} (opened in request {:?}) saw the session of request {req:?}, valid={valid}",
                    self.id, self.opener
                ));
            }
        }
    }
}

impl Connection for Recorded {
    fn connected(&self) -> Connected {
        self.io.connected()
    }
}

impl hyper::rt::Read for Recorded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskCx<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.observe("poll_read");
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Recorded {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut TaskCx<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.observe("poll_write");
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskCx<'_>) -> Poll<std::io::Result<()>> {
        self.observe("poll_flush");
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskCx<'_>) -> Poll<std::io::Result<()>> {
        self.observe("poll_shutdown");
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut TaskCx<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.observe("poll_write_vectored");
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

// ---------------------------------------------------------------------------------------------
// The upstream: echoes the identity headers it received.
// ---------------------------------------------------------------------------------------------

/// What the upstream received in one request.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Echo {
    tenant: Option<String>,
    req: Option<String>,
    user_tenant: Option<String>,
    user_req: Option<String>,
    /// How many `rpc-persist-tenant` values the request carried.
    tenant_headers: usize,
    phase: String,
    /// The connection (the client's port).
    conn: u16,
}

impl Echo {
    fn encode(&self) -> String {
        let o = |v: &Option<String>| v.clone().unwrap_or_else(|| "~".to_owned());
        format!(
            "{}|{}|{}|{}|{}|{}|{}",
            o(&self.tenant),
            o(&self.req),
            o(&self.user_tenant),
            o(&self.user_req),
            self.tenant_headers,
            self.phase,
            self.conn
        )
    }

    fn decode(s: &str) -> Option<Echo> {
        let f: Vec<&str> = s.split('|').collect();
        if f.len() != 7 {
            return None;
        }
        let o = |v: &str| (v != "~").then(|| v.to_owned());
        Some(Echo {
            tenant: o(f[0]),
            req: o(f[1]),
            user_tenant: o(f[2]),
            user_req: o(f[3]),
            tenant_headers: f[4].parse().ok()?,
            phase: f[5].to_owned(),
            conn: f[6].parse().ok()?,
        })
    }

    /// Carries exactly request `i`'s identity, both from the backup and from user code.
    fn is_own(&self, i: u64, tenant: &str) -> bool {
        let i = i.to_string();
        self.tenant.as_deref() == Some(tenant)
            && self.req.as_deref() == Some(i.as_str())
            && self.user_tenant.as_deref() == Some(tenant)
            && self.user_req.as_deref() == Some(i.as_str())
            && self.tenant_headers == 1
    }

    /// Carries no identity at all.
    fn is_anonymous(&self) -> bool {
        self.tenant.is_none() && self.req.is_none() && self.user_tenant.is_none() && self.user_req.is_none()
    }
}

struct Upstream {
    received: Mutex<Vec<Echo>>,
    held_tx: mpsc::UnboundedSender<()>,
    release: watch::Receiver<bool>,
}

struct UpstreamHandle {
    addr: SocketAddr,
    state: Arc<Upstream>,
    held_rx: mpsc::UnboundedReceiver<()>,
    release_tx: watch::Sender<bool>,
}

async fn serve_upstream() -> UpstreamHandle {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (held_tx, held_rx) = mpsc::unbounded_channel();
    let (release_tx, release) = watch::channel(false);
    let state = Arc::new(Upstream { received: Mutex::default(), held_tx, release });
    let st = state.clone();
    localsession_tokio::spawn_without_session(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else { return };
            let st = st.clone();
            localsession_tokio::spawn_without_session(async move {
                let svc = hyper::service::service_fn(move |req| echo(st.clone(), peer.port(), req));
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    UpstreamHandle { addr, state, held_rx, release_tx }
}

async fn echo(st: Arc<Upstream>, conn: u16, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let h = req.headers();
    let get = |n: &str| h.get(n).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let e = Echo {
        tenant: get("rpc-persist-tenant"),
        req: get("rpc-persist-req"),
        user_tenant: get("x-tenant"),
        user_req: get("x-req"),
        tenant_headers: h.get_all("rpc-persist-tenant").iter().count(),
        phase: get("x-phase").unwrap_or_default(),
        conn,
    };
    let delay = get("x-delay-ms").and_then(|v| v.parse::<u64>().ok());
    let hold = h.contains_key("x-hold");
    // Recorded on arrival: a caller that goes away mid-flight is checked too.
    st.received.lock().unwrap().push(e.clone());
    if let Some(ms) = delay {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if hold {
        let _ = st.held_tx.send(());
        let mut release = st.release.clone();
        let _ = release.wait_for(|r| *r).await.is_ok();
    }
    Ok(Response::new(Body::from(e.encode())))
}

// ---------------------------------------------------------------------------------------------
// The proxy: a handler behind `SessionLayer` calling the upstream through a lazily built client.
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(tokio_unstable), allow(dead_code))]
enum Arrangement {
    Pooled,
    PooledNaive,
    BufferSafe,
    BufferInsideSafe,
    BufferNaive,
}

// One proxy per test, built once: the size difference of the variants costs nothing.
#[allow(clippy::large_enum_variant)]
enum Proxy {
    Pooled(ClientBackup<Pooled, Recover>),
    Buffered(ClientBackup<Buffer<Request<Body>, ResponseFuture>, Recover>),
    InsideBuffer(Buffer<Request<Body>, ClientBackupFuture<ResponseFuture>>),
}

fn pooled_client(naive: bool, io: &Arc<IoLog>) -> Pooled {
    let mut builder =
        if naive { Client::builder(TokioExecutor::new()) } else { Client::builder(NoSessionExecutor::new()) };
    // A pool timer: the pool's idle-interval task is spawned (through the executor) too.
    builder.pool_timer(TokioTimer::new()).pool_idle_timeout(Duration::from_secs(60));
    builder.build(Recording { inner: HttpConnector::new(), log: io.clone() })
}

fn backup() -> ClientBackupLayer<Recover> {
    ClientBackupLayer::new(recover as Recover)
}

fn build_proxy(arrangement: Arrangement, io: &Arc<IoLog>) -> Proxy {
    match arrangement {
        Arrangement::Pooled => Proxy::Pooled(backup().layer(pooled_client(false, io))),
        Arrangement::PooledNaive => Proxy::Pooled(backup().layer(pooled_client(true, io))),
        Arrangement::BufferSafe => {
            let (svc, worker) = Buffer::pair(pooled_client(false, io), 64);
            localsession_tokio::spawn_without_session(worker);
            Proxy::Buffered(backup().layer(svc))
        }
        Arrangement::BufferInsideSafe => {
            let (svc, worker) = Buffer::pair(backup().layer(pooled_client(false, io)), 64);
            localsession_tokio::spawn_without_session(worker);
            Proxy::InsideBuffer(svc)
        }
        Arrangement::BufferNaive => Proxy::InsideBuffer(Buffer::new(backup().layer(pooled_client(false, io)), 64)),
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Outcome {
    Echo(Echo),
    /// `ClientBackupError::EndedSession`.
    Ended(String),
    Failed(String),
    /// The client future was dropped mid-flight (on purpose).
    Dropped,
}

fn from_backup_error<E: fmt::Display>(e: &ClientBackupError<E>) -> Outcome {
    match e {
        ClientBackupError::EndedSession(_) => Outcome::Ended(e.to_string()),
        other => Outcome::Failed(other.to_string()),
    }
}

impl Proxy {
    async fn send(&self, req: Request<Body>) -> Outcome {
        let resp = match self {
            Proxy::Pooled(c) => c.clone().oneshot(req).await.map_err(|e| from_backup_error(&e)),
            Proxy::Buffered(c) => c.clone().oneshot(req).await.map_err(|e| from_backup_error(&e)),
            Proxy::InsideBuffer(c) => c.clone().oneshot(req).await.map_err(|e: BoxError| {
                match e.downcast_ref::<ClientBackupError<hyper_util::client::legacy::Error>>() {
                    Some(inner) => from_backup_error(inner),
                    None => Outcome::Failed(e.to_string()),
                }
            }),
        };
        match resp {
            Ok(resp) => match resp.into_body().collect().await {
                Ok(body) => {
                    let text = String::from_utf8_lossy(&body.to_bytes()).into_owned();
                    Echo::decode(&text).map_or_else(|| Outcome::Failed(format!("bad echo {text:?}")), Outcome::Echo)
                }
                Err(e) => Outcome::Failed(format!("body error: {e}")),
            },
            Err(outcome) => outcome,
        }
    }
}

/// What a task that outlived its request saw after the request ended.
#[derive(Debug)]
struct Late {
    /// The current session: its request id and whether it is valid.
    current: Option<(Option<u64>, bool)>,
    backed_up: bool,
    call: Outcome,
}

#[derive(Debug)]
struct LateReport {
    req: Option<u64>,
    own: Late,
    grandchild: Result<Late, String>,
}

struct Env {
    mode: Mode,
    arrangement: Arrangement,
    upstream: SocketAddr,
    io: Arc<IoLog>,
    proxy: OnceLock<Proxy>,
    /// The request id current where the client was built (one entry: built once).
    built_in: Mutex<Vec<Option<u64>>>,
    detached_release: watch::Receiver<bool>,
    late_tx: mpsc::UnboundedSender<LateReport>,
    /// A thread that wakes the wakers it is sent at once (while the task is still being polled).
    waker: Mutex<std::sync::mpsc::Sender<(Waker, Arc<AtomicBool>)>>,
}

impl Env {
    /// The client, built lazily inside the first request that needs it.
    fn proxy(&self) -> &Proxy {
        self.proxy.get_or_init(|| {
            self.built_in.lock().unwrap().push(current_req());
            build_proxy(self.arrangement, &self.io)
        })
    }
}

async fn call_upstream(env: &Env, phase: &str, delay_ms: Option<u64>, hold: bool) -> Outcome {
    let proxy = env.proxy();
    let mut b = Request::get(format!("http://{}/", env.upstream)).header("x-phase", phase);
    // User code adding its own identity headers, the careful way: only from a valid session.
    let ident =
        with_current(|s| s.filter(|s| s.is_valid()).map(|s| (s.get_cloned(&USER_TENANT), s.get_cloned(&REQ_ID))));
    if let Some((tenant, req)) = ident {
        if let Some(t) = tenant {
            b = b.header("x-tenant", t);
        }
        if let Some(r) = req {
            b = b.header("x-req", r.to_string());
        }
    }
    if let Some(ms) = delay_ms {
        b = b.header("x-delay-ms", ms.to_string());
    }
    if hold {
        b = b.header("x-hold", "1");
    }
    proxy.send(b.body(Body::default()).unwrap()).await
}

async fn late_report(env: &Env) -> Late {
    let current = with_current(|s| s.map(|s| (s.get_cloned(&REQ_ID), s.is_valid())));
    let backed_up = backed_up_ctx().is_some();
    let call = call_upstream(env, "late", None, false).await;
    Late { current, backed_up, call }
}

/// Spawns a detached task that calls the upstream once during the request (the handler waits for
/// that call) and again, with a grandchild it spawns then, after the request ended.
async fn detach(env: &Arc<Env>) -> Outcome {
    let (tx, rx) = oneshot::channel();
    let env2 = env.clone();
    let me = current_req();
    drop(spawn_in(env.mode, async move {
        let during = call_upstream(&env2, "detached-during", None, false).await;
        let _ = tx.send(during);
        let mut release = env2.detached_release.clone();
        let _ = release.wait_for(|r| *r).await.is_ok();
        // A poll of its own, so that a sweep made while the task was parked has taken effect.
        tokio::task::yield_now().await;
        let own = late_report(&env2).await;
        let env3 = env2.clone();
        let grandchild = spawn_in(env2.mode, async move { late_report(&env3).await }).await.map_err(|e| e.to_string());
        let _ = env2.late_tx.send(LateReport { req: me, own, grandchild });
    }));
    rx.await.unwrap_or_else(|_| Outcome::Failed("the detached task vanished".to_owned()))
}

fn waker_thread() -> std::sync::mpsc::Sender<(Waker, Arc<AtomicBool>)> {
    let (tx, rx) = std::sync::mpsc::channel::<(Waker, Arc<AtomicBool>)>();
    std::thread::spawn(move || {
        while let Ok((waker, woken)) = rx.recv() {
            waker.wake();
            woken.store(true, Ordering::Release);
        }
    });
    tx
}

/// Returns `Pending` `rounds` times, each time after its waker was woken from another thread
/// while this poll was still running (bounded spin): the task is rescheduled mid-poll, and its
/// next poll may start on another worker before this one's after-poll work is done.
struct WakeMidPoll<'a> {
    env: &'a Env,
    rounds: u32,
}

impl Future for WakeMidPoll<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut TaskCx<'_>) -> Poll<()> {
        if self.rounds == 0 {
            return Poll::Ready(());
        }
        self.rounds -= 1;
        let woken = Arc::new(AtomicBool::new(false));
        let _ = self.env.waker.lock().unwrap().send((cx.waker().clone(), woken.clone()));
        let start = Instant::now();
        while !woken.load(Ordering::Acquire) && start.elapsed() < Duration::from_millis(2) {
            std::hint::spin_loop();
        }
        Poll::Pending
    }
}

async fn handle(env: Arc<Env>, req: Request<()>) -> Result<Response<Vec<Outcome>>, Infallible> {
    let hdr = |n: &str| req.headers().get(n).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let delay = hdr("x-delay-ms").and_then(|v| v.parse().ok());
    let drop_us: Option<u64> = hdr("x-drop-us").and_then(|v| v.parse().ok());
    let hold = hdr("x-hold").is_some();
    let detached = hdr("x-detach").is_some();
    let mut out = Vec::new();
    let first = call_upstream(&env, "first", delay, hold);
    out.push(match drop_us {
        // The client future dropped mid-request (a timeout in the handler).
        Some(us) => tokio::time::timeout(Duration::from_micros(us), first).await.unwrap_or(Outcome::Dropped),
        None => first.await,
    });
    hop().await;
    if hdr("x-wake").is_some() {
        let me = current_req();
        WakeMidPoll { env: &env, rounds: 3 }.await;
        let now = with_current(|s| s.map(|s| (s.get_cloned(&REQ_ID), s.is_valid())));
        if now != Some((me, true)) {
            out.push(Outcome::Failed(format!("after wakes mid-poll request {me:?} saw the session {now:?}")));
        }
    }
    if detached {
        out.push(detach(&env).await);
    }
    out.push(call_upstream(&env, "second", None, false).await);
    Ok(Response::new(out))
}

fn make_session(req: &Request<()>) -> SessionCtx {
    let tenant = req.headers().get("x-tenant").and_then(|v| v.to_str().ok()).unwrap_or("-").to_owned();
    let id: u64 = req.headers().get("x-req").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()).unwrap();
    let ctx = MetaInfo::with_persistent(&Context::background(), "TENANT", &tenant);
    let ctx = MetaInfo::with_persistent(&ctx, "REQ", &id.to_string());
    SessionCtx::new(&ctx).with(&USER_TENANT, tenant).with(&REQ_ID, id).with(&COUNTED, Counted::new())
}

type ProxySvc = BoxCloneService<Request<()>, Response<Vec<Outcome>>, Infallible>;

fn proxy_service(env: Arc<Env>) -> ProxySvc {
    let handler = tower::service_fn(move |req: Request<()>| handle(env.clone(), req));
    BoxCloneService::new(SessionLayer::new(make_session as fn(&Request<()>) -> SessionCtx).layer(handler))
}

/// Starts request `i` as tenant `tenant` in a task of its own (spawned with no session, as a
/// server's connection task would).
fn start(svc: &ProxySvc, i: u64, tenant: &str, headers: &[(&'static str, String)]) -> JoinHandle<Vec<Outcome>> {
    let mut b = Request::builder().header("x-tenant", tenant).header("x-req", i.to_string());
    for (k, v) in headers {
        b = b.header(*k, v.as_str());
    }
    let fut = svc.clone().oneshot(b.body(()).unwrap());
    tokio::spawn(async move {
        match fut.await {
            Ok(resp) => resp.into_body(),
            Err(never) => match never {},
        }
    })
}

struct Harness {
    env: Arc<Env>,
    upstream: UpstreamHandle,
    detached_release: watch::Sender<bool>,
    late_rx: mpsc::UnboundedReceiver<LateReport>,
    live_before: Option<isize>,
    outstanding_before: usize,
}

async fn setup(mode: Mode, arrangement: Arrangement) -> Harness {
    let live_before = localsession_std::live_sessions();
    let outstanding_before = outstanding();
    let upstream = serve_upstream().await;
    let (detached_release, release_rx) = watch::channel(false);
    let (late_tx, late_rx) = mpsc::unbounded_channel();
    let env = Arc::new(Env {
        mode,
        arrangement,
        upstream: upstream.addr,
        io: Arc::default(),
        proxy: OnceLock::new(),
        built_in: Mutex::default(),
        detached_release: release_rx,
        late_tx,
        waker: Mutex::new(waker_thread()),
    });
    Harness { env, upstream, detached_release, late_rx, live_before, outstanding_before }
}

impl Harness {
    fn received(&self) -> Vec<Echo> {
        self.upstream.state.received.lock().unwrap().clone()
    }

    /// The client was built lazily, once, inside a request.
    fn assert_built_inside_a_request(&self) {
        let built = self.env.built_in.lock().unwrap().clone();
        assert_eq!(built.len(), 1, "the client is built once: {built:?}");
        assert!(built[0].is_some(), "the client was built inside a request (with its session current)");
    }

    /// No pooled connection task ever polled its IO with a session (valid or ended).
    fn assert_connection_tasks_carry_no_session(&self) {
        let io = &self.env.io;
        let polls = io.polls.load(Ordering::SeqCst);
        assert!(polls > 0, "the connection IO was polled (the recorder works)");
        let with_session = io.with_session.load(Ordering::SeqCst);
        assert_eq!(
            with_session,
            0,
            "{with_session} of {polls} IO polls of pooled connection tasks ran with a request's session: {:#?}",
            io.samples.lock().unwrap()
        );
    }

    /// Keep-alive: at least one upstream connection served requests of two different tenants.
    fn assert_connections_were_reused_across_tenants(&self) {
        let mut per_conn: HashMap<u16, HashSet<Option<String>>> = HashMap::new();
        for e in self.received() {
            per_conn.entry(e.conn).or_default().insert(e.user_tenant.clone());
        }
        let shared = per_conn.values().filter(|t| t.len() >= 2).count();
        assert!(shared > 0, "precondition: no connection was reused across tenants ({} connections)", per_conn.len());
    }

    /// With the runtime idle: no task holds a session, nothing is bound, every value dropped.
    async fn assert_everything_released(&self) {
        #[cfg(tokio_unstable)]
        {
            eventually(|| localsession_tokio::implicit_task_sessions() == 0).await;
            let n = localsession_tokio::implicit_task_sessions();
            assert_eq!(n, 0, "{n} tasks still hold a session with the runtime idle");
        }
        let live_before = self.live_before;
        eventually(|| localsession_std::live_sessions() == live_before).await;
        assert_eq!(localsession_std::live_sessions(), live_before, "sessions still bound with the runtime idle");
        let before = self.outstanding_before;
        eventually(|| outstanding() == before).await;
        assert_eq!(outstanding(), before, "drop-counted session values not dropped with the runtime idle");
    }
}

/// Every echo the upstream received from inside a request carries one consistent identity: the
/// tenant assigned to the request id the user code sent, from the backup and from user code.
fn upstream_mixups(received: &[Echo], assigned: &HashMap<u64, &'static str>) -> Vec<String> {
    let mut wrong = Vec::new();
    for e in received {
        let ok = e.user_req.as_deref().and_then(|r| r.parse::<u64>().ok()).is_some_and(|r| {
            let t = assigned.get(&r).copied();
            t.is_some() && e.is_own(r, t.unwrap())
        });
        if !ok {
            wrong.push(format!("{e:?}"));
        }
    }
    wrong
}

struct Spec {
    mode: Mode,
    workers: usize,
    arrangement: Arrangement,
    requests: u64,
    seed: u64,
    /// Some handlers drop their first client future mid-flight.
    drop_first: bool,
    /// The driver aborts some request tasks mid-flight.
    abort: bool,
}

/// `spec.requests` concurrent requests with random tenants through the proxy; every call of
/// every request must carry exactly its own identity, at the proxy and at the upstream.
fn load_run(spec: Spec) {
    let _serial = serial();
    runtime(spec.mode, spec.workers).block_on(async {
        let h = setup(spec.mode, spec.arrangement).await;
        let svc = proxy_service(h.env.clone());
        let mut rng = XorShift::raw(spec.seed);
        let mut assigned = HashMap::new();
        let mut tasks = Vec::new();
        let mut aborted = 0;
        for i in 0..spec.requests {
            let tenant = TENANTS[rng.below(TENANTS.len() as u64) as usize];
            assigned.insert(i, tenant);
            let mut headers = Vec::new();
            if rng.below(4) == 0 {
                headers.push(("x-delay-ms", rng.below(3).to_string()));
            }
            if spec.drop_first && rng.below(3) == 0 {
                headers.push(("x-drop-us", rng.below(3_000).to_string()));
            }
            if spec.abort && rng.below(4) == 0 {
                headers.push(("x-wake", "1".to_owned()));
            }
            let task = start(&svc, i, tenant, &headers);
            if spec.abort && rng.below(3) == 0 {
                aborted += 1;
                let abort = task.abort_handle();
                let after = Duration::from_micros(rng.below(5_000));
                tokio::spawn(async move {
                    tokio::time::sleep(after).await;
                    abort.abort();
                });
            }
            tasks.push((i, tenant, task));
        }
        let deadline = tokio::time::Instant::now() + CAP;
        let mut wrong = Vec::new();
        let (mut completed, mut cancelled, mut dropped) = (0, 0, 0);
        for (i, tenant, task) in tasks {
            let res: Result<Vec<Outcome>, JoinError> =
                tokio::time::timeout_at(deadline, task).await.expect("the load did not finish in time");
            match res {
                Ok(outcomes) => {
                    completed += 1;
                    let expected = 2;
                    if outcomes.len() != expected {
                        wrong.push(format!("request {i} ({tenant}): {outcomes:?}"));
                    }
                    for (k, o) in outcomes.iter().enumerate() {
                        match o {
                            Outcome::Echo(e) if e.is_own(i, tenant) => {}
                            Outcome::Dropped if spec.drop_first && k == 0 => dropped += 1,
                            other => wrong.push(format!("request {i} ({tenant}) call {k}: {other:?}")),
                        }
                    }
                }
                Err(e) if e.is_cancelled() && spec.abort => cancelled += 1,
                Err(e) => wrong.push(format!("request {i} ({tenant}) task failed: {e}")),
            }
        }
        assert!(wrong.is_empty(), "{} wrong outcomes; first: {:#?}", wrong.len(), &wrong[..wrong.len().min(8)]);
        let received = h.received();
        let mixups = upstream_mixups(&received, &assigned);
        assert!(
            mixups.is_empty(),
            "{} upstream requests with a foreign or mixed identity; first: {:#?}",
            mixups.len(),
            &mixups[..mixups.len().min(8)]
        );
        if !spec.abort && !spec.drop_first {
            // Each call reached the upstream exactly once.
            let mut per_req: HashMap<String, usize> = HashMap::new();
            for e in &received {
                *per_req.entry(e.user_req.clone().unwrap_or_default()).or_default() += 1;
            }
            assert_eq!(received.len() as u64, 2 * spec.requests);
            assert!(per_req.values().all(|n| *n == 2), "some request's calls were lost or doubled");
        }
        if spec.abort {
            assert!(aborted > 0 && completed > 0, "precondition: a mix of aborted and completed requests");
            eprintln!(
                "aborts scheduled {aborted}, cancelled {cancelled}, completed {completed}, dropped calls {dropped}"
            );
        }
        h.assert_built_inside_a_request();
        if matches!(spec.arrangement, Arrangement::Pooled | Arrangement::BufferSafe) {
            h.assert_connection_tasks_carry_no_session();
        }
        h.assert_connections_were_reused_across_tenants();
        h.assert_everything_released().await;
    });
}

fn pooled_load(mode: Mode, workers: usize) {
    load_run(Spec {
        mode,
        workers,
        arrangement: Arrangement::Pooled,
        requests: 1_000,
        seed: 0x9e37_79b9_7f4a_7c15 ^ workers as u64,
        drop_first: false,
        abort: false,
    });
}

// --- Scenario 1: a pooled client built lazily inside the first request -------------------------

#[cfg(tokio_unstable)]
#[test]
fn lazy_pooled_client_sends_each_requests_own_tenant_implicit_2_workers() {
    pooled_load(Mode::Implicit, 2);
}

#[cfg(tokio_unstable)]
#[test]
fn lazy_pooled_client_sends_each_requests_own_tenant_implicit_4_workers() {
    pooled_load(Mode::Implicit, 4);
}

#[test]
fn lazy_pooled_client_sends_each_requests_own_tenant_explicit_2_workers() {
    pooled_load(Mode::Explicit, 2);
}

#[test]
fn lazy_pooled_client_sends_each_requests_own_tenant_explicit_4_workers() {
    pooled_load(Mode::Explicit, 4);
}

// --- Scenario 2: tower::buffer::Buffer built lazily inside a handler ----------------------------

#[cfg(tokio_unstable)]
#[test]
fn lazy_buffer_with_spawn_without_session_is_isolated_implicit_2_workers() {
    load_run(Spec {
        mode: Mode::Implicit,
        workers: 2,
        arrangement: Arrangement::BufferSafe,
        requests: 1_000,
        seed: 17,
        drop_first: false,
        abort: false,
    });
}

#[test]
fn lazy_buffer_with_spawn_without_session_is_isolated_explicit_4_workers() {
    load_run(Spec {
        mode: Mode::Explicit,
        workers: 4,
        arrangement: Arrangement::BufferSafe,
        requests: 1_000,
        seed: 23,
        drop_first: false,
        abort: false,
    });
}

/// `ClientBackupLayer` put *inside* a safely spawned buffer (the docs say: outside): its headers
/// are then written in the worker, which has no session. Whatever it sends, it must never be
/// another request's identity.
#[cfg(tokio_unstable)]
#[test]
fn client_backup_inside_a_safe_buffer_never_sends_a_foreign_tenant_implicit() {
    let _serial = serial();
    runtime(Mode::Implicit, 2).block_on(async {
        let h = setup(Mode::Implicit, Arrangement::BufferInsideSafe).await;
        let svc = proxy_service(h.env.clone());
        let mut rng = XorShift::raw(99);
        let mut tasks = Vec::new();
        for i in 0..300 {
            let tenant = TENANTS[rng.below(TENANTS.len() as u64) as usize];
            tasks.push((i, tenant, start(&svc, i, tenant, &[])));
        }
        let deadline = tokio::time::Instant::now() + CAP;
        let mut wrong = Vec::new();
        let mut anonymous = 0;
        for (i, tenant, task) in tasks {
            let outcomes = tokio::time::timeout_at(deadline, task).await.expect("hang").unwrap();
            for o in outcomes {
                match o {
                    Outcome::Echo(e) => {
                        let own_user = e.user_tenant.as_deref() == Some(tenant)
                            && e.user_req.as_deref() == Some(i.to_string().as_str());
                        let backup_ok = (e.tenant.is_none() && e.req.is_none())
                            || (e.tenant.as_deref() == Some(tenant) && e.req == Some(i.to_string()));
                        if e.tenant.is_none() {
                            anonymous += 1;
                        }
                        if !own_user || !backup_ok || e.tenant_headers > 1 {
                            wrong.push(format!("request {i} ({tenant}): {e:?}"));
                        }
                    }
                    other => wrong.push(format!("request {i} ({tenant}): {other:?}")),
                }
            }
        }
        assert!(wrong.is_empty(), "{} foreign identities; first: {:#?}", wrong.len(), &wrong[..wrong.len().min(8)]);
        eprintln!("backup inside the buffer: {anonymous} of 600 calls went out without the tenant metainfo");
        h.assert_built_inside_a_request();
        h.assert_connection_tasks_carry_no_session();
        h.assert_everything_released().await;
    });
}

/// The naive way: `Buffer::new` inside the first request's handler, `ClientBackupLayer` inside
/// the buffer. This test first showed that the README's promise for it ("if one slips through,
/// `EndedSession` catches it loudly") held only once the first request had ended: a second
/// request arriving while the first was in flight went out with the first request's tenant,
/// silently (`rpc-persist-tenant: acme` on globex's call). Implicit mode now knows the buffer's
/// spawn site: its worker never carries the spawning request's session but one that is ended
/// from the start, so every call through a naive buffer is refused loudly — the first request's
/// own, concurrent ones, and later ones — and none reaches the upstream.
#[cfg(tokio_unstable)]
#[test]
fn naive_lazy_buffer_a_concurrent_request_gets_its_own_tenant_or_ended_session() {
    let _serial = serial();
    runtime(Mode::Implicit, 2).block_on(async {
        let h = setup(Mode::Implicit, Arrangement::BufferNaive).await;
        let svc = proxy_service(h.env.clone());
        // Request 0 builds the buffer (its worker is spawned inside request 0's session) and,
        // while its call would be held at the upstream, 40 other requests call through it.
        let first = start(&svc, 0, "acme", &[("x-hold", "1".to_owned())]);
        let mut others = Vec::new();
        for i in 1..=40u64 {
            others.push((i, start(&svc, i, TENANTS[i as usize % TENANTS.len()], &[])));
        }
        let first = tokio::time::timeout(CAP, first).await.expect("hang").unwrap();
        let mut outcomes = vec![(0u64, first)];
        for (i, task) in others {
            outcomes.push((i, tokio::time::timeout(CAP, task).await.expect("hang").unwrap()));
        }
        let _ = h.upstream.release_tx.send(true);
        // Every call, request 0's own included, was refused with an error naming the cause.
        let not_refused: Vec<_> = outcomes
            .iter()
            .filter(|(_, o)| {
                o.is_empty()
                    || !o.iter().all(|o| {
                        matches!(o, Outcome::Ended(m) if m.contains("outlived the request") && m.contains("shared worker"))
                    })
            })
            .collect();
        assert!(not_refused.is_empty(), "calls through a naive buffer that were not refused loudly: {not_refused:?}");
        // Nothing reached the upstream with an identity, least of all another request's.
        let received = h.received();
        assert!(
            received.iter().all(|e| e.tenant.is_none() && e.req.is_none()),
            "the upstream received identities through a naive buffer: {received:?}"
        );
        // The worker pins no request's session: nothing for a sweep to clear (the worker keeps
        // its ended-from-the-start session), and every request's values are dropped while the
        // buffer and its worker live on.
        assert_eq!(localsession_tokio::sweep_ended_sessions(), 0);
        let before = h.outstanding_before;
        eventually(|| outstanding() == before).await;
        assert_eq!(outstanding(), before, "a request's values were kept alive by the buffer's worker");
        h.assert_built_inside_a_request();
    });
}

// --- Scenario 3: tasks that outlive their request ---------------------------------------------

/// Each request spawns a detached task (plain `tokio::spawn` in implicit mode) that calls the
/// upstream during the request, then — after the request's session ended with its response —
/// reads the session and calls again, and spawns a grandchild that does the same.
fn detached_run(mode: Mode, workers: usize, sweep: bool) {
    const N: u64 = 200;
    let _serial = serial();
    runtime(mode, workers).block_on(async {
        let mut h = setup(mode, Arrangement::Pooled).await;
        let svc = proxy_service(h.env.clone());
        let mut rng = XorShift::raw(4242 + workers as u64);
        let mut assigned = HashMap::new();
        let mut tasks = Vec::new();
        for i in 0..N {
            let tenant = TENANTS[rng.below(TENANTS.len() as u64) as usize];
            assigned.insert(i, tenant);
            tasks.push((i, tenant, start(&svc, i, tenant, &[("x-detach", "1".to_owned())])));
        }
        let deadline = tokio::time::Instant::now() + CAP;
        let mut wrong = Vec::new();
        for (i, tenant, task) in tasks {
            let outcomes = tokio::time::timeout_at(deadline, task).await.expect("hang").unwrap();
            if outcomes.len() != 3 || !outcomes.iter().all(|o| matches!(o, Outcome::Echo(e) if e.is_own(i, tenant))) {
                wrong.push(format!("request {i} ({tenant}): {outcomes:?}"));
            }
        }
        assert!(wrong.is_empty(), "during the requests: {wrong:#?}");
        // Every request has ended (its response is in); the detached tasks are parked.
        if sweep {
            #[cfg(tokio_unstable)]
            {
                let swept = localsession_tokio::sweep_ended_sessions();
                assert!(
                    swept >= N as usize,
                    "sweep_ended_sessions cleared {swept} entries, {N} detached tasks hold one"
                );
            }
        }
        h.detached_release.send(true).unwrap();
        let mut reports = Vec::new();
        for _ in 0..N {
            reports.push(tokio::time::timeout_at(deadline, h.late_rx.recv()).await.expect("hang").unwrap());
        }
        let mut wrong = Vec::new();
        for r in &reports {
            let lates = [Ok(&r.own), r.grandchild.as_ref()];
            for (who, late) in ["detached task", "its grandchild"].iter().zip(lates) {
                let Ok(late) = late else {
                    wrong.push(format!("request {:?}: {who} failed: {late:?}", r.req));
                    continue;
                };
                let ok = if sweep {
                    // Swept: no session at all; a call goes out with no identity.
                    late.current.is_none()
                        && !late.backed_up
                        && matches!(&late.call, Outcome::Echo(e) if e.is_anonymous())
                } else {
                    // The ended request's session, invalid; the client refuses to send.
                    late.current == Some((r.req, false))
                        && !late.backed_up
                        && matches!(&late.call, Outcome::Ended(m) if m.contains("outlived the request"))
                };
                if !ok {
                    wrong.push(format!("request {:?}: {who} saw {late:?}", r.req));
                }
            }
        }
        assert!(wrong.is_empty(), "{} late tasks misbehaved; first: {:#?}", wrong.len(), &wrong[..wrong.len().min(8)]);
        // The upstream: no call made after a request ended carries any identity.
        let received = h.received();
        let late: Vec<&Echo> = received.iter().filter(|e| e.phase == "late").collect();
        if sweep {
            assert_eq!(late.len(), 2 * N as usize, "every late call went out (anonymously)");
        } else {
            assert!(late.is_empty(), "calls from ended sessions reached the upstream: {late:#?}");
        }
        let identified: Vec<&&Echo> = late.iter().filter(|e| !e.is_anonymous()).collect();
        assert!(identified.is_empty(), "late calls carried an ended request's identity: {identified:#?}");
        let during: Vec<Echo> = received.into_iter().filter(|e| e.phase != "late").collect();
        assert_eq!(during.len(), 3 * N as usize);
        let mixups = upstream_mixups(&during, &assigned);
        assert!(mixups.is_empty(), "{mixups:#?}");
        h.assert_connection_tasks_carry_no_session();
        h.assert_everything_released().await;
    });
}

#[cfg(tokio_unstable)]
#[test]
fn detached_tasks_after_their_request_cannot_send_its_identity_implicit_4_workers() {
    detached_run(Mode::Implicit, 4, false);
}

#[test]
fn detached_tasks_after_their_request_cannot_send_its_identity_explicit_2_workers() {
    detached_run(Mode::Explicit, 2, false);
}

#[cfg(tokio_unstable)]
#[test]
fn detached_tasks_after_a_sweep_send_no_identity_implicit_2_workers() {
    detached_run(Mode::Implicit, 2, true);
}

// --- Scenario 4: aborts, dropped client futures, keep-alive across tenants ----------------------

#[cfg(tokio_unstable)]
#[test]
fn aborted_requests_and_dropped_client_calls_never_mix_tenants_implicit_4_workers() {
    load_run(Spec {
        mode: Mode::Implicit,
        workers: 4,
        arrangement: Arrangement::Pooled,
        requests: 1_000,
        seed: 0xdead_beef,
        drop_first: true,
        abort: true,
    });
}

#[test]
fn aborted_requests_and_dropped_client_calls_never_mix_tenants_explicit_2_workers() {
    load_run(Spec {
        mode: Mode::Explicit,
        workers: 2,
        arrangement: Arrangement::Pooled,
        requests: 1_000,
        seed: 0xfeed_f00d,
        drop_first: true,
        abort: true,
    });
}

/// Request 0 builds the pooled client and opens its first connection, and is aborted while its
/// call is held at the upstream. Later requests of other tenants reuse the pool: the connection
/// tasks never run with request 0's session (nor any other), and request 0's values are dropped.
fn aborted_opener_run(mode: Mode, workers: usize) {
    let _serial = serial();
    runtime(mode, workers).block_on(async {
        let mut h = setup(mode, Arrangement::Pooled).await;
        let svc = proxy_service(h.env.clone());
        let opener = start(&svc, 0, "acme", &[("x-hold", "1".to_owned())]);
        tokio::time::timeout(CAP, h.upstream.held_rx.recv()).await.expect("request 0 never reached the upstream");
        opener.abort();
        let res = tokio::time::timeout(CAP, opener).await.expect("hang");
        assert!(res.unwrap_err().is_cancelled());
        h.upstream.release_tx.send(true).unwrap();
        let others = ["globex", "initech", "umbrella", "hooli", "stark", "wayne"];
        let mut wrong = Vec::new();
        for i in 1..=40u64 {
            let tenant = others[i as usize % others.len()];
            let outcomes = tokio::time::timeout(CAP, start(&svc, i, tenant, &[])).await.expect("hang").unwrap();
            if !outcomes.iter().all(|o| matches!(o, Outcome::Echo(e) if e.is_own(i, tenant))) {
                wrong.push(format!("request {i} ({tenant}): {outcomes:?}"));
            }
        }
        assert!(wrong.is_empty(), "{wrong:#?}");
        let received = h.received();
        let acme: Vec<&Echo> = received.iter().filter(|e| e.tenant.as_deref() == Some("acme")).collect();
        assert_eq!(acme.len(), 1, "only request 0's own (held) call carries its tenant: {acme:#?}");
        assert!(acme[0].is_own(0, "acme"));
        let openers = h.env.io.openers.lock().unwrap().clone();
        assert_eq!(openers.get(&0), Some(&Some(0)), "request 0 opened the first connection");
        h.assert_built_inside_a_request();
        h.assert_connection_tasks_carry_no_session();
        h.assert_connections_were_reused_across_tenants();
        h.assert_everything_released().await;
    });
}

#[cfg(tokio_unstable)]
#[test]
fn a_connection_opened_by_an_aborted_request_never_carries_its_session_implicit_2_workers() {
    aborted_opener_run(Mode::Implicit, 2);
}

#[test]
fn a_connection_opened_by_an_aborted_request_never_carries_its_session_explicit_4_workers() {
    aborted_opener_run(Mode::Explicit, 4);
}

// --- Scenario 5: the naive executor, and sessions dropped ---------------------------------------

/// hyper-util's `TokioExecutor` in implicit mode (what the `hyper` module docs warn about): the
/// connection task inherits the session of the request that opened the connection. Headers are
/// written in each caller's task, so every call still carries its own tenant; the connection
/// task never runs with the session of a request other than its opener; once the requests have
/// ended, `sweep_ended_sessions` clears what those tasks pin, and every value is dropped while
/// the client and its connections live on.
#[cfg(tokio_unstable)]
#[test]
fn naive_tokio_executor_pins_only_the_openers_session_until_swept_implicit() {
    let _serial = serial();
    runtime(Mode::Implicit, 2).block_on(async {
        let h = setup(Mode::Implicit, Arrangement::PooledNaive).await;
        let svc = proxy_service(h.env.clone());
        let mut rng = XorShift::raw(7);
        let mut wrong = Vec::new();
        // Sequential requests, then a concurrent burst (more connections, more openers).
        for i in 0..30u64 {
            let tenant = TENANTS[rng.below(TENANTS.len() as u64) as usize];
            let outcomes = tokio::time::timeout(CAP, start(&svc, i, tenant, &[])).await.expect("hang").unwrap();
            if !outcomes.iter().all(|o| matches!(o, Outcome::Echo(e) if e.is_own(i, tenant))) {
                wrong.push(format!("request {i} ({tenant}): {outcomes:?}"));
            }
        }
        let burst: Vec<_> = (30..130u64)
            .map(|i| {
                let tenant = TENANTS[rng.below(TENANTS.len() as u64) as usize];
                (i, tenant, start(&svc, i, tenant, &[]))
            })
            .collect();
        for (i, tenant, task) in burst {
            let outcomes = tokio::time::timeout(CAP, task).await.expect("hang").unwrap();
            if !outcomes.iter().all(|o| matches!(o, Outcome::Echo(e) if e.is_own(i, tenant))) {
                wrong.push(format!("request {i} ({tenant}): {outcomes:?}"));
            }
        }
        assert!(wrong.is_empty(), "{wrong:#?}");
        let io = &h.env.io;
        assert!(
            io.with_session.load(Ordering::SeqCst) > 0,
            "documented: the connection task inherits its opener's session"
        );
        let foreign = io.foreign.load(Ordering::SeqCst);
        assert_eq!(
            foreign,
            0,
            "a connection task ran with another request's session: {:#?}",
            io.samples.lock().unwrap()
        );
        // Every request has ended; what the idle tasks pin is ended, and a sweep clears it.
        let pinned = localsession_tokio::implicit_task_sessions();
        assert!(pinned > 0, "documented: idle connection tasks pin their opener's (ended) session");
        let swept = localsession_tokio::sweep_ended_sessions();
        assert!(swept >= 1, "swept {swept} sessions, {pinned} were pinned just before");
        h.assert_everything_released().await;
        assert!(h.env.proxy.get().is_some(), "the client (and its pool) is still alive");
        // After the sweep the reused connections carry no session at all.
        let before = io.with_session.load(Ordering::SeqCst);
        let conns_before = io.conns.load(Ordering::SeqCst);
        let outcomes = tokio::time::timeout(CAP, start(&svc, 500, "acme", &[])).await.expect("hang").unwrap();
        assert!(outcomes.iter().all(|o| matches!(o, Outcome::Echo(e) if e.is_own(500, "acme"))), "{outcomes:?}");
        if io.conns.load(Ordering::SeqCst) == conns_before {
            assert_eq!(io.with_session.load(Ordering::SeqCst), before, "a swept connection task got a session back");
        } else {
            // Request 500 opened a connection of its own: its task pins request 500's session.
            localsession_tokio::sweep_ended_sessions();
        }
        assert_eq!(io.foreign.load(Ordering::SeqCst), 0);
        h.assert_everything_released().await;
    });
}
