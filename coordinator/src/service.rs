//! The gRPC edge: `Federation` and `Observer` services. Converts wire types to domain types (via
//! `mjpfl_proto::convert`) and refusals to gRPC statuses, and does nothing else.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use mjp::fl::{ModelUpdate, ObservedUpdate, UploadHeader};
use mjp::params::NamedTensors;
use mjpfl_proto::convert::{self, DeclaredTensors, TensorLayout};
use mjpfl_proto::v1;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::federation::{Federation, Refusal, TaskDecision, Transfer, TransferGuard, UploadTicket};

/// How long GetTask holds a poll open when there is nothing to do.
const LONG_POLL: Duration = Duration::from_secs(10);
/// What a Wait tells the client.
const RETRY_AFTER_MS: u32 = 250;

impl From<Refusal> for Status {
    fn from(r: Refusal) -> Status {
        match r {
            Refusal::Unauthenticated(m) => Status::unauthenticated(m),
            Refusal::FailedPrecondition(m) => Status::failed_precondition(m),
            Refusal::InvalidArgument(m) => Status::invalid_argument(m),
            Refusal::AlreadyExists(m) => Status::already_exists(m),
            Refusal::NotFound(m) => Status::not_found(m),
            Refusal::ResourceExhausted(m) => Status::resource_exhausted(m),
            Refusal::DataLoss(m) => Status::data_loss(m),
            Refusal::Internal(m) => Status::internal(m),
        }
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The client-facing service.
#[derive(Clone)]
pub struct FederationService {
    fed: Arc<Federation>,
}

impl FederationService {
    /// Wraps the federation.
    pub fn new(fed: Arc<Federation>) -> Self {
        Self { fed }
    }

    /// How long an upload may send nothing.
    fn idle_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.fed.config().server.upload_idle_timeout_secs)
    }

    /// Validates the header, then the chunks as they arrive, then the decoded values; only a
    /// fully valid update reaches the aggregate.
    async fn receive_update(
        &self,
        header: UploadHeader,
        declared: DeclaredTensors,
        mut stream: Streaming<v1::UpdateMessage>,
        authenticated: Option<crate::wire_limits::Authenticated>,
    ) -> Result<u32, Status> {
        let (ticket, layout, _in_flight) = self.open_upload(&header, declared, authenticated)?;
        let idle = self.idle_timeout();
        // One model's worth of memory per update being decoded: bound how many at once, and
        // take a slot only once data flows (a header followed by silence holds none).
        let mut next = next_chunk(&mut stream, idle).await?;
        let _permit = self.decode_permit().await?;
        let mut assembler = layout.assembler_with_buffers(
            self.fed.config().server.max_chunk_bytes,
            self.fed.decode_buffers(),
        );
        while let Some(chunk) = next {
            assembler.push(&chunk)?;
            // Let go of the chunk before reading the next: its payload is a slice of tonic's
            // receive buffer, which tonic reuses for the next message only once no slice of it
            // is left (else every 1 MiB message is a fresh allocation, faulted in page by page).
            drop(chunk);
            next = next_chunk(&mut stream, idle).await?;
        }
        let tensors = assembler.finish()?;
        let update = header.into_update(ticket.kind, tensors);
        Ok(self.fed.accept(ticket, update)?)
    }

    /// The checks an upload passes before any of its values are read: the session, its one
    /// upload in flight (held until the returned guard drops), the round's admission of the
    /// header and the declared tensors against the model.
    fn open_upload(
        &self,
        header: &UploadHeader,
        declared: DeclaredTensors,
        authenticated: Option<crate::wire_limits::Authenticated>,
    ) -> Result<(UploadTicket, TensorLayout, TransferGuard), Status> {
        let client = self.fed.authenticate(&header.session_token)?;
        let in_flight = self.fed.begin(&client, Transfer::Upload)?;
        // A session's chunks are bounded by its one upload in flight: no longer charged to the
        // budget shared with callers nobody has authenticated.
        if let Some(a) = authenticated {
            a.set();
        }
        let ticket = self.fed.admit(&client, header)?;
        let layout = declared.check(self.fed.manifest(), header.total_bytes)?;
        Ok((ticket, layout, in_flight))
    }

    async fn decode_permit(&self) -> Result<tokio::sync::OwnedSemaphorePermit, Status> {
        self.fed
            .upload_permits()
            .acquire_owned()
            .await
            .map_err(|_| Status::unavailable("coordinator shutting down"))
    }

