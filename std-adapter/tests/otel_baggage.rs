//! MetaInfo persistent values to OpenTelemetry baggage and back (feature `opentelemetry`).
#![cfg(feature = "opentelemetry")]
#![allow(missing_docs)]

use localsession_core::{Context, MetaInfo};
use localsession_std::{baggage_from_metainfo, metainfo_with_baggage, try_baggage_from_metainfo};
use opentelemetry::baggage::Baggage;

#[test]
fn persistent_values_round_trip_through_baggage() {
    let mut ctx = Context::background();
    for i in 0..20 {
        ctx = MetaInfo::with_persistent(&ctx, &format!("key-{i}"), &format!("value {i} / ünïcode"));
    }
    let ctx = MetaInfo::with_transient(&ctx, "hop", "only-one");
    let baggage = try_baggage_from_metainfo(&ctx).unwrap();
    assert_eq!(baggage.len(), 20);
    assert_eq!(baggage_from_metainfo(&ctx).len(), 20);

    let back = metainfo_with_baggage(&Context::background(), &baggage);
    let mut original: Vec<_> = MetaInfo::of(&ctx).persistent_values().collect();
    let mut round_tripped: Vec<_> = MetaInfo::of(&back).persistent_values().collect();
    original.sort_unstable();
    round_tripped.sort_unstable();
    assert_eq!(original, round_tripped);
    assert_eq!(MetaInfo::of(&back).count_transient(), 0);
}

#[test]
fn baggage_wins_over_an_existing_persistent_value_and_transients_stay() {
    let ctx = MetaInfo::with_persistent(&Context::background(), "tenant", "old");
    let ctx = MetaInfo::with_transient(&ctx, "hop", "1");
    let mut baggage = Baggage::new();
    let _ = baggage.insert_with_metadata("tenant", "new", "prop=1");
    let ctx = metainfo_with_baggage(&ctx, &baggage);
    assert_eq!(MetaInfo::of(&ctx).persistent("tenant"), Some("new"));
    assert_eq!(MetaInfo::of(&ctx).transient("hop"), Some("1"));
}

#[test]
fn values_baggage_refuses_are_named_or_left_out() {
    let mut ctx = MetaInfo::with_persistent(&Context::background(), "ok", "1");
    ctx = MetaInfo::with_persistent(&ctx, "bad key", "2");
    assert_eq!(try_baggage_from_metainfo(&ctx).unwrap_err().key(), "bad key");
    let lenient = baggage_from_metainfo(&ctx);
    assert_eq!(lenient.len(), 1);
    assert!(lenient.get("ok").is_some());

    // Over the 64-entry limit.
    let mut many = Context::background();
    for i in 0..65 {
        many = MetaInfo::with_persistent(&many, &format!("k{i}"), "v");
    }
    assert!(try_baggage_from_metainfo(&many).is_err());
    assert_eq!(baggage_from_metainfo(&many).len(), 64);
}
