//! Timers of the timer clock ([`TimerClock`](super::TimerClock), chosen by bit 2 of the first
//! byte): the clock records each [`Expiry`](super::Expiry) it is asked for, and `FireTimers`
//! fires the due ones, fires or drops one, or polls one's `settled()` future.
//!
//! The model: a scope with a deadline asks the clock once, the first time a `done()` poll stays
//! pending or an `after_cancel` callback is registered on it while it is live; the timer is for
//! its (effective) deadline. Firing a due timer settles the scope with `DeadlineExceeded`, which
//! runs its callbacks — exactly once, as `check_callbacks` checks after every operation.

use super::{Cause, Interp, TIMERS, pick};

impl Interp {
    /// After a pending poll or a registration on live scope `s`: the clock was asked for its
    /// timer if it has a deadline and had not asked before.
    pub(super) fn expect_arm(&mut self, s: usize, what: &str) {
        let real = TIMERS.with(|t| t.borrow().len());
        if self.uses_timers()
            && !self.scopes[s].armed
            && self.scopes[s].settled.is_none()
            && let Some(at) = self.scopes[s].deadline
        {
            self.scopes[s].armed = true;
            self.timers.push((at, s));
        }
        assert_eq!(real, self.timers.len(), "{what}: timers scheduled");
        if let Some(&(at, _)) = self.timers.last() {
            let got = TIMERS.with(|t| t.borrow().last().map(|(at, _)| *at));
            assert_eq!(got.map(|d| d.as_millis()), Some(u128::from(at)), "{what}: the timer's instant");
        }
    }

    fn uses_timers(&self) -> bool {
        self.timer_clock
    }

    pub(super) fn check_timers(&self, what: &str) {
        TIMERS.with(|t| {
            let t = t.borrow();
            assert_eq!(t.len(), self.timers.len(), "{what}: timers");
            for ((at, expiry), &(want_at, s)) in t.iter().zip(&self.timers) {
                assert_eq!(at.as_millis(), u128::from(want_at), "{what}: timer instant");
                let deadline = expiry.deadline().map(|d| d.since_origin().as_millis());
                assert_eq!(deadline, Some(u128::from(want_at)), "{what}: Expiry::deadline");
                assert_eq!(expiry.is_settled(), self.scopes[s].settled.is_some(), "{what}: Expiry::is_settled");
            }
        });
    }

    pub(super) fn fire_timers(&mut self, i: u8, how: u8) {
        self.check_timers("before firing timers");
        match how % 4 {
            // Every due timer, in order.
            0 => {
                let mut j = 0;
                while j < self.timers.len() {
                    if self.timers[j].0 <= self.now {
                        self.fire(j);
                    } else {
                        j += 1;
                    }
                }
            }
            // One, if due.
            1 => {
                if let Some(j) = pick(i, self.timers.len()).filter(|&j| self.timers[j].0 <= self.now) {
                    self.fire(j);
                }
            }
            // Dropped unfired (a runtime shutting down): the scope is not armed again.
            2 => {
                if let Some(j) = pick(i, self.timers.len()) {
                    self.timers.remove(j);
                    drop(TIMERS.with(|t| t.borrow_mut().remove(j)));
                }
            }
            // Poll its `settled()` future.
            _ => {
                let Some(j) = pick(i, self.timers.len()) else { return };
                let s = self.timers[j].1;
                let mut fut = TIMERS.with(|t| t.borrow()[j].1.settled());
                self.poll_done(&mut fut, Some(s));
            }
        }
        self.check_all_validity("after timers");
        self.check_timers("after timers");
    }

    /// Fires timer `j` (due).
    fn fire(&mut self, j: usize) {
        let (_, s) = self.timers.remove(j);
        let (_, expiry) = TIMERS.with(|t| t.borrow_mut().remove(j));
        expiry.fire();
        self.settle(s, Cause::Deadline);
    }
}

#[cfg(test)]
mod tests {
    use super::super::Interp;

    /// The interpreter told the clocks apart by address; both are zero-sized statics, which
    /// debug builds (and the fuzz build) placed at one address, so a run without the timer
    /// clock expected timers that were never scheduled (a fuzz crash, found 2026-12-01).
    #[test]
    fn the_plain_clock_is_not_taken_for_the_timer_clock() {
        assert!(!Interp::new(1, false).uses_timers());
        assert!(Interp::new(1, true).uses_timers());
    }
}
