//! The worker's gRPC service: unified generation, prefill with KV push, KV receipt, attach.
//!
//! KV moves one of two ways. Device to device: the prefill worker asks the decode worker for its
//! cache's CUDA IPC handle (once), reserves blocks there, copies its blocks straight into them on
//! the GPU and commits. Over gRPC: it reads the blocks out, streams them in checksummed chunks,
//! and the decode worker writes them in.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
    kv_chunk, AttachRequest, CancelKvRequest, CommitKvRequest, GenerateRequest, KvCacheInfo,
    KvCacheRequest, KvChunk, KvHeader, PrefillRequest, PrefillResponse, PushKvAck,
    ReserveKvRequest, ReserveKvResponse, StatusRequest, TokenBatch, WorkerStatus,
};
use super::transfer::{self, Assembler};
use super::{KvTransport, Role};
use crate::backend::SharedKvCache;
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
    pub kv: KvMoves,
    next_id: AtomicU64,
    /// Pushed sequences by request id, until their consumer attaches.
    pushed: Mutex<HashMap<String, u64>>,
    /// Sequences written device to device, by request id, until attached.
    imports: Arc<Mutex<HashMap<String, DeviceImport>>>,
    decode_clients: Mutex<HashMap<String, WorkerClient<Channel>>>,
    /// Per decode worker, its cache when KV goes there device to device; `None`: over gRPC.
    peer_caches: Mutex<HashMap<String, Option<SharedKvCache>>>,
}

/// A sequence a prefill worker writes into this worker's cache: first its blocks are reserved,
/// then the sender commits (its KV is in them), and the sequence joins the batch on attach. The
/// engine hears of the commit only with the attach, so a commit waits for no engine step.
struct DeviceImport {
    /// Engine id of the reservation.
    id: u64,
    blocks: usize,
    reserved_at: Instant,
    committed: Option<Committed>,
}

struct Committed {
    tokens: Vec<u32>,
    prompt_len: usize,
    params: SamplingParams,
}

/// How this worker moves KV: as a sender (transport, wire dtype) and as a receiver (its cache).
pub struct KvMoves {
    /// Send KV as f16 on the wire when the cache is f32 (gRPC transport).
    pub wire_f16: bool,
    pub transport: KvTransport,
    /// This worker's cache, when others may write into it.
    pub shared_cache: Option<SharedKvCache>,
    pub host_id: String,
    /// Reserved blocks nobody commits within this are freed.
    pub reserve_ttl: Duration,
}

