//! Large maps and contexts, and the two-thread mode.
//!
//! `BulkInsert` writes up to 4 200 `u16` keys (256 and up, so they never meet the `u8` keys
//! nor the `1u16` the checks read as absent) into a [`SessionMap`] or derives a
//! [`SessionCtx`] with them: maps and chains pass the index levels (64, 512 and 4 096 keys)
//! and, for maps, many compactions (one every `max(128, 2 * live)` writes). `BulkRemove` writes
//! tombstones. Both check `len` and reads against the model. [`BULK_BUDGET`] bounds the keys a
//! run writes, so runs stay fast.
//!
//! `TwoThreads` runs a batch of writes, reads, `len`s and snapshots on a second thread
//! ([`std::thread::scope`]) while the main thread runs its own batch on the same map, and
//! checks what holds under any interleaving:
//! - mode 0, distinct keys: each thread reads its own writes back; a read of the other
//!   thread's key sees nothing or the one value written to it; `len` never decreases and stays
//!   within the keys that can exist; a snapshot ([`SessionMap::export`]) taken mid-batch reads
//!   the same after the batches as when taken; after the join every write is there (no lost
//!   writes) and `len` is exact;
//! - modes 1 and 2, the same 16 keys: both threads overwrite them (mode 2: the second thread
//!   also removes them), so the map stays small and compacts every 128 writes, concurrently
//!   with the other thread's writes; every read decodes to a value some thread wrote to that
//!   key; after the join each key holds the last write of one of the threads (or, mode 2, is
//!   absent after the second thread's last remove).

use super::{AnySession, Arc, BTreeMap, BigValues, Entry, Interp, SessionModel, pick};
use localsession_core::{Context, SessionCtx, SessionExt, SessionMap};

/// Keys the bulk and two-thread operations may write in one run, in all.
pub(super) const BULK_BUDGET: usize = 4_200;
/// Two-thread batches in one run, at most (each costs two thread handoffs).
pub(super) const TWO_THREAD_RUNS: u8 = 3;
/// Keys per unit of a bulk operation's count byte (255 * 20 = 5 100 keys, more than the
/// run's budget, which lets one operation pass the 4 096-key level).
const BULK_SCALE: usize = 20;
/// The lowest `u16` key the bulk operations use.
const BIG_BASE: u16 = 256;

/// The `u16` key of a bulk operation's `i`-th write.
fn bulk_key(start: u8, i: usize) -> u16 {
    let span = usize::from(u16::MAX - BIG_BASE);
    BIG_BASE + ((usize::from(start) * 251 + i) % span) as u16
}

/// Reads `u16` key `k` as a `u32`.
fn read_big(s: &AnySession, k: u16) -> Option<u32> {
    s.read(&k, |v: Option<&u32>| v.copied())
}

/// Checks up to 64 keys spread over `big`, and two that are never bound.
pub(super) fn check_big_sample(s: &AnySession, big: &BigValues, what: &str) {
    let step = (big.len() / 64).max(1);
    for (&k, &v) in big.iter().step_by(step) {
        assert_eq!(read_big(s, k), Some(v), "{what}: big key {k}");
    }
    assert_eq!(read_big(s, BIG_BASE - 1), None, "{what}: big key never bound");
    if !big.contains_key(&u16::MAX) {
        assert_eq!(read_big(s, u16::MAX), None, "{what}: big key {}", u16::MAX);
    }
}

/// Checks `keys` (all of them up to 600, else 300 spread over them and the last) against `big`.
fn check_written(s: &AnySession, big: &BigValues, keys: &[u16], what: &str) {
    let step = if keys.len() <= 600 { 1 } else { keys.len() / 300 };
    for &k in keys.iter().step_by(step).chain(keys.last()) {
        assert_eq!(read_big(s, k), big.get(&k).copied(), "{what}: key {k}");
    }
}

/// A value written by the two-thread mode: the key, the thread and the write's index.
fn tagged(key: u16, thread: u32, i: usize) -> u32 {
    (u32::from(key) << 16) | (thread << 15) | (i as u32 & 0x7fff)
}

impl Interp {
    /// Takes up to `want` keys from the run's budget.
    fn take_budget(&mut self, want: usize) -> usize {
        let n = want.min(self.bulk_budget);
        self.bulk_budget -= n;
        n
    }

