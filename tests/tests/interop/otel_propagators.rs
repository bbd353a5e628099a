//! Interop with OpenTelemetry's SDK propagators (feature `opentelemetry`): the headers
//! `W3cTraceContext` and `W3cBaggage` write are read by opentelemetry-sdk's
//! `TraceContextPropagator`/`BaggagePropagator` into the same values, and the headers the SDK
//! writes are read by ours and written again byte for byte.
//!
//! Where the SDK itself is lossy, the generated values stay out of its way (each exclusion is a
//! behaviour of the SDK, checked in `the_sdks_own_losses_are_not_ours`):
//! - trace flags: the SDK keeps only the sampled bit (W3C "other flags"); ours passes all eight;
//! - baggage values with `%` or `\`: the SDK writes them unencoded (`\` is not a baggage-octet,
//!   and a raw `%41` reads back as `A`), so our reader refuses or decodes them;
//! - values with leading or trailing whitespace: the SDK trims them after decoding;
//! - more than 64 baggage entries: the SDK keeps the first 64.
//!
//! Baggage member order: the SDK writes its entries in hash-map order, ours in key order; W3C
//! baggage is unordered, so members are compared as sorted lists (each member byte for byte),
//! and one-member baggage is compared whole.

use std::collections::HashMap;

use http::{HeaderMap, HeaderName, HeaderValue};
use localsession_core::{Context, MetaInfo};
use localsession_std::baggage_from_metainfo;
use localsession_tokio::tower::{Propagator, TraceContext, TraceParent, W3cBaggage, W3cTraceContext};
use opentelemetry::baggage::{Baggage, BaggageExt};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use opentelemetry_sdk::propagation::{BaggagePropagator, TraceContextPropagator};
use proptest::prelude::*;

type OtelContext = opentelemetry::Context;

fn to_map(headers: &HeaderMap) -> HashMap<String, String> {
    headers.iter().map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap().to_owned())).collect()
}

fn to_headers(map: &HashMap<String, String>) -> HeaderMap {
    map.iter()
        .map(|(k, v)| (HeaderName::try_from(k.as_str()).unwrap(), HeaderValue::try_from(v.as_str()).unwrap()))
        .collect()
}

fn members(baggage: &str) -> Vec<&str> {
    let mut list: Vec<&str> = baggage.split(',').collect();
    list.sort_unstable();
    list
}

fn our_trace(ctx: &Context) -> Option<&TraceContext> {
    TraceContext::of(ctx)
}

/// Ours -> SDK: the SDK reads our headers into the same span context; and the SDK, given that
/// span context, writes exactly our bytes.
fn trace_ours_to_sdk(trace: &TraceContext) -> Result<(), TestCaseError> {
    let mut ours = HeaderMap::new();
    W3cTraceContext::new().inject(&trace.clone().attach(&Context::background()), &mut ours).unwrap();
    let sdk = TraceContextPropagator::new().extract(&to_map(&ours));
    let span = sdk.span().span_context().clone();
    prop_assert!(span.is_valid() && span.is_remote());
    prop_assert_eq!(span.trace_id().to_bytes(), trace.parent.trace_id);
    prop_assert_eq!(span.span_id().to_bytes(), trace.parent.parent_id);
    prop_assert_eq!(span.trace_flags().to_u8(), trace.parent.flags);
    prop_assert_eq!(span.trace_state().header(), trace.state.clone().unwrap_or_default());

    let mut written = HashMap::new();
    TraceContextPropagator::new().inject_context(&sdk, &mut written);
    prop_assert_eq!(&written["traceparent"], ours["traceparent"].to_str().unwrap());
    match ours.get("tracestate") {
        Some(state) => prop_assert_eq!(&written["tracestate"], state.to_str().unwrap()),
        // The SDK writes an empty `tracestate`, which W3C reads as none.
        None => prop_assert_eq!(&written["tracestate"], ""),
    }
    Ok(())
}