    /// Counts and logs a refused upload (a session's refusals against the open round; calls
    /// without a valid session apart, logged at a bounded rate).
    fn note_refusal(&self, round: u32, status: &Status) {
        if status.code() == tonic::Code::Unauthenticated {
            // Anyone can make these calls: counted apart from the round's rejections, and
            // logged at a bounded rate (the first ten, then at powers of two).
            let n = self.fed.note_unauthenticated();
            if n <= 10 || n.is_power_of_two() {
                tracing::warn!(
                    "update refused without a valid session ({n} so far): {}",
                    status.message()
                );
            }
        } else {
            self.fed.note_rejection();
            tracing::warn!(
                "update for round {round} refused ({:?}): {}",
                status.code(),
                status.message()
            );
        }
    }

    /// An update handed over in process by a simulated client of this process, through the
    /// checks of [`Self::submit_update`]'s: the header converted as from the wire, the session,
    /// the round's admission, the declared layout, a decoding permit, and the manifest, value,
    /// norm and weight checks of `accept` before the update is folded and tapped. Only the
    /// serialisation is skipped; the values are the same f32s the wire would carry. Returns the
    /// updates received this round, this one included.
    pub async fn submit_in_process(&self, token: &str, update: ModelUpdate) -> Result<u32, Status> {
        let (header, declared) =
            convert::upload_header_from_wire(convert::update_header(&update, token));
        let round = header.round;
        let result = async {
            let (ticket, _layout, _in_flight) = self.open_upload(&header, declared, None)?;
            let _permit = self.decode_permit().await?;
            let update = header.into_update(ticket.kind, update.tensors);
            Ok(self.fed.accept(ticket, update)?)
        }
        .await;
        if let Err(status) = &result {
            self.note_refusal(round, status);
        }
        result
    }

    /// Global model `version` for a simulated client of this process: the checks of
    /// `DownloadModel` (the session, one download in flight, a version the federation holds)
    /// without streaming it.
    pub fn model_in_process(&self, token: &str, version: u64) -> Result<Arc<NamedTensors>, Status> {
        let client = self.fed.authenticate(token)?;
        let _guard = self.fed.begin(&client, Transfer::Download)?;
        Ok(self.fed.model(version)?)
    }
}

/// The next chunk of an upload (`None` at its end), or why the upload is cut off: nothing
/// arrived for `idle`, a message other than a chunk, an oversized message, a broken stream.
async fn next_chunk(
    stream: &mut Streaming<v1::UpdateMessage>,
    idle: Duration,
) -> Result<Option<v1::TensorChunk>, Status> {
    let message = tokio::time::timeout(idle, stream.message())
        .await
        .map_err(|_| Status::deadline_exceeded(format!("no data for {idle:?}: upload cut off")))?;
    match message {
        Ok(Some(v1::UpdateMessage {
            kind: Some(v1::update_message::Kind::Chunk(c)),
        })) => Ok(Some(c)),
        Ok(Some(_)) => Err(Status::invalid_argument(
            "only chunks may follow the header",
        )),
        Ok(None) => Ok(None),
        Err(e) if e.code() == tonic::Code::DeadlineExceeded => Err(e),
        Err(e)
            if matches!(
                e.code(),
                tonic::Code::ResourceExhausted | tonic::Code::OutOfRange
            ) =>
        {
            Err(Status::resource_exhausted(format!(
                "upload refused: {}",
                e.message()
            )))
        }
        Err(e) => Err(Status::data_loss(format!(
            "update stream broke off: {}",
            e.message()
        ))),
    }
}

/// Streams model `version` as chunks; the first message carries the manifest. A reader that
/// takes nothing for `idle` is cut off (DEADLINE_EXCEEDED) and the stream lets go of the model
/// and of `guard` (its session's one download slot).
fn model_stream(
    version: u64,
    params: Arc<NamedTensors>,
    max_chunk: usize,
    vit: &mjp::VitConfig,
    idle: Duration,
    guard: Option<TransferGuard>,
) -> BoxStream<v1::ModelChunk> {
    let manifest = convert::manifest_to_wire(&params.manifest());
    let config = serde_json::to_string(vit).expect("config serialises");
    // Chunks are cut as the client reads them: a download holds one chunk, not a model copy.
    let chunks = convert::Chunks::new(params, |p| p, max_chunk);
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stream = CutOff {
        rx: tokio_stream::wrappers::ReceiverStream::new(rx),
        cut: cut.clone(),
        idle,
        ended: false,
    };
    tokio::spawn(async move {
        let _guard = guard;
        for (i, chunk) in chunks.enumerate() {
            let message = v1::ModelChunk {
                model_version: version,
                manifest: (i == 0).then(|| manifest.clone()),
                chunk: Some(chunk),
                model_config_json: if i == 0 {
                    config.clone()
                } else {
                    String::new()
                },
            };
            match tx.send_timeout(Ok(message), idle).await {
                Ok(()) => {}
                Err(tokio::sync::mpsc::error::SendTimeoutError::Timeout(_)) => {
                    cut.store(true, std::sync::atomic::Ordering::Release);
                    return;
                }
                Err(tokio::sync::mpsc::error::SendTimeoutError::Closed(_)) => return,
            }
        }
    });
    Box::pin(stream)
}

