//! The parallel-iterator adaptor: [`ParallelIteratorExt::in_current_session`] and friends.
//!
//! Built on rayon's plumbing the way rayon's own `map_init` is: a wrapper consumer whose
//! `into_folder` sets up per-job state (here: the installed session) that lives in the folder
//! until the job's `complete`, and a wrapper producer for the indexed path (`with_producer`).
//! The session is cloned once per *split* and installed once per *leaf job*, never per item
//! (except on the `into_iter` path: see "Coverage" on [`ParallelIteratorExt`]).
//!
//! What each placement of the adaptor covers is in [`ParallelIteratorExt`]'s docs ("Coverage").

use localsession_core::AnySession;
use localsession_std::Bridges;
use rayon::iter::plumbing::{Consumer, Folder, Producer, ProducerCallback, Reducer, UnindexedConsumer};
use rayon::iter::{IndexedParallelIterator, ParallelIterator};

use crate::install::Installed;

/// Carries a session into every job of a parallel iterator: `.in_current_session()`,
/// `.with_session(s)`, `.without_session()`.
///
/// Each job installs the session for as long as it runs and then puts back what its thread had
/// bound before, so items that rayon runs inline on the calling thread leave the caller's own
/// binding in place, and a `bind` inside an item ends with its job.
///
/// # Coverage
/// Which path runs depends on what follows the adaptor:
/// - Followed by the terminal operation (`sum`, `collect`, `for_each`, `reduce`, ...) or by
///   non-indexed adaptors: the consumer path. The session covers everything the job runs:
///   the items, every closure before and after the adaptor, the job's `complete`, and the
///   reductions of partial results — except the closures of a `flat_map`/`flatten` *before*
///   the adaptor, and what precedes them (below).
/// - Followed by indexed adaptors that drive the producer's `fold_with` (`map`, ...): the
///   producer path. The session covers producing and folding the job's items, not what runs
///   when the job's result is completed or reduced (a `reduce` closure, a `map` after a `fold`).
/// - Followed by an adaptor that iterates the producer itself — `zip`, `interleave`, and also
///   `enumerate`, `rev`, `step_by`, `chunks` (their producers fold through `into_iter`): each
///   item is produced with the session installed (one install per item), but consumed after
///   it, so `.in_current_session().enumerate().for_each(f)` runs `f` *without* the session.
/// - `flat_map` / `flatten` (not `flat_map_iter`, whose closure runs in the job's folder) call
///   their closure, and drive everything before it, inside the outer job before any consumer
///   of this adaptor has installed the session; and a half of an inner parallel iterator that
///   an idle worker steals runs outside it too. With such an adaptor in the chain, put
///   `.in_current_session()` both before it and last:
///   `.in_current_session().flat_map(f).in_current_session().sum()`.
///
/// So: put `.in_current_session()` last, right before the terminal operation (and once more
/// before a `flat_map`/`flatten`). `rayon-adapter/tests/adversary_rayon.rs` checks each case.
///
/// # Examples
/// ```
/// use localsession_core::SessionMap;
/// use localsession_rayon::ParallelIteratorExt;
/// use localsession_std::{current, scope};
/// use rayon::prelude::*;
///
/// let request = SessionMap::new().with_value("tenant", "acme");
/// let tenants: Vec<Option<&str>> = scope(request, || {
///     (0..100)
///         .into_par_iter()
///         .map(|_| current().and_then(|s| s.value_cloned::<&str, _>(&"tenant")))
///         .in_current_session() // last: it covers every closure before it
///         .collect()
/// });
/// assert!(tenants.iter().all(|t| *t == Some("acme")));
/// ```
pub trait ParallelIteratorExt: ParallelIterator {
    /// Runs every job of this iterator with the session current *now* (none while the flow is
    /// suppressed, see [`localsession_std::without_flow`]).
    ///
    /// # Examples
    /// ```
    /// use localsession_core::SessionMap;
    /// use localsession_rayon::ParallelIteratorExt;
    /// use localsession_std::{current, scope};
    /// use rayon::prelude::*;
    ///
    /// let missing = scope(SessionMap::new(), || {
    ///     let items = vec![1u64; 1000];
    ///     items.par_iter().filter(|_| current().is_none()).in_current_session().count()
    /// });
    /// assert_eq!(missing, 0);
    /// ```
    fn in_current_session(self) -> InSession<Self> {
        let session = localsession_std::flow_session();
        InSession { base: self, bridges: Bridges::capture(session.as_ref()), session }
    }

