//! The CUDA backend: NVRTC-compiled kernels through cudarc with dynamic loading, so the crate
//! builds and runs on machines without CUDA; there, opening it fails with a clear error.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::{
    result, sys, CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DeviceRepr,
    LaunchConfig, PushKernelArg, ValidAsZeroBits,
};

use super::{Backend, ForwardBatch, ForwardOutput, SharedKvCache, StaticBatch, StaticRun};
use crate::config::{KvDtype, ModelConfig};
use crate::weights::{transpose, Weights};
use crate::EngineError;

const KERNELS: &str = include_str!("kernels.cu");
/// Warps per thread block in the per-token and per-row kernels.
const WARPS: u32 = 4;

/// Whether a CUDA driver with at least one device is present.
pub fn device_available() -> bool {
    // Without the library, cudarc's first call would panic; ask first.
    let present = unsafe {
        cudarc::driver::sys::is_culib_present() && cudarc::nvrtc::sys::is_culib_present()
    };
    present && CudaContext::device_count().map(|n| n > 0).unwrap_or(false)
}

/// How many CUDA devices are visible (0 without a driver).
pub fn device_count() -> usize {
    if device_available() {
        CudaContext::device_count().unwrap_or(0) as usize
    } else {
        0
    }
}

fn cuda_err(e: impl std::fmt::Debug) -> EngineError {
    EngineError::Backend(format!("CUDA: {e:?}"))
}

/// A device buffer that grows to the largest batch seen.
struct Buf<T> {
    slice: CudaSlice<T>,
}

impl<T: DeviceRepr + ValidAsZeroBits> Buf<T> {
    fn new(stream: &Arc<CudaStream>, len: usize) -> Result<Self, EngineError> {
        Ok(Buf {
            slice: stream.alloc_zeros(len.max(1)).map_err(cuda_err)?,
        })
    }
    fn ensure(&mut self, stream: &Arc<CudaStream>, len: usize) -> Result<(), EngineError> {
        if self.slice.len() < len {
            self.slice = stream
                .alloc_zeros(len.next_power_of_two())
                .map_err(cuda_err)?;
        }
        Ok(())
    }
    fn upload(&mut self, stream: &Arc<CudaStream>, data: &[T]) -> Result<(), EngineError> {
        self.ensure(stream, data.len())?;
        if !data.is_empty() {
            stream
                .memcpy_htod(data, &mut self.slice.slice_mut(..data.len()))
                .map_err(cuda_err)?;
        }
        Ok(())
    }
}

/// The KV cache: every layer's K and V pools in one `cuMemAlloc` allocation, pool `p` (layer
/// `p / 2`, K then V) at `p * pool_bytes`. Not from cudarc's stream-ordered allocator: CUDA IPC
/// cannot share that memory with another process.
struct KvPools {
    ctx: Arc<CudaContext>,
    base: sys::CUdeviceptr,
    pool_bytes: usize,
    n_pools: usize,
}

impl KvPools {
    fn new(ctx: &Arc<CudaContext>, pool_bytes: usize, n_pools: usize) -> Result<Self, EngineError> {
        ctx.bind_to_thread().map_err(cuda_err)?;
        let bytes = pool_bytes * n_pools;
        // SAFETY: a plain allocation in the bound context, zeroed before use and freed on drop.
        let base = unsafe { result::malloc_sync(bytes) }.map_err(cuda_err)?;
        let pools = KvPools {
            ctx: ctx.clone(),
            base,
            pool_bytes,
            n_pools,
        };
        unsafe { result::memset_d8_sync(base, 0, bytes) }.map_err(cuda_err)?;
        Ok(pools)
    }

    fn pool(&self, p: usize) -> u64 {
        self.base + (p * self.pool_bytes) as u64
    }

    fn k(&self, layer: usize) -> u64 {
        self.pool(2 * layer)
    }

    fn v(&self, layer: usize) -> u64 {
        self.pool(2 * layer + 1)
    }
}

impl Drop for KvPools {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: allocated by `malloc_sync` in this context; every kernel using it was
            // synchronized by the step that launched it.
            let _ = unsafe { result::free_sync(self.base) };
        }
    }
}

/// Other workers' caches opened through their IPC handles, by handle; closed on drop.
struct PeerCaches {
    ctx: Arc<CudaContext>,
    opened: HashMap<Vec<u8>, sys::CUdeviceptr>,
}

