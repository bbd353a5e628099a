//! The header parsers behind the cargo-fuzz targets `baggage`, `traceparent` and `metainfo`
//! (`fuzz/fuzz_targets/`), replayed as ordinary tests by `tests/fuzz_corpus.rs`.
//!
//! Each run parses arbitrary bytes with the library's own functions and checks what must hold
//! of any result: no panic, errors name their header, and what parsed re-encodes and parses
//! back to the same thing.

use http::{HeaderMap, HeaderName, HeaderValue};
use localsession_core::{Context, MetaInfo};
use localsession_tokio::tower::{KitexMetainfo, Propagator, TraceParent, W3cBaggage, W3cTraceContext};

/// `baggage`: parse; on success, format and parse again to the same members.
///
/// # Examples
/// ```
/// localsession_tests::fuzz_headers::baggage(b"key1=value1;p, key2 = value2");
/// localsession_tests::fuzz_headers::baggage(b"k=%zz"); // an error, not a panic
/// ```
pub fn baggage(data: &[u8]) {
    match W3cBaggage::parse(data) {
        Ok(members) => {
            let text = W3cBaggage::format(members.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .expect("parsed baggage re-encodes within the limits");
            assert_eq!(W3cBaggage::parse(text.as_bytes()).expect("re-encoded baggage parses"), members);
        }
        Err(e) => assert_eq!(e.header(), "baggage"),
    }
    // Through the propagator, as a header field when the bytes are one.
    if let Ok(value) = HeaderValue::from_bytes(data) {
        let mut headers = HeaderMap::new();
        headers.insert("baggage", value);
        if let Err(e) = W3cBaggage.extract(&headers, &Context::background()) {
            assert_eq!(e.header(), "baggage");
        }
    }
}

/// `traceparent` (first line) and `tracestate` (the rest): parse; on success, the version `00`
/// form parses back to the same ids and flags.
///
/// # Examples
/// ```
/// localsession_tests::fuzz_headers::traceparent(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\nrojo=1");
/// localsession_tests::fuzz_headers::traceparent(b"ff-");
/// ```
pub fn traceparent(data: &[u8]) {
    let (parent, state) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], Some(&data[i + 1..])),
        None => (data, None),
    };
    match TraceParent::parse(parent) {
        Ok(tp) => {
            let again = TraceParent::parse(tp.to_string().as_bytes()).expect("the 00 form parses");
            assert_eq!((again.trace_id, again.parent_id, again.flags), (tp.trace_id, tp.parent_id, tp.flags));
        }
        Err(e) => assert_eq!(e.header(), "traceparent"),
    }
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_bytes(parent) {
        headers.insert("traceparent", v);
    }
    if let Some(Ok(v)) = state.map(HeaderValue::from_bytes) {
        headers.insert("tracestate", v);
    }
    match W3cTraceContext::new().extract(&headers, &Context::background()) {
        Ok(ctx) => {
            let mut out = HeaderMap::new();
            W3cTraceContext::new().inject(&ctx, &mut out).expect("a parsed trace context re-encodes");
        }
        Err(e) => assert!(e.header() == "traceparent" || e.header() == "tracestate", "{e}"),
    }
}

/// Kitex metainfo headers: the input is lines `name: value`; the valid header fields are read
/// with [`KitexMetainfo`]; on success, what was read is written and read back the same.
///
/// # Examples
/// ```
/// localsession_tests::fuzz_headers::metainfo(b"rpc-persist-abc-def: v\nrpc-transit-x: w\nrpc-persist-: skipped");
/// ```
pub fn metainfo(data: &[u8]) {
    let mut headers = HeaderMap::new();
    for line in data.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else { continue };
        let value = line[colon + 1..].strip_prefix(b" ").unwrap_or(&line[colon + 1..]);
        if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(&line[..colon]), HeaderValue::from_bytes(value)) {
            headers.append(name, value);
        }
    }
    match KitexMetainfo::new().read(&headers) {
        Ok(meta) => {
            // What was received is sent on as persistent values and this hop's transient ones.
            let mut sent = MetaInfo::default();
            meta.persistent_values().for_each(|(k, v)| sent.set_persistent(k, v));
            meta.transient_values().for_each(|(k, v)| sent.set_transient(k, v));
            let mut out = HeaderMap::new();
            if KitexMetainfo::new().write(&sent, &mut out).is_ok() {
                assert_eq!(KitexMetainfo::new().read(&out).expect("written metainfo reads"), sent.transfer_forward());
            }
        }
        Err(e) => assert!(e.header().starts_with("rpc-"), "{e}"),
    }
}
