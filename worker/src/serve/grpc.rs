//! The worker's gRPC service: unified generation, and the two sides of the KV handoff (the
//! prefill worker's in [`super::sender`], the decode worker's in [`super::receiver`]). What a
//! request holds lives in the engine thread's request table; handlers only move it on.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use futures_util::{Stream, StreamExt};
use pdfleet_api::proto::worker_server::Worker;
use pdfleet_api::proto::{
    self, AttachRequest, CancelKvRequest, CommitKvRequest, GenerateRequest, KvCacheInfo,
    KvCacheRequest, KvChunk, PrefillRequest, PrefillResponse, PushKvAck, ReserveKvRequest,
    ReserveKvResponse, StatusRequest, TokenBatch, WorkerStatus,
};
use pdfleet_api::{RequestId, Role};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::actor::EngineHandle;
use super::metrics::WorkerMetrics;
use super::sender::{KvMoves, Peers};
use super::table::SeqEvent;
use crate::backend::SharedKvCache;
use crate::config::ModelConfig;
use crate::engine::SamplingParams;
use crate::EngineError;

pub struct WorkerService {
    pub handle: EngineHandle,
    pub role: Role,
    pub model: ModelConfig,
    pub block_size: usize,
    pub metrics: WorkerMetrics,
    pub draining: Arc<AtomicBool>,
    pub pod: String,
    pub domain: String,
    pub kv: KvMoves,
    /// The decode workers this prefill worker moves KV to.
    pub peers: Peers,
    /// This worker's KV cache, when peers may write into it (decode role, on a GPU).
    pub shared_cache: Option<SharedKvCache>,
    /// Drawn at start: reservations and commits naming another instance are refused.
    pub epoch: u64,
}

pub type TokenStream = Pin<Box<dyn Stream<Item = Result<TokenBatch, Status>> + Send>>;

pub fn status_of(e: EngineError) -> Status {
    match e {
        EngineError::InvalidRequest(m) => Status::invalid_argument(m),
        EngineError::NoRoom(m) => Status::resource_exhausted(m),
        EngineError::NotFound(m) => Status::not_found(m),
        EngineError::Conflict(m) => Status::already_exists(m),
        EngineError::LeaseLapsed(m) => Status::deadline_exceeded(m),
        other => Status::internal(other.to_string()),
    }
}

pub fn request_id(id: Option<&proto::RequestId>) -> Result<RequestId, Status> {
    RequestId::from_proto(id).map_err(|e| Status::invalid_argument(e.to_string()))
}

pub fn params_of(p: Option<proto::SamplingParams>) -> SamplingParams {
    let p = p.unwrap_or_default();
    SamplingParams {
        max_tokens: p.max_tokens as usize,
        temperature: p.temperature,
        seed: p.seed,
        stop_token: p.stop_token,
    }
}

pub fn params_to_proto(p: &SamplingParams) -> proto::SamplingParams {
    proto::SamplingParams {
        max_tokens: p.max_tokens as u32,
        temperature: p.temperature,
        seed: p.seed,
        stop_token: p.stop_token,
    }
}

/// Cancels the request in the engine when dropped unless disarmed: a caller that goes away, or a
/// handler that fails half-way, frees everything the request held here.
pub struct CancelOnDrop {
    handle: EngineHandle,
    id: RequestId,
    /// This worker writes the request's blocks itself (nothing remote may still write them).
    writer_done: bool,
    armed: bool,
}

impl CancelOnDrop {
    pub fn new(handle: &EngineHandle, id: RequestId, writer_done: bool) -> Self {
        CancelOnDrop {
            handle: handle.clone(),
            id,
            writer_done,
            armed: true,
        }
    }

    pub fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if self.armed {
            self.handle.cancel(self.id, self.writer_done);
        }
    }
}

/// Turns engine events into the token stream a caller reads; dropping the stream cancels.
pub fn token_stream(rx: mpsc::UnboundedReceiver<SeqEvent>, guard: CancelOnDrop) -> TokenStream {
    let stream = UnboundedReceiverStream::new(rx).filter_map(move |e| {
        let _keep = &guard;
        std::future::ready(match e {
            SeqEvent::Token(t) => Some(Ok(TokenBatch {
                tokens: vec![t],
                finish_reason: proto::FinishReason::Unspecified as i32,
            })),
            SeqEvent::Finished(r) => Some(Ok(TokenBatch {
                tokens: vec![],
                finish_reason: r.to_proto() as i32,
            })),
            SeqEvent::Held | SeqEvent::Admitted => None,
        })
    });
    Box::pin(stream)
}

