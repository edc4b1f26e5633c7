//! The worker's gRPC service: unified generation, prefill with KV push, KV receipt, attach.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures_util::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

use super::actor::{EngineHandle, SeqEvent};
use super::metrics::WorkerMetrics;
use super::proto::worker_client::WorkerClient;
use super::proto::worker_server::Worker;
use super::proto::{
    kv_chunk, AttachRequest, GenerateRequest, KvChunk, KvHeader, PrefillRequest, PrefillResponse,
    PushKvAck, StatusRequest, TokenBatch, WorkerStatus,
};
use super::transfer::{self, Assembler};
use super::Role;
use crate::config::{KvDtype, ModelConfig};
use crate::engine::{FinishReason, SamplingParams};
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
    /// Send KV as f16 on the wire when the cache is f32.
    pub kv_wire_f16: bool,
    next_id: AtomicU64,
    /// Pushed sequences by request id, until their consumer attaches.
    pushed: Mutex<HashMap<String, u64>>,
    decode_clients: Mutex<HashMap<String, WorkerClient<Channel>>>,
}

type TokenStream = Pin<Box<dyn Stream<Item = Result<TokenBatch, Status>> + Send>>;

pub fn status_of(e: EngineError) -> Status {
    match e {
        EngineError::InvalidRequest(m) => Status::invalid_argument(m),
        EngineError::NoRoom(m) => Status::resource_exhausted(m),
        other => Status::internal(other.to_string()),
    }
}

fn params_of(p: Option<super::proto::SamplingParams>) -> SamplingParams {
    let p = p.unwrap_or_default();
    SamplingParams {
        max_tokens: p.max_tokens as usize,
        temperature: p.temperature,
        seed: p.seed,
        stop_token: p.stop_token,
    }
}

fn params_to_proto(p: &SamplingParams) -> super::proto::SamplingParams {
    super::proto::SamplingParams {
        max_tokens: p.max_tokens as u32,
        temperature: p.temperature,
        seed: p.seed,
        stop_token: p.stop_token,
    }
}

/// Aborts the request in the engine when dropped unless disarmed: a caller that goes away, or a
/// transfer that breaks half-way, frees every block it took.
struct AbortOnDrop {
    handle: EngineHandle,
    id: u64,
    armed: bool,
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if self.armed {
            self.handle.abort(self.id);
        }
    }
}

/// Turns engine events into the token stream a caller reads; dropping the stream aborts.
fn token_stream(rx: mpsc::UnboundedReceiver<SeqEvent>, guard: AbortOnDrop) -> TokenStream {
    let stream = UnboundedReceiverStream::new(rx).map(move |e| {
        let _keep = &guard;
        Ok(match e {
            SeqEvent::Token(t) => TokenBatch {
                tokens: vec![t],
                finish_reason: String::new(),
            },
            SeqEvent::Finished(r) => TokenBatch {
                tokens: vec![],
                finish_reason: r.as_str().to_string(),
            },
        })
    });
    Box::pin(stream)
}

