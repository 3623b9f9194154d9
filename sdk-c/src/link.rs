//! The fleet link of an agent opened with a `[broker]` section: the agent's update
//! daemon ([`outpost_agent::update::run_with`]) on one library-owned thread, sharing the
//! `Agent` that serves the app's calls.
//!
//! The thread (named `outpost-link`) runs a tokio current-thread runtime; the daemon's
//! blocking steps (metadata refresh, reconstruction, validation gate) run on that
//! runtime's blocking pool, at most [`BLOCKING_THREADS`] threads started on demand. Stop
//! = resolve the daemon's shutdown future, join the thread, then drop the runtime, which
//! waits for a blocking step in progress. Nothing outlives [`LinkSlot::stop`].

use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{JoinHandle, ThreadId};

use ::outpost_agent::Agent;
use ::outpost_agent::update::{EmbedOptions, UpdateEvent, run_with};
use tokio::sync::oneshot;

use crate::ffi::{Failure, Res};
use crate::{OUTPOST_ERR_INTERNAL, OUTPOST_ERR_INVALID_ARGUMENT, OUTPOST_ERR_LINK};

/// Most threads of the link's blocking pool (the gate and a metadata refresh can overlap
/// with a reconstruction only briefly; the machine runs one update at a time).
pub(crate) const BLOCKING_THREADS: usize = 2;

struct Running {
    stop: oneshot::Sender<()>,
    thread: JoinHandle<()>,
    id: ThreadId,
}

/// The link of one handle: its options, and the thread while it runs.
pub(crate) struct LinkSlot {
    opts: EmbedOptions,
    running: Mutex<Option<Running>>,
    /// Why the last run ended, if it ended by itself with an error.
    ended: Arc<Mutex<Option<String>>>,
}

impl LinkSlot {
    pub(crate) fn new(opts: EmbedOptions) -> Self {
        LinkSlot {
            opts,
            running: Mutex::new(None),
            ended: Arc::default(),
        }
    }

    /// Fails if the calling thread is the link thread (a callback must not stop or free
    /// the link it runs on: joining itself would deadlock).
    pub(crate) fn check_not_link_thread(&self, what: &str) -> Res {
        let running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        if running
            .as_ref()
            .is_some_and(|r| r.id == std::thread::current().id())
        {
            return Err(Failure::new(
                OUTPOST_ERR_INVALID_ARGUMENT,
                format!("{what} was called from a callback on the link thread"),
            ));
        }
        Ok(())
    }

    /// Starts the link thread unless it runs already.
    pub(crate) fn start(
        &self,
        agent: Arc<Agent>,
        observer: impl Fn(&UpdateEvent) + Send + Sync + 'static,
    ) -> Res {
        let mut running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(r) = running.as_ref() {
            if !r.thread.is_finished() {
                return Ok(());
            }
            if let Some(old) = running.take() {
                let _ = old.thread.join();
            }
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .max_blocking_threads(BLOCKING_THREADS)
            .thread_name("outpost-link-pool")
            .build()
            .map_err(|e| Failure::new(OUTPOST_ERR_INTERNAL, format!("link runtime: {e}")))?;
        let (stop, stopped) = oneshot::channel::<()>();
        let opts = self.opts.clone();
        let ended = Arc::clone(&self.ended);
        *ended.lock().unwrap_or_else(PoisonError::into_inner) = None;
        let thread = std::thread::Builder::new()
            .name("outpost-link".into())
            .spawn(move || {
                let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    rt.block_on(run_with(opts, agent, observer, async {
                        let _ = stopped.await;
                    }))
                }));
                // Dropping the runtime waits for a blocking step in progress.
                drop(rt);
                let why = match run {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(format!("fleet link stopped: {e:#}")),
                    Err(_) => Some("fleet link stopped: internal panic".to_owned()),
                };
                *ended.lock().unwrap_or_else(PoisonError::into_inner) = why;
            })
            .map_err(|e| Failure::new(OUTPOST_ERR_INTERNAL, format!("link thread: {e}")))?;
        let id = thread.thread().id();
        *running = Some(Running { stop, thread, id });
        Ok(())
    }

    /// Stops the link thread and waits for it (no-op if it does not run). Returns
    /// `OUTPOST_ERR_LINK` if the link had ended by itself with an error.
    pub(crate) fn stop(&self) -> Res {
        self.check_not_link_thread("stopping the fleet link")?;
        let taken = self
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(r) = taken {
            let _ = r.stop.send(());
            if r.thread.join().is_err() {
                return Err(Failure::new(
                    OUTPOST_ERR_INTERNAL,
                    "the link thread panicked",
                ));
            }
        }
        match self
            .ended
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            Some(why) => Err(Failure::new(OUTPOST_ERR_LINK, why)),
            None => Ok(()),
        }
    }

    /// Whether the link thread runs, and why it ended if it ended by itself.
    pub(crate) fn state(&self) -> (bool, Option<String>) {
        let running = self
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .is_some_and(|r| !r.thread.is_finished());
        let ended = self
            .ended
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        (running, ended)
    }
}
