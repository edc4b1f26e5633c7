// pdfleet CUDA kernels, compiled at run time by NVRTC. The model's shape arrives as macros (D, HD,
// NH, NKV, KVD, BS, V, KV_DTYPE, WARPS) so loops over it unroll.
typedef unsigned int u32;
typedef unsigned long long u64;
#define FULL_MASK 0xffffffffu
#define NEG_INF __int_as_float(0xff800000)
#define HD_PER_LANE ((HD + 31) / 32)

#if KV_DTYPE == 0
typedef float kv_t;
__device__ __forceinline__ float kv_load(kv_t x) { return x; }
__device__ __forceinline__ kv_t kv_store(float x) { return x; }
#elif KV_DTYPE == 1
typedef unsigned short kv_t;
__device__ __forceinline__ float kv_load(kv_t x) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x)); return f; }
__device__ __forceinline__ kv_t kv_store(float x) { kv_t h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x)); return h; }
#else
typedef unsigned short kv_t;
__device__ __forceinline__ float kv_load(kv_t x) { return __uint_as_float(((u32)x) << 16); }
__device__ __forceinline__ kv_t kv_store(float x) {
    u32 u = __float_as_uint(x);
    u += 0x7fffu + ((u >> 16) & 1u); // round to nearest even
    return (kv_t)(u >> 16);
}
#endif

