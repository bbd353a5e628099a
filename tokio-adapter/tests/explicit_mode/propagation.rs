//! Propagators: the W3C specs' own examples (Trace Context, Baggage), hostile headers over real
//! HTTP (a `400` naming the header, never a panic), and inject-then-extract round trips.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use localsession_core::{Context, MetaInfo, backed_up_ctx};
use localsession_tokio::tower::{
    KitexMetainfo, Propagator, ServerBackupLayer, TraceContext, TraceParent, W3cBaggage, W3cTraceContext,
};
use proptest::prelude::*;
use tower::{Layer, service_fn};

type Body = Full<Bytes>;
/// Header fields of a request.
type Fields = Vec<(&'static str, HeaderValue)>;

const SPEC_TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn headers(list: &[(&'static str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (name, value) in list {
        h.append(*name, HeaderValue::from_bytes(value.as_bytes()).unwrap());
    }
    h
}

#[test]
fn trace_context_spec_examples() {
    let tp = TraceParent::parse(SPEC_TRACEPARENT.as_bytes()).unwrap();
    assert_eq!(tp.version, 0);
    assert_eq!(
        tp.trace_id,
        [0x4b, 0xf9, 0x2f, 0x35, 0x77, 0xb3, 0x4d, 0xa6, 0xa3, 0xce, 0x92, 0x9d, 0x0e, 0x0e, 0x47, 0x36]
    );
    assert_eq!(tp.parent_id, [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]);
    assert_eq!(tp.flags, 1);
    assert_eq!(tp.to_string(), SPEC_TRACEPARENT);
    // The spec's not-sampled example.
    let tp = TraceParent::parse(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").unwrap();
    assert!(!tp.sampled());

    // The spec's tracestate examples, carried raw; several fields are joined with ','.
    let h = headers(&[
        ("traceparent", SPEC_TRACEPARENT),
        ("tracestate", "rojo=00f067aa0ba902b7"),
        ("tracestate", "congo=t61rcWkgMzE"),
    ]);
    let ctx = W3cTraceContext::new().extract(&h, &Context::background()).unwrap();
    let trace = TraceContext::of(&ctx).unwrap();
    assert_eq!(trace.state.as_deref(), Some("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"));
    let mut out = HeaderMap::new();
    W3cTraceContext::new().inject(&ctx, &mut out).unwrap();
    assert_eq!(out["traceparent"], SPEC_TRACEPARENT);
    assert_eq!(out["tracestate"], "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE");
}

#[test]
fn traceparent_version_rules() {
    let bad = [
        ("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "version ff"),
        ("0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "version is not lowercase hex"),
        ("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", "trace-id is not lowercase hex"),
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-00F067AA0BA902B7-01", "parent-id is not lowercase hex"),
        ("00-00000000000000000000000000000000-00f067aa0ba902b7-01", "trace-id is all zeros"),
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", "parent-id is all zeros"),
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-", "exactly 55"),
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1", "shorter than 55"),
        ("00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "separated by '-'"),
        ("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x", "must start with '-'"),
    ];
    for (value, reason) in bad {
        let err = TraceParent::parse(value.as_bytes()).unwrap_err();
        assert_eq!(err.header(), "traceparent");
        assert!(err.to_string().contains(reason), "{value}: {err}");
    }
    // Future versions: leniently, the first four fields; what follows a '-' is ignored.
    let tp = TraceParent::parse(b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
    assert_eq!(tp.version, 1);
    let tp = TraceParent::parse(b"fe-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-09-extra").unwrap();
    assert_eq!((tp.version, tp.flags), (0xfe, 9));
    assert_eq!(tp.to_string(), "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-09"); // sent as 00
    // Sent twice: invalid.
    let h = headers(&[("traceparent", SPEC_TRACEPARENT), ("traceparent", SPEC_TRACEPARENT)]);
    assert!(W3cTraceContext::read(&h).unwrap_err().to_string().contains("more than once"));
}

#[test]
fn baggage_spec_examples() {
    let members =
        W3cBaggage::parse(b"key1=value1;property1;property2, key2 = value2, key3=value3; propertyKey=propertyValue")
            .unwrap();
    let pairs: Vec<(&str, &str)> = members.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    assert_eq!(pairs, [("key1", "value1"), ("key2", "value2"), ("key3", "value3")]);
    // The spec's other examples: percent-encoded values, a property with a value.
    let members = W3cBaggage::parse(b"userId=alice,serverNode=DF%2028,isProduction=false").unwrap();
    assert_eq!(members[1], ("serverNode".to_owned(), "DF 28".to_owned()));
    let members = W3cBaggage::parse(b"key1=value1;property1=value1").unwrap();
    assert_eq!(members, [("key1".to_owned(), "value1".to_owned())]);
    // Invalid UTF-8 after decoding: the replacement character, as the spec says.
    assert_eq!(W3cBaggage::parse(b"k=%FF").unwrap()[0].1, "\u{fffd}");
    // Whitespace around members and '=' is not part of keys or values; empty members skipped.
    assert_eq!(W3cBaggage::parse(b" \ta = 1 \t,,b=2 ").unwrap().len(), 2);

    // Several baggage fields are one list; the context gets persistent values.
    let h = headers(&[("baggage", "key1=value1"), ("baggage", "key2=va%20lue2")]);
    let ctx = W3cBaggage.extract(&h, &Context::background()).unwrap();
    assert_eq!(MetaInfo::of(&ctx).persistent("key2"), Some("va lue2"));
    let mut out = HeaderMap::new();
    W3cBaggage.inject(&ctx, &mut out).unwrap();
    assert_eq!(out["baggage"], "key1=value1,key2=va%20lue2");
}

#[test]
fn baggage_limits_and_errors() {
    let at_limit: Vec<String> = (0..W3cBaggage::MAX_ENTRIES).map(|i| format!("k{i}=v")).collect();
    assert_eq!(W3cBaggage::parse(at_limit.join(",").as_bytes()).unwrap().len(), W3cBaggage::MAX_ENTRIES);
    let over = format!("{},k=v", at_limit.join(","));
    assert!(W3cBaggage::parse(over.as_bytes()).unwrap_err().to_string().contains("more than 180 list-members"));
    // The same across several fields.
    let h = headers(&[("baggage", &at_limit.join(",")), ("baggage", "one=more")]);
    assert!(W3cBaggage.extract(&h, &Context::background()).is_err());
    let long = format!("k={}", "v".repeat(W3cBaggage::MAX_BYTES));
    assert!(W3cBaggage::parse(long.as_bytes()).unwrap_err().to_string().contains("longer than 8192 bytes"));
    for (value, reason) in [
        ("k=%zz", "percent-encoding"),
        ("k=%4", "percent-encoding"),
        ("k=a\"b", "must be percent-encoded"),
        ("k=a\\b", "must be percent-encoded"),
        ("k=a\x01b", "control characters"),
        ("k=a\x7fb", "control characters"),
        ("novalue", "no '='"),
        ("=v", "not an HTTP token"),
        ("k y=v", "not an HTTP token"),
    ] {
        let err = W3cBaggage::parse(value.as_bytes()).unwrap_err();
        assert_eq!(err.header(), "baggage");
        assert!(err.to_string().contains(reason), "{value:?}: {err}");
    }
    // Sending more than the limits is an error too.
    let mut meta = MetaInfo::default();
    for i in 0..=W3cBaggage::MAX_ENTRIES {
        meta.set_persistent(&format!("k{i}"), "v");
    }
    let err = W3cBaggage.inject(&MetaInfo::attach(&Context::background(), meta), &mut HeaderMap::new()).unwrap_err();
    assert_eq!(err.header(), "baggage");
}

// ---- hostile input over real HTTP ----

/// Serves a handler that echoes its persistent values, behind all three propagators; hyper's
/// header buffer is raised so that a 1 MiB header reaches the layer.
async fn serve_all() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let layer = ServerBackupLayer::new().with_propagator(W3cBaggage).with_propagator(W3cTraceContext::new());
    let svc = layer.layer(service_fn(|_req: Request<Incoming>| async {
        let ctx = backed_up_ctx().unwrap();
        let meta: Vec<String> = MetaInfo::of(&ctx).persistent_values().map(|(k, v)| format!("{k}={v}")).collect();
        let trace = TraceContext::of(&ctx).map(|t| t.parent.to_string()).unwrap_or_default();
        Ok::<_, Infallible>(Response::new(Body::from(format!("{} {trace}", meta.join(",")))))
    }));
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let svc = TowerToHyperService::new(svc.clone());
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .max_buf_size(4 << 20)
                    .max_headers(1000)
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

async fn send(addr: SocketAddr, list: &[(&'static str, HeaderValue)]) -> (StatusCode, String) {
    let http = Client::builder(TokioExecutor::new()).build_http::<Body>();
    let mut req = Request::get(format!("http://{addr}/")).body(Body::default()).unwrap();
    for (name, value) in list {
        req.headers_mut().append(*name, value.clone());
    }
    let resp = http.request(req).await.unwrap();
    let status = resp.status();
    (status, String::from_utf8(resp.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap())
}

fn value(s: &str) -> HeaderValue {
    HeaderValue::from_bytes(s.as_bytes()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_headers_get_a_400_naming_the_header() {
    let addr = serve_all().await;
    let ten_thousand: Vec<String> = (0..10_000).map(|i| format!("k{i}=v")).collect();
    let mib = "x".repeat(1 << 20);
    let cases: Vec<(Fields, &str, &str)> = vec![
        (vec![("baggage", value(&ten_thousand.join(",")))], "\"baggage\"", "longer than 8192 bytes"),
        (
            ten_thousand.iter().take(200).map(|m| ("baggage", value(m))).collect(),
            "\"baggage\"",
            "more than 180 list-members",
        ),
        (vec![("baggage", value(&format!("k={mib}")))], "\"baggage\"", "longer than 8192 bytes"),
        (vec![("rpc-persist-big", value(&mib))], "\"rpc-persist-big\"", "exceed 16384 bytes"),
        (vec![("tracestate", value(&mib)), ("traceparent", value(SPEC_TRACEPARENT))], "\"tracestate\"", "longer"),
        (vec![("baggage", value("k=%G0"))], "\"baggage\"", "percent-encoding"),
        (vec![("baggage", value("k=a\tb"))], "\"baggage\"", "must be percent-encoded"),
        (vec![("baggage", HeaderValue::from_bytes(b"k=\xff").unwrap())], "\"baggage\"", "non-ASCII"),
        (
            vec![("traceparent", value("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"))],
            "\"traceparent\"",
            "version ff is invalid",
        ),
        (
            vec![("traceparent", value("0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"))],
            "\"traceparent\"",
            "version is not lowercase hex",
        ),
        (vec![("traceparent", value(&mib))], "\"traceparent\"", "version is not lowercase hex"),
        (vec![("rpc-transit-x", HeaderValue::from_bytes(b"\xc3\x28").unwrap())], "\"rpc-transit-x\"", "not UTF-8"),
    ];
    for (list, header, reason) in cases {
        let (status, body) = send(addr, &list).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{header} {reason}: {body}");
        assert!(body.contains(header) && body.contains(reason), "{header} {reason}: {body}");
    }
    // 300 Kitex headers: more than the entry limit.
    let many: Vec<(&'static str, HeaderValue)> = (0..300)
        .map(|i| -> (&'static str, HeaderValue) {
            (Box::leak(format!("rpc-persist-k{i}").into_boxed_str()), value("v"))
        })
        .collect();
    let (status, body) = send(addr, &many).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.contains("more than 256 metainfo headers"), "{body}");
    // Still serving, and all three propagate together.
    let (status, body) = send(
        addr,
        &[
            ("rpc-persist-tenant", value("acme")),
            ("baggage", value("user=J%C3%BCrgen")),
            ("traceparent", value(SPEC_TRACEPARENT)),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, format!("TENANT=acme,user=Jürgen {SPEC_TRACEPARENT}"));
}

#[test]
fn layers_default_to_kitex_only() {
    // Without the W3C propagators, W3C headers are not read (and so never rejected).
    let h = headers(&[("baggage", "k=%zz"), ("traceparent", "garbage"), ("rpc-persist-a", "1")]);
    let ctx = KitexMetainfo::new().extract(&h, &Context::background()).unwrap();
    assert_eq!(MetaInfo::of(&ctx).persistent_values().collect::<Vec<_>>(), [("A", "1")]);
    let list: [Arc<dyn Propagator>; 1] = [Arc::new(W3cTraceContext::new().ignore_invalid())];
    let _ = ServerBackupLayer::new().propagators(list);
}

// ---- round trips ----

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Kitex: CGI keys (`[A-Z0-9_]`, not empty) and header-safe values (visible ASCII and UTF-8,
    /// spaces inside; no edge whitespace) round-trip through inject then extract.
    #[test]
    fn kitex_inject_then_extract_round_trips(
        persistent in prop::collection::btree_map("[A-Z0-9_]{1,12}", "[!-~]([ -~\u{e9}\u{4e2d}]{0,20}[!-~])?", 0..12),
        transient in prop::collection::btree_map("[A-Z0-9_]{1,12}", "[!-~]{1,20}", 0..12),
    ) {
        let mut meta = MetaInfo::default();
        for (k, v) in &persistent { meta.set_persistent(k, v); }
        for (k, v) in &transient { meta.set_transient(k, v); }
        let ctx = MetaInfo::attach(&Context::background(), meta.clone());
        let mut h = HeaderMap::new();
        KitexMetainfo::new().inject(&ctx, &mut h).unwrap();
        let got = KitexMetainfo::new().extract(&h, &Context::background()).unwrap();
        prop_assert_eq!(MetaInfo::of(&got), &meta.transfer_forward());
    }

    /// Baggage: token keys and any UTF-8 values round-trip (percent-encoding).
    #[test]
    fn baggage_inject_then_extract_round_trips(
        persistent in prop::collection::btree_map("[A-Za-z0-9!#$&'*+.^_`|~-]{1,12}", "\\PC{0,20}", 0..20),
    ) {
        let mut meta = MetaInfo::default();
        for (k, v) in &persistent { meta.set_persistent(k, v); }
        let ctx = MetaInfo::attach(&Context::background(), meta.clone());
        let mut h = HeaderMap::new();
        W3cBaggage.inject(&ctx, &mut h).unwrap();
        let got = W3cBaggage.extract(&h, &Context::background()).unwrap();
        prop_assert_eq!(MetaInfo::of(&got), &meta);
    }

    /// Trace context: any valid traceparent and tracestate round-trip.
    #[test]
    fn trace_context_round_trips(
        trace_id in any::<[u8; 16]>().prop_filter("not zero", |t| *t != [0; 16]),
        parent_id in any::<[u8; 8]>().prop_filter("not zero", |p| *p != [0; 8]),
        flags in any::<u8>(),
        state in proptest::option::of("[a-z0-9]{1,8}=[!-+\\--<>-~]{1,16}"),
    ) {
        let trace = TraceContext { parent: TraceParent { version: 0, trace_id, parent_id, flags }, state };
        let ctx = trace.clone().attach(&Context::background());
        let mut h = HeaderMap::new();
        W3cTraceContext::new().inject(&ctx, &mut h).unwrap();
        let got = W3cTraceContext::new().extract(&h, &Context::background()).unwrap();
        prop_assert_eq!(TraceContext::of(&got), Some(&trace));
    }

    /// Arbitrary bytes never panic any parser.
    #[test]
    fn parsers_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..120)) {
        let _ = TraceParent::parse(&bytes);
        let _ = W3cBaggage::parse(&bytes);
        if let Ok(v) = HeaderValue::from_bytes(&bytes) {
            let h: HeaderMap = [("rpc-persist-k".parse().unwrap(), v.clone()), ("tracestate".parse().unwrap(), v)].into_iter().collect();
            let _ = KitexMetainfo::new().read(&h);
            let _ = W3cTraceContext::read(&h);
        }
    }
}
