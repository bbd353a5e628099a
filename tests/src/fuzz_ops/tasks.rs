//! The [`TaskTable`](localsession_core::TaskTable): spawned, rebind, terminated (also before
//! the spawn, as tokio's hooks may report it), entries with attachments, and sweep.
//!
//! The model keeps, per task id, `Live(session, attachment)` or `Ended` (a tombstone: the
//! terminate came first), and each shard's tombstones in order, evicting the oldest past
//! [`TaskTable::TOMBSTONES_PER_SHARD`]. The shard of an id is the table's own (a multiplicative
//! mix of the id, top 4 bits): that is the one internal the model copies, so that
//! `TaskTerminateMany` can check eviction.

use std::collections::VecDeque;

use localsession_core::{TaskAttachment, TaskTable};

use super::{AnySession, Arc, Entry, HashMap, Interp, pick, same_session};

const SHARDS: usize = 16;

fn shard(id: u64) -> usize {
    (id.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 60) as usize % SHARDS
}

/// A task id: mostly 0 to 23, a few near the top of the range.
fn task_id(b: u8) -> u64 {
    if b >= 240 { u64::MAX - u64::from(b - 240) } else { u64::from(b % 24) }
}

enum Slot {
    Live(Option<Entry>, Option<u8>),
    Ended,
}

#[derive(Default)]
pub(super) struct TaskModel {
    slots: HashMap<u64, Slot>,
    tombstones: [VecDeque<u64>; SHARDS],
}

fn attachment(a: u8) -> TaskAttachment {
    Arc::new(a)
}

fn attachment_is(got: Option<&TaskAttachment>, want: Option<u8>, what: &str) {
    let got = got.map(|a| *a.downcast_ref::<u8>().expect("a u8 attachment"));
    assert_eq!(got, want, "{what}: attachment");
}

impl TaskModel {
    /// `spawned_with`: what it hands back.
    fn spawned(&mut self, id: u64, session: Option<Entry>, att: Option<u8>) -> (Option<Entry>, Option<u8>) {
        match self.slots.get_mut(&id) {
            Some(Slot::Ended) => {
                self.slots.remove(&id);
                self.tombstones[shard(id)].retain(|&t| t != id);
                (session, att)
            }
            Some(Slot::Live(s, a)) => (std::mem::replace(s, session), std::mem::replace(a, att)),
            None => {
                self.slots.insert(id, Slot::Live(session, att));
                (None, None)
            }
        }
    }

    fn terminated(&mut self, id: u64) -> (Option<Entry>, Option<u8>) {
        match self.slots.remove(&id) {
            Some(Slot::Live(s, a)) => (s, a),
            Some(Slot::Ended) => {
                self.slots.insert(id, Slot::Ended);
                (None, None)
            }
            None => {
                let stones = &mut self.tombstones[shard(id)];
                if stones.len() == TaskTable::TOMBSTONES_PER_SHARD
                    && let Some(oldest) = stones.pop_front()
                {
                    self.slots.remove(&oldest);
                }
                stones.push_back(id);
                self.slots.insert(id, Slot::Ended);
                (None, None)
            }
        }
    }

    fn live(&self, id: u64) -> (Option<&Entry>, Option<u8>) {
        match self.slots.get(&id) {
            Some(Slot::Live(s, a)) => (s.as_ref(), *a),
            _ => (None, None),
        }
    }
}

impl Interp {
    pub(super) fn check_tasks(&self, what: &str) {
        let m = &self.task_model;
        let tasks = m.slots.values().filter(|s| matches!(s, Slot::Live(..))).count();
        let sessions = m.slots.values().filter(|s| matches!(s, Slot::Live(Some(_), _))).count();
        assert_eq!(self.tasks.tasks(), tasks, "{what}: tasks()");
        assert_eq!(self.tasks.sessions(), sessions, "{what}: sessions()");
        for id in (0..24).chain((0..16).map(|i| u64::MAX - i)) {
            let (s, a) = m.live(id);
            same_session(self.tasks.session(id).as_ref(), s, what);
            let (real_s, real_a) = self.tasks.entry(id);
            same_session(real_s.as_ref(), s, what);
            attachment_is(real_a.as_ref(), a, what);
        }
    }

