//! Adversarial tests: hostile session values in `SessionFields` log lines and spans, thread
//! helpers racing `reset_default_manager`, the shared-worker marker across resets, inline pool
//! jobs, and MetaInfo <-> OpenTelemetry baggage with hostile keys and values.
//!
//! Every test takes `serial()`: tests reset the default manager, which ends the bindings of
//! every thread in the process, so no other test of this binary may run meanwhile.
#![cfg(all(feature = "tracing", feature = "opentelemetry"))]
#![allow(missing_docs)]

use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex, MutexGuard, mpsc};

use localsession_core::{AnySession, Context, Key, MetaInfo, SessionCtx, SessionMap};
use localsession_std::{
    Builder, ManagerOptions, RecordedSessionFields, ScopeExt, SessionFields, baggage_from_metainfo, bind, current, go,
    go_session, in_current_session, is_shared_worker_session, metainfo_with_baggage, reset_default_manager, scope,
    shared_worker_session, try_baggage_from_metainfo, unbind, with_session,
};
use opentelemetry::baggage::Baggage;
use tracing::Subscriber;
use tracing::span::{Attributes, Id};
use tracing_subscriber::layer::{Context as LayerContext, Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

// ---------------------------------------------------------------------------------------------
// Support
// ---------------------------------------------------------------------------------------------

fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    let guard = SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    // Whatever an earlier (possibly failed) test left on this harness thread.
    drop(unbind());
    guard
}

fn reset() {
    reset_default_manager(ManagerOptions::default()).unwrap();
}

/// Resets from another thread (as a real admin path would), and waits for it.
fn reset_elsewhere() {
    std::thread::spawn(reset).join().unwrap();
}

static TENANT: Key<String> = Key::new("tenant");
static USER: Key<String> = Key::new("user");

fn tenant_fields() -> SessionFields {
    SessionFields::new().key("tenant", &TENANT).key("user", &USER)
}

fn request(tenant: &str, user: &str) -> SessionCtx {
    SessionCtx::new(&Context::background()).with(&TENANT, tenant.to_owned()).with(&USER, user.to_owned())
}

/// A `std::io::Write` collecting what `fmt` writes.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Lines {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).expect("fmt writes UTF-8")
    }
}

/// Counts spans opened and closed in the registry (placed inside the session fields layer).
#[derive(Clone, Default)]
struct SpanCount(Arc<(AtomicUsize, AtomicUsize)>);

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for SpanCount {
    fn on_new_span(&self, _: &Attributes<'_>, _: &Id, _: LayerContext<'_, S>) {
        self.0.0.fetch_add(1, Ordering::SeqCst);
    }
    fn on_close(&self, _: Id, _: LayerContext<'_, S>) {
        self.0.1.fetch_add(1, Ordering::SeqCst);
    }
}

/// Runs `f` under a thread-local subscriber: the session fields layer on spans, the session
/// fields format in front of every line, no ANSI colours, no time. Returns what was written.
fn capture(fields: &SessionFields, f: impl FnOnce()) -> String {
    capture_counting(fields, &SpanCount::default(), f)
}

fn capture_counting(fields: &SessionFields, count: &SpanCount, f: impl FnOnce()) -> String {
    let lines = Lines::default();
    let writer = lines.clone();
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(false)
        .event_format(fields.format(tracing_subscriber::fmt::format().without_time()))
        .with_writer(move || writer.clone());
    let subscriber = tracing_subscriber::registry().with(count.clone()).with(fields.layer()).with(fmt);
    tracing::subscriber::with_default(subscriber, f);
    lines.text()
}

/// The `key=value` pairs of a logfmt line (what a log shipper parses): pairs separated by
/// spaces, a value either bare (up to the next space) or double-quoted with backslash escapes.
/// Words without `=` are skipped.
fn logfmt_pairs(line: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        while chars.peek() == Some(&' ') {
            chars.next();
        }
        if chars.peek().is_none() {
            return out;
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == ' ' || c == '=' {
                break;
            }
            key.push(c);
            chars.next();
        }
        if chars.peek() != Some(&'=') {
            continue;
        }
        chars.next();
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ' ' {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        out.push((key, value));
    }
}