__device__ __forceinline__ u64 mix64(u64 z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

// Layer 0: its input is tok_embed[tok] + pos_embed[pos], so each projection splits into two
// precomputed tables (embedding · Wᵀ) and a token's q, k, v are two lookups and an add.
extern "C" __global__ void embed_qkv_kernel(
    int n_tokens, const u32* __restrict__ tokens, const u32* __restrict__ positions,
    const float* __restrict__ q_tok, const float* __restrict__ q_pos,
    const float* __restrict__ k_tok, const float* __restrict__ k_pos,
    const float* __restrict__ v_tok, const float* __restrict__ v_pos,
    const u32* __restrict__ slots, kv_t* __restrict__ k_cache, kv_t* __restrict__ v_cache,
    const int* __restrict__ q_row, int all_rows, float* __restrict__ q_out)
{
    int lane = threadIdx.x & 31;
    int t = blockIdx.x * WARPS + (threadIdx.x >> 5);
    if (t >= n_tokens) return;
    size_t tok = tokens[t], pos = positions[t], slot = slots[t];
    for (int j = lane; j < KVD; j += 32) {
        k_cache[slot * KVD + j] = kv_store(k_tok[tok * KVD + j] + k_pos[pos * KVD + j]);
        v_cache[slot * KVD + j] = kv_store(v_tok[tok * KVD + j] + v_pos[pos * KVD + j]);
    }
    int r = all_rows ? t : q_row[t];
    if (r >= 0)
        for (int j = lane; j < D; j += 32) q_out[(size_t)r * D + j] = q_tok[tok * D + j] + q_pos[pos * D + j];
}

// Deeper layers: q, k, v = W · x for the previous layer's output, weights transposed ([D, out]) so
// lanes read consecutive addresses.
extern "C" __global__ void proj_qkv_kernel(
    int n_tokens, const float* __restrict__ x_in,
    const float* __restrict__ wq_t, const float* __restrict__ wk_t, const float* __restrict__ wv_t,
    const u32* __restrict__ slots, kv_t* __restrict__ k_cache, kv_t* __restrict__ v_cache,
    const int* __restrict__ q_row, int all_rows, float* __restrict__ q_out)
{
    __shared__ float xs[WARPS][D];
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int t = blockIdx.x * WARPS + warp;
    if (t >= n_tokens) return;
    float* x = xs[warp];
    for (int i = lane; i < D; i += 32) x[i] = x_in[(size_t)t * D + i];
    __syncwarp();
    size_t slot = slots[t];
    for (int j = lane; j < KVD; j += 32) {
        float k = 0.f, v = 0.f;
        #pragma unroll 8
        for (int i = 0; i < D; i++) { k += wk_t[i * KVD + j] * x[i]; v += wv_t[i * KVD + j] * x[i]; }
        k_cache[slot * KVD + j] = kv_store(k);
        v_cache[slot * KVD + j] = kv_store(v);
    }
    int r = all_rows ? t : q_row[t];
    if (r >= 0)
        for (int j = lane; j < D; j += 32) {
            float q = 0.f;
            #pragma unroll 8
            for (int i = 0; i < D; i++) q += wq_t[i * D + j] * x[i];
            q_out[(size_t)r * D + j] = q;
        }
}

// q · k for one cached row, with 16-byte loads where the layout allows.
__device__ __forceinline__ float dot_row(const float* q, const kv_t* __restrict__ k) {
    float s = 0.f;
#if KV_DTYPE == 0 && HD % 4 == 0 && KVD % 4 == 0
    const float4* k4 = (const float4*)k;
    #pragma unroll
    for (int i = 0; i < HD / 4; i++) {
        float4 v = __ldg(k4 + i);
        s += q[4 * i] * v.x + q[4 * i + 1] * v.y + q[4 * i + 2] * v.z + q[4 * i + 3] * v.w;
    }
#elif KV_DTYPE != 0 && HD % 8 == 0 && KVD % 8 == 0
    const uint4* k8 = (const uint4*)k;
    #pragma unroll
    for (int i = 0; i < HD / 8; i++) {
        uint4 v = __ldg(k8 + i);
        u32 w[4] = {v.x, v.y, v.z, v.w};
        #pragma unroll
        for (int j = 0; j < 4; j++) {
            s += q[8 * i + 2 * j] * kv_load((kv_t)(w[j] & 0xffffu));
            s += q[8 * i + 2 * j + 1] * kv_load((kv_t)(w[j] >> 16));
        }
    }
#else
    #pragma unroll
    for (int i = 0; i < HD; i++) s += q[i] * kv_load(k[i]);
#endif
    return s;
}

// Output projection and sampling of one row by one warp: greedy argmax (first maximum) or
// Gumbel-max at a temperature, with the same random stream as the CPU backend.
struct SampleArgs {
    const float* out_t;
    const float* temps;
    const u64* seeds;
    const u32* gen_pos;
    float* logits;
    int want_logits;
    u32* tokens_out;
    int out_stride;
};

__device__ void sample_row(const float* h, int r, int lane, const SampleArgs& a) {
    float temp = a.temps[r];
    float best = NEG_INF;
    int best_i = 0x7fffffff;
    for (int v = lane; v < V; v += 32) {
        float x = 0.f;
        #pragma unroll 8
        for (int i = 0; i < D; i++) x += a.out_t[i * V + v] * h[i];
        if (a.want_logits) a.logits[(size_t)r * V + v] = x;
        if (temp > 0.f) {
            u64 k = mix64(a.seeds[r] ^ mix64(((u64)a.gen_pos[r] << 32) | (u64)v));
            float u = ((float)(k >> 40) + 0.5f) / 16777216.f;
            x = x / temp - logf(-logf(u));
        }
        if (x > best) { best = x; best_i = v; }
    }
    for (int o = 16; o > 0; o >>= 1) {
        float ob = __shfl_xor_sync(FULL_MASK, best, o);
        int oi = __shfl_xor_sync(FULL_MASK, best_i, o);
        if (ob > best || (ob == best && oi < best_i)) { best = ob; best_i = oi; }
    }
    if (lane == 0) a.tokens_out[(size_t)r * a.out_stride] = best_i;
}

// Sampling after multi-head attention, whose heads come from different warps.
extern "C" __global__ void logits_kernel(int n_rows, const float* __restrict__ hidden, SampleArgs a)
{
    __shared__ float hs[WARPS][D];
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int r = blockIdx.x * WARPS + warp;
    if (r >= n_rows) return;
    for (int i = lane; i < D; i += 32) hs[warp][i] = hidden[(size_t)r * D + i];
    __syncwarp();
    sample_row(hs[warp], r, lane, a);
}

// Elements per 16-byte load, and the lanes that share one key when a head is split into such
// loads. When a head fits that layout, each group of LPK lanes walks its own keys (KPI groups per
// warp), so one warp instruction reads KPI whole consecutive rows: coalesced, and with the loop
// unrolled several rows per lane are in flight.
#if KV_DTYPE == 0
#define VEC 4
#else
#define VEC 8
#endif
#define LPK (HD / VEC)
#define KPI (32 / LPK)
#define GROUPED (HD % VEC == 0 && LPK <= 32 && 32 % LPK == 0 && KVD % VEC == 0)

__device__ __forceinline__ void load_vec(const kv_t* __restrict__ p, float out[VEC]) {
#if KV_DTYPE == 0
    float4 v = __ldg((const float4*)p);
    out[0] = v.x; out[1] = v.y; out[2] = v.z; out[3] = v.w;
#else
    uint4 v = __ldg((const uint4*)p);
    u32 w[4] = {v.x, v.y, v.z, v.w};
    #pragma unroll
    for (int j = 0; j < 4; j++) {
        out[2 * j] = kv_load((kv_t)(w[j] & 0xffffu));
        out[2 * j + 1] = kv_load((kv_t)(w[j] >> 16));
    }
#endif
}

// Causal attention through the block table: one warp per (query row, head), online softmax.
extern "C" __global__ void attention_kernel(
    int n_rows, const int* __restrict__ row_token, int all_rows,
    const u32* __restrict__ positions, const u32* __restrict__ token_seq,
    const u32* __restrict__ block_tables, int max_blocks,
    const float* __restrict__ q, const kv_t* __restrict__ k_cache, const kv_t* __restrict__ v_cache,
    float* __restrict__ out, int fuse_sampling, SampleArgs sa)
{
    // With one head a warp holds a whole row, so the last layer samples right here instead of
    // writing the row out for a separate kernel.
    __shared__ float row_smem[WARPS][D];
    int lane = threadIdx.x & 31;
    int item = blockIdx.x * WARPS + (threadIdx.x >> 5);
    if (item >= n_rows * NH) return;
    int r = item / NH, h = item % NH;
    int t = all_rows ? r : row_token[r];
    int pos = positions[t];
    const u32* table = block_tables + (size_t)token_seq[t] * max_blocks;
    int kv_off = (h / (NH / NKV)) * HD;
    const float scale = rsqrtf((float)HD);
#if GROUPED
    int g = lane / LPK, e = lane % LPK;
    float qv[VEC], acc[VEC], kx[VEC], vx[VEC];
    #pragma unroll
    for (int i = 0; i < VEC; i++) { qv[i] = q[(size_t)r * D + h * HD + e * VEC + i] * scale; acc[i] = 0.f; }
    float m = NEG_INF, l = 0.f;
    // Block by block: one table read per block, then every key of the block with independent
    // loads. All lanes run the same iterations (the shuffles need the whole warp); keys past the
    // query's position are loaded from the allocated block but carry no weight.
    int n_keys = pos + 1;
    for (int b0 = 0; b0 * BS < n_keys; b0++) {
        size_t block_row = (size_t)table[b0] * BS;
        #pragma unroll
        for (int k0 = 0; k0 < BS; k0 += KPI) {
            int kk = k0 + g;
            bool in_block = kk < BS;
            bool valid = in_block && b0 * BS + kk < n_keys;
            size_t row = (block_row + (in_block ? kk : 0)) * KVD + kv_off + e * VEC;
            load_vec(k_cache + row, kx);
            load_vec(v_cache + row, vx);
            float s = 0.f;
            #pragma unroll
            for (int i = 0; i < VEC; i++) s += qv[i] * kx[i];
            #pragma unroll
            for (int o = LPK / 2; o > 0; o >>= 1) s += __shfl_xor_sync(FULL_MASK, s, o);
            if (valid) {
                float m_new = fmaxf(m, s);
                float corr = expf(m - m_new), w = expf(s - m_new);
                l = l * corr + w;
                #pragma unroll
                for (int i = 0; i < VEC; i++) acc[i] = acc[i] * corr + w * vx[i];
                m = m_new;
            }
        }
    }
    // Merge the groups' partial softmaxes (a group with no keys has m = -inf and weighs 0).
    #pragma unroll
    for (int o = LPK; o < 32; o <<= 1) {
        float m_o = __shfl_xor_sync(FULL_MASK, m, o), l_o = __shfl_xor_sync(FULL_MASK, l, o);
        float m_new = fmaxf(m, m_o);
        float a = m == NEG_INF ? 0.f : expf(m - m_new), b = m_o == NEG_INF ? 0.f : expf(m_o - m_new);
        l = l * a + l_o * b;
        #pragma unroll
        for (int i = 0; i < VEC; i++) acc[i] = acc[i] * a + __shfl_xor_sync(FULL_MASK, acc[i], o) * b;
        m = m_new;
    }
    if (g == 0) {
        #pragma unroll
        for (int i = 0; i < VEC; i++) {
            if (fuse_sampling) row_smem[threadIdx.x >> 5][e * VEC + i] = acc[i] / l;
            else out[(size_t)r * D + h * HD + e * VEC + i] = acc[i] / l;
        }
    }
#else
    // General head sizes: keys 32 at a time, one per lane, then each lane accumulates its
    // dimensions of V.
    float qv[HD];
    #pragma unroll
    for (int d = 0; d < HD; d++) qv[d] = q[(size_t)r * D + h * HD + d] * scale;
    float m = NEG_INF, l = 0.f, acc[HD_PER_LANE];
    #pragma unroll
    for (int i = 0; i < HD_PER_LANE; i++) acc[i] = 0.f;
    for (int base = 0; base <= pos; base += 32) {
        int p = base + lane;
        u32 slot = 0;
        float s = NEG_INF;
        if (p <= pos) {
            slot = table[p / BS] * BS + p % BS;
            s = dot_row(qv, k_cache + (size_t)slot * KVD + kv_off);
        }
        float m_new = fmaxf(m, warp_max(s));
        float corr = expf(m - m_new);
        float pl = p <= pos ? expf(s - m_new) : 0.f;
        l = l * corr + warp_sum(pl);
        #pragma unroll
        for (int i = 0; i < HD_PER_LANE; i++) acc[i] *= corr;
        int nk = min(32, pos - base + 1);
        for (int kk = 0; kk < nk; kk++) {
            float pk = __shfl_sync(FULL_MASK, pl, kk);
            u32 sk = __shfl_sync(FULL_MASK, slot, kk);
            const kv_t* vr = v_cache + (size_t)sk * KVD + kv_off;
            #pragma unroll
            for (int i = 0; i < HD_PER_LANE; i++) {
                int d = lane + 32 * i;
                if (d < HD) acc[i] += pk * kv_load(vr[d]);
            }
        }
        m = m_new;
    }
    #pragma unroll
    for (int i = 0; i < HD_PER_LANE; i++) {
        int d = lane + 32 * i;
        if (d < HD) {
            if (fuse_sampling) row_smem[threadIdx.x >> 5][d] = acc[i] / l;
            else out[(size_t)r * D + h * HD + d] = acc[i] / l;
        }
    }
#endif
    if (fuse_sampling) {
        __syncwarp();
        sample_row(row_smem[threadIdx.x >> 5], r, lane, sa);
    }
}

// Static batches keep their tokens in a [batch, row_stride] matrix on the device; this lays out
// positions start..start+count of every row as a forward batch, so no step goes back to the host.
extern "C" __global__ void static_layout_kernel(
    int batch, int start, int count, int row_stride, const u32* __restrict__ matrix,
    const u32* __restrict__ block_tables, int max_blocks,
    u32* __restrict__ tokens, u32* __restrict__ positions, u32* __restrict__ slots,
    u32* __restrict__ token_seq, int* __restrict__ q_row, int* __restrict__ row_token,
    u32* __restrict__ gen_pos)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= batch * count) return;
    int s = i / count, c = i % count, p = start + c;
    tokens[i] = matrix[(size_t)s * row_stride + p];
    positions[i] = p;
    slots[i] = block_tables[(size_t)s * max_blocks + p / BS] * BS + p % BS;
    token_seq[i] = s;
    bool last = c == count - 1;
    q_row[i] = last ? s : -1;
    if (last) { row_token[s] = i; gen_pos[s] = p + 1; }
}

