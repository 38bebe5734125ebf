//! One round's work: seeded sampling of the live clients, each client's round config (its
//! sub-seed), what a polling client should do, and admission of updates into the open round (the
//! header before any tensor byte is read, then the fully received update).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mjp::Seed;
use mjp::fl::{ModelUpdate, ObservedUpdate, RoundConfig, UpdateKind, UploadHeader};
use rand::seq::SliceRandom;

use super::membership::ClientEntry;
use super::{Federation, Phase, Refusal};

/// What a polling client should do.
#[derive(Clone, Debug)]
pub enum TaskDecision {
    /// Train on `model_version` for `round`.
    Train {
        /// Round.
        round: u32,
        /// Model version to start from.
        model_version: u64,
        /// The recipe (with this client's seed).
        config: RoundConfig,
    },
    /// Ask again later.
    Wait(String),
    /// Exit.
    Finished {
        /// Why.
        reason: String,
        /// Rounds completed.
        rounds: u32,
    },
}

/// Admission ticket for an update whose header passed validation.
#[derive(Clone, Debug)]
pub struct UploadTicket {
    /// Sender.
    pub client_id: String,
    /// Round.
    pub round: u32,
    /// Attempt of the round.
    pub attempt: u32,
    /// The update kind the header declared (the federation's; checked).
    pub kind: UpdateKind,
    /// The round's recipe for this client.
    pub config: RoundConfig,
}

/// An upload in flight (see [`Federation::begin_upload`]).
pub struct TransferGuard {
    fed: Arc<Federation>,
    key: (String, Transfer),
}

/// What a session has in flight (at most one of each).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Transfer {
    /// An update being received.
    Upload,
    /// A model version being sent.
    Download,
}

impl Drop for TransferGuard {
    fn drop(&mut self) {
        self.fed.lock().in_flight.remove(&self.key);
    }
}

impl Federation {
    /// Client `partition`'s recipe for `round`: the federation's training section, with the
    /// round's learning rate and shuffle ratio and the client's own sub-seed.
    fn round_config(
        &self,
        round: u32,
        attempt: u32,
        partition: u32,
        ratio: f64,
        deadline_unix_ms: u64,
    ) -> RoundConfig {
        let t = &self.config.training;
        let seed = Seed(self.config.federation.seed)
            .child("round", u64::from(round) * 1000 + u64::from(attempt))
            .child("partition", u64::from(partition));
        RoundConfig {
            update_kind: t.update_kind,
            local_steps: match t.update_kind {
                UpdateKind::FedSgd => 1,
                UpdateKind::FedAvg => t.local_steps,
            },
            local_epochs: t.local_epochs,
            learning_rate: t.learning_rate_at(round, self.config.federation.rounds),
            batch_size: t.batch_size,
            shuffle_ratio: ratio,
            jigsaw_probability: t.jigsaw_probability,
            per_sample_jigsaw: t.per_sample_jigsaw,
            dal_lambda: t.dal_lambda,
            fedprox_mu: t.fedprox_mu,
            seed: seed.0,
            deadline_unix_ms,
            local_optimizer: t.local_optimizer,
            defense: self.config.defense.at(round).client,
        }
    }

    /// The clients sampled for `round` (attempt `attempt`): a draw seeded by the run seed among
    /// the live clients in id order, so a rerun samples the same clients.
    pub(super) fn sample(
        &self,
        clients: &BTreeMap<String, ClientEntry>,
        round: u32,
        attempt: u32,
    ) -> BTreeSet<String> {
        let f = &self.config.federation;
        let timeout = Duration::from_secs_f64(f.client_timeout_secs);
        let mut live: Vec<String> = clients
            .values()
            .filter(|c| c.last_seen.elapsed() < timeout)
            .map(|c| c.id.clone())
            .collect();
        live.sort();
        let k = if f.sample_fraction > 0.0 {
            ((f.sample_fraction * live.len() as f64).ceil() as usize)
                .max(1)
                .min(f.clients_per_round as usize)
        } else {
            f.clients_per_round as usize
        }
        .min(live.len());
        let mut rng = Seed(f.seed)
            .child("sample", u64::from(round) * 1000 + u64::from(attempt))
            .rng();
        live.shuffle(&mut rng);
        live.into_iter().take(k).collect()
    }