fn values_of<'a>(pairs: &'a [(String, String)], key: &str) -> Vec<&'a str> {
    pairs.iter().filter(|(k, _)| k == key).map(|(_, v)| v.as_str()).collect()
}

/// The fields `fmt` printed for span `name` on `line`: what is between `name{` and `}:`.
fn span_fields<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let start = line.find(&format!("{name}{{"))? + name.len() + 1;
    let end = start + line[start..].rfind("}:")?;
    Some(&line[start..end])
}

fn who() -> Option<u64> {
    current().and_then(|s| s.value_cloned::<u64, _>(&"who"))
}

/// A session naming `who`, holding a clone of `token` (so `Arc::strong_count(token)` tells
/// whether a session was leaked).
fn named(who: u64, token: &Arc<()>) -> AnySession {
    SessionMap::new().with_value("who", who).with_value("token", token.clone()).into()
}

// ---------------------------------------------------------------------------------------------
// 1. Log injection through session values
// ---------------------------------------------------------------------------------------------

/// Control: what `fmt` itself does with a hostile *string field* of an event: it quotes and
/// escapes it, so the line stays one line with one `tenant` pair. The session fields must be
/// no weaker than this.
#[test]
fn control_fmt_quotes_and_escapes_hostile_string_fields_of_its_own() {
    let _serial = serial();
    let hostile = "acme tenant=globex\n tenant=globex INFO forged: admin granted";
    let out = capture(&SessionFields::new(), || tracing::info!(tenant = hostile, "hello"));
    assert_eq!(out.lines().count(), 1, "{out:?}");
    let pairs = logfmt_pairs(out.lines().next().unwrap());
    assert_eq!(values_of(&pairs, "tenant").len(), 1, "{out:?}");
}

/// Request A's tenant value contains a newline followed by a line that looks like request B's:
/// the log must still have one line per event, and no line may start with B's tenant.
#[test]
fn a_newline_in_a_session_value_cannot_forge_a_log_line_of_another_tenant() {
    let _serial = serial();
    let hostile = "acme\ntenant=globex user=root  INFO adversary_fields: admin access granted";
    let out = capture(&tenant_fields(), || {
        scope(request(hostile, "ann"), || tracing::info!("request served"));
    });
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1, "one event made {} log lines: {out:?}", lines.len());
    assert!(
        !lines.iter().any(|l| l.starts_with("tenant=globex")),
        "a line attributed to tenant globex was forged: {out:?}"
    );
}

/// Request A's value contains ` tenant=globex`: a logfmt parser must not find a second
/// `tenant` pair on A's line (nor one saying `globex`).
#[test]
fn a_space_and_key_in_a_session_value_cannot_forge_another_tenant_pair() {
    let _serial = serial();
    let out = capture(&tenant_fields(), || {
        // The tenant is trusted (set by the gateway); the user name comes from the request.
        scope(request("acme", "mallory tenant=globex"), || tracing::info!("request served"));
    });
    let line = out.lines().next().expect("one line");
    let pairs = logfmt_pairs(line);
    assert_eq!(values_of(&pairs, "tenant"), vec!["acme"], "the line parses as {pairs:?}: {out:?}");
    assert_eq!(values_of(&pairs, "user"), vec!["mallory tenant=globex"], "{out:?}");
}

/// The same values recorded on a span: what `fmt` prints in the span's context
/// (`handler{...}`) must hold one `tenant` pair and no line break.
#[test]
fn session_values_on_spans_cannot_forge_fields_or_lines() {
    let _serial = serial();
    let out = capture(&tenant_fields(), || {
        scope(request("acme", "x tenant=globex\rtenant=globex\n"), || {
            tracing::info_span!("handler").in_scope(|| tracing::info!("inside"));
        });
    });
    assert_eq!(out.lines().count(), 1, "{out:?}");
    assert!(!out.contains('\r'), "a raw carriage return reaches the log: {out:?}");
    let fields = span_fields(&out, "handler").unwrap_or_else(|| panic!("no span context in {out:?}"));
    let pairs = logfmt_pairs(fields);
    assert_eq!(values_of(&pairs, "tenant"), vec!["acme"], "span fields parse as {pairs:?}: {out:?}");
}