impl WorkerService {
    /// New work: refused while draining or unhealthy, and by a worker of another role.
    pub fn admit(&self, role: Role) -> Result<(), Status> {
        if self.draining.load(Ordering::SeqCst) {
            return Err(Status::unavailable("worker is draining"));
        }
        if !self.handle.health().ok() {
            return Err(Status::unavailable("the worker's engine is not healthy"));
        }
        self.require_role(role)
    }

    pub fn require_role(&self, role: Role) -> Result<(), Status> {
        if self.role != role {
            return Err(Status::failed_precondition(format!(
                "this worker's role is {}",
                self.role
            )));
        }
        Ok(())
    }

    pub fn ready(&self) -> bool {
        !self.draining.load(Ordering::SeqCst) && self.handle.health().ok()
    }
}

#[tonic::async_trait]
impl Worker for WorkerService {
    type GenerateStream = TokenStream;
    type AttachStream = TokenStream;

    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<TokenStream>, Status> {
        self.admit(Role::Unified)?;
        let req = request.into_inner();
        let id = request_id(req.id.as_ref())?;
        let (tx, rx) = mpsc::unbounded_channel();
        self.handle
            .submit(id, req.prompt, params_of(req.params), false, tx)
            .await
            .map_err(status_of)?;
        let guard = CancelOnDrop::new(&self.handle, id, true);
        Ok(Response::new(token_stream(rx, guard)))
    }

    async fn prefill(
        &self,
        request: Request<PrefillRequest>,
    ) -> Result<Response<PrefillResponse>, Status> {
        self.admit(Role::Prefill)?;
        super::sender::prefill(self, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn push_kv(
        &self,
        request: Request<Streaming<KvChunk>>,
    ) -> Result<Response<PushKvAck>, Status> {
        self.admit(Role::Decode)?;
        super::receiver::push_kv(self, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn kv_cache(&self, _: Request<KvCacheRequest>) -> Result<Response<KvCacheInfo>, Status> {
        self.admit(Role::Decode)?;
        super::receiver::kv_cache(self).map(Response::new)
    }

    async fn reserve_kv(
        &self,
        request: Request<ReserveKvRequest>,
    ) -> Result<Response<ReserveKvResponse>, Status> {
        self.admit(Role::Decode)?;
        super::receiver::reserve_kv(self, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn commit_kv(
        &self,
        request: Request<CommitKvRequest>,
    ) -> Result<Response<PushKvAck>, Status> {
        // Allowed while draining: it completes a transfer already admitted.
        self.require_role(Role::Decode)?;
        super::receiver::commit_kv(self, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn cancel_kv(
        &self,
        request: Request<CancelKvRequest>,
    ) -> Result<Response<PushKvAck>, Status> {
        let req = request.into_inner();
        let id = request_id(req.id.as_ref())?;
        self.handle.cancel_and_wait(id, req.writer_done).await;
        Ok(Response::new(PushKvAck { blocks: 0 }))
    }

    async fn attach(
        &self,
        request: Request<AttachRequest>,
    ) -> Result<Response<TokenStream>, Status> {
        // Allowed while draining: it finishes work already admitted.
        self.require_role(Role::Decode)?;
        let id = request_id(request.into_inner().id.as_ref())?;
        let (tx, rx) = mpsc::unbounded_channel();
        self.handle.attach(id, tx).await.map_err(status_of)?;
        let guard = CancelOnDrop::new(&self.handle, id, true);
        Ok(Response::new(token_stream(rx, guard)))
    }

    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<WorkerStatus>, Status> {
        let s = self.handle.status().await.map_err(status_of)?;
        Ok(Response::new(WorkerStatus {
            role: self.role.to_proto() as i32,
            ready: self.ready(),
            running: s.running as u32,
            waiting: s.waiting as u32,
            blocks_used: s.blocks_used as u32,
            blocks_total: s.blocks_total as u32,
            block_size: self.block_size as u32,
            domain: self.domain.clone(),
            vocab_size: self.model.vocab_size as u32,
            max_seq_len: self.model.max_seq_len as u32,
            pod: self.pod.clone(),
            pending_transfers: s.handoffs.total() as u32,
        }))
    }
}