    pub(super) fn task_op(&mut self, kind: u8, id: u8, s: u8) {
        let id = task_id(id);
        let entry = pick(s, self.sessions.len()).map(|i| self.sessions[i].clone());
        match kind % 8 {
            0 | 1 => {
                let session = if kind.is_multiple_of(8) { entry } else { None };
                let got = self.tasks.spawned(id, session.as_ref().map(|e| e.real.clone()));
                let (want, _) = self.task_model.spawned(id, session, None);
                same_session(got.as_ref(), want.as_ref(), "spawned: handed back");
            }
            2 => {
                let (real_s, real_a) =
                    self.tasks.spawned_with(id, entry.as_ref().map(|e| e.real.clone()), Some(attachment(s)));
                let (want_s, want_a) = self.task_model.spawned(id, entry, Some(s));
                same_session(real_s.as_ref(), want_s.as_ref(), "spawned_with: handed back");
                attachment_is(real_a.as_ref(), want_a, "spawned_with");
            }
            3 | 4 => {
                let session = if kind % 8 == 3 { entry } else { None };
                let got = self.tasks.rebind(id, session.as_ref().map(|e| &e.real));
                let want = match self.task_model.slots.get_mut(&id) {
                    Some(Slot::Live(cur, _)) => match (cur.as_ref(), session.as_ref()) {
                        (Some(a), Some(b)) if a.real.ptr_eq(&b.real) => None,
                        (None, None) => None,
                        _ => std::mem::replace(cur, session),
                    },
                    _ => None,
                };
                same_session(got.as_ref(), want.as_ref(), "rebind: previous session");
            }
            5 => {
                let got = self.tasks.terminated(id);
                let (want, _) = self.task_model.terminated(id);
                same_session(got.as_ref(), want.as_ref(), "terminated");
            }
            6 => {
                let (real_s, real_a) = self.tasks.terminated_with(id);
                let (want_s, want_a) = self.task_model.terminated(id);
                same_session(real_s.as_ref(), want_s.as_ref(), "terminated_with");
                attachment_is(real_a.as_ref(), want_a, "terminated_with");
            }
            _ => {
                let cleared = self.tasks.sweep(AnySession::is_valid);
                let doomed: Vec<u64> = (self.task_model.slots.iter())
                    .filter_map(|(&id, slot)| match slot {
                        Slot::Live(Some(e), _) if self.done(Some(self.scope_of(&e.model))) => Some(id),
                        _ => None,
                    })
                    .collect();
                let mut want = Vec::new();
                for id in doomed {
                    if let Some(Slot::Live(cur, _)) = self.task_model.slots.get_mut(&id) {
                        want.extend(cur.take());
                    }
                }
                assert_eq!(cleared.len(), want.len(), "sweep: sessions cleared");
                for c in &cleared {
                    assert!(want.iter().any(|w| w.real.ptr_eq(c)), "sweep cleared a session it should keep");
                    assert!(!c.is_valid(), "sweep cleared a valid session");
                }
            }
        }
        self.check_tasks("after a task-table operation");
    }

    /// Terminates `n * 8 + 1` unseen ids before their spawn (tombstones, evicting the oldest
    /// of a full shard), then spawns the first few: a tombstone hands the session back, an
    /// evicted one does not.
    pub(super) fn task_terminate_many(&mut self, n: u8, base: u8) {
        let first = 1_000 + u64::from(base) * 4_096;
        let count = usize::from(n) * 8 + 1;
        for id in (first..).take(count) {
            let got = self.tasks.terminated(id);
            let (want, _) = self.task_model.terminated(id);
            same_session(got.as_ref(), want.as_ref(), "terminate before spawn");
        }
        let entry = self.sessions.first().cloned();
        for id in (first..).take(4) {
            let got = self.tasks.spawned(id, entry.as_ref().map(|e| e.real.clone()));
            let (want, _) = self.task_model.spawned(id, entry.clone(), None);
            same_session(got.as_ref(), want.as_ref(), "spawn after terminate");
            let got = self.tasks.terminated(id);
            let (want, _) = self.task_model.terminated(id);
            same_session(got.as_ref(), want.as_ref(), "terminate after spawn");
        }
        self.check_tasks("after many terminates");
    }
}
