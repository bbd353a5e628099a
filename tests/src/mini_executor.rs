//! A hand-written executor that embeds localsession using only `localsession-core` — the
//! "custom executor or kernel" path.
//!
//! Five steps, each marked `STEP n` below:
//! 1. Give every execution unit (here: each worker thread) a slot: a [`LocalSlot`].
//! 2. Implement [`ContextStore`] over it: read the running unit's slot, replace it.
//! 3. Register the store once with [`set_global_store`], so library code can call
//!    `localsession_core::current()` without knowing the executor.
//! 4. Let each task own its session: at spawn, capture the spawner's current session into the
//!    new task.
//! 5. Around every poll, swap the task's session into the worker's slot, and after the poll take
//!    whatever the slot holds back into the task (so a `bind` inside a task sticks to the task
//!    and never leaks into the next one).
//!
//! The executor itself is a plain run queue shared by `workers` threads, with `std::task::Wake`
//! wakers: no runtime crate.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::task::{Context as TaskContext, Poll, Wake, Waker};

use localsession_core::{AnySession, BindError, ContextStore, LocalSlot, set_global_store};

// STEP 1: one slot per execution unit (a worker thread; a kernel would use a per-CPU struct).
thread_local! {
    static WORKER_SLOT: LocalSlot = const { LocalSlot::new() };
}

/// STEP 2: the executor's store: the running worker's slot.
#[derive(Debug)]
pub struct ExecutorStore(());

/// The one store of this executor.
pub static EXECUTOR_STORE: ExecutorStore = ExecutorStore(());

impl ContextStore for ExecutorStore {
    fn with_current(&self, f: &mut dyn FnMut(Option<&AnySession>)) {
        WORKER_SLOT.with(|slot| slot.with(f));
    }

    fn replace(&self, session: Option<AnySession>) -> Result<Option<AnySession>, BindError> {
        let mut session = Some(session);
        WORKER_SLOT
            .try_with(|slot| slot.replace(session.take().flatten()))
            .map_err(|_| BindError::new(session.take().flatten(), "worker thread is shutting down"))
    }
}

/// STEP 3: register the store (once per process; a second call is a harmless error here).
pub fn install() {
    let _ = set_global_store(&EXECUTOR_STORE);
}

type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

struct Task {
    future: Mutex<Option<BoxFuture>>,
    /// The task's session between polls (STEP 4).
    session: Mutex<Option<AnySession>>,
    shared: Arc<Shared>,
}

struct Shared {
    queue: Mutex<VecDeque<Arc<Task>>>,
    ready: Condvar,
    /// Tasks spawned and not finished.
    live: AtomicUsize,
}

impl Wake for Task {
    fn wake(self: Arc<Self>) {
        let shared = Arc::clone(&self.shared);
        shared.queue.lock().unwrap_or_else(PoisonError::into_inner).push_back(self);
        shared.ready.notify_one();
    }
}

/// A multi-worker run-queue executor.
#[derive(Clone)]
pub struct MiniExecutor {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for MiniExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MiniExecutor").field("live", &self.shared.live.load(Ordering::Relaxed)).finish()
    }
}

impl Default for MiniExecutor {
    fn default() -> Self {
        Self::new()
    }
}

impl MiniExecutor {
    /// An executor with an empty queue.
    #[must_use]
    pub fn new() -> MiniExecutor {
        install();
        MiniExecutor {
            shared: Arc::new(Shared {
                queue: Mutex::new(VecDeque::new()),
                ready: Condvar::new(),
                live: AtomicUsize::new(0),
            }),
        }
    }

    /// Spawns a task that inherits the spawner's current session (STEP 4).
    pub fn spawn(&self, future: impl Future<Output = ()> + Send + 'static) {
        let session = localsession_core::with_current_in(&EXECUTOR_STORE, |s| s.cloned());
        self.spawn_with(session, future);
    }

    /// Spawns a task with a given session (or none).
    pub fn spawn_with(&self, session: Option<AnySession>, future: impl Future<Output = ()> + Send + 'static) {
        self.shared.live.fetch_add(1, Ordering::SeqCst);
        let task = Arc::new(Task {
            future: Mutex::new(Some(Box::pin(future))),
            session: Mutex::new(session),
            shared: Arc::clone(&self.shared),
        });
        task.wake();
    }

    /// Runs every task to completion on `workers` threads (the calling thread waits).
    pub fn run(&self, workers: usize) {
        std::thread::scope(|scope| {
            for _ in 0..workers.max(1) {
                scope.spawn(|| self.worker());
            }
        });
    }

    fn worker(&self) {
        loop {
            let task = {
                let mut queue = self.shared.queue.lock().unwrap_or_else(PoisonError::into_inner);
                loop {
                    if let Some(task) = queue.pop_front() {
                        break task;
                    }
                    if self.shared.live.load(Ordering::SeqCst) == 0 {
                        self.shared.ready.notify_all();
                        return;
                    }
                    queue = self.shared.ready.wait(queue).unwrap_or_else(PoisonError::into_inner);
                }
            };
            let mut slot = task.future.lock().unwrap_or_else(PoisonError::into_inner);
            let Some(future) = slot.as_mut() else { continue };
            let waker = Waker::from(Arc::clone(&task));
            let mut cx = TaskContext::from_waker(&waker);

            // STEP 5: the task's session goes into this worker's slot for the poll...
            let session = task.session.lock().unwrap_or_else(PoisonError::into_inner).take();
            let previous = EXECUTOR_STORE.replace(session).ok().flatten();
            let poll = future.as_mut().poll(&mut cx);
            // ...and whatever the slot holds afterwards is the task's session from now on.
            let after = EXECUTOR_STORE.replace(previous).ok().flatten();

            if poll == Poll::Ready(()) {
                *slot = None;
                drop(slot);
                drop(after); // the task ended: its session is released
                if self.shared.live.fetch_sub(1, Ordering::SeqCst) == 1 {
                    self.shared.ready.notify_all();
                }
            } else {
                *task.session.lock().unwrap_or_else(PoisonError::into_inner) = after;
            }
        }
    }
}

/// A future that returns `Pending` once (waking itself), so the task is re-queued and may be
/// resumed by another worker.
pub async fn yield_now() {
    struct YieldNow(bool);
    impl Future for YieldNow {
        type Output = ();
        fn poll(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<()> {
            if self.0 {
                Poll::Ready(())
            } else {
                self.0 = true;
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        }
    }
    YieldNow(false).await;
}