/// The host's boot id: processes that see the same one share a kernel, so CUDA IPC can work.
pub fn host_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// An error from the decode worker, carrying its name so the router replaces only it.
fn decode_error(addr: &str, e: Status) -> Status {
    Status::new(e.code(), format!("decode {addr}: {}", e.message()))
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

impl AbortOnDrop {
    fn new(handle: &EngineHandle, id: u64) -> Self {
        AbortOnDrop {
            handle: handle.clone(),
            id,
            armed: true,
        }
    }
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

/// Waits for a held prefill's first token and end: the token, why it ended, and when.
async fn prefill_done(
    rx: &mut mpsc::UnboundedReceiver<SeqEvent>,
) -> Option<(u32, FinishReason, Instant)> {
    let mut first = None;
    while let Some(e) = rx.recv().await {
        match e {
            SeqEvent::Token(t) => first = Some(t),
            SeqEvent::Finished(r) => return Some((first?, r, Instant::now())),
        }
    }
    None
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
        kv: KvMoves,
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
            kv,
            next_id: AtomicU64::new(1),
            pushed: Mutex::new(HashMap::new()),
            imports: Arc::new(Mutex::new(HashMap::new())),
            decode_clients: Mutex::new(HashMap::new()),
            peer_caches: Mutex::new(HashMap::new()),
        }
    }

    /// New work: refused while draining, and by a worker of another role.
    fn admit(&self, role: Role) -> Result<(), Status> {
        if self.draining.load(Ordering::SeqCst) {
            return Err(Status::unavailable("worker is draining"));
        }
        self.require_role(role)
    }

    fn require_role(&self, role: Role) -> Result<(), Status> {
        if self.role != role {
            return Err(Status::failed_precondition(format!(
                "this worker's role is {}",
                self.role
            )));
        }
        Ok(())
    }

    /// This worker's cache, for peers to write into; refused where it cannot be shared.
    fn own_shared_cache(&self) -> Result<&SharedKvCache, Status> {
        self.kv.shared_cache.as_ref().ok_or_else(|| {
            Status::failed_precondition("this worker's KV cache cannot be shared (not on a GPU)")
        })
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

    /// The decode worker's cache if KV can go there device to device (asked once per worker).
    /// With `--kv-transport device`, a cache that cannot be reached is an error.
    async fn peer_cache(&self, addr: &str) -> Result<Option<SharedKvCache>, Status> {
        if let Some(known) = self.peer_caches.lock().expect("lock").get(addr) {
            return Ok(known.clone());
        }
        let mut client = self.decode_client(addr).await?;
        let reachable = match client.kv_cache(KvCacheRequest {}).await {
            Ok(info) => self.check_peer_cache(info.into_inner()),
            Err(e) => Err(e.message().to_string()),
        };
        let cache = match reachable {
            Ok(cache) => {
                tracing::info!(decode = %addr, device = %cache.device, "KV goes device to device");
                Some(cache)
            }
            Err(why) if self.kv.transport == KvTransport::Device => {
                return Err(Status::failed_precondition(format!(
                    "decode {addr}: no device-to-device KV path: {why}"
                )))
            }
            Err(why) => {
                tracing::info!(decode = %addr, why, "KV goes over gRPC");
                None
            }
        };
        self.peer_caches
            .lock()
            .expect("lock")
            .insert(addr.to_string(), cache.clone());
        Ok(cache)
    }

    fn check_peer_cache(&self, info: KvCacheInfo) -> Result<SharedKvCache, String> {
        if info.host_id.is_empty() || info.host_id != self.kv.host_id {
            return Err("the decode worker runs on another host".into());
        }
        if info.block_size as usize != self.block_size
            || info.kv_dtype != self.model.kv_dtype.to_string()
        {
            return Err(format!(
                "cache layout differs: block size {} {}, here {} {}",
                info.block_size, info.kv_dtype, self.block_size, self.model.kv_dtype
            ));
        }
        Ok(SharedKvCache {
            ipc_handle: info.ipc_handle,
            device: info.device,
            pool_bytes: info.pool_bytes,
            n_pools: info.n_pools,
            block_bytes: info.block_bytes,
        })
    }

    /// The device path, run alongside the prefill: reserve blocks on the decode worker and queue
    /// the copy into them, which the engine runs right after the step that completes the prompt.
    /// Returns the bytes copied; an error says whether blocks are left reserved there.
    async fn reserve_and_copy(
        &self,
        id: u64,
        req: &PrefillRequest,
        cache: SharedKvCache,
    ) -> Result<u64, (Status, bool)> {
        let addr = &req.decode_addr;
        let mut client = self.decode_client(addr).await.map_err(|e| (e, false))?;
        let num_blocks = req.prompt.len().div_ceil(self.block_size);
        let bytes = cache.bytes(num_blocks);
        let blocks = client
            .reserve_kv(ReserveKvRequest {
                request_id: req.request_id.clone(),
                num_blocks: num_blocks as u32,
            })
            .await
            .map_err(|e| (decode_error(addr, e), false))?
            .into_inner()
            .blocks;
        self.handle
            .copy_held_to(id, cache, blocks)
            .await
            .map_err(|e| (status_of(e), true))?;
        Ok(bytes)
    }

    async fn commit_device(
        &self,
        req: &PrefillRequest,
        params: &SamplingParams,
        first_token: u32,
    ) -> Result<(), Status> {
        let addr = &req.decode_addr;
        let mut tokens = req.prompt.clone();
        tokens.push(first_token);
        self.decode_client(addr)
            .await?
            .commit_kv(CommitKvRequest {
                request_id: req.request_id.clone(),
                tokens,
                prompt_len: req.prompt.len() as u32,
                params: Some(params_to_proto(params)),
            })
            .await
            .map_err(|e| decode_error(addr, e))?;
        Ok(())
    }

    /// Frees blocks reserved on the decode worker for a sequence that will not come (best effort:
    /// they also expire).
    fn cancel_reservation(&self, req: &PrefillRequest) {
        let client = self
            .decode_clients
            .lock()
            .expect("lock")
            .get(&req.decode_addr)
            .cloned();
        if let Some(mut client) = client {
            let request_id = req.request_id.clone();
            tokio::spawn(async move {
                let _ = client.cancel_kv(CancelKvRequest { request_id }).await;
            });
        }
    }

    /// Reads the held sequence's KV out and streams it to the decode worker; returns bytes sent.
    async fn push_grpc(
        &self,
        id: u64,
        req: &PrefillRequest,
        params: &SamplingParams,
    ) -> Result<u64, Status> {
        let kv = self.handle.export(id).await.map_err(status_of)?;
        let cache = self.model.kv_dtype;
        let wire = if self.kv.wire_f16 && cache == KvDtype::F32 {
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
        let addr = &req.decode_addr;
        let mut client = self.decode_client(addr).await?;
        let msgs = transfer::chunks(header, data);
        client
            .push_kv(tokio_stream::iter(msgs))
            .await
            .map_err(|e| decode_error(addr, e))?;
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
        self.admit(Role::Unified)?;
        let req = request.into_inner();
        let id = self.new_id();
        let (tx, rx) = mpsc::unbounded_channel();
        self.handle
            .submit(id, req.prompt, params_of(req.params), false, tx)
            .await
            .map_err(status_of)?;
        let guard = AbortOnDrop::new(&self.handle, id);
        Ok(Response::new(token_stream(rx, guard)))
    }

    async fn prefill(
        &self,
        request: Request<PrefillRequest>,
    ) -> Result<Response<PrefillResponse>, Status> {
        self.admit(Role::Prefill)?;
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
        let _guard = AbortOnDrop::new(&self.handle, id);
        // Device path: reserve the decode worker's blocks while the prompt runs.
        let device = if self.kv.transport != KvTransport::Grpc && params.max_tokens > 1 {
            self.peer_cache(&req.decode_addr).await?
        } else {
            None
        };
        let (done, copied) = match device.clone() {
            Some(cache) => {
                let (done, copied) = tokio::join!(
                    prefill_done(&mut rx),
                    self.reserve_and_copy(id, &req, cache)
                );
                (done, Some(copied))
            }
            None => (prefill_done(&mut rx).await, None),
        };
        let reserved = matches!(copied, Some(Ok(_)) | Some(Err((_, true))));
        let Some((first_token, reason, prefilled_at)) = done else {
            if reserved {
                self.cancel_reservation(&req);
            }
            return Err(Status::internal("prefill ended without a token"));
        };
        let prefill_seconds = (prefilled_at - start).as_secs_f64();
        if reason != FinishReason::Held {
            if reserved {
                self.cancel_reservation(&req);
            }
            return Ok(Response::new(PrefillResponse {
                first_token,
                finish_reason: reason.as_str().to_string(),
                prefill_seconds,
                ..Default::default()
            }));
        }
        let (kv_bytes, transport) = match (copied, device) {
            (Some(Ok(bytes)), _) => {
                self.commit_device(&req, &params, first_token).await?;
                (bytes, KvTransport::Device)
            }
            // The decode worker was full while the prompt ran; it may have room now. If not, the
            // router hears so and picks another one.
            (Some(Err((e, false))), Some(cache)) if e.code() == tonic::Code::ResourceExhausted => {
                let bytes =
                    self.reserve_and_copy(id, &req, cache)
                        .await
                        .map_err(|(e, reserved)| {
                            if reserved {
                                self.cancel_reservation(&req);
                            }
                            e
                        })?;
                self.commit_device(&req, &params, first_token).await?;
                (bytes, KvTransport::Device)
            }
            (Some(Err((e, reserved))), _) => {
                if reserved {
                    self.cancel_reservation(&req);
                }
                if self.kv.transport == KvTransport::Device {
                    return Err(e);
                }
                let addr = &req.decode_addr;
                tracing::warn!(decode = %addr, error = %e.message(), "device-to-device KV copy failed; using gRPC for this decode worker");
                self.peer_caches
                    .lock()
                    .expect("lock")
                    .insert(addr.clone(), None);
                (self.push_grpc(id, &req, &params).await?, KvTransport::Grpc)
            }
            (None, _) => (self.push_grpc(id, &req, &params).await?, KvTransport::Grpc),
        };
        let transfer_seconds = prefilled_at.elapsed().as_secs_f64();
        self.handle.release_held(id);
        self.metrics
            .kv_moved("send", transport.as_str(), kv_bytes, transfer_seconds);
        Ok(Response::new(PrefillResponse {
            first_token,
            finish_reason: String::new(),
            cached_tokens: 0,
            prefill_seconds,
            kv_bytes,
            transfer_seconds,
            kv_transport: transport.as_str().to_string(),
        }))
    }

    async fn push_kv(
        &self,
        request: Request<Streaming<KvChunk>>,
    ) -> Result<Response<PushKvAck>, Status> {
        self.admit(Role::Decode)?;
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
        let mut guard = AbortOnDrop::new(&self.handle, id);
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
        self.metrics.kv_moved(
            "receive",
            "grpc",
            data.len() as u64,
            start.elapsed().as_secs_f64(),
        );
        Ok(Response::new(PushKvAck {
            blocks: header.num_blocks,
        }))
    }

    async fn kv_cache(&self, _: Request<KvCacheRequest>) -> Result<Response<KvCacheInfo>, Status> {
        self.admit(Role::Decode)?;
        let cache = self.own_shared_cache()?;
        Ok(Response::new(KvCacheInfo {
            ipc_handle: cache.ipc_handle.clone(),
            host_id: self.kv.host_id.clone(),
            device: cache.device.clone(),
            pool_bytes: cache.pool_bytes,
            n_pools: cache.n_pools,
            block_bytes: cache.block_bytes,
            block_size: self.block_size as u32,
            kv_dtype: self.model.kv_dtype.to_string(),
        }))
    }

    async fn reserve_kv(
        &self,
        request: Request<ReserveKvRequest>,
    ) -> Result<Response<ReserveKvResponse>, Status> {
        self.admit(Role::Decode)?;
        let req = request.into_inner();
        if req.num_blocks == 0 {
            return Err(Status::invalid_argument("num_blocks must be positive"));
        }
        self.own_shared_cache()?;
        if self
            .imports
            .lock()
            .expect("lock")
            .contains_key(&req.request_id)
        {
            return Err(Status::already_exists(format!(
                "blocks are already reserved for request {}",
                req.request_id
            )));
        }
        let id = self.new_id();
        let blocks = self
            .handle
            .reserve(id, req.num_blocks as usize)
            .await
            .map_err(status_of)?;
        self.imports.lock().expect("lock").insert(
            req.request_id.clone(),
            DeviceImport {
                id,
                blocks: blocks.len(),
                reserved_at: Instant::now(),
                committed: None,
            },
        );
        // A sender that dies before committing, or a sequence nobody attaches to, must not keep
        // the blocks.
        let (imports, handle, ttl) = (
            self.imports.clone(),
            self.handle.clone(),
            self.kv.reserve_ttl,
        );
        tokio::spawn(async move {
            tokio::time::sleep(ttl).await;
            let expired = {
                let mut m = imports.lock().expect("lock");
                match m.get(&req.request_id) {
                    Some(i) if i.id == id => m.remove(&req.request_id).is_some(),
                    _ => false,
                }
            };
            if expired {
                tracing::warn!(request = %req.request_id, "freeing KV blocks reserved but never attached");
                handle.cancel_import(id);
            }
        });
        Ok(Response::new(ReserveKvResponse { blocks }))
    }

    async fn cancel_kv(
        &self,
        request: Request<CancelKvRequest>,
    ) -> Result<Response<PushKvAck>, Status> {
        let rid = request.into_inner().request_id;
        let import = self
            .imports
            .lock()
            .expect("lock")
            .remove(&rid)
            .ok_or_else(|| Status::not_found(format!("no reserved blocks for request {rid}")))?;
        self.handle.cancel_import(import.id);
        Ok(Response::new(PushKvAck { blocks: 0 }))
    }

    async fn commit_kv(
        &self,
        request: Request<CommitKvRequest>,
    ) -> Result<Response<PushKvAck>, Status> {
        // Allowed while draining: it completes a transfer already admitted.
        self.require_role(Role::Decode)?;
        let req = request.into_inner();
        let computed = req.tokens.len().saturating_sub(1);
        let blocks = computed.div_ceil(self.block_size);
        let reserved_at = {
            let mut imports = self.imports.lock().expect("lock");
            let import = imports
                .get_mut(&req.request_id)
                .filter(|i| i.committed.is_none())
                .ok_or_else(|| {
                    Status::not_found(format!(
                        "no reserved blocks for request {} (never reserved, expired or already committed)",
                        req.request_id
                    ))
                })?;
            if req.prompt_len as usize >= req.tokens.len() || blocks != import.blocks {
                return Err(Status::invalid_argument(format!(
                    "{} tokens (prompt {}) do not fill the {} blocks reserved",
                    req.tokens.len(),
                    req.prompt_len,
                    import.blocks
                )));
            }
            import.committed = Some(Committed {
                tokens: req.tokens,
                prompt_len: req.prompt_len as usize,
                params: params_of(req.params),
            });
            import.reserved_at
        };
        // Reserved blocks exist only where the cache is shared.
        let bytes = self.own_shared_cache()?.bytes(blocks);
        self.metrics.kv_moved(
            "receive",
            "device",
            bytes,
            reserved_at.elapsed().as_secs_f64(),
        );
        Ok(Response::new(PushKvAck {
            blocks: blocks as u32,
        }))
    }

    async fn attach(
        &self,
        request: Request<AttachRequest>,
    ) -> Result<Response<TokenStream>, Status> {
        // Allowed while draining: it finishes work already admitted.
        self.require_role(Role::Decode)?;
        let rid = request.into_inner().request_id;
        let (tx, rx) = mpsc::unbounded_channel();
        let pushed = self.pushed.lock().expect("lock").remove(&rid);
        let id = if let Some(id) = pushed {
            self.handle.attach(id, tx).await.map_err(status_of)?;
            id
        } else {
            let import = {
                let mut imports = self.imports.lock().expect("lock");
                match imports.get(&rid) {
                    Some(i) if i.committed.is_some() => imports.remove(&rid),
                    _ => None,
                }
            };
            let Some(DeviceImport {
                id,
                committed: Some(c),
                ..
            }) = import
            else {
                return Err(Status::not_found(format!(
                    "no transferred sequence for request {rid}"
                )));
            };
            self.handle
                .attach_import(id, c.tokens, c.prompt_len, c.params, tx)
                .await
                .map_err(status_of)?;
            id
        };
        let guard = AbortOnDrop::new(&self.handle, id);
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
