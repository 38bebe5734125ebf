//! The interception tap: every update, decoded but untouched, goes to each observer through its
//! own bounded queue. A slow observer loses updates (counted), it never blocks the federation.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use mjp::fl::ObservedUpdate;
use tokio::sync::mpsc;

/// An observer's end of the tap.
pub struct Subscription {
    /// Intercepted updates in order.
    pub updates: mpsc::Receiver<Arc<ObservedUpdate>>,
    /// How many were dropped for this observer so far.
    pub dropped: Arc<AtomicU64>,
}

struct Subscriber {
    tx: mpsc::Sender<Arc<ObservedUpdate>>,
    dropped: Arc<AtomicU64>,
}

/// Fan-out of intercepted updates.
pub struct Tap {
    queue: usize,
    sequence: AtomicU64,
    subscribers: Mutex<Vec<Subscriber>>,
}

impl Tap {
    /// A tap whose observers each queue up to `queue` updates.
    pub fn new(queue: usize) -> Self {
        Self {
            queue: queue.max(1),
            sequence: AtomicU64::new(0),
            subscribers: Mutex::new(Vec::new()),
        }
    }

    /// Adds an observer (gRPC Watch stream or the in-process adversary).
    pub fn subscribe(&self) -> Subscription {
        let (tx, rx) = mpsc::channel(self.queue);
        let dropped = Arc::new(AtomicU64::new(0));
        self.subscribers.lock().expect("tap lock").push(Subscriber {
            tx,
            dropped: dropped.clone(),
        });
        Subscription {
            updates: rx,
            dropped,
        }
    }

    /// Next sequence number.
    pub fn next_sequence(&self) -> u64 {
        self.sequence.fetch_add(1, Ordering::Relaxed)
    }

    /// Publishes one update to every observer without waiting.
    pub fn publish(&self, update: ObservedUpdate) {
        let mut subs = self.subscribers.lock().expect("tap lock");
        subs.retain(|s| !s.tx.is_closed());
        for s in subs.iter() {
            let mut u = update.clone();
            u.dropped_before = s.dropped.load(Ordering::Relaxed);
            match s.tx.try_send(Arc::new(u)) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    s.dropped.fetch_add(1, Ordering::Relaxed);
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
    }

    /// Ends every observer's stream (the federation is over or shutting down).
    pub fn close(&self) {
        self.subscribers.lock().expect("tap lock").clear();
    }

    /// Number of live observers.
    pub fn observers(&self) -> usize {
        self.subscribers
            .lock()
            .expect("tap lock")
            .iter()
            .filter(|s| !s.tx.is_closed())
            .count()
    }
}