    /// Runs every job of this iterator with `session`.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::SessionMap;
    /// use localsession_rayon::ParallelIteratorExt;
    /// use localsession_std::current;
    /// use rayon::prelude::*;
    ///
    /// let job = SessionMap::new().with_value("batch", 7u32);
    /// let sum: u32 = (0..10u32)
    ///     .into_par_iter()
    ///     .map(|i| i * current().unwrap().value_cloned::<u32, _>(&"batch").unwrap())
    ///     .with_session(job)
    ///     .sum();
    /// assert_eq!(sum, 7 * 45);
    /// assert!(current().is_none()); // nothing is left bound on the caller
    /// ```
    fn with_session(self, session: impl Into<AnySession>) -> InSession<Self> {
        let session = Some(session.into());
        InSession { base: self, bridges: Bridges::capture(session.as_ref()), session }
    }

    /// Runs every job of this iterator with no session, whatever its threads had bound.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::SessionMap;
    /// use localsession_rayon::ParallelIteratorExt;
    /// use localsession_std::{current, scope};
    /// use rayon::prelude::*;
    ///
    /// let seen = scope(SessionMap::new(), || {
    ///     (0..100).into_par_iter().filter(|_| current().is_some()).without_session().count()
    /// });
    /// assert_eq!(seen, 0);
    /// ```
    fn without_session(self) -> InSession<Self> {
        InSession { base: self, session: None, bridges: Bridges::capture(None) }
    }
}

impl<I: ParallelIterator> ParallelIteratorExt for I {}

/// A parallel iterator whose jobs run with a session (see [`ParallelIteratorExt`]). Indexed
/// when the iterator it wraps is.
///
/// # Examples
/// ```
/// use localsession_core::SessionMap;
/// use localsession_rayon::{InSession, ParallelIteratorExt};
/// use rayon::prelude::*;
///
/// let it: InSession<rayon::range::Iter<u32>> = (0..4u32).into_par_iter().with_session(SessionMap::new());
/// assert_eq!(it.len(), 4); // still indexed
/// ```
#[derive(Clone, Debug)]
#[must_use = "parallel iterators are lazy and do nothing unless consumed"]
pub struct InSession<I> {
    base: I,
    session: Option<AnySession>,
    bridges: Bridges,
}

impl<I: ParallelIterator> ParallelIterator for InSession<I> {
    type Item = I::Item;

    fn drive_unindexed<C>(self, consumer: C) -> C::Result
    where
        C: UnindexedConsumer<Self::Item>,
    {
        self.base.drive_unindexed(SessionConsumer { base: consumer, session: self.session, bridges: self.bridges })
    }

    fn opt_len(&self) -> Option<usize> {
        self.base.opt_len()
    }
}

impl<I: IndexedParallelIterator> IndexedParallelIterator for InSession<I> {
    fn drive<C>(self, consumer: C) -> C::Result
    where
        C: Consumer<Self::Item>,
    {
        self.base.drive(SessionConsumer { base: consumer, session: self.session, bridges: self.bridges })
    }

    fn len(&self) -> usize {
        self.base.len()
    }

    fn with_producer<CB>(self, callback: CB) -> CB::Output
    where
        CB: ProducerCallback<Self::Item>,
    {
        self.base.with_producer(SessionCallback { base: callback, session: self.session, bridges: self.bridges })
    }
}

/// Wraps the producer handed to the downstream callback.
struct SessionCallback<CB> {
    base: CB,
    session: Option<AnySession>,
    bridges: Bridges,
}

impl<T, CB: ProducerCallback<T>> ProducerCallback<T> for SessionCallback<CB> {
    type Output = CB::Output;

    fn callback<P>(self, producer: P) -> CB::Output
    where
        P: Producer<Item = T>,
    {
        self.base.callback(SessionProducer { base: producer, session: self.session, bridges: self.bridges })
    }
}

/// The producer path: one install per `fold_with` (a leaf job).
struct SessionProducer<P> {
    base: P,
    session: Option<AnySession>,
    bridges: Bridges,
}

impl<P: Producer> Producer for SessionProducer<P> {
    type Item = P::Item;
    type IntoIter = SessionIter<P::IntoIter>;

    fn into_iter(self) -> Self::IntoIter {
        SessionIter { base: self.base.into_iter(), session: self.session, bridges: self.bridges }
    }

    fn min_len(&self) -> usize {
        self.base.min_len()
    }

    fn max_len(&self) -> usize {
        self.base.max_len()
    }

