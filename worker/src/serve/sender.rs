//! The prefill worker's side of the handoff: run the prompt, then move its KV to the decode
//! worker the router chose, device to device (reserve there, copy when the prompt is done,
//! commit) or over gRPC (export, stream, the decode worker commits). Whatever happens, the
//! request's blocks here are freed and, if it reached the decode worker, its blocks there too.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use pdfleet_api::failure;
use pdfleet_api::proto::worker_client::WorkerClient;
use pdfleet_api::proto::{
    self, CancelKvRequest, CommitKvRequest, KvCacheInfo, KvCacheRequest, KvHeader, PrefillRequest,
    PrefillResponse, ReserveKvRequest,
};
use pdfleet_api::{FinishReason, KvDtype, KvTransport, KvTransportPolicy, RequestId};
use tokio::sync::mpsc;
use tonic::transport::Channel;
use tonic::{Code, Status};

use super::actor::EngineHandle;
use super::grpc::{params_to_proto, request_id, status_of, WorkerService};
use super::table::{CopyOrder, SeqEvent};
use super::transfer;
use crate::backend::SharedKvCache;
use crate::engine::SamplingParams;
use crate::EngineError;

/// How this worker sends KV.
pub struct KvMoves {
    /// Send KV as f16 on the wire when the cache is f32 (gRPC transport).
    pub wire_f16: bool,
    pub policy: KvTransportPolicy,
    /// This host's boot id: CUDA IPC works only between processes that share it.
    pub host_id: String,
}

/// The host's boot id: processes that see the same one share a kernel, so CUDA IPC can work.
pub fn host_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// A decode worker's cache as this worker opened it, and the instance it belongs to.
#[derive(Clone, Debug)]
struct PeerCache {
    shared: SharedKvCache,
    epoch: u64,
}

/// The decode workers this worker has moved KV to: a client each, and how KV goes there.
#[derive(Default)]
pub struct Peers {
    clients: Mutex<HashMap<String, WorkerClient<Channel>>>,
    /// `None`: over gRPC.
    caches: Mutex<HashMap<String, Option<PeerCache>>>,
}

impl Peers {
    async fn client(&self, addr: &str) -> Result<WorkerClient<Channel>, Status> {
        if let Some(c) = self.clients.lock().expect("lock").get(addr) {
            return Ok(c.clone());
        }
        let endpoint = tonic::transport::Endpoint::from_shared(addr.to_string())
            .map_err(|e| Status::invalid_argument(format!("decode_addr {addr:?}: {e}")))?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(2));
        let client = WorkerClient::connect(endpoint)
            .await
            .map_err(|e| {
                failure::of_decode(addr, Status::unavailable(format!("unreachable: {e}")))
            })?
            .max_decoding_message_size(pdfleet_api::MAX_MESSAGE_BYTES);
        self.clients
            .lock()
            .expect("lock")
            .insert(addr.to_string(), client.clone());
        Ok(client)
    }

    /// Forgets what is known of a decode worker (it restarted, or its cache failed us): the
    /// next request asks again.
    fn forget(&self, addr: &str) {
        self.caches.lock().expect("lock").remove(addr);
    }

    fn use_grpc(&self, addr: &str) {
        self.caches
            .lock()
            .expect("lock")
            .insert(addr.to_string(), None);
    }
}

/// What ended the prompt.
enum PrefillEnd {
    /// The KV is held for the decode worker.
    Held,
    /// The first token already ends the request.
    Finished(FinishReason),
}

/// Waits for a held prefill's first token and end.
/// How a prefill went: its first token, how it ended, when it left the queue and when the
/// token came.
struct Prefilled {
    first_token: u32,
    end: PrefillEnd,
    admitted_at: Instant,
    done_at: Instant,
}

async fn prefill_done(rx: &mut mpsc::UnboundedReceiver<SeqEvent>) -> Option<Prefilled> {
    let mut first = None;
    let mut admitted_at = None;
    while let Some(e) = rx.recv().await {
        let end = match e {
            SeqEvent::Admitted => {
                // A preempted sequence is admitted again: its wait ended the first time.
                admitted_at.get_or_insert_with(Instant::now);
                continue;
            }
            SeqEvent::Token(t) => {
                first = Some(t);
                continue;
            }
            SeqEvent::Held => PrefillEnd::Held,
            SeqEvent::Finished(r) => PrefillEnd::Finished(r),
        };
        let done_at = Instant::now();
        return Some(Prefilled {
            first_token: first?,
            end,
            admitted_at: admitted_at.unwrap_or(done_at),
            done_at,
        });
    }
    None
}

/// Until disarmed, frees the request everywhere when dropped (the router went away, a transfer
/// failed): here first, and only once the engine has done so (so no copy of ours can still
/// write), then on the decode worker if the request reached it.
struct SendGuard {
    handle: EngineHandle,
    id: RequestId,
    decode: Option<WorkerClient<Channel>>,
    armed: bool,
}