    /// The shuffle ratio clients of `round` train with.
    pub(super) fn shuffle_ratio(&self, round: u32) -> f64 {
        // The schedule drives MJP; naive shuffling always permutes every patch; learned and none
        // never shuffle (the records say so rather than echoing an unused schedule).
        match self.vit.pe {
            mjp::PeMode::Mjp => self
                .config
                .shuffle
                .ratio_at(round, self.config.federation.rounds),
            mjp::PeMode::NaiveShuffle => 1.0,
            mjp::PeMode::Learned | mjp::PeMode::None => 0.0,
        }
    }

    /// What client `id` should do now.
    pub fn task_for(&self, id: &str) -> TaskDecision {
        let mut s = self.lock();
        if s.phase == Phase::Finished {
            return TaskDecision::Finished {
                reason: s
                    .failure
                    .clone()
                    .unwrap_or_else(|| "all rounds completed".into()),
                rounds: s.completed,
            };
        }
        let s = &mut *s;
        match &mut s.round {
            Some(r) if r.sampled.contains(id) && !r.submitted.contains(id) => {
                let partition = s.clients.get(id).map_or(0, |c| c.partition);
                if !r.started.contains(id) {
                    r.started.insert(id.to_string());
                }
                TaskDecision::Train {
                    round: r.round,
                    model_version: r.version,
                    config: self.round_config(
                        r.round,
                        r.attempt,
                        partition,
                        r.ratio,
                        r.deadline_unix_ms,
                    ),
                }
            }
            Some(r) if r.submitted.contains(id) => {
                TaskDecision::Wait(format!("update for round {} received", r.round))
            }
            Some(r) => TaskDecision::Wait(format!("not sampled in round {}", r.round)),
            None => TaskDecision::Wait(format!(
                "waiting for clients ({} connected, {} needed)",
                self.connected_recently(s),
                self.config.federation.min_clients
            )),
        }
    }

    /// Validates an update's header before any of its bytes are read.
    pub fn admit(&self, client_id: &str, header: &UploadHeader) -> Result<UploadTicket, Refusal> {
        let (round, model_version) = (header.round, header.model_version);
        let s = self.lock();
        let Some(r) = &s.round else {
            return Err(Refusal::FailedPrecondition(format!(
                "round {round} is not open"
            )));
        };
        if round != r.round {
            return Err(Refusal::FailedPrecondition(format!(
                "update for round {round}, the open round is {}",
                r.round
            )));
        }
        if model_version != r.version {
            return Err(Refusal::FailedPrecondition(format!(
                "update computed from model version {model_version}, round {} trains version {}",
                r.round, r.version
            )));
        }
        let kind = match header.kind {
            None => return Err(Refusal::InvalidArgument("update kind not set".into())),
            Some(k) if k != self.config.training.update_kind => {
                return Err(Refusal::InvalidArgument(format!(
                    "update kind {k}, this federation expects {}",
                    self.config.training.update_kind
                )));
            }
            Some(k) => k,
        };
        if !r.sampled.contains(client_id) {
            return Err(Refusal::FailedPrecondition(format!(
                "{client_id} was not sampled in round {}",
                r.round
            )));
        }
        if r.submitted.contains(client_id) {
            return Err(Refusal::AlreadyExists(format!(
                "{client_id} already submitted for round {}",
                r.round
            )));
        }
        if Instant::now() > r.deadline {
            return Err(Refusal::FailedPrecondition(format!(
                "round {} passed its deadline",
                r.round
            )));
        }
        let partition = s.clients.get(client_id).map_or(0, |c| c.partition);
        Ok(UploadTicket {
            client_id: client_id.to_string(),
            round: r.round,
            attempt: r.attempt,
            kind,
            config: self.round_config(r.round, r.attempt, partition, r.ratio, r.deadline_unix_ms),
        })
    }

    /// Counts a refused update of an authenticated client against the open round (if one is
    /// open).
    pub fn note_rejection(&self) {
        if let Some(r) = self.lock().round.as_mut() {
            r.rejected += 1;
        }
    }

    /// Counts a call refused for want of a valid session; returns the count so far (callers
    /// log only a few of them: anyone can make these calls).
    pub fn note_unauthenticated(&self) -> u64 {
        let mut s = self.lock();
        s.unauthenticated += 1;
        s.unauthenticated
    }