    fn split_at(self, index: usize) -> (Self, Self) {
        let (left, right) = self.base.split_at(index);
        let (session, bridges) = (self.session, self.bridges);
        (
            SessionProducer { base: left, session: session.clone(), bridges: bridges.clone() },
            SessionProducer { base: right, session, bridges },
        )
    }

    fn fold_with<F>(self, folder: F) -> F
    where
        F: Folder<Self::Item>,
    {
        let _installed = Installed::new(self.session, self.bridges);
        self.base.fold_with(folder)
    }
}

/// The `into_iter` path (`zip`, `interleave`, ...): the iterator may be dropped in any order
/// relative to another one, so it installs around each item instead of holding an install.
struct SessionIter<It> {
    base: It,
    session: Option<AnySession>,
    bridges: Bridges,
}

impl<It: Iterator> Iterator for SessionIter<It> {
    type Item = It::Item;

    fn next(&mut self) -> Option<It::Item> {
        let _installed = Installed::new(self.session.clone(), self.bridges.clone());
        self.base.next()
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.base.size_hint()
    }
}

impl<It: DoubleEndedIterator> DoubleEndedIterator for SessionIter<It> {
    fn next_back(&mut self) -> Option<It::Item> {
        let _installed = Installed::new(self.session.clone(), self.bridges.clone());
        self.base.next_back()
    }
}

impl<It: ExactSizeIterator> ExactSizeIterator for SessionIter<It> {
    fn len(&self) -> usize {
        self.base.len()
    }
}

/// The consumer path: one install per `into_folder` (a leaf job), held until `complete`.
struct SessionConsumer<C> {
    base: C,
    session: Option<AnySession>,
    bridges: Bridges,
}

impl<T, C: Consumer<T>> Consumer<T> for SessionConsumer<C> {
    type Folder = SessionFolder<C::Folder>;
    type Reducer = SessionReducer<C::Reducer>;
    type Result = C::Result;

    fn split_at(self, index: usize) -> (Self, Self, Self::Reducer) {
        let (left, right, reducer) = self.base.split_at(index);
        let (session, bridges) = (self.session, self.bridges);
        (
            SessionConsumer { base: left, session: session.clone(), bridges: bridges.clone() },
            SessionConsumer { base: right, session: session.clone(), bridges: bridges.clone() },
            SessionReducer { base: reducer, session, bridges },
        )
    }

    fn into_folder(self) -> Self::Folder {
        // Installed first: the downstream `into_folder` may run user code (`fold`'s identity).
        let installed = Installed::new(self.session, self.bridges);
        SessionFolder { base: self.base.into_folder(), installed }
    }

    fn full(&self) -> bool {
        self.base.full()
    }
}

impl<T, C: UnindexedConsumer<T>> UnindexedConsumer<T> for SessionConsumer<C> {
    fn split_off_left(&self) -> Self {
        SessionConsumer {
            base: self.base.split_off_left(),
            session: self.session.clone(),
            bridges: self.bridges.clone(),
        }
    }

    fn to_reducer(&self) -> Self::Reducer {
        SessionReducer { base: self.base.to_reducer(), session: self.session.clone(), bridges: self.bridges.clone() }
    }
}

/// A leaf job's folder; the session stays installed until it completes (or is dropped, also
/// during unwinding).
struct SessionFolder<F> {
    base: F,
    installed: Installed,
}

impl<T, F: Folder<T>> Folder<T> for SessionFolder<F> {
    type Result = F::Result;

    fn consume(self, item: T) -> Self {
        SessionFolder { base: self.base.consume(item), installed: self.installed }
    }

    fn consume_iter<I>(self, iter: I) -> Self
    where
        I: IntoIterator<Item = T>,
    {
        // Forwarded as a whole: the downstream folder's own `consume_iter` is its fast path.
        SessionFolder { base: self.base.consume_iter(iter), installed: self.installed }
    }

    fn complete(self) -> F::Result {
        let SessionFolder { base, installed } = self;
        let result = base.complete();
        drop(installed);
        result
    }

    fn full(&self) -> bool {
        self.base.full()
    }
}

/// Joins two jobs' results with the session installed (a `reduce` closure sees it).
struct SessionReducer<R> {
    base: R,
    session: Option<AnySession>,
    bridges: Bridges,
}

impl<T, R: Reducer<T>> Reducer<T> for SessionReducer<R> {
    fn reduce(self, left: T, right: T) -> T {
        let _installed = Installed::new(self.session, self.bridges);
        self.base.reduce(left, right)
    }
}
