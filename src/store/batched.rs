//! Calls that arrive while the previous batch runs go together in the next: one round trip per
//! batch, not per call. PostgreSQL's intake commits its webhooks this way (group commit; SQLite has
//! its own writer thread, `store::sqlite::writer`), and delivery's first reads of the intents in
//! flight together are one call. At rest a call runs alone, at once. Callers wait for their own
//! outcome.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::StoreError;

type Reply<O> = oneshot::Sender<Result<O, StoreError>>;
/// Where items are queued; `None` once closed.
type Queue<I, O> = Mutex<Option<mpsc::Sender<(I, Reply<O>)>>>;

pub struct Batched<I, O> {
    sender: Queue<I, O>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl<I, O> Batched<I, O>
where
    I: Clone + Send + Sync + 'static,
    O: Send + 'static,
{
    /// Starts the task that runs the batches, each of at most `max` calls; `run` runs one batch
    /// (in one transaction, one statement) and returns an outcome per item, in order.
    /// A batch the database refuses for a value one of its items holds
    /// ([`StoreError::refuses_value`]) is run again item by item: only that item is refused, not
    /// the callers whose items shared its batch.
    pub fn start<F, Fut>(max: usize, run: F) -> Batched<I, O>
    where
        F: Fn(Arc<[I]>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Vec<O>, StoreError>> + Send,
    {
        let (tx, mut rx) = mpsc::channel::<(I, Reply<O>)>(4 * max);
        let task = tokio::spawn(async move {
            let mut batch = Vec::with_capacity(max);
            while rx.recv_many(&mut batch, max).await > 0 {
                let (items, replies): (Vec<I>, Vec<Reply<O>>) = batch.drain(..).unzip();
                let items: Arc<[I]> = items.into();
                match run(items.clone()).await {
                    Ok(outcomes) => {
                        for (reply, outcome) in replies.into_iter().zip(outcomes) {
                            let _ = reply.send(Ok(outcome));
                        }
                    }
                    Err(e) if e.refuses_value() && items.len() > 1 => {
                        for (item, reply) in items.iter().zip(replies) {
                            let alone = run(Arc::new([item.clone()])).await;
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
        Batched {
            sender: Mutex::new(Some(tx)),
            task: Mutex::new(Some(task)),
        }
    }

    /// Queues one item and waits for the outcome of its batch.
    pub async fn submit(&self, item: I) -> Result<O, StoreError> {
        let sender = self
            .sender
            .lock()
            .expect("batches lock")
            .clone()
            .ok_or_else(|| StoreError::Unavailable("store is closed".into()))?;
        let (reply, answer) = oneshot::channel();
        let stopped = || StoreError::Unavailable("the store's batches stopped".into());
        sender.send((item, reply)).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    pub fn is_open(&self) -> bool {
        self.sender.lock().expect("batches lock").is_some()
    }

    /// Takes no more items and waits (up to 10 s) for the batches already queued.
    pub async fn close(&self) {
        self.sender.lock().expect("batches lock").take();
        let task = self.task.lock().expect("batches task lock").take();
        if let Some(task) = task {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Runs = Arc<Mutex<Vec<Vec<i32>>>>;

    /// A batch runner that records each batch, holds it until `open`, refuses any batch holding 13
    /// as a database refuses a value, and answers each item tenfold.
    fn gated() -> (Arc<Batched<i32, i32>>, Runs, tokio::sync::watch::Sender<bool>) {
        let runs = Runs::default();
        let (open, gate) = tokio::sync::watch::channel(false);
        let seen = runs.clone();
        let batched = Batched::start(64, move |items: Arc<[i32]>| {
            seen.lock().unwrap().push(items.to_vec());
            let mut gate = gate.clone();
            async move {
                gate.wait_for(|open| *open).await.unwrap();
                if items.contains(&13) {
                    return Err(StoreError::Corrupt("13".into()));
                }
                Ok(items.iter().map(|i| i * 10).collect())
            }
        });
        (Arc::new(batched), runs, open)
    }

    /// Submits `first` and waits until its batch runs (held at the gate), then submits `then`:
    /// they wait in the queue meanwhile. Returns the outcomes once the gate opens.
    async fn one_then_together(first: i32, then: &[i32]) -> (Vec<Result<i32, StoreError>>, Vec<Vec<i32>>) {
        let (batched, runs, open) = gated();
        let alone = tokio::spawn({
            let b = batched.clone();
            async move { b.submit(first).await }
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while runs.lock().unwrap().is_empty() {
            assert!(tokio::time::Instant::now() < deadline, "the first call never ran");
            tokio::task::yield_now().await;
        }
        let mut together = Box::pin(futures_util::future::join_all(then.iter().map(|&i| batched.submit(i))));
        // One poll queues them all (the channel has room); the first batch still runs.
        assert!(tokio::time::timeout(Duration::ZERO, &mut together).await.is_err());
        open.send(true).unwrap();
        let mut outcomes = vec![alone.await.unwrap()];
        outcomes.extend(together.await);
        let runs = runs.lock().unwrap().clone();
        (outcomes, runs)
    }

    /// While a batch runs, the calls made meanwhile wait and then run together, each answered with
    /// its own outcome.
    #[tokio::test]
    async fn calls_made_while_a_batch_runs_go_together_in_the_next() {
        let (outcomes, runs) = one_then_together(1, &[2, 3, 4, 5, 6]).await;
        let answers: Vec<i32> = outcomes.into_iter().map(Result::unwrap).collect();
        assert_eq!(answers, [10, 20, 30, 40, 50, 60]);
        assert_eq!(runs, [vec![1], vec![2, 3, 4, 5, 6]]);
    }

    /// A batch refused for a value one of its items holds is run again item by item: only that
    /// item's caller is refused.
    #[tokio::test]
    async fn a_batch_refused_for_one_items_value_refuses_only_that_item() {
        let (outcomes, runs) = one_then_together(1, &[12, 13, 14]).await;
        assert_eq!(outcomes[0].as_ref().unwrap(), &10);
        assert_eq!(outcomes[1].as_ref().unwrap(), &120);
        assert!(matches!(outcomes[2], Err(StoreError::Corrupt(_))), "{:?}", outcomes[2]);
        assert_eq!(outcomes[3].as_ref().unwrap(), &140);
        assert_eq!(runs, [vec![1], vec![12, 13, 14], vec![12], vec![13], vec![14]]);
    }
}