    /// Marks a transfer of `client` in flight until the guard drops; refused while another
    /// of the same kind is (a session holds at most one decoding slot, and at most one
    /// download's buffers: 200 abandoned downloads of one session cannot pile up).
    pub fn begin(self: &Arc<Self>, client: &str, kind: Transfer) -> Result<TransferGuard, Refusal> {
        let key = (client.to_string(), kind);
        if !self.lock().in_flight.insert(key.clone()) {
            return Err(Refusal::AlreadyExists(format!(
                "{client} already has {} in flight",
                match kind {
                    Transfer::Upload => "an upload",
                    Transfer::Download => "a download",
                }
            )));
        }
        Ok(TransferGuard {
            fed: self.clone(),
            key,
        })
    }

    /// Folds a fully received, validated update into the open round; publishes it on the tap.
    pub fn accept(&self, ticket: UploadTicket, update: ModelUpdate) -> Result<u32, Refusal> {
        // One pass over the values measures what admission needs and finds non-finite ones.
        let stats = update.tensors.value_stats();
        if let Err(e) = update.tensors.check_manifest(&self.manifest).and_then(|_| {
            if stats.finite {
                Ok(())
            } else {
                update.tensors.check_finite()
            }
        }) {
            return Err(Refusal::InvalidArgument(e.to_string()));
        }
        self.admission
            .check_metrics(&update.metrics)
            .map_err(Refusal::InvalidArgument)?;
        // The bounds come from what the server knows (the partition it assigned, the round's
        // recipe, the global model); the update's norm is measured outside the lock.
        let (max_weight, norm_bound) = {
            let s = self.lock();
            let partition = s.clients.get(&ticket.client_id).map_or(0, |c| c.partition);
            let bound = s.round.as_ref().map_or(f64::INFINITY, |r| r.norm_bound);
            (self.admission.max_weight(partition, &ticket.config), bound)
        };
        let admitted = self
            .admission
            .admit_stats(stats, update.num_examples, max_weight, norm_bound)
            .map_err(Refusal::InvalidArgument)?;
        if admitted.weight < update.num_examples as f64 || admitted.scale < 1.0 {
            tracing::warn!(
                "{}: update bounded (claimed {} examples, weighted {}; L2 norm {:.3e}, scaled by {:.3e})",
                ticket.client_id,
                update.num_examples,
                admitted.weight,
                admitted.norm,
                admitted.scale
            );
        }
        // Sequence numbers are taken only for updates that reach the tap: a gap means a drop.
        // Under the secure-aggregation view no single update reaches it (the round's sum does,
        // when the round commits).
        let secure = self.config.defense.at(ticket.round).secure_aggregation;
        let update = Arc::new(update);
        let publish = |accepted: bool, update: Arc<ModelUpdate>| {
            if !secure {
                self.tap.publish(ObservedUpdate {
                    sequence: self.tap.next_sequence(),
                    client_id: ticket.client_id.clone(),
                    accepted,
                    dropped_before: 0,
                    config: ticket.config.clone(),
                    update,
                    contributors: Vec::new(),
                });
            }
        };
        let mut s = self.lock();
        let open = s.round.as_mut().filter(|r| {
            r.round == ticket.round && r.attempt == ticket.attempt && Instant::now() <= r.deadline
        });
        let Some(r) = open else {
            drop(s);
            publish(false, update);
            return Err(Refusal::FailedPrecondition(format!(
                "round {} closed before the update finished arriving (deadline)",
                ticket.round
            )));
        };
        // Each update adds at most weight x scale x max|value| to any value of the running sum:
        // refuse the one that could take it past what f32 holds.
        let adds = admitted.weight * admitted.scale * admitted.max_abs;
        if r.magnitude + adds > f64::from(f32::MAX) / 4.0 {
            return Err(Refusal::InvalidArgument(format!(
                "update values up to {:.3e} with weight {} would overflow the round's aggregate",
                admitted.max_abs, admitted.weight
            )));
        }
        if !r.submitted.insert(ticket.client_id.clone()) {
            return Err(Refusal::AlreadyExists(format!(
                "{} already submitted for round {}",
                ticket.client_id, r.round
            )));
        }
        r.magnitude += adds;
        // The tap gets the update exactly as received; the fold shares it (no copy), in
        // client-id order when `training.ordered_fold_mb` lets updates wait for their turn.
        r.enqueue(
            ticket.client_id.clone(),
            super::Pending {
                config: ticket.config.clone(),
                update: update.clone(),
                weight: admitted.weight,
                scale: admitted.scale,
            },
        );
        let received = r.submitted.len() as u32;
        drop(s);
        publish(true, update.clone());
        self.recycle(update);
        self.notify_submission();
        Ok(received)
    }
}