/// Terminal control characters (ANSI escapes, NUL, BEL, backspace) in a session value: `fmt`
/// escapes them in its own fields and messages (tracing-subscriber >= 0.3.20); the session
/// fields must not write them raw either.
#[test]
fn terminal_control_characters_in_session_values_are_not_written_raw() {
    let _serial = serial();
    let hostile = "acme\x1b[2K\x1b[1Gtenant=globex\x07\x08\x00";
    let out = capture(&tenant_fields(), || {
        scope(request(hostile, "ann"), || {
            tracing::info!("served");
            tracing::info_span!("handler").in_scope(|| tracing::info!("in span"));
        });
    });
    let raw: Vec<char> = out.chars().filter(|c| matches!(c, '\x1b' | '\x07' | '\x08' | '\0')).collect();
    assert!(raw.is_empty(), "raw control characters {raw:?} reach the log: {out:?}");
}

/// Structured consumers read `RecordedSessionFields`: there the hostile value must be exactly
/// what the session holds (not truncated, not re-split), under its own name only.
#[test]
fn recorded_session_fields_hold_hostile_values_exactly() {
    let _serial = serial();
    struct Grab(Arc<Mutex<Vec<RecordedSessionFields>>>);
    impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Grab {
        fn on_new_span(&self, _: &Attributes<'_>, id: &Id, ctx: LayerContext<'_, S>) {
            let span = ctx.span(id).unwrap();
            if let Some(r) = span.extensions().get::<RecordedSessionFields>() {
                self.0.lock().unwrap().push(r.clone());
            }
        }
    }
    let hostile = format!("a\"b\\c\nd=e tenant=globex \u{0}\u{fffd}\u{202e}{}", "x".repeat(10_000));
    let grabbed = Arc::new(Mutex::new(Vec::new()));
    let fields = tenant_fields();
    let subscriber = tracing_subscriber::registry().with(fields.layer()).with(Grab(grabbed.clone()));
    tracing::subscriber::with_default(subscriber, || {
        scope(request(&hostile, "ann"), || drop(tracing::info_span!("s")));
    });
    let grabbed = grabbed.lock().unwrap();
    assert_eq!(grabbed.len(), 1);
    assert_eq!(grabbed[0].get("tenant"), Some(hostile.as_str()));
    assert_eq!(grabbed[0].iter().map(|(n, _)| n).collect::<Vec<_>>(), vec!["tenant", "user"]);
}

/// A 1 MiB value: logged whole on one line, on spans and events, no panic.
#[test]
fn a_one_mebibyte_session_value_is_logged_on_one_line() {
    let _serial = serial();
    let big = "y".repeat(1 << 20);
    let out = capture(&tenant_fields(), || {
        scope(request(&big, "ann"), || {
            tracing::info!("big");
            tracing::info_span!("big_span").in_scope(|| tracing::info!("big in span"));
        });
    });
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2);
    assert!(lines[0].starts_with(&format!("tenant={big} user=ann ")));
    // Event prefix and span context: the value twice on the second line.
    assert_eq!(lines[1].matches(big.as_str()).count(), 2);
}

/// A value type whose `Display` misbehaves.
struct Hostile(Mode);

#[derive(Clone, Copy)]
enum Mode {
    Panic,
    /// Reads and rebinds the session (restoring it), and logs, from inside `Display`.
    Reenter,
    /// Unbinds the session being rendered from inside `Display`.
    Unbind,
}

static HOSTILE: Key<Hostile> = Key::new("hostile");

impl fmt::Display for Hostile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Mode::Panic => panic!("Display of a session value panicked"),
            Mode::Reenter => {
                let tenant = current().and_then(|s| s.get_cloned(&TENANT)).unwrap_or_default();
                let inner = scope(request("inner", "inner-user"), || current().and_then(|s| s.get_cloned(&TENANT)));
                tracing::info!("logged from inside Display");
                write!(f, "{tenant}/{}", inner.unwrap_or_default())
            }
            Mode::Unbind => {
                let taken = unbind();
                drop(taken); // the session being rendered loses its binding (and this handle)
                f.write_str("unbound")
            }
        }
    }
}

fn hostile_session(mode: Mode, token: &Arc<()>) -> AnySession {
    SessionCtx::new(&Context::background())
        .with(&TENANT, "acme".to_owned())
        .with(&HOSTILE, Hostile(mode))
        .with_value("token", token.clone())
        .into()
}