/// The chunks a download's producer sent, then DEADLINE_EXCEEDED if it gave up on the reader
/// (a reader must never take a cut-off model for a whole one).
struct CutOff {
    rx: tokio_stream::wrappers::ReceiverStream<Result<v1::ModelChunk, Status>>,
    cut: Arc<std::sync::atomic::AtomicBool>,
    idle: Duration,
    ended: bool,
}

impl Stream for CutOff {
    type Item = Result<v1::ModelChunk, Status>;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        match Pin::new(&mut self.rx).poll_next(cx) {
            std::task::Poll::Ready(None) if !self.ended => {
                self.ended = true;
                let cut = self.cut.load(std::sync::atomic::Ordering::Acquire);
                std::task::Poll::Ready(cut.then(|| {
                    Err(Status::deadline_exceeded(format!(
                        "the download was not read for {:?}: cut off",
                        self.idle
                    )))
                }))
            }
            other => other,
        }
    }
}

#[tonic::async_trait]
impl v1::federation_server::Federation for FederationService {
    async fn join(
        &self,
        request: Request<v1::JoinRequest>,
    ) -> Result<Response<v1::JoinResponse>, Status> {
        let req = request.into_inner();
        let caps = req.capabilities.unwrap_or_default();
        let joined = self.fed.join(
            &req.client_name,
            &req.join_secret,
            caps.num_examples,
            req.partition_hint,
            &req.previous_session_token,
        )?;
        let config = self.fed.config();
        Ok(Response::new(v1::JoinResponse {
            client_id: joined.client_id,
            session_token: joined.token,
            federation: Some(v1::FederationInfo {
                federation_id: self.fed.id().to_string(),
                model_config_json: serde_json::to_string(self.fed.vit())
                    .expect("config serialises"),
                dataset: config.data.dataset.to_string(),
                total_rounds: config.federation.rounds,
                seed: config.federation.seed,
                partition_index: joined.partition,
                num_partitions: config.partition.count(),
                partition_json: serde_json::to_string(&config.partition)
                    .expect("partition serialises"),
                max_message_bytes: mjpfl_proto::MAX_MESSAGE_BYTES as u64,
                max_chunk_bytes: config.server.max_chunk_bytes as u64,
            }),
            manifest: Some(convert::manifest_to_wire(self.fed.manifest())),
        }))
    }

    async fn get_task(
        &self,
        request: Request<v1::GetTaskRequest>,
    ) -> Result<Response<v1::Task>, Status> {
        let id = self.fed.authenticate(&request.get_ref().session_token)?;
        let mut changes = self.fed.watch();
        let deadline = tokio::time::Instant::now() + LONG_POLL;
        let kind = loop {
            match self.fed.task_for(&id) {
                TaskDecision::Train {
                    round,
                    model_version,
                    config,
                } => {
                    break v1::task::Kind::Train(v1::TrainTask {
                        round,
                        model_version,
                        config: Some(convert::round_config_to_wire(&config)),
                    });
                }
                TaskDecision::Finished { reason, rounds } => {
                    break v1::task::Kind::Finished(v1::Finished {
                        reason,
                        rounds_completed: rounds,
                    });
                }
                TaskDecision::Wait(reason) => {
                    tokio::select! {
                        _ = changes.changed() => continue,
                        _ = tokio::time::sleep_until(deadline) => {
                            break v1::task::Kind::Wait(v1::Wait { retry_after_ms: RETRY_AFTER_MS, reason });
                        }
                    }
                }
            }
        };
        Ok(Response::new(v1::Task { kind: Some(kind) }))
    }

    type DownloadModelStream = BoxStream<v1::ModelChunk>;

    async fn download_model(
        &self,
        request: Request<v1::DownloadModelRequest>,
    ) -> Result<Response<Self::DownloadModelStream>, Status> {
        let req = request.into_inner();
        let client = self.fed.authenticate(&req.session_token)?;
        let guard = self.fed.begin(&client, Transfer::Download)?;
        let params = self.fed.model(req.model_version)?;
        Ok(Response::new(model_stream(
            req.model_version,
            params,
            self.fed.config().server.max_chunk_bytes,
            self.fed.vit(),
            self.idle_timeout(),
            Some(guard),
        )))
    }