/// SDK -> ours: ours reads the SDK's headers into the same values and writes them again byte
/// for byte.
fn trace_sdk_to_ours(span: SpanContext) -> Result<(), TestCaseError> {
    let mut written = HashMap::new();
    TraceContextPropagator::new()
        .inject_context(&OtelContext::new().with_remote_span_context(span.clone()), &mut written);
    let ctx = W3cTraceContext::new().extract(&to_headers(&written), &Context::background()).unwrap();
    let trace = our_trace(&ctx).expect("a trace context");
    prop_assert_eq!(trace.parent.trace_id, span.trace_id().to_bytes());
    prop_assert_eq!(trace.parent.parent_id, span.span_id().to_bytes());
    prop_assert_eq!(trace.parent.flags, span.trace_flags().to_u8());
    prop_assert_eq!(trace.state.clone().unwrap_or_default(), span.trace_state().header());

    let mut again = HeaderMap::new();
    W3cTraceContext::new().inject(&ctx, &mut again).unwrap();
    prop_assert_eq!(again["traceparent"].to_str().unwrap(), &written["traceparent"]);
    if written["tracestate"].is_empty() {
        prop_assert!(again.get("tracestate").is_none()); // an empty tracestate is none
    } else {
        prop_assert_eq!(again["tracestate"].to_str().unwrap(), &written["tracestate"]);
    }
    Ok(())
}

/// Ours -> SDK -> ours for baggage, and SDK -> ours -> SDK.
fn baggage_both_ways(pairs: &[(String, String)]) -> Result<(), TestCaseError> {
    let mut meta = MetaInfo::default();
    for (k, v) in pairs {
        meta.set_persistent(k, v);
    }
    let ctx = MetaInfo::attach(&Context::background(), meta.clone());

    // Ours -> SDK: the same entries (as `baggage_from_metainfo` makes them).
    let mut ours = HeaderMap::new();
    W3cBaggage.inject(&ctx, &mut ours).unwrap();
    let sdk = BaggagePropagator::new().extract(&to_map(&ours));
    let expected: Baggage = baggage_from_metainfo(&ctx);
    prop_assert_eq!(sdk.baggage().len(), expected.len());
    for (k, (v, _)) in &expected {
        prop_assert_eq!(sdk.baggage().get(k.as_str()), Some(v));
    }

    // The SDK writes those entries as our bytes (member order aside).
    let mut written = HashMap::new();
    BaggagePropagator::new().inject_context(&sdk, &mut written);
    match ours.get("baggage") {
        None => prop_assert!(!written.contains_key("baggage")),
        Some(our_header) => {
            let our_header = our_header.to_str().unwrap();
            prop_assert_eq!(members(&written["baggage"]), members(our_header));
            if pairs.len() == 1 {
                prop_assert_eq!(&written["baggage"], our_header);
            }
        }
    }

    // SDK -> ours -> written again: the same values, the same bytes.
    let mut baggage = Baggage::new();
    for (k, v) in pairs {
        let _ = baggage.insert(k.clone(), v.clone());
    }
    prop_assert_eq!(baggage.len(), pairs.len());
    let mut sdk_written = HashMap::new();
    BaggagePropagator::new().inject_context(&OtelContext::new().with_baggage(baggage), &mut sdk_written);
    if pairs.is_empty() {
        prop_assert!(!sdk_written.contains_key("baggage"));
        return Ok(());
    }
    let back = W3cBaggage.extract(&to_headers(&sdk_written), &Context::background()).unwrap();
    prop_assert_eq!(MetaInfo::of(&back), &meta);
    let mut again = HeaderMap::new();
    W3cBaggage.inject(&back, &mut again).unwrap();
    prop_assert_eq!(members(again["baggage"].to_str().unwrap()), members(&sdk_written["baggage"]));
    Ok(())
}