impl Drop for SendGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (handle, id, decode) = (self.handle.clone(), self.id, self.decode.take());
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            handle.cancel(id, true);
            return;
        };
        rt.spawn(async move {
            handle.cancel_and_wait(id, true).await;
            if let Some(mut c) = decode {
                let _ = c
                    .cancel_kv(CancelKvRequest {
                        id: Some(id.to_proto()),
                        writer_done: true,
                    })
                    .await;
            }
        });
    }
}

/// The decode worker's cache if KV can go there device to device (asked once per worker). With
/// `--kv-transport device`, a cache that cannot be reached is an error.
async fn peer_cache(svc: &WorkerService, addr: &str) -> Result<Option<PeerCache>, Status> {
    if let Some(known) = svc.peers.caches.lock().expect("lock").get(addr) {
        return Ok(known.clone());
    }
    let mut client = svc.peers.client(addr).await?;
    let reachable = match client.kv_cache(KvCacheRequest {}).await {
        Ok(info) => check_peer_cache(svc, info.into_inner()),
        Err(e) => Err(e.message().to_string()),
    };
    let cache = match reachable {
        Ok(cache) => {
            tracing::info!(decode = %addr, device = %cache.shared.device, "KV goes device to device");
            Some(cache)
        }
        Err(why) if svc.kv.policy == KvTransportPolicy::Device => {
            return Err(failure::of_decode(
                addr,
                Status::failed_precondition(format!("no device-to-device KV path: {why}")),
            ))
        }
        Err(why) => {
            tracing::info!(decode = %addr, why, "KV goes over gRPC");
            None
        }
    };
    svc.peers
        .caches
        .lock()
        .expect("lock")
        .insert(addr.to_string(), cache.clone());
    Ok(cache)
}

fn check_peer_cache(svc: &WorkerService, info: KvCacheInfo) -> Result<PeerCache, String> {
    if info.host_id.is_empty() || info.host_id != svc.kv.host_id {
        return Err("the decode worker runs on another host".into());
    }
    let dtype = proto::KvDtype::try_from(info.kv_dtype)
        .ok()
        .and_then(KvDtype::from_proto);
    if info.block_size as usize != svc.block_size || dtype != Some(svc.model.kv_dtype) {
        return Err(format!(
            "cache layout differs: block size {} {:?}, here {} {}",
            info.block_size, dtype, svc.block_size, svc.model.kv_dtype
        ));
    }
    Ok(PeerCache {
        shared: SharedKvCache {
            ipc_handle: info.ipc_handle,
            device: info.device,
            pool_bytes: info.pool_bytes,
            n_pools: info.n_pools,
            block_bytes: info.block_bytes,
        },
        epoch: info.epoch,
    })
}

/// The device path, run alongside the prompt: reserve blocks on the decode worker and queue the
/// copy into them, which the engine runs right after the step that completes the prompt. If
/// the lease would have ended by then, it is renewed and the copy asked again. Returns the bytes
/// copied.
async fn device_copy(
    svc: &WorkerService,
    id: RequestId,
    addr: &str,
    cache: &PeerCache,
    num_blocks: usize,
) -> Result<u64, Status> {
    let mut client = svc.peers.client(addr).await?;
    let mut renewed = false;
    loop {
        let sent_at = Instant::now();
        let reserved = client
            .reserve_kv(ReserveKvRequest {
                id: Some(id.to_proto()),
                num_blocks: num_blocks as u32,
                epoch: cache.epoch,
            })
            .await
            .map_err(|e| {
                if e.code() == Code::Aborted {
                    // Another instance now: open its cache afresh next time.
                    svc.peers.forget(addr);
                }
                failure::of_decode(addr, e)
            })?
            .into_inner();
        // The decode worker counts the lease from when it saw the request, which is later.
        let lease_until = sent_at + Duration::from_millis(reserved.lease_ms as u64);
        let order = CopyOrder {
            target: cache.shared.clone(),
            dst: reserved.blocks,
            lease_until,
        };
        match svc.handle.copy_when_held(id, order).await {
            Ok(()) => return Ok(cache.shared.bytes(num_blocks)),
            Err(EngineError::LeaseLapsed(_)) if !renewed => renewed = true,
            Err(e) => return Err(status_of(e)),
        }
    }
}

async fn commit_device(
    svc: &WorkerService,
    id: RequestId,
    req: &PrefillRequest,
    params: &SamplingParams,
    first_token: u32,
    epoch: u64,
) -> Result<(), Status> {
    let addr = &req.decode_addr;
    let mut tokens = req.prompt.clone();
    tokens.push(first_token);
    svc.peers
        .client(addr)
        .await?
        .commit_kv(CommitKvRequest {
            id: Some(id.to_proto()),
            tokens,
            prompt_len: req.prompt.len() as u32,
            params: Some(params_to_proto(params)),
            epoch,
        })
        .await
        .map_err(|e| failure::of_decode(addr, e))?;
    Ok(())
}

