//! The round driver: waits for enough clients, opens each round, closes it when every sampled
//! client has submitted or the deadline passes, retries rounds that missed `min_fit`, and
//! commits the rest (aggregate, server optimiser, evaluation, checkpoint, record).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use mjp::Seed;
use mjp::params::NamedTensors;
use mjp::train::{EvalOptions, EvalReport, evaluate};
use tokio::sync::watch;

use super::{Federation, OpenRound, OrderedFold, Phase, SecureSum, unix_ms};
use crate::aggregate::{Aggregator, ServerState, apply};
use crate::error::{CoordinatorError, Result};
use crate::rundir::RoundRecord;

impl Federation {
    /// Runs rounds until all are done, too many retries fail, or `shutdown` flips to true.
    pub async fn drive(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) -> Result<()> {
        let f = &self.config.federation;
        loop {
            if *shutdown.borrow() {
                return Ok(());
            }
            let (completed, attempt) = {
                let s = self.lock();
                (s.completed, s.attempt)
            };
            if completed >= f.rounds {
                self.lock().phase = Phase::Finished;
                self.notify();
                tracing::info!("federation finished: {completed} rounds");
                return Ok(());
            }
            let round = completed + 1;
            // Wait for enough live clients.
            loop {
                let n = self.connected(&self.lock());
                if n >= f.min_clients {
                    break;
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    _ = shutdown.changed() => return Ok(()),
                }
            }
            self.open_round(round, attempt);
            // Wait for every sampled client, or the deadline. A sampled client that has not
            // asked for its task within `client_timeout_secs` of the opening (a polling client
            // asks within seconds) is absent, a re-joined client's old identity for one: once
            // every client that did take its task has submitted, the round closes without it
            // instead of waiting for the deadline. A client that took its task and went silent
            // cannot be told from a slow one, so it is waited for until the deadline.
            let (deadline, pickup) = self
                .lock()
                .round
                .as_ref()
                .map(|r| {
                    let pickup = r.opened + Duration::from_secs_f64(f.client_timeout_secs);
                    (r.deadline, pickup.min(r.deadline))
                })
                .expect("round just opened");
            let mut changes = self.watch_submissions();
            let closed_by = loop {
                let (all, started_all) = self.lock().round.as_ref().map_or((false, false), |r| {
                    (
                        r.submitted.len() == r.sampled.len(),
                        r.started.is_subset(&r.submitted),
                    )
                });
                if all {
                    break "all-submitted";
                }
                let now = Instant::now();
                if now >= deadline {
                    break "deadline";
                }
                if now >= pickup && started_all {
                    break "absent-clients";
                }
                let wake = if now < pickup { pickup } else { deadline };
                tokio::select! {
                    _ = changes.changed() => {}
                    _ = tokio::time::sleep_until(wake.into()) => {}
                    _ = shutdown.changed() => {
                        self.lock().round = None;
                        tracing::info!("shutdown: round {round} abandoned (it reruns on restart)");
                        return Ok(());
                    }
                }
            };
            let mut open = self.lock().round.take().expect("round open");
            self.notify();
            open.flush();
            let count = open.aggregator.count() as u32;
            if count < f.min_fit {
                let mut s = self.lock();
                s.attempt += 1;
                tracing::warn!(
                    "round {round} closed by {closed_by} with {count} of {} needed updates; global model unchanged, retrying",
                    f.min_fit
                );
                if s.attempt > f.max_round_retries + 1 {
                    s.failure = Some(format!(
                        "round {round} failed {} times to collect {} updates",
                        s.attempt - 1,
                        f.min_fit
                    ));
                    s.phase = Phase::Finished;
                    drop(s);
                    self.notify();
                    return Err(CoordinatorError::Starved {
                        round,
                        min_fit: f.min_fit,
                        attempts: f.max_round_retries + 1,
                    });
                }
                continue;
            }
            let me = self.clone();
            let committed = tokio::task::spawn_blocking(move || me.commit(open, closed_by))
                .await
                .map_err(|e| CoordinatorError::task("round commit", e))
                .and_then(|r| r);
            let record = match committed {
                Ok(record) => record,
                // The aggregate moved the model somewhere non-finite: nothing was applied or
                // written; the round is tried again (with another sample) like a starved one.
                Err(e @ CoordinatorError::Diverged { .. }) => {
                    let mut s = self.lock();
                    s.attempt += 1;
                    tracing::warn!("{e}; global model unchanged, retrying the round");
                    if s.attempt > f.max_round_retries + 1 {
                        s.failure = Some(format!("round {round}: {e}"));
                        s.phase = Phase::Finished;
                        drop(s);
                        self.notify();
                        return Err(e);
                    }
                    continue;
                }
                Err(e) => {
                    // The global model did not move; stop so clients exit with the reason and a
                    // restart resumes from the last committed round.
                    let mut s = self.lock();
                    s.failure = Some(format!("round {round} could not be committed: {e}"));
                    s.phase = Phase::Finished;
                    drop(s);
                    self.notify();
                    return Err(e);
                }
            };
            tracing::info!(
                "round {} committed: {} updates, shuffle ratio {:.2}, test accuracy {}",
                record.round,
                record.aggregated.len(),
                record.shuffle_ratio,
                record
                    .test
                    .as_ref()
                    .map_or("-".into(), |t| format!("{:.4}", t.accuracy))
            );
        }
    }

