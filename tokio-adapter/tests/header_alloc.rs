//! Memory stays bounded on hostile headers: with a counting global allocator, parsing a 1 MiB
//! header through every propagator allocates at most a small bound beyond the input (the
//! limits are checked before anything is copied). Its own test binary: the allocator is global.
#![allow(missing_docs)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use http::{HeaderMap, HeaderValue};
use localsession_core::Context;
use localsession_tokio::tower::{KitexMetainfo, Propagator, W3cBaggage, W3cTraceContext};

/// Counts live bytes allocated by the measuring thread while it tracks, and their peak. Only
/// that thread counts: the test harness runs other tests (building megabyte inputs) on other
/// threads at the same time.
struct Counting;

thread_local! {
    // `const` and destructor-free: reading it never allocates (safe inside the allocator).
    static TRACKING: Cell<bool> = const { Cell::new(false) };
}

fn tracking() -> bool {
    TRACKING.try_with(Cell::get).unwrap_or(false)
}
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to `System`; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if tracking() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        // SAFETY: the caller's layout, forwarded.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if tracking() {
            LIVE.fetch_sub(layout.size().min(LIVE.load(Ordering::Relaxed)), Ordering::Relaxed);
        }
        // SAFETY: allocated by `System` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// One measurement at a time (tests run on several threads).
static SERIAL: Mutex<()> = Mutex::new(());

/// Peak bytes allocated (net) while `f` runs.
fn peak_of(f: impl FnOnce()) -> usize {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    LIVE.store(0, Ordering::SeqCst);
    PEAK.store(0, Ordering::SeqCst);
    TRACKING.with(|t| t.set(true));
    f();
    TRACKING.with(|t| t.set(false));
    PEAK.load(Ordering::SeqCst)
}

const BOUND: usize = 64 * 1024;
const MIB: usize = 1 << 20;

fn extract_all(h: &HeaderMap) {
    let propagators: [&dyn Propagator; 3] = [&KitexMetainfo::new(), &W3cBaggage, &W3cTraceContext::new()];
    for p in propagators {
        let r = p.extract(h, &Context::background());
        std::hint::black_box(&r);
        if let Err(e) = r {
            assert!(!e.header().is_empty());
        }
    }
}

#[test]
fn a_1_mib_hostile_header_allocates_a_small_bounded_amount() {
    let big = "k=v,".repeat(MIB / 4); // 2^18 baggage entries
    let cases: Vec<(&'static str, String)> = vec![
        ("baggage", big.clone()),
        ("baggage", format!("k={}", "%".repeat(MIB))),
        ("rpc-persist-big", "x".repeat(MIB)),
        ("rpc-transit-big", "x".repeat(MIB)),
        ("tracestate", "a=b,".repeat(MIB / 4)),
        ("traceparent", format!("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-{}", "x".repeat(MIB))),
        ("traceparent", "0".repeat(MIB)),
    ];
    for (name, value) in cases {
        let mut h = HeaderMap::new();
        h.insert(name, HeaderValue::from_str(&value).unwrap());
        if name == "tracestate" {
            h.insert(
                "traceparent",
                HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            );
        }
        let peak = peak_of(|| extract_all(&h));
        assert!(peak < BOUND, "{name}: parsing a 1 MiB header allocated {peak} bytes at peak (bound {BOUND})");
    }
}

#[test]
fn many_hostile_headers_allocate_a_small_bounded_amount() {
    // 10^4 small metainfo headers and 10^4 baggage fields (about 100 KiB of input in total).
    let mut h = HeaderMap::new();
    for i in 0..10_000 {
        h.insert(http::HeaderName::try_from(format!("rpc-persist-k{i}")).unwrap(), HeaderValue::from_static("v"));
        h.append("baggage", HeaderValue::from_str(&format!("k{i}=v")).unwrap());
    }
    let peak = peak_of(|| extract_all(&h));
    assert!(peak < BOUND, "10^4 headers: {peak} bytes at peak (bound {BOUND})");
}