/// Reads the held sequence's KV out and streams it to the decode worker; returns bytes sent.
async fn push_grpc(
    svc: &WorkerService,
    id: RequestId,
    addr: &str,
    params: &SamplingParams,
) -> Result<u64, Status> {
    let kv = svc.handle.export(id).await.map_err(status_of)?;
    let cache = svc.model.kv_dtype;
    let wire = if svc.kv.wire_f16 && cache == KvDtype::F32 {
        KvDtype::F16
    } else {
        cache
    };
    let data = transfer::convert(&kv.data, cache, wire);
    let bytes = data.len() as u64;
    let header = KvHeader {
        id: Some(id.to_proto()),
        tokens: kv.tokens,
        prompt_len: kv.prompt_len as u32,
        params: Some(params_to_proto(params)),
        num_blocks: kv.num_blocks as u32,
        block_size: svc.block_size as u32,
        n_layers: svc.model.n_layers as u32,
        kv_dim: svc.model.kv_dim() as u32,
        wire_dtype: wire.to_proto() as i32,
        total_bytes: bytes,
    };
    let mut client = svc.peers.client(addr).await?;
    client
        .push_kv(tokio_stream::iter(transfer::chunks(header, data)))
        .await
        .map_err(|e| failure::of_decode(addr, e))?;
    Ok(bytes)
}

/// `Prefill`: the prompt, then its KV to `decode_addr`.
pub async fn prefill(svc: &WorkerService, req: PrefillRequest) -> Result<PrefillResponse, Status> {
    let id = request_id(req.id.as_ref())?;
    if req.decode_addr.is_empty() {
        return Err(Status::invalid_argument("decode_addr is required"));
    }
    let addr = req.decode_addr.clone();
    let params = super::grpc::params_of(req.params);
    let start = Instant::now();
    let (tx, mut rx) = mpsc::unbounded_channel();
    svc.handle
        .submit(id, req.prompt.clone(), params.clone(), true, tx)
        .await
        .map_err(status_of)?;
    let mut guard = SendGuard {
        handle: svc.handle.clone(),
        id,
        decode: None,
        armed: true,
    };
    let device = if svc.kv.policy != KvTransportPolicy::Grpc && params.max_tokens > 1 {
        peer_cache(svc, &addr).await?
    } else {
        None
    };
    let num_blocks = req.prompt.len().div_ceil(svc.block_size);
    let (done, copied) = match &device {
        Some(cache) => {
            guard.decode = Some(svc.peers.client(&addr).await?);
            let (done, copied) = tokio::join!(
                prefill_done(&mut rx),
                device_copy(svc, id, &addr, cache, num_blocks)
            );
            (done, Some(copied))
        }
        None => (prefill_done(&mut rx).await, None),
    };
    let Some(Prefilled {
        first_token,
        end,
        admitted_at,
        done_at: prefilled_at,
    }) = done
    else {
        return Err(Status::internal("the prefill ended without a token"));
    };
    let prefill_seconds = (prefilled_at - start).as_secs_f64();
    let queue_seconds = (admitted_at - start).as_secs_f64();
    if let PrefillEnd::Finished(reason) = end {
        // Nothing to move; the guard frees any reservation on the decode worker.
        return Ok(PrefillResponse {
            first_token,
            finish_reason: reason.to_proto() as i32,
            prefill_seconds,
            queue_seconds,
            ..Default::default()
        });
    }
    let (kv_bytes, transport) = match (copied, &device) {
        (Some(Ok(bytes)), Some(cache)) => {
            commit_device(svc, id, &req, &params, first_token, cache.epoch).await?;
            (bytes, KvTransport::Device)
        }
        // The decode worker was full while the prompt ran; it may have room now. If not, the
        // router hears so and picks another one.
        (Some(Err(e)), Some(cache)) if e.code() == Code::ResourceExhausted => {
            let bytes = device_copy(svc, id, &addr, cache, num_blocks).await?;
            commit_device(svc, id, &req, &params, first_token, cache.epoch).await?;
            (bytes, KvTransport::Device)
        }
        (Some(Err(e)), _) => {
            if svc.kv.policy == KvTransportPolicy::Device {
                return Err(e);
            }
            tracing::warn!(decode = %addr, error = %e.message(), "device-to-device KV copy failed; using gRPC for this decode worker");
            svc.peers.use_grpc(&addr);
            // Nothing of ours writes there any more: free the reservation at once.
            if let Some(mut c) = guard.decode.clone() {
                let _ = c
                    .cancel_kv(CancelKvRequest {
                        id: Some(id.to_proto()),
                        writer_done: true,
                    })
                    .await;
            }
            (push_grpc(svc, id, &addr, &params).await?, KvTransport::Grpc)
        }
        _ => {
            guard.decode = Some(svc.peers.client(&addr).await?);
            (push_grpc(svc, id, &addr, &params).await?, KvTransport::Grpc)
        }
    };
    let transfer_seconds = prefilled_at.elapsed().as_secs_f64();
    svc.handle.release(id);
    guard.armed = false;
    svc.metrics
        .kv_moved("send", transport, kv_bytes, transfer_seconds);
    Ok(PrefillResponse {
        first_token,
        finish_reason: proto::FinishReason::Unspecified as i32,
        cached_tokens: 0,
        prefill_seconds,
        kv_bytes,
        transfer_seconds,
        kv_transport: transport.to_proto() as i32,
        queue_seconds,
    })
}
