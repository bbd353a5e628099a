//! A `no_std` firmware-style use of `localsession-core`: the single-slot store, a tick clock,
//! sessions, deadlines and metainfo — built for `thumbv7em-none-eabihf` (it cannot run here; the
//! build proves the core needs neither `std` nor an OS).
//!
//! `cargo build --manifest-path tests/nostd/Cargo.toml --target thumbv7em-none-eabihf`
#![no_std]

extern crate alloc;

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use core::time::Duration;

use localsession_core::{
    Clock, Context, Instant, Key, MetaInfo, SessionCtx, SessionMap, SingleSlotStore, current, scope,
    set_global_clock, set_global_store,
};

/// A bump allocator over a static arena (enough for the demo; it never frees).
struct Bump {
    arena: UnsafeCell<[u8; 64 * 1024]>,
    next: AtomicUsize,
}

// SAFETY: allocation hands out disjoint ranges by atomically advancing `next`.
unsafe impl Sync for Bump {}

// SAFETY: every returned pointer is inside the arena, aligned, and never handed out twice.
unsafe impl GlobalAlloc for Bump {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let base = self.arena.get() as usize;
        let mut cur = self.next.load(Ordering::Relaxed);
        loop {
            let start = (base + cur).next_multiple_of(layout.align()) - base;
            let end = start + layout.size();
            if end > 64 * 1024 {
                return core::ptr::null_mut();
            }
            match self.next.compare_exchange_weak(cur, end, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return (base + start) as *mut u8,
                Err(actual) => cur = actual,
            }
        }
    }

    unsafe fn dealloc(&self, _ptr: *mut u8, _layout: Layout) {}
}

#[global_allocator]
static ALLOCATOR: Bump = Bump { arena: UnsafeCell::new([0; 64 * 1024]), next: AtomicUsize::new(0) };

#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

/// A clock driven by a SysTick-style interrupt counting milliseconds.
struct Ticks(AtomicU32);

impl Clock for Ticks {
    fn now(&self) -> Duration {
        Duration::from_millis(u64::from(self.0.load(Ordering::Relaxed)))
    }
}

static TICKS: Ticks = Ticks(AtomicU32::new(0));
static STORE: SingleSlotStore = SingleSlotStore::new();
static REQUEST: Key<u32> = Key::new("request");

/// The SysTick handler would call this.
#[unsafe(no_mangle)]
pub extern "C" fn localsession_tick() {
    TICKS.0.fetch_add(1, Ordering::Relaxed);
}

/// Library code deep in the firmware: reads the current session, no parameter.
fn current_request() -> u32 {
    current().and_then(|s| s.get_cloned(&REQUEST)).unwrap_or(0)
}

/// Runs one "request": returns a checksum of what the session machinery reported.
#[unsafe(no_mangle)]
pub extern "C" fn localsession_demo(request: u32) -> u32 {
    let _ = set_global_store(&STORE);
    let _ = set_global_clock(&TICKS);
    let ctx = MetaInfo::with_persistent(&Context::background(), "tenant", "acme");
    let session = SessionCtx::with_deadline(&ctx, Instant::now(&TICKS) + Duration::from_millis(50)).with(&REQUEST, request);
    let seen = scope(session.clone(), current_request);
    let map = SessionMap::new().with_value(1u8, request);
    let from_map = map.value::<u32, _>(&1u8).map_or(0, |v| *v);
    let valid = u32::from(session.is_valid());
    session.disable();
    seen.wrapping_add(from_map).wrapping_add(valid).wrapping_add(u32::from(session.is_valid()))
}