    pub(super) fn bulk_insert(&mut self, s: u8, count: u8, start: u8, salt: u8) {
        let Some(i) = pick(s, self.sessions.len()) else { return };
        let e = self.sessions[i].clone();
        if matches!(e.model, SessionModel::Custom { .. }) {
            return;
        }
        let n = self.take_budget(usize::from(count) * BULK_SCALE + 1);
        if n == 0 {
            return; // the run's budget is spent
        }
        let keys: Vec<u16> = (0..n).map(|j| bulk_key(start, j)).collect();
        let value = |j: usize| (j as u32).wrapping_mul(2_654_435_761) ^ u32::from(salt);
        match (&e.real, &e.model) {
            (AnySession::Map(m), SessionModel::Map { map }) => {
                for (j, &k) in keys.iter().enumerate() {
                    match j % 8 {
                        // The erased path stores use, now and then.
                        0 => drop(SessionExt::with_value(m, k, value(j))),
                        _ => m.insert(k, value(j)),
                    }
                }
                let model = &mut self.maps[*map];
                for (j, &k) in keys.iter().enumerate() {
                    model.big.insert(k, value(j));
                }
                let len = model.values.len() + model.big.len();
                assert_eq!(m.len(), len, "len after a bulk insert of {n}");
                check_written(&e.real, &self.maps[*map].big, &keys, "bulk insert into a map");
            }
            (AnySession::Ctx(c), SessionModel::Ctx { scope, values, big, meta }) => {
                let mut ctx: SessionCtx = c.clone();
                let mut big = BigValues::clone(big);
                for (j, &k) in keys.iter().enumerate() {
                    ctx = ctx.with_value(k, value(j));
                    big.insert(k, value(j));
                }
                let real: AnySession = ctx.into();
                check_written(&real, &big, &keys, "bulk derive");
                let model =
                    SessionModel::Ctx { scope: *scope, values: values.clone(), big: Arc::new(big), meta: meta.clone() };
                let ident = self.fresh_ident();
                self.push_session(Entry { real, model, ident });
            }
            (real, m) => panic!("session kind differs from the model: {real:?} vs {m:?}"),
        }
        self.check_session(&e, "after a bulk insert");
    }

    pub(super) fn bulk_remove(&mut self, s: u8, count: u8, start: u8) {
        let Some(i) = pick(s, self.sessions.len()) else { return };
        let e = self.sessions[i].clone();
        let (AnySession::Map(m), SessionModel::Map { map }) = (&e.real, &e.model) else { return };
        let n = self.take_budget(usize::from(count) * BULK_SCALE / 2 + 1);
        if n == 0 {
            return;
        }
        let model = &mut self.maps[*map];
        // Bound keys from the `start`-th on, and as many never-bound ones.
        let skip = usize::from(start) * model.big.len() / 256;
        let bound: Vec<u16> = model.big.keys().skip(skip).take(n).copied().collect();
        for &k in &bound {
            assert!(m.remove(&k), "remove of bound key {k}");
            model.big.remove(&k);
        }
        for j in 0..n.min(64) {
            let k = bulk_key(start.wrapping_add(128), j);
            assert_eq!(m.remove(&k), model.big.remove(&k).is_some(), "remove of key {k}");
        }
        assert_eq!(m.len(), model.values.len() + model.big.len(), "len after a bulk remove");
        check_written(&e.real, &self.maps[*map].big, &bound, "bulk remove");
        self.check_session(&e, "after a bulk remove");
    }

    pub(super) fn two_threads(&mut self, s: u8, n: u8, mode: u8) {
        let pooled = pick(s, self.sessions.len()).and_then(|i| {
            let e = &self.sessions[i];
            match (&e.real, &e.model) {
                (AnySession::Map(m), SessionModel::Map { map }) => Some((e.clone(), m.clone(), *map)),
                _ => None,
            }
        });
        let (map, before) = match &pooled {
            Some((_, m, idx)) => (m.clone(), self.maps[*idx].big.clone()),
            None => (SessionMap::new(), BigValues::new()),
        };
        let u8_len = pooled.as_ref().map_or(0, |(_, _, idx)| self.maps[*idx].values.len());
        if self.two_thread_runs == TWO_THREAD_RUNS {
            return;
        }
        self.two_thread_runs += 1;
        let each = self.take_budget(2 * (16 + usize::from(n))) / 2;
        if each == 0 {
            return;
        }
        let after = match mode % 3 {
            0 => distinct_keys(&map, &before, u8_len, each, s),
            m => same_keys(&map, &before, each, m == 2),
        };
        assert_eq!(map.len(), u8_len + after.len(), "len after the two-thread batch");
        if let Some((e, _, idx)) = pooled {
            self.maps[idx].big = after;
            self.check_session(&e, "after the two-thread batch");
        }
    }
}

/// A snapshot taken mid-batch and what it read.
type Snapshot = (Context, Vec<(u16, Option<u32>)>);