/// `SessionFields::key` renders with `Display`; nothing in its docs says what happens when
/// that `Display` panics (only `field`'s docs ask the render function not to). A user expects
/// logging not to take the request down, and the span not to be leaked in the registry.
#[test]
fn a_panicking_display_in_a_key_field_neither_panics_the_log_call_nor_leaks_the_span() {
    let _serial = serial();
    let fields = SessionFields::new().key("tenant", &TENANT).key("hostile", &HOSTILE);
    let count = SpanCount::default();
    let token = Arc::new(());
    let (event, span) = (Arc::new(Mutex::new(None)), Arc::new(Mutex::new(None)));
    let out = capture_counting(&fields, &count, || {
        scope(hostile_session(Mode::Panic, &token), || {
            *event.lock().unwrap() = Some(catch_unwind(|| tracing::info!("event")).is_ok());
            *span.lock().unwrap() = Some(catch_unwind(|| drop(tracing::info_span!("panicky_span"))).is_ok());
            // The thread still has its session, and logging still works afterwards.
            assert_eq!(current().and_then(|s| s.get_cloned(&TENANT)).as_deref(), Some("acme"));
        });
        assert!(current().is_none());
        tracing::info!("after");
    });
    assert!(out.lines().last().is_some_and(|l| l.ends_with("after") && !l.contains("acme")), "{out:?}");
    assert_eq!(Arc::strong_count(&token), 1, "the session was leaked");
    let (opened, closed) = (count.0.0.load(Ordering::SeqCst), count.0.1.load(Ordering::SeqCst));
    assert_eq!(opened, closed, "{opened} spans opened in the registry, {closed} closed: a span leaked");
    assert_eq!(*event.lock().unwrap(), Some(true), "a panicking Display made tracing::info! panic");
    assert_eq!(*span.lock().unwrap(), Some(true), "a panicking Display made info_span! panic");
}

/// `Display` that reads `current()`, opens a scope of another session and logs, from inside
/// the log call (for an event and for a span): no deadlock, no panic, the right values, the
/// thread's binding as before, nothing leaked.
#[test]
fn a_display_that_reenters_the_library_and_logs_works() {
    let _serial = serial();
    let fields = SessionFields::new().key("hostile", &HOSTILE);
    let token = Arc::new(());
    let out = capture(&fields, || {
        scope(hostile_session(Mode::Reenter, &token), || {
            tracing::info!("outer");
            tracing::info_span!("reentrant").in_scope(|| ());
            assert_eq!(current().and_then(|s| s.get_cloned(&TENANT)).as_deref(), Some("acme"));
        });
    });
    assert!(current().is_none());
    assert_eq!(Arc::strong_count(&token), 1, "the session was leaked");
    let outer = out.lines().find(|l| l.ends_with("outer")).unwrap_or_else(|| panic!("{out:?}"));
    assert!(outer.starts_with("hostile=acme/inner "), "{out:?}");
    // The event logged from inside `Display` is dropped by tracing itself (its dispatcher is not
    // re-entered while it dispatches), so it is not asserted either way.
}

/// `Display` that unbinds the very session being rendered: the borrowed session stays alive
/// for the render (no use-after-free), and is dropped afterwards (no leak).
#[test]
fn a_display_that_unbinds_the_session_being_rendered_is_safe_and_leaks_nothing() {
    let _serial = serial();
    let fields = SessionFields::new().key("tenant", &TENANT).key("hostile", &HOSTILE);
    let token = Arc::new(());
    let out = capture(&fields, || {
        bind(hostile_session(Mode::Unbind, &token)).unwrap();
        tracing::info!("first");
        assert!(current().is_none(), "Display unbound the session");
        tracing::info!("second");
    });
    assert_eq!(Arc::strong_count(&token), 1, "the unbound session was leaked");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out:?}");
    assert!(lines[0].starts_with("tenant=acme hostile=unbound "), "{out:?}");
    assert!(!lines[1].contains("tenant="), "{out:?}");
}

// ---------------------------------------------------------------------------------------------
// 2. Thread helpers, resets, the shared-worker marker, inline jobs
// ---------------------------------------------------------------------------------------------

