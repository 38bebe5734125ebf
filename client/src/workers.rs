//! Training workers for the clients of one process (`simulate`, sweeps): at most `workers` clients
//! train at once, each inside its own thread pool of `threads` threads, so a CPU budget is split
//! between concurrent models instead of every model contending for every core (one model per
//! worker, as pfl-research runs its users).
//!
//! The pure-Rust backend parallelises matrix products and large reductions on the rayon pool of
//! the thread that calls it; a worker's pool is that pool while it trains. Its kernels split work
//! over output blocks and fixed-size chunks, never over a thread-count-dependent reduction order,
//! so a client's update is bit-identical whatever the number of workers or threads
//! (`tests/parallel_clients.rs` checks that on whole federations).

use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::{ClientError, Result};

/// A fixed set of worker thread pools with a permit each.
pub struct TrainingWorkers {
    permits: Arc<Semaphore>,
    pools: Mutex<Vec<Arc<rayon::ThreadPool>>>,
    workers: usize,
    threads: usize,
}

impl std::fmt::Debug for TrainingWorkers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "TrainingWorkers({} x {} threads)",
            self.workers, self.threads
        )
    }
}

impl TrainingWorkers {
    /// `workers` pools (at least 1) of `threads` threads each (at least 1).
    pub fn new(workers: usize, threads: usize) -> Result<Arc<Self>> {
        let (workers, threads) = (workers.max(1), threads.max(1));
        let pools = (0..workers)
            .map(|w| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .thread_name(move |t| format!("train-{w}.{t}"))
                    .build()
                    .map(Arc::new)
                    .map_err(|e| ClientError::Local(format!("training worker thread pool: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Arc::new(Self {
            permits: Arc::new(Semaphore::new(workers)),
            pools: Mutex::new(pools),
            workers,
            threads,
        }))
    }

    /// `workers` pools (0: one per core, at most `max_useful`) sharing this machine's cores.
    pub fn split_cores(workers: usize, max_useful: usize) -> Result<Arc<Self>> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let workers = if workers == 0 {
            cores.min(max_useful.max(1))
        } else {
            workers
        };
        Self::new(workers, (cores / workers.max(1)).max(1))
    }

    /// Number of workers.
    pub fn workers(&self) -> usize {
        self.workers
    }

    /// Threads per worker.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Waits for a free worker (first come, first served).
    pub async fn acquire(self: &Arc<Self>) -> Result<Worker> {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ClientError::Local("training workers closed: shutting down".into()))?;
        let pool = self
            .pools
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
            .expect("a permit is held for every free pool");
        Ok(Worker {
            pool: Some(pool),
            owner: self.clone(),
            _permit: permit,
        })
    }
}

/// One worker, held while a client trains; its pool goes back when it is dropped.
pub struct Worker {
    pool: Option<Arc<rayon::ThreadPool>>,
    owner: Arc<TrainingWorkers>,
    _permit: OwnedSemaphorePermit,
}

impl Worker {
    /// Runs `f` on this worker's threads (blocking the caller until it returns).
    pub fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.pool.as_ref().expect("held until drop").install(f)
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take() {
            // Back before the permit (dropped after this body) frees a waiter.
            self.owner
                .pools
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(pool);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn workers_run_on_their_own_pools_and_come_back() {
        let w = TrainingWorkers::new(2, 1).unwrap();
        let a = w.acquire().await.unwrap();
        let b = w.acquire().await.unwrap();
        assert_eq!(a.install(rayon::current_num_threads), 1);
        let (na, nb) = (
            a.install(|| std::thread::current().name().map(str::to_owned)),
            b.install(|| std::thread::current().name().map(str::to_owned)),
        );
        assert_ne!(na, nb, "two workers, two pools");
        // A third waits until one comes back.
        let third = tokio::time::timeout(std::time::Duration::from_millis(50), w.acquire()).await;
        assert!(third.is_err(), "no third worker while two are held");
        drop(a);
        let c = tokio::time::timeout(std::time::Duration::from_secs(5), w.acquire())
            .await
            .expect("a worker came back")
            .unwrap();
        assert_eq!(c.install(rayon::current_num_threads), 1);
        drop((b, c));
        assert_eq!(w.pools.lock().unwrap().len(), 2);
    }
}