impl PeerCaches {
    fn open(&mut self, target: &SharedKvCache) -> Result<sys::CUdeviceptr, EngineError> {
        if let Some(&p) = self.opened.get(&target.ipc_handle) {
            return Ok(p);
        }
        let mut handle = sys::CUipcMemHandle_st { reserved: [0; 64] };
        if target.ipc_handle.len() != handle.reserved.len() {
            return Err(EngineError::Backend(format!(
                "a CUDA IPC handle has 64 bytes, not {}",
                target.ipc_handle.len()
            )));
        }
        for (d, s) in handle.reserved.iter_mut().zip(&target.ipc_handle) {
            *d = *s as _;
        }
        self.ctx.bind_to_thread().map_err(cuda_err)?;
        let mut ptr = 0;
        // SAFETY: the handle names memory of another process on this host; the lazy peer flag
        // maps it whether it lives on this GPU or on a peer one.
        unsafe {
            sys::cuIpcOpenMemHandle_v2(
                &mut ptr,
                handle,
                sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32,
            )
        }
        .result()
        .map_err(|e| EngineError::Backend(format!("opening the peer's KV cache: {e:?}")))?;
        self.opened.insert(target.ipc_handle.clone(), ptr);
        Ok(ptr)
    }
}

impl Drop for PeerCaches {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            for &p in self.opened.values() {
                // SAFETY: opened by `cuIpcOpenMemHandle_v2` in this context.
                let _ = unsafe { sys::cuIpcCloseMemHandle(p) };
            }
        }
    }
}

struct Layer0 {
    q_tok: CudaSlice<f32>,
    q_pos: CudaSlice<f32>,
    k_tok: CudaSlice<f32>,
    k_pos: CudaSlice<f32>,
    v_tok: CudaSlice<f32>,
    v_pos: CudaSlice<f32>,
}

struct DeepLayer {
    wq_t: CudaSlice<f32>,
    wk_t: CudaSlice<f32>,
    wv_t: CudaSlice<f32>,
}

struct Kernels {
    embed_qkv: CudaFunction,
    proj_qkv: CudaFunction,
    attention: CudaFunction,
    logits: CudaFunction,
    static_layout: CudaFunction,
    gather_blocks: CudaFunction,
    scatter_blocks: CudaFunction,
    copy_blocks: CudaFunction,
}

/// Per-step inputs and scratch, kept on the device between steps.
struct Scratch {
    tokens: Buf<u32>,
    positions: Buf<u32>,
    slots: Buf<u32>,
    token_seq: Buf<u32>,
    block_tables: Buf<u32>,
    q_row: Buf<i32>,
    row_token: Buf<i32>,
    temps: Buf<f32>,
    seeds: Buf<u64>,
    gen_pos: Buf<u32>,
    q: Buf<f32>,
    hidden_a: Buf<f32>,
    hidden_b: Buf<f32>,
    logits: Buf<f32>,
}

pub struct CudaBackend {
    config: ModelConfig,
    block_size: usize,
    num_blocks: usize,
    stream: Arc<CudaStream>,
    kernels: Kernels,
    layer0: Layer0,
    deep: Vec<DeepLayer>,
    out_t: CudaSlice<f32>,
    cache: KvPools,
    peers: PeerCaches,
    s: Scratch,
    /// Sampled tokens of a [`Backend::forward`] step.
    out_tokens: Buf<u32>,
    /// A sequence's KV on its way out or in, contiguous, and its block ids.
    staging: Buf<u8>,
    transfer_blocks: Buf<u32>,
    device_name: String,
}

/// `emb · Wᵀ` for a `[rows, dim]` embedding and a `[out, dim]` weight: a `[rows, out]` table.
fn project_table(emb: &[f32], w: &[f32], dim: usize) -> Vec<f32> {
    let out = w.len() / dim;
    let mut t = Vec::with_capacity(emb.len() / dim * out);
    for row in emb.chunks_exact(dim) {
        for wr in w.chunks_exact(dim) {
            t.push(row.iter().zip(wr).map(|(a, b)| a * b).sum());
        }
    }
    t
}

/// The kernels' `SampleArgs`: where sampling reads its inputs and writes tokens (and logits).
#[repr(C)]
#[derive(Clone, Copy)]
struct SampleArgs {
    out_t: u64,
    temps: u64,
    seeds: u64,
    gen_pos: u64,
    logits: u64,
    want_logits: i32,
    tokens_out: u64,
    out_stride: i32,
}