#[test]
fn the_specs_examples_both_ways() {
    let parent = TraceParent::parse(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
    let trace = TraceContext { parent, state: Some("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE".to_owned()) };
    trace_ours_to_sdk(&trace).unwrap();
    let span = SpanContext::new(
        TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
        SpanId::from_hex("00f067aa0ba902b7").unwrap(),
        TraceFlags::SAMPLED,
        true,
        "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE".parse::<TraceState>().unwrap(),
    );
    trace_sdk_to_ours(span).unwrap();
    let pairs =
        [("userId", "alice"), ("serverNode", "DF 28"), ("isProduction", "false"), ("user", "Jürgen"), ("eq", "a=b")];
    baggage_both_ways(&pairs.map(|(k, v)| (k.to_owned(), v.to_owned()))).unwrap();
    // One member: the whole header, byte for byte, both ways.
    let ctx = MetaInfo::with_persistent(&Context::background(), "q", "a,b; c=d \"é\"");
    let mut ours = HeaderMap::new();
    W3cBaggage.inject(&ctx, &mut ours).unwrap();
    assert_eq!(ours["baggage"], "q=a%2Cb%3B%20c%3Dd%20%22%C3%A9%22");
    let mut written = HashMap::new();
    BaggagePropagator::new().inject_context(&BaggagePropagator::new().extract(&to_map(&ours)), &mut written);
    assert_eq!(written["baggage"], "q=a%2Cb%3B%20c%3Dd%20%22%C3%A9%22");
}

/// The SDK behaviours the generated values avoid, pinned so that a change in the SDK shows up.
#[test]
fn the_sdks_own_losses_are_not_ours() {
    // Trace flags: the SDK keeps only `sampled`; ours keeps them all.
    let mut h = HashMap::new();
    h.insert("traceparent".to_owned(), "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-09".to_owned());
    let sdk = TraceContextPropagator::new().extract(&h);
    assert_eq!(sdk.span().span_context().trace_flags().to_u8(), 1);
    let ours = W3cTraceContext::new().extract(&to_headers(&h), &Context::background()).unwrap();
    assert_eq!(our_trace(&ours).unwrap().parent.flags, 9);

    // `%` and `\` are written raw by the SDK; ours encodes them.
    let mut baggage = Baggage::new();
    let _ = baggage.insert("k", "100%41\\");
    let mut written = HashMap::new();
    BaggagePropagator::new().inject_context(&OtelContext::new().with_baggage(baggage), &mut written);
    assert_eq!(written["baggage"], "k=100%41\\");
    let ctx = MetaInfo::with_persistent(&Context::background(), "k", "100%41\\");
    let mut ours = HeaderMap::new();
    W3cBaggage.inject(&ctx, &mut ours).unwrap();
    assert_eq!(ours["baggage"], "k=100%2541%5C");
    // ... and the SDK reads ours back exactly.
    let sdk = BaggagePropagator::new().extract(&to_map(&ours));
    assert_eq!(sdk.baggage().get("k").map(|v| v.as_str()), Some("100%41\\"));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn trace_context_interop(
        trace_id in any::<[u8; 16]>().prop_filter("not zero", |t| *t != [0; 16]),
        parent_id in any::<[u8; 8]>().prop_filter("not zero", |p| *p != [0; 8]),
        sampled in any::<bool>(),
        // W3C tracestate list-members: simple keys, values without ',' and '=', no edge spaces.
        state in proptest::collection::btree_map("[a-z][a-z0-9_*/-]{0,8}", "[!-+.-<>-~]{1,12}", 0..6),
    ) {
        let state = (!state.is_empty())
            .then(|| state.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(","));
        let flags = u8::from(sampled);
        let trace = TraceContext { parent: TraceParent { version: 0, trace_id, parent_id, flags }, state: state.clone() };
        trace_ours_to_sdk(&trace)?;
        let span = SpanContext::new(
            TraceId::from_bytes(trace_id),
            SpanId::from_bytes(parent_id),
            TraceFlags::new(flags),
            true,
            state.as_deref().unwrap_or("").parse::<TraceState>().unwrap(),
        );
        trace_sdk_to_ours(span)?;
    }

    #[test]
    fn baggage_interop(
        // Token keys without '%' (the SDK percent-decodes keys); values: any text without '%'
        // and '\', no edge whitespace; at most 64 entries (the SDK's limit).
        pairs in proptest::collection::btree_map(
            "[A-Za-z0-9!#$&'*+.^_`|~-]{1,12}",
            "([^%\\\\\\s]([^%\\\\]{0,18}[^%\\\\\\s])?)?",
            0..64,
        ),
    ) {
        let pairs: Vec<(String, String)> = pairs.into_iter().collect();
        baggage_both_ways(&pairs)?;
    }
}
