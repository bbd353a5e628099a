//! The OpenTelemetry context bridge is opt-in: with the feature on and the switch never turned
//! on, a thread with the session does not get the session's context attached.
#![cfg(feature = "opentelemetry")]
#![allow(missing_docs)]

use localsession_core::SessionMap;
use localsession_std::{OTEL_CONTEXT, carries_otel_context, current, go_session};
use opentelemetry::Context as OtelContext;

#[derive(Debug)]
struct Marker;

#[test]
fn without_the_switch_the_context_is_only_a_session_value() {
    assert!(!carries_otel_context());
    let map = SessionMap::new().with(&OTEL_CONTEXT, OtelContext::new().with_value(Marker));
    let (attached, in_session) = go_session(map, || {
        let attached = OtelContext::map_current(|cx| cx.get::<Marker>().is_some());
        let in_session = current().unwrap().get_cloned(&OTEL_CONTEXT).is_some_and(|cx| cx.get::<Marker>().is_some());
        (attached, in_session)
    })
    .join()
    .unwrap();
    assert!(!attached);
    assert!(in_session);
}
