//! Group commit for PostgreSQL intake (SQLite has its own writer thread, `store::sqlite::writer`):
//! one writer task commits every webhook that arrived while the previous batch was being written in
//! one transaction, so a burst costs one round trip per batch, not one per webhook. Callers wait for
//! their own outcome.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::{EnqueueOutcome, NewIntent, StoreError};

/// Most webhooks committed in one transaction.
pub const MAX_BATCH: usize = 512;

type Reply = oneshot::Sender<Result<EnqueueOutcome, StoreError>>;

pub struct GroupCommit {
    sender: Mutex<Option<mpsc::Sender<(NewIntent, Reply)>>>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl GroupCommit {
    /// Starts the writer; `commit` writes one batch in one transaction and returns an outcome per item.
    /// A batch the database refuses for a value one of its items holds
    /// ([`StoreError::refuses_value`]) is committed again item by item: only that item is refused,
    /// not the shoppers whose webhooks shared its batch.
    pub fn start<F, Fut>(commit: F) -> GroupCommit
    where
        F: Fn(Arc<[NewIntent]>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Vec<EnqueueOutcome>, StoreError>> + Send,
    {
        let (tx, mut rx) = mpsc::channel::<(NewIntent, Reply)>(4 * MAX_BATCH);
        let task = tokio::spawn(async move {
            let mut batch = Vec::with_capacity(MAX_BATCH);
            while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
                let (items, replies): (Vec<NewIntent>, Vec<Reply>) = batch.drain(..).unzip();
                let items: Arc<[NewIntent]> = items.into();
                match commit(items.clone()).await {
                    Ok(outcomes) => {
                        for (reply, outcome) in replies.into_iter().zip(outcomes) {
                            let _ = reply.send(Ok(outcome));
                        }
                    }
                    Err(e) if e.refuses_value() && items.len() > 1 => {
                        for (item, reply) in items.iter().zip(replies) {
                            let alone = commit(Arc::new([item.clone()])).await;
                            let _ = reply.send(alone.and_then(|mut o| o.pop().ok_or(e.clone())));
                        }
                    }
                    Err(e) => {
                        for reply in replies {
                            let _ = reply.send(Err(e.clone()));
                        }
                    }
                }
            }
        });
        GroupCommit {
            sender: Mutex::new(Some(tx)),
            task: Mutex::new(Some(task)),
        }
    }

    /// Queues one webhook and waits for the commit of its batch.
    pub async fn enqueue(&self, item: NewIntent) -> Result<EnqueueOutcome, StoreError> {
        let sender = self
            .sender
            .lock()
            .expect("writer lock")
            .clone()
            .ok_or_else(|| StoreError::Unavailable("store is closed".into()))?;
        let (reply, answer) = oneshot::channel();
        let stopped = || StoreError::Unavailable("store writer stopped".into());
        sender.send((item, reply)).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    pub fn is_open(&self) -> bool {
        self.sender.lock().expect("writer lock").is_some()
    }

    /// Stops taking webhooks and waits (up to 10 s) for the batches already queued.
    pub async fn close(&self) {
        self.sender.lock().expect("writer lock").take();
        let task = self.task.lock().expect("writer task lock").take();
        if let Some(task) = task {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
    }
}

/// Splits a batch into first occurrences of each dedupe key and the rest (duplicates within the batch).
pub fn first_occurrences(items: &[NewIntent]) -> Vec<bool> {
    let mut seen = std::collections::HashSet::new();
    items.iter().map(|i| seen.insert(i.dedupe_key.as_str())).collect()
}