impl WorkerService {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        handle: EngineHandle,
        role: Role,
        model: ModelConfig,
        block_size: usize,
        metrics: WorkerMetrics,
        draining: Arc<AtomicBool>,
        pod: String,
        domain: String,
        kv_wire_f16: bool,
    ) -> Self {
        WorkerService {
            handle,
            role,
            model,
            block_size,
            metrics,
            draining,
            pod,
            domain,
            kv_wire_f16,
            next_id: AtomicU64::new(1),
            pushed: Mutex::new(HashMap::new()),
            decode_clients: Mutex::new(HashMap::new()),
        }
    }

    fn admit(&self, wanted: &[Role]) -> Result<(), Status> {
        if self.draining.load(Ordering::SeqCst) {
            return Err(Status::unavailable("worker is draining"));
        }
        if !wanted.contains(&self.role) {
            return Err(Status::failed_precondition(format!(
                "this worker's role is {}",
                self.role
            )));
        }
        Ok(())
    }

    fn new_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    async fn decode_client(&self, addr: &str) -> Result<WorkerClient<Channel>, Status> {
        if let Some(c) = self.decode_clients.lock().expect("lock").get(addr) {
            return Ok(c.clone());
        }
        let endpoint = tonic::transport::Endpoint::from_shared(addr.to_string())
            .map_err(|e| Status::invalid_argument(format!("decode {addr}: bad address: {e}")))?
            .tcp_nodelay(true);
        let client = WorkerClient::connect(endpoint)
            .await
            .map_err(|e| Status::unavailable(format!("decode {addr}: unreachable: {e}")))?
            .max_decoding_message_size(64 << 20);
        self.decode_clients
            .lock()
            .expect("lock")
            .insert(addr.to_string(), client.clone());
        Ok(client)
    }

    /// Pushes a held sequence's KV to the decode worker; returns bytes sent.
    async fn push(
        &self,
        id: u64,
        req: &PrefillRequest,
        params: &SamplingParams,
    ) -> Result<u64, Status> {
        let kv = self.handle.export(id).await.map_err(status_of)?;
        let cache = self.model.kv_dtype;
        let wire = if self.kv_wire_f16 && cache == KvDtype::F32 {
            KvDtype::F16
        } else {
            cache
        };
        let data = transfer::convert(&kv.data, cache, wire);
        let bytes = data.len() as u64;
        let header = KvHeader {
            request_id: req.request_id.clone(),
            tokens: kv.tokens,
            prompt_len: kv.prompt_len as u32,
            params: Some(params_to_proto(params)),
            num_blocks: kv.num_blocks as u32,
            block_size: self.block_size as u32,
            n_layers: self.model.n_layers as u32,
            kv_dim: self.model.kv_dim() as u32,
            wire_dtype: wire.to_string(),
            total_bytes: bytes,
        };
        // Errors that are the decode worker's carry its name, so the router replaces only it.
        let addr = &req.decode_addr;
        let mut client = self.decode_client(addr).await?;
        let msgs = transfer::chunks(header, data);
        client
            .push_kv(tokio_stream::iter(msgs))
            .await
            .map_err(|e| Status::new(e.code(), format!("decode {addr}: {}", e.message())))?;
        Ok(bytes)
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
        self.admit(&[Role::Unified])?;
        let req = request.into_inner();
        let id = self.new_id();
        let (tx, rx) = mpsc::unbounded_channel();
        self.handle
            .submit(id, req.prompt, params_of(req.params), false, tx)
            .await
            .map_err(status_of)?;
        let guard = AbortOnDrop {
            handle: self.handle.clone(),
            id,
            armed: true,
        };
        Ok(Response::new(token_stream(rx, guard)))
    }

    async fn prefill(
        &self,
        request: Request<PrefillRequest>,
    ) -> Result<Response<PrefillResponse>, Status> {
        self.admit(&[Role::Prefill])?;
        let req = request.into_inner();
        let params = params_of(req.params);
        let id = self.new_id();
        let start = Instant::now();
        let (tx, mut rx) = mpsc::unbounded_channel();
        self.handle
            .submit(id, req.prompt.clone(), params.clone(), true, tx)
            .await
            .map_err(status_of)?;
        // Whatever happens from here (caller gone, push failed), the held blocks are freed.
        let _guard = AbortOnDrop {
            handle: self.handle.clone(),
            id,
            armed: true,
        };
        let mut first = None;
        let mut reason = None;
        while let Some(e) = rx.recv().await {
            match e {
                SeqEvent::Token(t) => first = Some(t),
                SeqEvent::Finished(r) => {
                    reason = Some(r);
                    break;
                }
            }
        }
        let (Some(first_token), Some(reason)) = (first, reason) else {
            return Err(Status::internal("prefill ended without a token"));
        };
        let prefill_seconds = start.elapsed().as_secs_f64();
        if reason != FinishReason::Held {
            return Ok(Response::new(PrefillResponse {
                first_token,
                finish_reason: reason.as_str().to_string(),
                prefill_seconds,
                ..Default::default()
            }));
        }
        let t = Instant::now();
        let kv_bytes = self.push(id, &req, &params).await?;
        let transfer_seconds = t.elapsed().as_secs_f64();
        self.handle.release_held(id);
        self.metrics
            .kv_transfer_bytes
            .with_label_values(&["send"])
            .inc_by(kv_bytes);
        self.metrics
            .kv_transfer_seconds
            .with_label_values(&["send"])
            .observe(transfer_seconds);
        Ok(Response::new(PrefillResponse {
            first_token,
            finish_reason: String::new(),
            cached_tokens: 0,
            prefill_seconds,
            kv_bytes,
            transfer_seconds,
        }))
    }

    async fn push_kv(
        &self,
        request: Request<Streaming<KvChunk>>,
    ) -> Result<Response<PushKvAck>, Status> {
        self.admit(&[Role::Decode])?;
        let start = Instant::now();
        let mut stream = request.into_inner();
        let header = match stream.message().await? {
            Some(KvChunk {
                part: Some(kv_chunk::Part::Header(h)),
            }) => h,
            _ => return Err(Status::invalid_argument("a KV push starts with its header")),
        };
        let wire = transfer::parse_dtype(&header.wire_dtype).map_err(status_of)?;
        if header.block_size as usize != self.block_size
            || header.n_layers as usize != self.model.n_layers
            || header.kv_dim as usize != self.model.kv_dim()
        {
            return Err(Status::failed_precondition(format!(
                "KV layout mismatch: sender has block size {}, {} layers, kv_dim {}; this worker {}, {}, {}",
                header.block_size,
                header.n_layers,
                header.kv_dim,
                self.block_size,
                self.model.n_layers,
                self.model.kv_dim()
            )));
        }
        let expected = header.num_blocks as usize
            * self.block_size
            * self.model.kv_dim()
            * 2
            * self.model.n_layers
            * wire.bytes();
        if header.total_bytes as usize != expected {
            return Err(Status::invalid_argument(format!(
                "header announces {} bytes, its blocks need {expected}",
                header.total_bytes
            )));
        }
        let id = self.new_id();
        self.handle
            .reserve(id, header.num_blocks as usize)
            .await
            .map_err(status_of)?;
        // Until committed, a broken stream releases the reserved blocks.
        let mut guard = AbortOnDrop {
            handle: self.handle.clone(),
            id,
            armed: true,
        };
        let mut assembler = Assembler::new(expected);
        while let Some(msg) = stream.message().await? {
            match msg.part {
                Some(kv_chunk::Part::Data(d)) => assembler.push(&d).map_err(Status::data_loss)?,
                _ => {
                    return Err(Status::invalid_argument(
                        "only data chunks may follow the header",
                    ))
                }
            }
        }
        let data = assembler.finish().map_err(Status::data_loss)?;
        let kv = transfer::convert(&data, wire, self.model.kv_dtype);
        let params = params_of(header.params);
        self.handle
            .commit_import(id, header.tokens, header.prompt_len as usize, params, kv)
            .await
            .map_err(status_of)?;
        guard.armed = false;
        self.pushed
            .lock()
            .expect("lock")
            .insert(header.request_id, id);
        self.metrics
            .kv_transfer_bytes
            .with_label_values(&["receive"])
            .inc_by(data.len() as u64);
        self.metrics
            .kv_transfer_seconds
            .with_label_values(&["receive"])
            .observe(start.elapsed().as_secs_f64());
        Ok(Response::new(PushKvAck {
            blocks: header.num_blocks,
        }))
    }

    async fn attach(
        &self,
        request: Request<AttachRequest>,
    ) -> Result<Response<TokenStream>, Status> {
        // Allowed while draining: it finishes work already admitted.
        if self.role != Role::Decode {
            return Err(Status::failed_precondition(format!(
                "this worker's role is {}",
                self.role
            )));
        }
        let rid = request.into_inner().request_id;
        let id = self
            .pushed
            .lock()
            .expect("lock")
            .remove(&rid)
            .ok_or_else(|| {
                Status::not_found(format!("no transferred sequence for request {rid}"))
            })?;
        let (tx, rx) = mpsc::unbounded_channel();
        self.handle.attach(id, tx).await.map_err(status_of)?;
        let guard = AbortOnDrop {
            handle: self.handle.clone(),
            id,
            armed: true,
        };
        Ok(Response::new(token_stream(rx, guard)))
    }

    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<WorkerStatus>, Status> {
        let s = self.handle.status().await.map_err(status_of)?;
        Ok(Response::new(WorkerStatus {
            role: self.role.to_string(),
            ready: !self.draining.load(Ordering::SeqCst),
            running: s.running as u32,
            waiting: s.waiting as u32,
            blocks_used: s.blocks_used as u32,
            blocks_total: s.blocks_total as u32,
            block_size: self.block_size as u32,
            domain: self.domain.clone(),
            vocab_size: self.model.vocab_size as u32,
            max_seq_len: self.model.max_seq_len as u32,
            pod: self.pod.clone(),
        }))
    }
}