    /// Opens `round` (attempt `attempt`) on the clients sampled for it.
    fn open_round(&self, round: u32, attempt: u32) {
        let f = &self.config.federation;
        let mut s = self.lock();
        let sampled = self.sample(&s.clients, round, attempt);
        let ratio = self.shuffle_ratio(round);
        let deadline_in = Duration::from_secs_f64(f.round_deadline_secs);
        tracing::info!(
            "round {round} (attempt {attempt}) open: {} clients sampled, shuffle ratio {ratio:.3}",
            sampled.len()
        );
        s.round = Some(OpenRound {
            round,
            attempt,
            version: u64::from(s.completed),
            ratio,
            sampled,
            started: BTreeSet::new(),
            submitted: BTreeSet::new(),
            aggregator: Aggregator::new(self.config.training.aggregator, &self.manifest),
            norm_bound: self.admission.norm_bound(&s.global),
            magnitude: 0.0,
            metrics: BTreeMap::new(),
            rejected: 0,
            opened: Instant::now(),
            deadline: Instant::now() + deadline_in,
            deadline_unix_ms: unix_ms(SystemTime::now() + deadline_in),
            secure: self
                .config
                .defense
                .at(round)
                .secure_aggregation
                .then(SecureSum::default),
            fold: OrderedFold {
                budget: (self.config.training.ordered_fold_mb.unwrap_or(0) as usize)
                    .saturating_mul(1 << 20),
                ..OrderedFold::default()
            },
        });
        s.phase = Phase::Training;
        drop(s);
        self.notify();
    }

