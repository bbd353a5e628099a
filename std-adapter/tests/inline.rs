//! Wrapped closures run inline keep the caller's binding (issue "isolation", part A): what a
//! thread had bound before `in_current_session(f)()` / `with_session(s, f)()` is bound again
//! afterwards — also when `f` panics or binds something itself — while threads spawned for a
//! closure (`go`, `go_session`) end with nothing bound.
#![allow(missing_docs)]

use std::panic::{AssertUnwindSafe, catch_unwind};

use localsession_core::{AnySession, SessionMap};
use localsession_std::{bind, current, go, go_session, in_current_session, scope, unbind, with_session};

fn named(who: &'static str) -> AnySession {
    SessionMap::new().with_value("who", who).into()
}

fn who() -> Option<&'static str> {
    current().and_then(|s| s.value_cloned::<&'static str, _>(&"who"))
}

#[test]
fn an_inline_in_current_session_job_keeps_the_callers_binding() {
    scope(named("caller"), || {
        // `rayon::join(a, b)` runs `a` inline on the calling thread.
        let seen = in_current_session(who)();
        assert_eq!(seen, Some("caller"));
        assert_eq!(who(), Some("caller"), "the caller lost its session after an inline job");
    });
    assert!(current().is_none());
}

#[test]
fn an_inline_with_session_job_restores_the_callers_binding() {
    scope(named("caller"), || {
        assert_eq!(with_session(Some(named("job")), who)(), Some("job"));
        assert_eq!(who(), Some("caller"));
        // `with_session(None, f)` hides the caller's session from `f` only.
        assert_eq!(with_session(None, who)(), None);
        assert_eq!(who(), Some("caller"), "with_session(None, f)() wiped the caller's session");
    });
}

#[test]
fn a_panic_inside_an_inline_job_restores_the_callers_binding() {
    bind(named("caller")).unwrap();
    let r = catch_unwind(AssertUnwindSafe(|| with_session(Some(named("job")), || panic!("job failed"))()));
    assert!(r.is_err());
    assert_eq!(who(), Some("caller"));
    let r = catch_unwind(AssertUnwindSafe(|| {
        in_current_session(|| {
            bind(named("rebound inside")).unwrap();
            panic!("job failed after binding")
        })()
    }));
    assert!(r.is_err());
    assert_eq!(who(), Some("caller"));
    unbind();
}

#[test]
fn a_bind_inside_an_inline_job_ends_with_the_job() {
    scope(named("caller"), || {
        let inner = with_session(None, || {
            bind(named("bound by the job")).unwrap();
            who()
        })();
        assert_eq!(inner, Some("bound by the job"));
        assert_eq!(who(), Some("caller"));
    });
}

#[test]
fn nested_inline_jobs_restore_each_level() {
    scope(named("outer"), || {
        let trail = with_session(Some(named("level 1")), || {
            let deeper = with_session(Some(named("level 2")), || {
                let deepest = in_current_session(who)();
                (deepest, who())
            })();
            (deeper, who())
        })();
        assert_eq!(trail, ((Some("level 2"), Some("level 2")), Some("level 1")));
        assert_eq!(who(), Some("outer"));
    });
}

#[test]
fn with_nothing_bound_before_an_inline_job_leaves_nothing_bound() {
    assert!(current().is_none());
    assert_eq!(with_session(Some(named("job")), who)(), Some("job"));
    assert!(current().is_none());
}

#[test]
fn pool_threads_and_spawned_threads_end_empty() {
    // A job shipped to another thread leaves that thread as it found it: empty.
    let job = scope(named("request"), || in_current_session(|| (who(), current().is_some())));
    let after = std::thread::spawn(move || {
        let seen = job();
        (seen, current().is_none())
    })
    .join()
    .unwrap();
    assert_eq!(after, ((Some("request"), true), true));
    // `go`/`go_session`: the fresh thread unbinds at the end, even what `f` bound itself.
    let h = scope(named("request"), || {
        go(|| {
            bind(named("bound in thread")).unwrap();
            who()
        })
    });
    assert_eq!(h.join().unwrap(), Some("bound in thread"));
    assert_eq!(go_session(named("given"), who).join().unwrap(), Some("given"));
}