// SAFETY: plain old data laid out as the C struct in kernels.cu.
unsafe impl DeviceRepr for SampleArgs {}

/// One warp per item, `WARPS` warps per block.
fn warp_grid(items: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((items as u32).div_ceil(WARPS).max(1), 1, 1),
        block_dim: (WARPS * 32, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl CudaBackend {
    pub fn new(
        weights: &Weights,
        block_size: usize,
        num_blocks: usize,
        ordinal: usize,
    ) -> Result<Self, EngineError> {
        let c = weights.config.clone();
        c.validate()?;
        if !device_available() {
            return Err(EngineError::Backend(
                "no CUDA device: the CUDA driver or NVRTC library was not found, or no GPU is visible".into(),
            ));
        }
        if block_size == 0 || num_blocks == 0 {
            return Err(EngineError::InvalidConfig(
                "block_size and num_blocks must be positive".into(),
            ));
        }
        let ctx = CudaContext::new(ordinal).map_err(cuda_err)?;
        let device_name = ctx.name().map_err(cuda_err)?;
        let (major, minor) = ctx.compute_capability().map_err(cuda_err)?;
        let stream = ctx.default_stream();
        let defines = format!(
            "#define D {}\n#define HD {}\n#define NH {}\n#define NKV {}\n#define KVD {}\n#define BS {}\n#define V {}\n#define WARPS {WARPS}\n#define KV_DTYPE {}\n",
            c.dim,
            c.head_dim(),
            c.n_heads,
            c.n_kv_heads,
            c.kv_dim(),
            block_size,
            c.vocab_size,
            match c.kv_dtype {
                KvDtype::F32 => 0,
                KvDtype::F16 => 1,
                KvDtype::Bf16 => 2,
            }
        );
        let opts = cudarc::nvrtc::CompileOptions {
            options: vec![format!("--gpu-architecture=compute_{major}{minor}")],
            ..Default::default()
        };
        let ptx = cudarc::nvrtc::compile_ptx_with_opts(format!("{defines}{KERNELS}"), opts)
            .map_err(|e| EngineError::Backend(format!("NVRTC: {e}")))?;
        let module = ctx.load_module(ptx).map_err(cuda_err)?;
        let f = |name: &str| module.load_function(name).map_err(cuda_err);
        let kernels = Kernels {
            embed_qkv: f("embed_qkv_kernel")?,
            proj_qkv: f("proj_qkv_kernel")?,
            attention: f("attention_kernel")?,
            logits: f("logits_kernel")?,
            static_layout: f("static_layout_kernel")?,
            gather_blocks: f("gather_blocks_kernel")?,
            scatter_blocks: f("scatter_blocks_kernel")?,
            copy_blocks: f("copy_blocks_kernel")?,
        };
        let up = |v: &[f32]| stream.clone_htod(v).map_err(cuda_err);
        let l0 = &weights.layers[0];
        let layer0 = Layer0 {
            q_tok: up(&project_table(&weights.tok_embed, &l0.wq, c.dim))?,
            q_pos: up(&project_table(&weights.pos_embed, &l0.wq, c.dim))?,
            k_tok: up(&project_table(&weights.tok_embed, &l0.wk, c.dim))?,
            k_pos: up(&project_table(&weights.pos_embed, &l0.wk, c.dim))?,
            v_tok: up(&project_table(&weights.tok_embed, &l0.wv, c.dim))?,
            v_pos: up(&project_table(&weights.pos_embed, &l0.wv, c.dim))?,
        };
        let deep = weights.layers[1..]
            .iter()
            .map(|l| {
                Ok(DeepLayer {
                    wq_t: up(&transpose(&l.wq, c.dim, c.dim))?,
                    wk_t: up(&transpose(&l.wk, c.kv_dim(), c.dim))?,
                    wv_t: up(&transpose(&l.wv, c.kv_dim(), c.dim))?,
                })
            })
            .collect::<Result<Vec<_>, EngineError>>()?;
        let out_t = up(&transpose(&weights.out, c.vocab_size, c.dim))?;
        let pool_bytes = num_blocks * super::block_bytes(&c, block_size);
        let cache = KvPools::new(&ctx, pool_bytes, 2 * c.n_layers)?;
        let peers = PeerCaches {
            ctx: ctx.clone(),
            opened: HashMap::new(),
        };
        let s = Scratch {
            tokens: Buf::new(&stream, 1)?,
            positions: Buf::new(&stream, 1)?,
            slots: Buf::new(&stream, 1)?,
            token_seq: Buf::new(&stream, 1)?,
            block_tables: Buf::new(&stream, 1)?,
            q_row: Buf::new(&stream, 1)?,
            row_token: Buf::new(&stream, 1)?,
            temps: Buf::new(&stream, 1)?,
            seeds: Buf::new(&stream, 1)?,
            gen_pos: Buf::new(&stream, 1)?,
            q: Buf::new(&stream, 1)?,
            hidden_a: Buf::new(&stream, 1)?,
            hidden_b: Buf::new(&stream, 1)?,
            logits: Buf::new(&stream, 1)?,
        };
        let out_tokens = Buf::new(&stream, 1)?;
        let staging = Buf::new(&stream, 1)?;
        let transfer_blocks = Buf::new(&stream, 1)?;
        tracing::info!(device = %device_name, sm = format!("{major}.{minor}"), "CUDA backend ready");
        Ok(CudaBackend {
            config: c,
            block_size,
            num_blocks,
            stream,
            kernels,
            layer0,
            deep,
            out_t,
            cache,
            peers,
            s,
            out_tokens,
            staging,
            transfer_blocks,
            device_name,
        })
    }

    pub fn device_name(&self) -> &str {
        &self.device_name
    }

    /// Grows the scratch buffers for a batch of `n` tokens and `rows` sampled rows.
    fn reserve(&mut self, n: usize, rows: usize) -> Result<(), EngineError> {
        let (st, d) = (&self.stream, self.config.dim);
        let deep = self.config.n_layers > 1;
        self.s.q.ensure(st, if deep { n } else { rows } * d)?;
        self.s
            .hidden_a
            .ensure(st, if deep { n * d } else { rows * d })?;
        self.s.hidden_b.ensure(st, if deep { n * d } else { 1 })?;
        self.s.logits.ensure(st, rows * self.config.vocab_size)?;
        Ok(())
    }

    /// Launches the model over the batch already laid out in the scratch buffers: `n` tokens,
    /// `rows` sampled rows whose tokens go to `out[offset + row * stride]` of the static token
    /// matrix, or to `out_tokens` when there is none.
    #[allow(clippy::too_many_arguments)]
    fn launch_model(
        &mut self,
        n: usize,
        rows: usize,
        max_blocks: usize,
        want_logits: bool,
        matrix: Option<&mut CudaSlice<u32>>,
        out_offset: usize,
        out_stride: usize,
    ) -> Result<(), EngineError> {
        self.reserve(n, rows)?;
        let layers = self.config.n_layers;
        let (n_i, rows_i, mb_i) = (n as i32, rows as i32, max_blocks as i32);
        let st = self.stream.clone();
        // With one head the attention warp holds a whole row and samples it itself.
        let fuse = self.config.n_heads == 1;
        let fuse_i = i32::from(fuse);
        let tokens_out = match matrix {
            Some(m) => m,
            None => &mut self.out_tokens.slice,
        };
        let s = &mut self.s;
        let sample = SampleArgs {
            out_t: self.out_t.device_ptr(&st).0,
            temps: s.temps.slice.device_ptr(&st).0,
            seeds: s.seeds.slice.device_ptr(&st).0,
            gen_pos: s.gen_pos.slice.device_ptr(&st).0,
            logits: s.logits.slice.device_ptr(&st).0,
            want_logits: i32::from(want_logits),
            tokens_out: tokens_out.device_ptr(&st).0
                + (out_offset * std::mem::size_of::<u32>()) as u64,
            out_stride: out_stride as i32,
        };
        for layer in 0..layers {
            let last = layer + 1 == layers;
            let all_rows = i32::from(!last);
            let (kc, vc) = (self.cache.k(layer), self.cache.v(layer));
            // Layer input: hidden_b holds the previous layer's output when there is one.
            if layer == 0 {
                let l0 = &self.layer0;
                let mut b = st.launch_builder(&self.kernels.embed_qkv);
                b.arg(&n_i).arg(&s.tokens.slice).arg(&s.positions.slice);
                b.arg(&l0.q_tok)
                    .arg(&l0.q_pos)
                    .arg(&l0.k_tok)
                    .arg(&l0.k_pos)
                    .arg(&l0.v_tok)
                    .arg(&l0.v_pos);
                b.arg(&s.slots.slice)
                    .arg(&kc)
                    .arg(&vc)
                    .arg(&s.q_row.slice)
                    .arg(&all_rows)
                    .arg(&mut s.q.slice);
                unsafe { b.launch(warp_grid(n)) }.map_err(cuda_err)?;
            } else {
                let w = &self.deep[layer - 1];
                let mut b = st.launch_builder(&self.kernels.proj_qkv);
                b.arg(&n_i)
                    .arg(&s.hidden_b.slice)
                    .arg(&w.wq_t)
                    .arg(&w.wk_t)
                    .arg(&w.wv_t);
                b.arg(&s.slots.slice)
                    .arg(&kc)
                    .arg(&vc)
                    .arg(&s.q_row.slice)
                    .arg(&all_rows)
                    .arg(&mut s.q.slice);
                unsafe { b.launch(warp_grid(n)) }.map_err(cuda_err)?;
            }
            let q_rows = if last { rows } else { n };
            let q_rows_i = q_rows as i32;
            let mut b = st.launch_builder(&self.kernels.attention);
            b.arg(&q_rows_i)
                .arg(&s.row_token.slice)
                .arg(&all_rows)
                .arg(&s.positions.slice)
                .arg(&s.token_seq.slice);
            b.arg(&s.block_tables.slice)
                .arg(&mb_i)
                .arg(&s.q.slice)
                .arg(&kc)
                .arg(&vc)
                .arg(&mut s.hidden_a.slice)
                .arg(if last { &fuse_i } else { &0i32 })
                .arg(&sample);
            unsafe { b.launch(warp_grid(q_rows * self.config.n_heads)) }.map_err(cuda_err)?;
            if !last {
                std::mem::swap(&mut s.hidden_a, &mut s.hidden_b);
            }
        }
        if !fuse {
            let mut b = st.launch_builder(&self.kernels.logits);
            b.arg(&rows_i).arg(&s.hidden_a.slice).arg(&sample);
            unsafe { b.launch(warp_grid(rows)) }.map_err(cuda_err)?;
        }
        Ok(())
    }

    fn pool_bytes_per_block(&self) -> usize {
        super::block_bytes(&self.config, self.block_size)
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> &'static str {
        "cuda"
    }
    fn config(&self) -> &ModelConfig {
        &self.config
    }
    fn block_size(&self) -> usize {
        self.block_size
    }
    fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    fn forward(&mut self, batch: &ForwardBatch) -> Result<ForwardOutput, EngineError> {
        let (n, rows) = (batch.tokens.len(), batch.samples.len());
        if n == 0 {
            return Ok(ForwardOutput::default());
        }
        let st = self.stream.clone();
        let mut q_row = vec![-1i32; n];
        for (r, smp) in batch.samples.iter().enumerate() {
            q_row[smp.token_index as usize] = r as i32;
        }
        let s = &mut self.s;
        s.tokens.upload(&st, &batch.tokens)?;
        s.positions.upload(&st, &batch.positions)?;
        s.slots.upload(&st, &batch.slots)?;
        s.token_seq.upload(&st, &batch.token_seq)?;
        s.block_tables.upload(&st, &batch.block_tables)?;
        s.q_row.upload(&st, &q_row)?;
        s.row_token.upload(
            &st,
            &batch
                .samples
                .iter()
                .map(|x| x.token_index as i32)
                .collect::<Vec<_>>(),
        )?;
        s.temps.upload(
            &st,
            &batch
                .samples
                .iter()
                .map(|x| x.temperature)
                .collect::<Vec<_>>(),
        )?;
        s.seeds.upload(
            &st,
            &batch.samples.iter().map(|x| x.seed).collect::<Vec<_>>(),
        )?;
        s.gen_pos.upload(
            &st,
            &batch.samples.iter().map(|x| x.position).collect::<Vec<_>>(),
        )?;
        self.out_tokens.ensure(&st, rows)?;
        self.launch_model(n, rows, batch.max_blocks, batch.want_logits, None, 0, 1)?;
        let tokens = st
            .clone_dtoh(&self.out_tokens.slice.slice(..rows))
            .map_err(cuda_err)?;
        let logits = if batch.want_logits {
            Some(
                st.clone_dtoh(&self.s.logits.slice.slice(..rows * self.config.vocab_size))
                    .map_err(cuda_err)?,
            )
        } else {
            None
        };
        Ok(ForwardOutput { tokens, logits })
    }

    fn read_blocks(&mut self, blocks: &[u32]) -> Result<Vec<u8>, EngineError> {
        let (bb, n) = (self.pool_bytes_per_block(), blocks.len());
        let total = bb * n * self.cache.n_pools;
        let st = self.stream.clone();
        self.transfer_blocks.upload(&st, blocks)?;
        self.staging.ensure(&st, total)?;
        let (n_i, bb_i) = (n as i32, bb as i32);
        for i in 0..self.cache.n_pools {
            let pool = self.cache.pool(i);
            let mut out = self.staging.slice.slice_mut(i * n * bb..(i + 1) * n * bb);
            let mut b = st.launch_builder(&self.kernels.gather_blocks);
            b.arg(&pool)
                .arg(&self.transfer_blocks.slice)
                .arg(&n_i)
                .arg(&bb_i)
                .arg(&mut out);
            let cfg = LaunchConfig {
                grid_dim: (n.max(1) as u32, 1, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            unsafe { b.launch(cfg) }.map_err(cuda_err)?;
        }
        st.clone_dtoh(&self.staging.slice.slice(..total))
            .map_err(cuda_err)
    }

    fn write_blocks(&mut self, blocks: &[u32], data: &[u8]) -> Result<(), EngineError> {
        let (bb, n) = (self.pool_bytes_per_block(), blocks.len());
        if data.len() != bb * n * self.cache.n_pools {
            return Err(EngineError::Backend(format!(
                "KV data of {} bytes does not fill {n} blocks",
                data.len()
            )));
        }
        let st = self.stream.clone();
        self.transfer_blocks.upload(&st, blocks)?;
        self.staging.upload(&st, data)?;
        let (n_i, bb_i) = (n as i32, bb as i32);
        for i in 0..self.cache.n_pools {
            let pool = self.cache.pool(i);
            let input = self.staging.slice.slice(i * n * bb..(i + 1) * n * bb);
            let mut b = st.launch_builder(&self.kernels.scatter_blocks);
            b.arg(&input)
                .arg(&self.transfer_blocks.slice)
                .arg(&n_i)
                .arg(&bb_i)
                .arg(&pool);
            let cfg = LaunchConfig {
                grid_dim: (n.max(1) as u32, 1, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            unsafe { b.launch(cfg) }.map_err(cuda_err)?;
        }
        st.synchronize().map_err(cuda_err)
    }

    fn shared_cache(&self) -> Option<SharedKvCache> {
        let share = || -> Result<SharedKvCache, EngineError> {
            self.cache.ctx.bind_to_thread().map_err(cuda_err)?;
            let mut handle = sys::CUipcMemHandle_st { reserved: [0; 64] };
            // SAFETY: `base` is a live `cuMemAlloc` allocation of this context.
            unsafe { sys::cuIpcGetMemHandle(&mut handle, self.cache.base) }
                .result()
                .map_err(cuda_err)?;
            let uuid = self.cache.ctx.uuid().map_err(cuda_err)?;
            Ok(SharedKvCache {
                ipc_handle: handle.reserved.iter().map(|&c| c as u8).collect(),
                device: uuid
                    .bytes
                    .iter()
                    .map(|&b| format!("{:02x}", b as u8))
                    .collect(),
                pool_bytes: self.cache.pool_bytes as u64,
                n_pools: self.cache.n_pools as u32,
                block_bytes: self.pool_bytes_per_block() as u32,
            })
        };
        share()
            .inspect_err(|e| tracing::warn!(error = %e, "the KV cache cannot be shared"))
            .ok()
    }

    fn copy_blocks_to(
        &mut self,
        target: &SharedKvCache,
        src: &[u32],
        dst: &[u32],
    ) -> Result<(), EngineError> {
        let bb = self.pool_bytes_per_block();
        if target.block_bytes as usize != bb
            || target.n_pools as usize != self.cache.n_pools
            || src.len() != dst.len()
        {
            return Err(EngineError::Backend(format!(
                "peer cache layout ({} pools of {}-byte blocks) does not match this one ({} of {bb}), or {} source blocks for {} targets",
                target.n_pools,
                target.block_bytes,
                self.cache.n_pools,
                src.len(),
                dst.len()
            )));
        }
        if src.is_empty() {
            return Ok(());
        }
        let peer_base = self.peers.open(target)?;
        let st = self.stream.clone();
        let n = src.len();
        let ids: Vec<u32> = src.iter().chain(dst).copied().collect();
        self.transfer_blocks.upload(&st, &ids)?;
        let dst_ids =
            self.transfer_blocks.slice.device_ptr(&st).0 + std::mem::size_of_val(src) as u64;
        let (src_pool, dst_pool) = (self.cache.pool_bytes as u64, target.pool_bytes);
        let (n_i, bb_i) = (n as i32, bb as i32);
        let mut b = st.launch_builder(&self.kernels.copy_blocks);
        b.arg(&self.cache.base)
            .arg(&src_pool)
            .arg(&self.transfer_blocks.slice)
            .arg(&peer_base)
            .arg(&dst_pool)
            .arg(&dst_ids)
            .arg(&n_i)
            .arg(&bb_i);
        let cfg = LaunchConfig {
            grid_dim: (n as u32, self.cache.n_pools as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { b.launch(cfg) }.map_err(cuda_err)?;
        st.synchronize().map_err(cuda_err)
    }

    fn run_static(&mut self, run: &StaticBatch) -> Result<StaticRun, EngineError> {
        let (prompts, batch, new_tokens, max_blocks) =
            (run.prompts, run.batch, run.new_tokens, run.max_blocks);
        let st = self.stream.clone();
        let prompt_len = prompts.len() / batch;
        let stride = prompt_len + new_tokens;
        let mut matrix_host = vec![0u32; batch * stride];
        for s in 0..batch {
            matrix_host[s * stride..s * stride + prompt_len]
                .copy_from_slice(&prompts[s * prompt_len..(s + 1) * prompt_len]);
        }
        let mut matrix = st.clone_htod(&matrix_host).map_err(cuda_err)?;
        self.s.block_tables.upload(&st, run.block_tables)?;
        self.s.temps.upload(&st, &vec![0.0f32; batch])?;
        self.s.seeds.upload(&st, &vec![0u64; batch])?;
        let n_max = batch * if run.recompute { stride } else { prompt_len };
        for buf in [
            &mut self.s.tokens,
            &mut self.s.positions,
            &mut self.s.slots,
            &mut self.s.token_seq,
        ] {
            buf.ensure(&st, n_max)?;
        }
        self.s.q_row.ensure(&st, n_max)?;
        self.s.row_token.ensure(&st, batch)?;
        self.s.gen_pos.ensure(&st, batch)?;
        self.reserve(n_max, batch)?;
        st.synchronize().map_err(cuda_err)?;
        let (batch_i, stride_i, mb_i) = (batch as i32, stride as i32, max_blocks as i32);
        let mut step = |this: &mut Self, start: usize, count: usize| -> Result<(), EngineError> {
            let (start_i, count_i) = (start as i32, count as i32);
            {
                let s = &mut this.s;
                let mut b = st.launch_builder(&this.kernels.static_layout);
                b.arg(&batch_i)
                    .arg(&start_i)
                    .arg(&count_i)
                    .arg(&stride_i)
                    .arg(&matrix)
                    .arg(&s.block_tables.slice)
                    .arg(&mb_i);
                b.arg(&mut s.tokens.slice)
                    .arg(&mut s.positions.slice)
                    .arg(&mut s.slots.slice)
                    .arg(&mut s.token_seq.slice);
                b.arg(&mut s.q_row.slice)
                    .arg(&mut s.row_token.slice)
                    .arg(&mut s.gen_pos.slice);
                unsafe { b.launch(LaunchConfig::for_num_elems((batch * count) as u32)) }
                    .map_err(cuda_err)?;
            }
            this.launch_model(
                batch * count,
                batch,
                max_blocks,
                false,
                Some(&mut matrix),
                start + count,
                stride,
            )
        };
        let t0 = Instant::now();
        step(self, 0, prompt_len)?;
        st.synchronize().map_err(cuda_err)?;
        let prefill_secs = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        for i in 1..new_tokens {
            let len = prompt_len + i;
            if run.recompute {
                step(self, 0, len)?;
            } else {
                step(self, len - 1, 1)?;
            }
        }
        st.synchronize().map_err(cuda_err)?;
        let decode_secs = t1.elapsed().as_secs_f64();
        let all = st.clone_dtoh(&matrix).map_err(cuda_err)?;
        let tokens = (0..batch)
            .flat_map(|s| all[s * stride + prompt_len..(s + 1) * stride].to_vec())
            .collect();
        Ok(StaticRun {
            tokens,
            prefill_secs,
            decode_secs,
        })
    }
}