    /// Aggregates, moves the global model, evaluates, checkpoints and records a closed round.
    fn commit(&self, mut open: OpenRound, closed_by: &str) -> Result<RoundRecord> {
        let secure = open.secure.take();
        // The server optimiser's state is moved out, not copied (for Adam it is two models). A
        // commit that fails stops the federation (see `drive`); a restart resumes from the last
        // committed round's state on disk, so nothing half-applied is ever used.
        let (global, mut server) = {
            let mut s = self.lock();
            (s.global.clone(), std::mem::take(&mut s.server))
        };
        let aggregated = open.submitted.iter().cloned().collect();
        let update = open.aggregator.finish().expect("min_fit >= 1 updates");
        let kind = self.config.training.update_kind;
        // A diverged round leaves the optimiser state as it was (Adam: two models' worth).
        let before = server.clone();
        let diverged = |server: ServerState, reason: String| {
            self.lock().server = server;
            CoordinatorError::Diverged {
                round: open.round,
                reason,
            }
        };
        let new_global = apply(
            &self.config.training.server_optimizer(),
            &mut server,
            &global,
            update,
            kind,
        );
        drop(global);
        if let Err(e) = new_global.check_finite() {
            return Err(diverged(
                before,
                format!("aggregated model is not finite: {e}"),
            ));
        }
        let every = self.config.data.eval_every.max(1);
        let due = open.round == 1
            || open.round.is_multiple_of(every)
            || open.round >= self.config.federation.rounds;
        let test = if due {
            self.evaluate(&new_global, open.round >= self.config.federation.rounds)?
        } else {
            None
        };
        // Nothing non-finite reaches rounds.jsonl (it would not read back, and resume with it).
        if let Some(t) = &test
            && !t.is_finite()
        {
            return Err(diverged(
                before,
                format!(
                    "evaluation of the new model is not finite (loss {})",
                    t.loss
                ),
            ));
        }
        let version = open.version + 1;
        self.run_dir.save_model(version, &new_global, &self.vit)?;
        let defense = self.config.defense.at(open.round);
        let sampled: Vec<String> = open.sampled.into_iter().collect();
        let privacy = defense.client.is_private().then(|| {
            let mut ledger = crate::privacy::Ledger::from_records(&self.lock().history);
            ledger.add_round(&sampled, &defense.client);
            ledger.round(&sampled, &defense.client, self.config.defense.delta)
        });
        let record = RoundRecord {
            round: open.round,
            attempt: open.attempt,
            model_version: version,
            update_kind: kind.to_string(),
            shuffle_ratio: open.ratio,
            defense,
            privacy: privacy.flatten(),
            sampled,
            aggregated,
            rejected: open.rejected,
            folded_out_of_order: open.fold.out_of_order,
            closed_by: closed_by.to_string(),
            client_metrics: open
                .metrics
                .into_iter()
                .map(|(k, (sum, n))| (k, sum / f64::from(n.max(1))))
                .collect(),
            test,
            wall_seconds: open.opened.elapsed().as_secs_f64(),
            committed_unix_ms: unix_ms(SystemTime::now()),
        };
        self.run_dir.commit_round(&record, &server)?;
        // The secure-aggregation view: the round's sum reaches the tap once the round is in.
        if let Some(observed) = secure
            .and_then(|sum| sum.observed(open.round, open.version, kind, self.tap.next_sequence()))
        {
            self.tap.publish(observed);
        }
        let mut s = self.lock();
        s.global = Arc::new(new_global);
        s.server = server;
        s.completed = open.round;
        s.attempt = 1;
        s.history.push(record.clone());
        s.phase = if s.completed >= self.config.federation.rounds {
            Phase::Finished
        } else {
            Phase::Waiting
        };
        drop(s);
        self.notify();
        Ok(record)
    }

    /// Evaluates on the test set: all of it for the last round, `round_test_limit` images before.
    fn evaluate(&self, params: &NamedTensors, last: bool) -> Result<Option<EvalReport>> {
        let Some(test) = &self.test_data else {
            return Ok(None);
        };
        let device = self.config.server.device.device()?;
        let model = mjp::checkpoint::model_from_params(&self.vit, params, &device)?;
        let options = EvalOptions {
            jigsaw_metrics: self.config.data.eval_jigsaw_metrics,
            jigsaw_limit: (self.config.data.eval_jigsaw_limit > 0)
                .then_some(self.config.data.eval_jigsaw_limit),
            seed: Seed(self.config.federation.seed).child("eval", 0),
            limit: (!last && self.config.data.round_test_limit > 0)
                .then_some(self.config.data.round_test_limit),
            ..EvalOptions::default()
        };
        Ok(Some(evaluate(&model, test, &options)))
    }
}