/// Mode 0: each thread writes its own keys. Returns the map's `u16` keys afterwards.
fn distinct_keys(map: &SessionMap, before: &BigValues, u8_len: usize, each: usize, s: u8) -> BigValues {
    let base = |t: usize| -> u16 { 0x4000 + 0x4000 * t as u16 + u16::from(s) * 16 };
    let key = |t: usize, i: usize| base(t) + i as u16;
    let value = |k: u16| u32::from(k) * 3 + 1;
    let max_len = u8_len + before.len() + 2 * each;
    let batch = |t: usize| -> Option<Snapshot> {
        let mut snapshot = None;
        let mut last_len = u8_len + before.len();
        for i in 0..each {
            let k = key(t, i);
            if i % 5 == 4 {
                drop(map.with_value(k, value(k)));
            } else {
                map.insert(k, value(k));
            }
            assert_eq!(map.value::<u32, _>(&k).as_deref(), Some(&value(k)), "thread {t} reads its write of {k}");
            if i % 8 == 0 {
                let other = key(1 - t, i);
                let seen = map.read(&other, |v: Option<&u32>| v.copied());
                let old = before.get(&other).copied();
                assert!(seen.is_none() || seen == Some(value(other)) || seen == old, "thread {t} read {seen:?}");
                let len = map.len();
                assert!(len >= last_len && len <= max_len, "len {len} after {last_len} (at most {max_len})");
                last_len = len;
            }
            if i == each / 2 {
                let ctx = map.export();
                let keys: Vec<u16> = (0..each).step_by(7).flat_map(|j| [key(0, j), key(1, j)]).collect();
                let seen = keys.iter().map(|&k| (k, ctx.value::<u32, _>(&k).copied())).collect::<Vec<_>>();
                assert!(seen.iter().any(|&(k, v)| k == key(t, 0) && v == Some(value(k))), "snapshot has own write");
                snapshot = Some((ctx, seen));
            }
        }
        snapshot
    };
    let (mine, theirs) = std::thread::scope(|sc| {
        let other = sc.spawn(|| batch(1));
        let mine = batch(0);
        (mine, other.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
    });
    for (ctx, seen) in mine.into_iter().chain(theirs) {
        for (k, v) in seen {
            assert_eq!(ctx.value::<u32, _>(&k).copied(), v, "a snapshot changed: key {k}");
        }
    }
    let mut after = before.clone();
    for t in 0..2 {
        for i in 0..each {
            let k = key(t, i);
            after.insert(k, value(k));
            assert_eq!(map.read(&k, |v: Option<&u32>| v.copied()), Some(value(k)), "lost write of key {k}");
        }
    }
    after
}

/// Modes 1 and 2: both threads overwrite the same 16 keys; with `removes`, the second thread
/// also removes them. Returns the map's `u16` keys afterwards, checked against what either
/// thread can have left.
fn same_keys(map: &SessionMap, before: &BigValues, each: usize, removes: bool) -> BigValues {
    const HOT: u16 = 16;
    let key = |i: usize| 0x3000 + (i as u16 % HOT);
    let check_seen = |k: u16, seen: Option<u32>| {
        if let Some(v) = seen {
            let from_batch = v >> 16 == u32::from(k);
            assert!(from_batch || before.get(&k) == Some(&v), "key {k} read {v:#x}: nobody wrote that");
        }
    };
    // The last effect of each thread on each hot key: `Some(value)` or `None` (removed).
    let batch = |t: u32| -> BTreeMap<u16, Option<u32>> {
        let mut last = BTreeMap::new();
        for i in 0..each {
            let k = key(i * 7 + t as usize);
            if removes && t == 1 && i % 3 == 2 {
                map.remove(&k);
                last.insert(k, None);
            } else {
                let v = tagged(k, t, i);
                map.insert(k, v);
                last.insert(k, Some(v));
            }
            let probe = key(i * 3);
            check_seen(probe, map.read(&probe, |v: Option<&u32>| v.copied()));
            if i % 16 == 0 {
                let ctx = map.export();
                let first = ctx.value::<u32, _>(&probe).copied();
                check_seen(probe, first);
                assert_eq!(ctx.value::<u32, _>(&probe).copied(), first, "a snapshot changed");
            }
        }
        last
    };
    let (a, b) = std::thread::scope(|sc| {
        let other = sc.spawn(|| batch(1));
        let mine = batch(0);
        (mine, other.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
    });
    let mut after = before.clone();
    for k in (0..usize::from(HOT)).map(key) {
        let now = map.read(&k, |v: Option<&u32>| v.copied());
        let allowed = [a.get(&k).copied(), b.get(&k).copied()];
        let ok = match allowed {
            [None, None] => now == before.get(&k).copied(),
            _ => allowed.iter().flatten().any(|&effect| effect == now),
        };
        assert!(ok, "key {k} holds {now:?}; last writes {allowed:?}");
        match now {
            Some(v) => after.insert(k, v),
            None => after.remove(&k),
        };
    }
    after
}
