//! The decode worker's side of the handoff: blocks reserved for arriving KV, written over gRPC
//! (PushKv) or by the prefill worker's GPU (ReserveKv, then CommitKv), then kept until the
//! router attaches. Every import is checked before it reaches the engine.

use std::time::Instant;

use pdfleet_api::proto::{
    self, kv_chunk, CommitKvRequest, KvCacheInfo, KvChunk, PushKvAck, ReserveKvRequest,
    ReserveKvResponse,
};
use pdfleet_api::{KvDtype, KvTransport};
use tonic::{Status, Streaming};

use super::grpc::{params_of, request_id, status_of, CancelOnDrop, WorkerService};
use super::table::Writer;
use super::transfer::{self, Assembler};
use crate::backend::SharedKvCache;

/// This worker's cache, for peers to write into; refused where it cannot be shared.
fn own_shared_cache(svc: &WorkerService) -> Result<&SharedKvCache, Status> {
    svc.shared_cache.as_ref().ok_or_else(|| {
        Status::failed_precondition("this worker's KV cache cannot be shared (not on a GPU)")
    })
}

/// Reservations and commits name the instance whose cache the sender opened: one restarted at
/// the same address is another, and its blocks are not the ones the sender knows.
fn check_epoch(svc: &WorkerService, epoch: u64) -> Result<(), Status> {
    if epoch != svc.epoch {
        return Err(Status::aborted(format!(
            "this worker restarted: epoch {epoch} is not its epoch; open its cache again"
        )));
    }
    Ok(())
}

/// `PushKv`: the header, then the chunks; the sequence is committed once all arrived whole.
pub async fn push_kv(
    svc: &WorkerService,
    mut stream: Streaming<KvChunk>,
) -> Result<PushKvAck, Status> {
    let start = Instant::now();
    let header = match stream.message().await? {
        Some(KvChunk {
            part: Some(kv_chunk::Part::Header(h)),
        }) => h,
        _ => return Err(Status::invalid_argument("a KV push starts with its header")),
    };
    let id = request_id(header.id.as_ref())?;
    let wire = proto::KvDtype::try_from(header.wire_dtype)
        .ok()
        .and_then(KvDtype::from_proto)
        .ok_or_else(|| Status::invalid_argument("the header names no wire dtype"))?;
    let m = &svc.model;
    if header.block_size as usize != svc.block_size
        || header.n_layers as usize != m.n_layers
        || header.kv_dim as usize != m.kv_dim()
    {
        return Err(Status::failed_precondition(format!(
            "KV layout mismatch: sender has block size {}, {} layers, kv_dim {}; this worker {}, {}, {}",
            header.block_size, header.n_layers, header.kv_dim, svc.block_size, m.n_layers, m.kv_dim()
        )));
    }
    if header.num_blocks == 0 || header.num_blocks as usize > m.max_seq_len.div_ceil(svc.block_size)
    {
        return Err(Status::invalid_argument(format!(
            "{} blocks cannot hold a sequence of this model",
            header.num_blocks
        )));
    }
    let expected =
        header.num_blocks as usize * svc.block_size * m.kv_dim() * 2 * m.n_layers * wire.bytes();
    if header.total_bytes != expected as u64 {
        return Err(Status::invalid_argument(format!(
            "header announces {} bytes, its blocks need {expected}",
            header.total_bytes
        )));
    }
    svc.handle
        .reserve(id, header.num_blocks as usize, Writer::Local)
        .await
        .map_err(status_of)?;
    // Until committed, a broken stream frees the reserved blocks.
    let mut guard = CancelOnDrop::new(&svc.handle, id, true);
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
        svc.handle.touch(id);
    }
    let data = assembler.finish().map_err(Status::data_loss)?;
    let kv = transfer::convert(&data, wire, m.kv_dtype);
    svc.handle
        .commit(
            id,
            Writer::Local,
            header.tokens,
            header.prompt_len as usize,
            params_of(header.params),
            Some(kv),
        )
        .await
        .map_err(status_of)?;
    guard.disarm();
    svc.metrics.kv_moved(
        "receive",
        KvTransport::Grpc,
        data.len() as u64,
        start.elapsed().as_secs_f64(),
    );
    Ok(PushKvAck {
        blocks: header.num_blocks,
    })
}

/// `KvCache`: where a peer on this host can write KV device to device.
pub fn kv_cache(svc: &WorkerService) -> Result<KvCacheInfo, Status> {
    let cache = own_shared_cache(svc)?;
    Ok(KvCacheInfo {
        ipc_handle: cache.ipc_handle.clone(),
        host_id: svc.kv.host_id.clone(),
        device: cache.device.clone(),
        pool_bytes: cache.pool_bytes,
        n_pools: cache.n_pools,
        block_bytes: cache.block_bytes,
        block_size: svc.block_size as u32,
        kv_dtype: svc.model.kv_dtype.to_proto() as i32,
        epoch: svc.epoch,
    })
}

/// `ReserveKv`: blocks a peer writes into until its lease ends (asking again renews it).
pub async fn reserve_kv(
    svc: &WorkerService,
    req: ReserveKvRequest,
) -> Result<ReserveKvResponse, Status> {
    own_shared_cache(svc)?;
    check_epoch(svc, req.epoch)?;
    let id = request_id(req.id.as_ref())?;
    if req.num_blocks == 0
        || req.num_blocks as usize > svc.model.max_seq_len.div_ceil(svc.block_size)
    {
        return Err(Status::invalid_argument(format!(
            "{} blocks cannot hold a sequence of this model",
            req.num_blocks
        )));
    }
    // The table owns the reservation from the moment it exists, with a deadline: a caller that
    // goes away before the answer leaves nothing behind for good.
    let (blocks, lease) = svc
        .handle
        .reserve(id, req.num_blocks as usize, Writer::Peer)
        .await
        .map_err(status_of)?;
    Ok(ReserveKvResponse {
        blocks,
        lease_ms: lease.as_millis() as u32,
    })
}

/// `CommitKv`: the peer has written the reserved blocks.
pub async fn commit_kv(svc: &WorkerService, req: CommitKvRequest) -> Result<PushKvAck, Status> {
    let cache = own_shared_cache(svc)?;
    check_epoch(svc, req.epoch)?;
    let id = request_id(req.id.as_ref())?;
    let (blocks, took) = svc
        .handle
        .commit(
            id,
            Writer::Peer,
            req.tokens,
            req.prompt_len as usize,
            params_of(req.params),
            None,
        )
        .await
        .map_err(status_of)?;
    svc.metrics.kv_moved(
        "receive",
        KvTransport::Device,
        cache.bytes(blocks),
        took.as_secs_f64(),
    );
    Ok(PushKvAck {
        blocks: blocks as u32,
    })
}