// KV transfer: copies whole blocks between a cache pool and a contiguous staging buffer, so a
// sequence's KV leaves or enters the device in one copy rather than one per block.
extern "C" __global__ void gather_blocks_kernel(
    const unsigned char* __restrict__ pool, const u32* __restrict__ blocks, int n_blocks, int block_bytes,
    unsigned char* __restrict__ out)
{
    int b = blockIdx.x;
    if (b >= n_blocks) return;
    const unsigned char* src = pool + (size_t)blocks[b] * block_bytes;
    unsigned char* dst = out + (size_t)b * block_bytes;
    if (block_bytes % 16 == 0) {
        for (int i = threadIdx.x; i < block_bytes / 16; i += blockDim.x) ((uint4*)dst)[i] = ((const uint4*)src)[i];
    } else {
        for (int i = threadIdx.x; i < block_bytes; i += blockDim.x) dst[i] = src[i];
    }
}

extern "C" __global__ void scatter_blocks_kernel(
    const unsigned char* __restrict__ in, const u32* __restrict__ blocks, int n_blocks, int block_bytes,
    unsigned char* __restrict__ pool)
{
    int b = blockIdx.x;
    if (b >= n_blocks) return;
    const unsigned char* src = in + (size_t)b * block_bytes;
    unsigned char* dst = pool + (size_t)blocks[b] * block_bytes;
    if (block_bytes % 16 == 0) {
        for (int i = threadIdx.x; i < block_bytes / 16; i += blockDim.x) ((uint4*)dst)[i] = ((const uint4*)src)[i];
    } else {
        for (int i = threadIdx.x; i < block_bytes; i += blockDim.x) dst[i] = src[i];
    }
}

// Copies block src_blocks[b] of every pool into block dst_blocks[b] of the same pool of another
// worker's cache (opened through CUDA IPC: on this GPU, or on a peer over NVLink). Grid: blocks x
// pools; pool p starts at p * pool_bytes in each cache.
extern "C" __global__ void copy_blocks_kernel(
    const unsigned char* __restrict__ src, unsigned long long src_pool_bytes, const u32* __restrict__ src_blocks,
    unsigned char* __restrict__ dst, unsigned long long dst_pool_bytes, const u32* __restrict__ dst_blocks,
    int n_blocks, int block_bytes)
{
    int b = blockIdx.x, p = blockIdx.y;
    if (b >= n_blocks) return;
    const unsigned char* from = src + p * src_pool_bytes + (size_t)src_blocks[b] * block_bytes;
    unsigned char* to = dst + p * dst_pool_bytes + (size_t)dst_blocks[b] * block_bytes;
    if (block_bytes % 16 == 0) {
        for (int i = threadIdx.x; i < block_bytes / 16; i += blockDim.x) ((uint4*)to)[i] = ((const uint4*)from)[i];
    } else {
        for (int i = threadIdx.x; i < block_bytes; i += blockDim.x) to[i] = from[i];
    }
}