/// Two request threads spawn with every helper (`go`, `go_session`, `Builder`, `ScopeExt`)
/// and run inline jobs (`with_session`, `in_current_session`) while a third thread resets the
/// default manager over and over. Every unit sees its own request or nothing — never another
/// request's — and after everything ends no session is left alive.
#[test]
fn resets_racing_every_thread_helper_never_show_another_requests_session_and_leak_nothing() {
    let _serial = serial();
    const ROUNDS: u64 = 120;
    let token = Arc::new(());
    let done = Arc::new(AtomicBool::new(false));
    let resets = Arc::new(AtomicUsize::new(0));
    let resetter = {
        let (done, resets) = (done.clone(), resets.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) || resets.load(Ordering::Relaxed) < 20 {
                reset();
                resets.fetch_add(1, Ordering::Relaxed);
                std::thread::yield_now();
            }
        })
    };
    let workers: Vec<_> = (1..=2u64)
        .map(|w| {
            let token = token.clone();
            std::thread::spawn(move || {
                for i in 0..ROUNDS {
                    let me = w * 1_000_000 + i * 10;
                    let mine = |seen: Option<u64>, expect: u64| {
                        assert!(seen.is_none() || seen == Some(expect), "unit of {expect} saw {seen:?}");
                    };
                    bind(named(me, &token)).unwrap();
                    mine(go(who).join().unwrap(), me);
                    mine(go_session(named(me + 1, &token), who).join().unwrap(), me + 1);
                    mine(Builder::new().spawn(who).unwrap().join().unwrap(), me);
                    mine(Builder::new().session(named(me + 2, &token)).spawn(who).unwrap().join().unwrap(), me + 2);
                    std::thread::scope(|s| {
                        mine(s.go(who).join().unwrap(), me);
                        mine(s.go_session(named(me + 3, &token), who).join().unwrap(), me + 3);
                    });
                    mine(with_session(Some(named(me + 4, &token)), who)(), me + 4);
                    mine(who(), me);
                    mine(in_current_session(who)(), me);
                    let job = in_current_session(who);
                    mine(std::thread::spawn(job).join().unwrap(), me);
                    mine(who(), me);
                    drop(unbind());
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    done.store(true, Ordering::Relaxed);
    resetter.join().unwrap();
    assert!(resets.load(Ordering::Relaxed) >= 20);
    assert_eq!(Arc::strong_count(&token), 1, "sessions survived their threads");
}

/// A thread spawned with a request's session outlives its parent, which disables the session
/// and ends: the thread sees the session as ended, its log lines carry none of the request's
/// fields (documented for ended sessions), and the session is freed when it ends.
#[test]
fn a_thread_that_outlives_its_parents_disable_logs_no_identity_and_frees_the_session() {
    let _serial = serial();
    let token = Arc::new(());
    let (tx, rx) = mpsc::channel::<()>();
    let fields = tenant_fields();
    let t = token.clone();
    let parent = std::thread::spawn(move || {
        let session = request("acme", "ann").with_value("token", t);
        let child = go_session(session.clone(), move || {
            rx.recv().unwrap(); // until the parent disabled the session and ended
            let valid = current().map(|s| s.is_valid());
            let lines = capture(&tenant_fields(), || tracing::info!("late work"));
            let grandchild = go(move || current().map(|s| s.is_valid())).join().unwrap();
            (valid, lines, grandchild)
        });
        session.disable();
        child
    });
    let child = parent.join().unwrap();
    tx.send(()).unwrap();
    let (valid, lines, grandchild) = child.join().unwrap();
    assert_eq!(valid, Some(false));
    assert_eq!(grandchild, Some(false));
    assert!(!lines.contains("acme") && !lines.contains("ann"), "{lines:?}");
    assert!(fields.current_values().is_empty());
    assert_eq!(Arc::strong_count(&token), 1, "the session outlived every thread");
}

/// A reset while a `go_session` thread runs: the thread loses the session from then on, and
/// the session is freed when the thread ends (nothing keeps it).
#[test]
fn a_reset_while_a_go_thread_runs_ends_its_binding_and_frees_it() {
    let _serial = serial();
    let token = Arc::new(());
    let barrier = Arc::new(Barrier::new(2));
    let b = barrier.clone();
    let h = go_session(named(7, &token), move || {
        let before = who();
        b.wait();
        b.wait(); // the reset ran
        let after = who();
        let inline = with_session(Some(named(8, &Arc::new(()))), who)();
        (before, after, inline, who())
    });
    barrier.wait();
    reset();
    barrier.wait();
    assert_eq!(h.join().unwrap(), (Some(7), None, Some(8), None));
    assert_eq!(Arc::strong_count(&token), 1);
}

/// The docs: "unlike any other binding, a reset_default_manager does not end it (...): a
/// thread that holds it still holds it after a reset."
#[test]
fn the_shared_worker_marker_survives_a_reset_from_another_thread() {
    let _serial = serial();
    let marker = shared_worker_session();
    bind(marker.clone()).unwrap();
    reset_elsewhere();
    assert!(current().is_some_and(|s| is_shared_worker_session(&s)), "a reset ended the shared-worker marker");
    // And on a thread that got it through go_session.
    let (tx, rx) = mpsc::channel::<()>();
    let h = go_session(marker, move || {
        rx.recv().unwrap();
        current().is_some_and(|s| is_shared_worker_session(&s))
    });
    reset_elsewhere();
    tx.send(()).unwrap();
    assert!(h.join().unwrap(), "a reset ended the marker of a go_session thread");
    drop(unbind());
}

/// A shared worker (marker bound) runs a pool job inline after a reset: the job's scope must
/// give the worker its marker back, as it does without a reset.
#[test]
fn the_shared_worker_marker_survives_an_inline_job_run_after_a_reset() {
    let _serial = serial();
    bind(shared_worker_session()).unwrap();
    reset_elsewhere();
    let token = Arc::new(());
    assert_eq!(with_session(Some(named(1, &token)), who)(), Some(1));
    let after_with_session = current().is_some_and(|s| is_shared_worker_session(&s));
    scope(named(2, &token), || ());
    let after_scope = current().is_some_and(|s| is_shared_worker_session(&s));
    drop(unbind());
    assert_eq!(Arc::strong_count(&token), 1);
    assert!(after_with_session, "an inline job after a reset dropped the shared-worker marker");
    assert!(after_scope, "a scope after a reset dropped the shared-worker marker");
}

/// A reset lands while a shared worker runs an inline job: when the job ends the worker must
/// still hold the marker (no reset ends it).
#[test]
fn the_shared_worker_marker_survives_a_reset_during_an_inline_job() {
    let _serial = serial();
    bind(shared_worker_session()).unwrap();
    let token = Arc::new(());
    let seen = in_current_session(|| {
        let inside = current().is_some_and(|s| is_shared_worker_session(&s));
        reset_elsewhere();
        inside
    })();
    assert!(seen);
    let after_job = current().is_some_and(|s| is_shared_worker_session(&s));
    bind(shared_worker_session()).unwrap();
    with_session(Some(named(3, &token)), reset_elsewhere)();
    let after_given_job = current().is_some_and(|s| is_shared_worker_session(&s));
    drop(unbind());
    assert_eq!(Arc::strong_count(&token), 1);
    assert!(after_job, "a reset during an inline in_current_session job dropped the shared-worker marker");
    assert!(after_given_job, "a reset during an inline with_session job dropped the shared-worker marker");
}

/// An inline job that unbinds, binds several sessions and then panics: the caller gets exactly
/// its binding back, and every session the job bound is freed.
#[test]
fn an_inline_job_that_unbinds_rebinds_and_panics_restores_the_caller_and_frees_its_sessions() {
    let _serial = serial();
    let caller_token = Arc::new(());
    let job_token = Arc::new(());
    let caller = named(100, &caller_token);
    bind(caller.clone()).unwrap();
    let jt = job_token.clone();
    let r = catch_unwind(AssertUnwindSafe(|| {
        in_current_session(move || {
            assert_eq!(who(), Some(100));
            drop(unbind());
            assert_eq!(who(), None);
            for i in 0..5 {
                bind(named(200 + i, &jt)).unwrap();
            }
            let nested = with_session(Some(named(300, &jt)), || {
                drop(unbind());
                who()
            })();
            assert_eq!(nested, None);
            assert_eq!(who(), Some(204));
            panic!("job failed");
        })()
    }));
    assert!(r.is_err());
    assert!(current().is_some_and(|s| s.ptr_eq(&caller)), "the caller's exact binding was not restored");
    assert_eq!(Arc::strong_count(&job_token), 1, "sessions the job bound were leaked");
    drop(unbind());
    drop(caller);
    assert_eq!(Arc::strong_count(&caller_token), 1);
}

/// The documented behaviour of a reset inside an inline job: the caller's pre-reset binding
/// is not restored; nothing from before the reset is leaked either.
#[test]
fn a_reset_inside_an_inline_job_does_not_restore_the_pre_reset_binding_and_leaks_nothing() {
    let _serial = serial();
    let token = Arc::new(());
    bind(named(1, &token)).unwrap();
    let inside = with_session(Some(named(2, &token)), || {
        reset_elsewhere();
        let after_reset = who();
        bind(named(3, &token)).unwrap();
        (after_reset, who())
    })();
    assert_eq!(inside, (None, Some(3)));
    assert_eq!(who(), None, "the pre-reset binding came back after the job");
    assert_eq!(Arc::strong_count(&token), 1, "a session from before the reset was leaked");
}

// ---------------------------------------------------------------------------------------------
// 3. MetaInfo <-> OpenTelemetry baggage
// ---------------------------------------------------------------------------------------------

fn with_persistent(pairs: &[(&str, &str)]) -> Context {
    pairs.iter().fold(Context::background(), |ctx, (k, v)| MetaInfo::with_persistent(&ctx, k, v))
}

fn sorted_persistent(ctx: &Context) -> Vec<(String, String)> {
    let mut v: Vec<_> = MetaInfo::of(ctx).persistent_values().map(|(k, v)| (k.to_owned(), v.to_owned())).collect();
    v.sort();
    v
}

/// Values may hold anything (the propagator percent-encodes them on the wire): separators,
/// percent signs, pre-encoded text, quotes, controls, non-ASCII, empty. They round-trip
/// exactly, and keys made of every character a token allows do too.
#[test]
fn hostile_values_and_every_token_character_round_trip_exactly() {
    let _serial = serial();
    let token_chars: String = (0x21u8..0x7f).map(char::from).filter(|c| !"(),/:;<=>?@[\\]{}\"".contains(*c)).collect();
    let pairs = [
        ("sep", "a,b;c=d"),
        ("pct", "100%"),
        ("encoded", "%2C%3B%3D%25"),
        ("quote", "\"x\" 'y'"),
        ("ctl", "line1\nline2\r\0\t"),
        ("uni", "ünïcödé ✓ \u{202e}"),
        ("empty", ""),
        ("props", "v;prop=1;flag"),
        (token_chars.as_str(), "token"),
    ];
    let ctx = with_persistent(&pairs);
    let baggage = try_baggage_from_metainfo(&ctx).unwrap();
    assert_eq!(baggage.len(), pairs.len());
    for (k, v) in &pairs {
        assert_eq!(baggage.get(k).map(|s| s.as_str()), Some(*v), "key {k:?}");
    }
    let back = metainfo_with_baggage(&Context::background(), &baggage);
    assert_eq!(sorted_persistent(&back), sorted_persistent(&ctx));
    assert_eq!(baggage_from_metainfo(&ctx).len(), pairs.len());
}

/// Every key baggage refuses (each separator, space, empty, non-ASCII, controls) is named by
/// the strict conversion — also in the message, quoted so that a hostile key cannot break it —
/// and left out (alone) by the lenient one. No panic.
#[test]
fn each_refused_key_is_named_and_left_out_alone() {
    let _serial = serial();
    let mut bad: Vec<String> = "(),/:;<=>?@[\\]{}\"".chars().map(|c| format!("k{c}k")).collect();
    bad.extend(["", "a b", "tënant", "a\nb", "a\tb", "\u{7f}", "%", "k=v,x=y"].map(str::to_owned));
    // `%` is a valid token character; the others are not.
    bad.retain(|k| k != "%");
    for key in &bad {
        let ctx = with_persistent(&[("good", "1"), (key.as_str(), "v"), ("~ok", "2")]);
        let err = try_baggage_from_metainfo(&ctx).unwrap_err();
        assert_eq!(err.key(), key);
        let msg = err.to_string();
        assert!(msg.contains(&format!("{key:?}")), "{msg}");
        assert!(!msg.contains('\n'), "a key broke the error message onto two lines: {msg:?}");
        let lenient = baggage_from_metainfo(&ctx);
        assert_eq!(lenient.len(), 2, "key {key:?}");
        assert!(lenient.get("good").is_some() && lenient.get("~ok").is_some());
    }
    assert!(try_baggage_from_metainfo(&with_persistent(&[("%", "pct key")])).is_ok());
}

/// The 8192-byte limit counts keys and values: exactly 8192 fits, one byte more is refused
/// and named, by key, in key order. The lenient conversion keeps what fits.
#[test]
fn the_8192_byte_limit_is_exact_and_the_overflowing_key_is_named() {
    let _serial = serial();
    let fits = "v".repeat(8191);
    assert_eq!(try_baggage_from_metainfo(&with_persistent(&[("k", &fits)])).unwrap().len(), 1);
    let over = "v".repeat(8192);
    let err = try_baggage_from_metainfo(&with_persistent(&[("k", &over)])).unwrap_err();
    assert_eq!(err.key(), "k");
    assert!(baggage_from_metainfo(&with_persistent(&[("k", &over)])).is_empty());

    // Three entries of 3000 bytes: "a" and "b" fit (6000), "c" would make 9000.
    let v = "x".repeat(2999);
    let ctx = with_persistent(&[("c", &v), ("a", &v), ("b", &v)]);
    assert_eq!(try_baggage_from_metainfo(&ctx).unwrap_err().key(), "c");
    let lenient = baggage_from_metainfo(&ctx);
    assert_eq!(lenient.len(), 2);
    assert!(lenient.get("c").is_none());
    // Multi-byte characters count in bytes: 4096 two-byte characters with a one-byte key.
    let wide = "é".repeat(4096);
    assert!(try_baggage_from_metainfo(&with_persistent(&[("w", &wide)])).is_err());
    assert!(try_baggage_from_metainfo(&with_persistent(&[("w", &"é".repeat(4095))])).is_ok());
}

/// Thousands of entries and a 1 MiB value: no panic, the lenient conversion keeps 64, the
/// strict one names the 65th key in key order.
#[test]
fn many_entries_and_huge_values_are_refused_without_panicking() {
    let _serial = serial();
    let mut meta = MetaInfo::default();
    for i in 0..5_000 {
        meta.set_persistent(&format!("k{i:05}"), "v");
    }
    meta.set_persistent("zz-huge", &"h".repeat(1 << 20));
    let ctx = MetaInfo::attach(&Context::background(), meta);
    assert_eq!(baggage_from_metainfo(&ctx).len(), 64);
    assert_eq!(try_baggage_from_metainfo(&ctx).unwrap_err().key(), "k00064");
    let kept = baggage_from_metainfo(&ctx);
    assert!(kept.get("k00063").is_some() && kept.get("k00064").is_none());
}

/// Baggage -> metainfo -> baggage, with metadata and a full (64-entry, near-8192-byte)
/// baggage: values exact, metadata dropped (documented), transient values untouched.
#[test]
fn a_full_baggage_round_trips_through_metainfo() {
    let _serial = serial();
    let mut baggage = Baggage::new();
    for i in 0..64 {
        let value = format!("{i};=,%{}", "p".repeat(110));
        assert!(baggage.insert_with_metadata(format!("key{i:02}"), value, "m=1").is_none());
    }
    assert_eq!(baggage.len(), 64);
    let ctx = MetaInfo::with_transient(&Context::background(), "hop", "1");
    let ctx = metainfo_with_baggage(&ctx, &baggage);
    assert_eq!(MetaInfo::of(&ctx).count_persistent(), 64);
    assert_eq!(MetaInfo::of(&ctx).transient("hop"), Some("1"));
    let again = try_baggage_from_metainfo(&ctx).unwrap();
    assert_eq!(again.len(), 64);
    for (k, (v, _)) in &baggage {
        let back = again.get_with_metadata(k.as_str()).unwrap();
        assert_eq!(back.0.as_str(), v.as_str());
        assert_eq!(back.1.as_str(), "", "metadata is dropped");
    }
    // An empty baggage leaves the context as it was.
    let same = metainfo_with_baggage(&ctx, &Baggage::new());
    assert_eq!(sorted_persistent(&same), sorted_persistent(&ctx));
}