    async fn submit_update(
        &self,
        request: Request<Streaming<v1::UpdateMessage>>,
    ) -> Result<Response<v1::SubmitUpdateResponse>, Status> {
        let authenticated = request
            .extensions()
            .get::<crate::wire_limits::Authenticated>()
            .cloned();
        let mut stream = request.into_inner();
        let first = tokio::time::timeout(self.idle_timeout(), stream.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no header: upload cut off"))?;
        let header = match first? {
            Some(v1::UpdateMessage {
                kind: Some(v1::update_message::Kind::Header(h)),
            }) => h,
            Some(_) => {
                return Err(Status::invalid_argument(
                    "the first message of SubmitUpdate must be the header",
                ));
            }
            None => return Err(Status::invalid_argument("empty SubmitUpdate stream")),
        };
        let (header, declared) = convert::upload_header_from_wire(header);
        let round = header.round;
        match self
            .receive_update(header, declared, stream, authenticated)
            .await
        {
            Ok(received) => Ok(Response::new(v1::SubmitUpdateResponse {
                accepted: true,
                round,
                received,
            })),
            Err(status) => {
                self.note_refusal(round, &status);
                Err(status)
            }
        }
    }

    async fn status(
        &self,
        request: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::StatusResponse>, Status> {
        if !self
            .fed
            .auth()
            .may_see_status(&request.get_ref().status_token)
        {
            return Err(Status::unauthenticated("wrong status token"));
        }
        let s = self.fed.status();
        Ok(Response::new(v1::StatusResponse {
            round: s.round,
            model_version: s.model_version,
            connected_clients: s.connected,
            total_rounds: s.total_rounds,
            phase: s.phase.name().to_string(),
            history: s
                .history
                .iter()
                .map(|r| v1::RoundSummary {
                    round: r.round,
                    updates: r.aggregated.len() as u32,
                    test_accuracy: r.test.as_ref().map_or(f64::NAN, |t| t.accuracy),
                    test_loss: r.test.as_ref().map_or(f64::NAN, |t| t.loss),
                    shuffle_ratio: r.shuffle_ratio,
                    wall_seconds: r.wall_seconds,
                })
                .collect(),
        }))
    }
}

/// The observer (adversary) service.
#[derive(Clone)]
pub struct ObserverService {
    fed: Arc<Federation>,
}

impl ObserverService {
    /// Wraps the federation.
    pub fn new(fed: Arc<Federation>) -> Self {
        Self { fed }
    }

    fn check(&self, token: &str) -> Result<(), Status> {
        if self.fed.auth().is_observer(token) {
            Ok(())
        } else {
            Err(Status::unauthenticated("wrong observer token"))
        }
    }
}

/// The messages of one intercepted update: header, chunks (the bytes as received, cut as they
/// are sent), end.
pub fn intercepted_messages(
    u: &ObservedUpdate,
    max_chunk: usize,
) -> impl Iterator<Item = v1::InterceptedMessage> + Send + 'static {
    use v1::intercepted_message::Kind;
    let header = v1::InterceptHeader {
        sequence: u.sequence,
        client_id: u.client_id.clone(),
        round: u.update.round,
        model_version: u.update.model_version,
        kind: convert::kind_to_wire(u.update.kind) as i32,
        batch_size: u.update.batch_size,
        local_steps: u.update.local_steps,
        num_examples: u.update.num_examples,
        config: Some(convert::round_config_to_wire(&u.config)),
        tensors: convert::manifest_to_wire(&u.update.tensors.manifest()).tensors,
        dropped_before: u.dropped_before,
        accepted: u.accepted,
        contributors: u.contributors.clone(),
    };
    std::iter::once(Kind::Header(header))
        .chain(convert::Chunks::new(u.update.clone(), |u| &u.tensors, max_chunk).map(Kind::Chunk))
        .chain(std::iter::once(Kind::End(v1::InterceptEnd {
            sequence: u.sequence,
        })))
        .map(|k| v1::InterceptedMessage { kind: Some(k) })
}

#[tonic::async_trait]
impl v1::observer_server::Observer for ObserverService {
    type WatchStream = BoxStream<v1::InterceptedMessage>;

    async fn watch(
        &self,
        request: Request<v1::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        self.check(&request.get_ref().observer_token)?;
        let sub = self.fed.tap().subscribe();
        let max_chunk = self.fed.config().server.max_chunk_bytes;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let mut updates = sub.updates;
        // Forwarder: when the observer reads slowly this awaits, the tap queue fills and the tap
        // drops (and counts) instead of ever blocking the federation.
        tokio::spawn(async move {
            while let Some(u) = updates.recv().await {
                for m in intercepted_messages(&u, max_chunk) {
                    if tx.send(Ok(m)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    type DownloadModelStream = BoxStream<v1::ModelChunk>;

    async fn download_model(
        &self,
        request: Request<v1::ObserverModelRequest>,
    ) -> Result<Response<Self::DownloadModelStream>, Status> {
        let req = request.into_inner();
        self.check(&req.observer_token)?;
        let params = self.fed.model(req.model_version)?;
        Ok(Response::new(model_stream(
            req.model_version,
            params,
            self.fed.config().server.max_chunk_bytes,
            self.fed.vit(),
            Duration::from_secs_f64(self.fed.config().server.upload_idle_timeout_secs),
            None,
        )))
    }
}
