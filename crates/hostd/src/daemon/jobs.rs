//! Jobs running in this process: the cancel switch of each, beside its row in the store (the
//! store says how it ended; this says who to tell). An entry lives as long as its task.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::watch;
use uuid::Uuid;

#[derive(Default)]
pub struct JobRegistry {
    running: Mutex<HashMap<Uuid, watch::Sender<bool>>>,
}

impl JobRegistry {
    /// Registers a job; the receiver turns `true` when it is cancelled.
    pub fn register(&self, id: Uuid) -> watch::Receiver<bool> {
        let (tx, rx) = watch::channel(false);
        self.map().insert(id, tx);
        rx
    }

    pub fn finished(&self, id: Uuid) {
        self.map().remove(&id);
    }

    /// Tells the job's task to stop; false when no such task runs here.
    pub fn cancel(&self, id: Uuid) -> bool {
        self.map().get(&id).is_some_and(|tx| tx.send(true).is_ok())
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, watch::Sender<bool>>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Resolves once `rx` says cancelled (never, if the sender is gone without cancelling).
pub async fn cancelled(mut rx: watch::Receiver<bool>) {
    if rx.wait_for(|c| *c).await.is_err() {
        std::future::pending::<()>().await;
    }
}
