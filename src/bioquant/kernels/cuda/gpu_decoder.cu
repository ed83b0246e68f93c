// CUDA backend (see gpu_decoder.h). One translation unit: the kernels, one file per family (the
// .cuh files included below, in this order), and the forward pass that strings them (GpuDecoder::Impl).

#include "bioquant/kernels/cuda/gpu_decoder.h"
#include "bioquant/kernels/cuda/bnb4_permute_tables.h"
#include "bioquant/kernels/cuda/gpu_memory_plan.h"
#include "bioquant/kernels/cuda/knobs.h"
#include "bioquant/kernels/cuda/device_common.cuh"
#include "bioquant/kernels/cuda/block_decoders.cuh"
#include "bioquant/kernels/cuda/qmatvec_kernels.cuh"
#include "bioquant/kernels/cuda/mma_tiles.cuh"
#include "bioquant/kernels/cuda/q4k_kernels.cuh"
#include "bioquant/kernels/cuda/qgemm_kernel.cuh"
#include "bioquant/kernels/cuda/bnb4_kernels.cuh"
#include "bioquant/kernels/cuda/block_mma_kernels.cuh"
#include "bioquant/kernels/cuda/q6k_kernels.cuh"
#include "bioquant/kernels/cuda/plain_kernels.cuh"
#include "bioquant/kernels/cuda/cublas_runtime.cuh"
#include "bioquant/kernels/cuda/elementwise_kernels.cuh"
#include "bioquant/kernels/cuda/attention_kernels.cuh"
#include "bioquant/kernels/cuda/device_memory.cuh"
#include "bioquant/kernels/cuda/exact_kernels.cuh"


#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <dlfcn.h>
#include <initializer_list>
#include <map>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "bioquant/core/error.h"
#include "bioquant/core/thread_pool.h"
#include "bioquant/kernels/cpu/ops.h"
#include "bioquant/kernels/exact.h"
#include "bioquant/model/decoder.h"
#include "bioquant/model/model.h"
#include "bioquant/quant/quant.h"
#include "bioquant/quant/random_rows.h"

namespace bioquant {
namespace {

// Calls f(std::integral_constant<int, T>{}) for a quantized format T (the kernels' template
// argument); throws for formats without integer kernels (the plain ones).
template <class F>
void with_quantized_format(QuantType t, const char* what, F&& f) {
  switch (t) {
#define BQ_FORMAT(X) \
  case X: f(std::integral_constant<int, static_cast<int>(X)>{}); return
    BQ_FORMAT(QuantType::Q8_0);
    BQ_FORMAT(QuantType::Q4_0);
    BQ_FORMAT(QuantType::Q4_K);
    BQ_FORMAT(QuantType::Q5_K);
    BQ_FORMAT(QuantType::Q6_K);
    BQ_FORMAT(QuantType::INT8);
    BQ_FORMAT(QuantType::NF4);
    BQ_FORMAT(QuantType::FP4);
#undef BQ_FORMAT
    default: throw Error(std::string("CUDA: no ") + what + " for weights of type " + quant_traits(t).name);
  }
}

}  // namespace

struct GpuDecoder::Impl {
  const Model& model;
  int device;
  KvType kv_type;
  bool exact;  // exact numerics (forward_exact)
  size_t exact_smem_limit = 0;  // exact_attention_kernel's score buffer, at most
  cudaStream_t stream = nullptr;
  Allocator mem;
  std::vector<DevBuf> owned;
  std::vector<DevLayer> layers;
  DevMatrix output;
  const float* final_norm = nullptr;
  const float* inv_freq = nullptr;  // rotary_dim / 2 frequencies, then longrope's long ones
  // The position from which a launch's last token makes it rotate with longrope's long factors: the
  // original context (as transformers decides each forward), or 0 for a round of a prompt whose whole
  // step takes them. Decode steps (one token) always get the original context, so a captured graph
  // decides by the position it reads.
  int64_t rope_long_from(const DecodeSegment& s) const {
    const RopeParams& r = model.config().rope;
    if (r.type != RopeType::LongRope) return std::numeric_limits<int64_t>::max();
    return s.long_rope && s.n > 1 ? 0 : r.original_max_positions;
  }
  std::map<const KVCache*, DevKv> caches;
  size_t device_used_peak = 0, device_total = 0, device_used_at_start = 0;
  size_t blas_bytes = 0;  // device memory cuBLAS's handle took when opened
  Cublas blas;
  // Prompt GEMM buffers (bf16 activations, one dequantized chunk of rows), grown on demand.
  DevBuf gemm_x, gemm_w[2];
  // Batched decode attention (one launch for up to kBatchAttentionSeqs sequences): per sequence its
  // heads' finished-split counters, split results and KV cache (its DevKv), grown as batches need.
  static constexpr int64_t kBatchAttentionSeqs = 64;
  bool batch_attention_on = cuda_knob_int("BIOQUANT_CUDA_ATTENTION_PER_SEQUENCE", 0) != 1;  // 1: a launch per sequence
  DevBuf batch_attn;
  std::vector<DevKv> host_refs;
  // Batched decode steps (every sequence one new token, the integer kernels) replay a graph too, once
  // the same caches have stepped together twice in a row: a batch whose sequences change every step
  // (continuous batching as sequences finish) would pay a capture each step. Its caches' K/V table is
  // copied in from pinned memory (graph_refs), refilled before each replay. BIOQUANT_CUDA_BATCH_GRAPH=2: none.
  bool batch_graphs_on = cuda_knob_int("BIOQUANT_CUDA_BATCH_GRAPH", 1) == 1;
  struct BatchGraph {
    cudaGraphExec_t exec = nullptr;
    std::vector<const KVCache*> caches;  // the step's sequences, in order
    uint64_t generation = 0;
    void* attn = nullptr;  // batch_attn's buffer when captured
  } batch_graph;
  std::vector<const KVCache*> last_batch;  // the previous batched decode step's caches
  DevKv* graph_refs = nullptr;              // pinned, kBatchAttentionSeqs entries
  bool capturing_batch = false;
  void drop_batch_graph() {
    if (batch_graph.exec) cudaGraphExecDestroy(batch_graph.exec);
    batch_graph = BatchGraph{};
  }
  struct BatchAttention {
    int* done = nullptr;
    float* part = nullptr;
    DevKv* refs = nullptr;  // null: each sequence its own launch
  };
  // Chunk c + 1 is dequantized on a side stream while chunk c multiplies (memory-bound work under
  // compute-bound work); events hand each buffer back and forth.
  cudaStream_t dequant_stream = nullptr;
  cudaEvent_t tile_ready[2] = {nullptr, nullptr}, tile_free[2] = {nullptr, nullptr};
  static constexpr int64_t kGemmMinTokens = kGpuGemmMinTokens;  // shorter sequences' rows: the integer kernels (exact, fast enough)
  // Rows [0, gemm_rows) of the step being enqueued multiply on tensor cores: those of the sequences
  // with at least kGemmMinTokens tokens in it (stacked first), so a sequence's arithmetic does not
  // depend on what it is batched with.
  int64_t gemm_rows = 0;
  // A decode step of at least this many sequences (one new token each) multiplies on tensor cores
  // through cuBLAS too: the dp4a kernels' cost grows with the rows (each extra token costs about half a
  // one-token matvec), the dequantize + GEMM's hardly does. Measured (H200, 8B shape, tokens/s of the
  // batch): q4_k 8 sequences 819 dp4a / 597 GEMM, 16: 811 / 980, 64: 803 / 2033; nf4 alike; bf16 8: 361 /
  // 1065. So 16 for quantized weights, 8 for plain ones; later, layers with mma kernels keep them longer
  // (mma_gemm_from). BIOQUANT_CUDA_BATCH_GEMM sets it.
  int64_t batch_gemm_min = cuda_knob_int("BIOQUANT_CUDA_BATCH_GEMM", 0);
  static bool mma_format(QuantType t) {
    return t == QuantType::Q4_K || t == QuantType::Q5_K || t == QuantType::Q6_K || t == QuantType::NF4 ||
           t == QuantType::FP4 || t == QuantType::INT8 || t == QuantType::Q8_0 || t == QuantType::Q4_0;
  }
  // The columns an mma kernel's rows must be a multiple of: whole super-blocks, nf4/fp4 blocks of 64, q8_0
  // and q4_0 block pairs, int8 blocks of 32.
  static int64_t mma_cols(QuantType t) {
    return t == QuantType::Q4_K || t == QuantType::Q5_K || t == QuantType::Q6_K ? 256 : t == QuantType::INT8 ? 32 : 64;
  }
  // The fewest tokens a pass takes the mma kernel with: q8_0's and q4_0's (block pairs, 16 rows a block) are
  // latency-bound with few tokens. H200, 8B, same call, mma / dp4a: q8_0 2 sequences 353 / 492 tok/s, 4: 665 /
  // 671, 8: 1154 / 841; q4_0 2: 431 / 600, 4: 790 / 821, 6: 1099 / 934, 8: 1354 / 1015.
  static int64_t mma_min_tokens(QuantType t) { return t == QuantType::Q8_0 ? 8 : t == QuantType::Q4_0 ? 6 : 2; }
  // From how many sequences a decode step of layers in this format is faster through cuBLAS than the mma
  // kernels (H200, 8B, mma / cuBLAS tok/s): q4_k 24 sequences 2051 / 1724, 32: 2201 / 2173, 48: 2166 / 2924;
  // nf4 24: 1898 / 1711, 32: 2089 / 2128; q4_k_m 24: 1977 / 1720, 32: 2110 / 2156; int8 24: 1855 / 1681, 32:
  // 2025 / 2106; q8_0 24: 1469 / 1615 (16: 1610 mma against 1132 cuBLAS); q4_0 24: 1648 / 1703, 32: 1828 /
  // 2197; q5_k 24: 2132 / 1702 (32: cuBLAS 2169).
  static int64_t mma_gemm_from(QuantType t) { return t == QuantType::Q8_0 || t == QuantType::Q4_0 ? 24 : 32; }
  // From how many sequences a decode step of layers in this format is faster through qgemm_kernel than
  // the mma kernels (H200, 8B, mma / qgemm_kernel tok/s): q4_k 8 sequences 2127 / 1705, 12: 2234 / 2359, 16:
  // 2574 / 2672, 24: 2457 / 3413; nf4 8: 1706 / 1954, 12: 1901 / 2556, 16: 2347 / 3258, 24: 2171 / 4091; int8
  // 8: 1699 / 1705, 12: 1908 / 2296, 16: 2375 / 3037, 24: 2199 / 3782; q8_0 8: 1264 / 1591, 12: 1455 / 2227;
  // q4_k_m (q4_k and q6_k) 8: 2003 / 1748, 12: 2113 / 2420, 16: 2446 / 3085; q4_0 8: 1431 / 1730; q5_k 8: 2018 /
  // 1775, 12: 2165 / 2445.
  static int64_t qgemm_from(QuantType t) {
    return t == QuantType::NF4 || t == QuantType::FP4 || t == QuantType::Q8_0 || t == QuantType::Q4_0 ? 8 : 12;
  }
  // The smallest mma_gemm_from of the layers' formats, or 0 when a layer has no mma kernel; when every
  // matrix takes qgemm_kernel, the largest qgemm_from of their formats instead.
  int64_t layers_mma_gemm_from() const {
    int64_t from = 1 << 30, from_qgemm = 0;
    bool all_qgemm = true;
    for (const DevLayer& l : layers)
      for (const DevMatrix* m : {&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down}) {
        if (!mma_format(m->type)) return 0;
        from = std::min(from, mma_gemm_from(m->type));
        all_qgemm = all_qgemm && qgemm_format(*m);
        from_qgemm = std::max(from_qgemm, qgemm_from(m->type));
      }
    return all_qgemm && qgemm_max >= from_qgemm ? from_qgemm : from;
  }
  bool batch_decode_gemm(std::span<const DecodeSegment> segments) const {
    // cuBLAS only: the WMMA fallback was slower than the integer kernels up to ~32 sequences (16: 423
    // against 811 tok/s, q4_k, H200); so is qgemm_kernel without the partial sums' buffer (16: 2165
    // against 2573 tok/s, q4_k, H200).
    if (!blas.ready() || layers.empty()) return false;
    const QuantType t = layers.front().wq.type;
    const bool plain = t == QuantType::F32 || t == QuantType::F16 || t == QuantType::BF16;
    // Layers that multiply passes of up to 16 tokens on the tensor cores themselves (the mma kernels) keep
    // them longer (mma_gemm_from).
    const int64_t mma_from = batch_mma ? layers_mma_gemm_from() : 0;
    const int64_t fallback = plain ? 8 : mma_from > 0 ? mma_from : 16;
    if (static_cast<int64_t>(segments.size()) < (batch_gemm_min > 0 ? batch_gemm_min : fallback)) return false;
    for (const DecodeSegment& sg : segments)
      if (sg.n != 1) return false;
    return true;
  }
  // Decode (one token) kernel variant, BIOQUANT_CUDA_DECODE=1|2|3|4|5|6|8 to compare: 1 = one-token
  // kernel, 2 = that with its block loop unrolled twice, 3 = q4_k's pair kernel, 4 = BIOQUANT_CUDA_ROWS
  // rows per warp, 5 = the nf4/fp4 byte-permute kernel, 6 = that with each block's codes loaded an
  // iteration ahead, 8 = the 8-token prompt kernel; unset: the fastest measured per format (nf4/fp4: 6,
  // with double quantization 5).
  int decode_variant = cuda_knob_int("BIOQUANT_CUDA_DECODE", 0);
  bool group_launches = cuda_knob_int("BIOQUANT_CUDA_GROUP", 1) == 1;  // BIOQUANT_CUDA_GROUP=2: one launch per matrix
  // BIOQUANT_CUDA_PERSIST=k: decode grids of k blocks per SM whose warps loop over rows (0: a warp per row).
  unsigned persist_blocks = 0;
  // Rows per warp of the one-token kernels (BIOQUANT_CUDA_ROWS=1|2|4). Measured (8B shape, H100): q4_k
  // 1 (with its activations in shared memory: 307 tok/s against 288 for 2 rows from global memory);
  // the rows kernel of int8, q5_k, nf4, fp4: 2 (nf4 with dp2a: 260 tok/s, 1 row 265, 4 rows 209).
  int decode_rows = cuda_knob_int("BIOQUANT_CUDA_ROWS", 0);
  // Activations of the q4_k decode kernel through shared memory (BIOQUANT_CUDA_SHARED=2: from global).
  bool q4k_shared_activations = cuda_knob_int("BIOQUANT_CUDA_SHARED", 1) == 1;
  // q4_k rows whose pairs leave lanes idle on q4k_decode_flat_kernel (BIOQUANT_CUDA_Q4K_FLAT=2: on q4k_decode_kernel).
  bool q4k_flat = cuda_knob_int("BIOQUANT_CUDA_Q4K_FLAT", 1) == 1;
  bool q6k_decode = cuda_knob_int("BIOQUANT_CUDA_Q6K", 1) == 1;  // 2: q6_k one-token rows on the generic kernel
  // q4_k, q5_k, q6_k, int8, q8_0, q4_0, nf4, fp4 and bf16 passes of 2-16 tokens on the tensor cores
  // (BIOQUANT_CUDA_BATCH_MMA=2: passes of 8 on qmatmul_kernel / bf16_matmul_vec_kernel).
  bool batch_mma = cuda_knob_int("BIOQUANT_CUDA_BATCH_MMA", 1) == 1;
  // q4_k, nf4 and fp4 passes of two tokens on q4k_decode_tokens_kernel / bnb4_decode_tokens_kernel
  // (BIOQUANT_CUDA_TWO_TOKENS=2: on the mma kernels; =3: nf4's and fp4's on the mma kernels, q4_k's not).
  int two_tokens_knob = cuda_knob_int("BIOQUANT_CUDA_TWO_TOKENS", 1);
  bool two_token_q4k = two_tokens_knob != 2, two_token_bnb4 = two_tokens_knob == 1;
  // Batched decode steps' kernels as dependent launches too, the mma kernels of the k-quants only
  // (BIOQUANT_CUDA_PDL_BATCH=2: none; 3: every mma kernel too); batch_step_pdl is set per step. H200, 8B,
  // same call, tok/s with / without: q4_k 2 sequences 710 / 657, 8: 1934 / 1888; bf16 16: 2400 / 2366;
  // q8_0 4: 718 / 676.
  int pdl_batch_knob = cuda_knob_int("BIOQUANT_CUDA_PDL_BATCH", 1);
  bool dependent_batch = pdl_batch_knob != 2, dependent_batch_mma = pdl_batch_knob == 3;
  bool batch_step_pdl = false;
  // Whether a decode kernel over n rows is launched dependent (see await_inputs): single tokens, and the
  // rows of a batched decode step (every sequence one token).
  bool pdl(int64_t n) const { return dependent_decode && (n == 1 || batch_step_pdl); }
  // Decode kernels as programmatic dependent launches (see await_inputs; BIOQUANT_CUDA_PDL=2: plain).
  bool dependent_decode = cuda_knob_int("BIOQUANT_CUDA_PDL", 1) == 1;
  // Decode attention in one kernel with RoPE, the cache store and the output quantization
  // (BIOQUANT_CUDA_FUSED=2: the separate kernels).
  bool fused_attention = cuda_knob_int("BIOQUANT_CUDA_FUSED", 1) == 1;
  // Prompt tokens of a sequence per step (see GpuDecoder::prompt_chunk).
  int64_t prompt_chunk = cuda_knob_int("BIOQUANT_CUDA_PROMPT_CHUNK", 0);
  // Splits of a decode attention head over blocks (BIOQUANT_CUDA_SPLITS=1: one block per head; unset:
  // about four blocks per SM, at most kGpuMaxAttentionSplits), each of at least BIOQUANT_CUDA_SPLIT_MIN positions.
  // Measured (8B q4_k, H100, tg at 4096 positions): 8 splits 288 tok/s, 16 305, 32 285.
  int attention_splits = std::min(cuda_knob_int("BIOQUANT_CUDA_SPLITS", 0), 64);
  int attention_min_chunk = cuda_knob_int("BIOQUANT_CUDA_SPLIT_MIN", 128);
  // Query heads per decode attention block (attention_decode_kernel; BIOQUANT_CUDA_ATTN_HEADS=1..4):
  // the heads of a KV group that share a block read its cache once.
  int attention_heads = std::clamp(cuda_knob_int("BIOQUANT_CUDA_ATTN_HEADS", kDecodeMaxHeads), 1, kDecodeMaxHeads);
  // Halved while the heads' scores for splits of split_len positions outgrow the shared memory.
  int decode_heads_per_block(int64_t split_len) const {
    const ModelConfig& c = model.config();
    int heads = static_cast<int>(std::min<int64_t>(attention_heads, c.n_heads / c.n_kv_heads));
    while (heads > 1 && decode_attention_smem(static_cast<int>(c.head_dim), split_len) * static_cast<size_t>(heads) > decode_smem_bytes)
      heads /= 2;
    return heads;
  }
  // Cached positions per decode attention block staged in shared memory (attention_decode_kernel):
  // the whole split when it fits beside the heads' scores, else as many as fit; BIOQUANT_CUDA_STAGE=n
  // stages at most n (1: none). A q8 cache needs head_dim and kv_dim multiples of 64 (its scales
  // copied in pairs).
  int attention_stage = cuda_knob_int("BIOQUANT_CUDA_STAGE", 0);
  int stage_len(int64_t split_len) const {
    const ModelConfig& c = model.config();
    if (attention_stage == 1) return 0;
    if (kv_type == KvType::Q8 && (c.head_dim % 64 != 0 || c.kv_dim() % 64 != 0)) return 0;
    const int d = static_cast<int>(c.head_dim);
    const size_t fixed = decode_attention_smem(d, split_len) * static_cast<size_t>(decode_heads_per_block(split_len));
    if (fixed >= decode_smem_bytes) return 0;
    // Rows of K and V (and, q8, their scales) that fit the room left, in multiples of 8; the q8 scales'
    // rounding to 16 bytes may take one step of 8 back.
    const size_t per_row = 2 * static_cast<size_t>(decode_stage_row(d, kv_bytes())) + (kv_type == KvType::Q8 ? 4 * static_cast<size_t>(d / 32) : 0);
    int64_t n = std::min<int64_t>((split_len + 7) / 8 * 8, static_cast<int64_t>((decode_smem_bytes - fixed) / per_row) / 8 * 8);
    if (attention_stage > 1) n = std::min<int64_t>(n, attention_stage / 8 * 8);
    while (n > 0 && fixed + decode_stage_bytes(d, kv_bytes(), static_cast<int>(n)) > decode_smem_bytes) n -= 8;
    return static_cast<int>(n);
  }
  int kv_bytes() const { return kv_type == KvType::F32 ? 4 : kv_type == KvType::BF16 ? 2 : 1; }
  // The fused decode attention's shared memory for splits of up to split_len positions.
  size_t decode_smem(int64_t split_len) const {
    const int d = static_cast<int>(model.config().head_dim);
    return decode_attention_smem(d, split_len) * static_cast<size_t>(decode_heads_per_block(split_len)) +
           decode_stage_bytes(d, kv_bytes(), stage_len(split_len));
  }
  // Decode steps take the fused attention kernel (attention_decode_kernel) when the head fits it.
  bool fused_decode_ok() const {
    const int64_t d = model.config().head_dim;
    return fused_attention && d % 32 == 0 && d <= kMaxHeadDim;
  }
  // Positions one block of the fused decode attention holds scores for, for contexts up to `len`: at
  // most the larger of the minimum split and an even share over the splits (the whole context with one).
  int64_t decode_split_len(int64_t len) const {
    if (attention_splits == 1) return len;
    return std::min<int64_t>(len, std::max<int64_t>(attention_min_chunk, (len + attention_splits - 1) / attention_splits));
  }
  // Whether a decode step over contexts up to `len` positions fits the attention kernels' shared memory.
  bool decode_attention_fits(int64_t len) const {
    if (fused_decode_ok()) return decode_smem(decode_split_len(len)) <= decode_smem_bytes;
    return attention_smem_bytes(len) <= attention_smem_limit;
  }
  // The attention kernels' dynamic shared memory on this card: what it has per block (H100: 227 KB, a
  // head's scores for ~50K positions beside the staged rows; A100: 163 KB, sm_86/89: 99 KB), at most
  // kAttentionSmemBytes for attention_kernel. Set by GpuDecoder::GpuDecoder.
  size_t decode_smem_bytes = 0, attention_smem_limit = 0;
  // Prompt attention on tensor cores with a bf16 cache (BIOQUANT_CUDA_TC_ATTENTION=2: the f32 tiled kernel).
  bool tensor_core_attention = cuda_knob_int("BIOQUANT_CUDA_TC_ATTENTION", 1) == 1;
  // Each of the two dequantized-row buffers (BIOQUANT_CUDA_TILE_MB to choose). Measured on an H100, 8B
  // q4_k pp512: 64 MB 18.5k tok/s, 48 MB 17.7k, 32 MB 14.1k (before the tensor-core attention); a 70B
  // model gets 32 MB (7% slower prompts than 48 MB) to keep its prompt workspace small.
  size_t gemm_tile_bytes = 0;

  // Workspace, grown on demand.
  struct Work {
    float *x = nullptr, *x2 = nullptr, *normed = nullptr, *h = nullptr, *q = nullptr, *k = nullptr, *v = nullptr, *attn = nullptr, *gate = nullptr,
          *up = nullptr, *logits = nullptr;
    int8_t* aq = nullptr;
    float* ad = nullptr;
    int* as = nullptr;
    int64_t* pos = nullptr;  // each sequence's first position (kernels read it, so a captured graph can replay)
    float* attn_part = nullptr;  // split decode attention: per head and split, the output, max and sum
    int* attn_done = nullptr;    // per head: its splits finished (zero between launches)
    int* top = nullptr;          // each logit row's top token (top_token_kernel)
    float* host_x = nullptr;       // pinned: embedding rows in
    float* host_logits = nullptr;  // pinned: logits out
    int64_t* host_pos = nullptr;   // pinned
    int* host_top = nullptr;       // pinned: top tokens out
    int64_t tokens = 0, logit_rows = 0;
    uint64_t generation = 0;  // bumped when the buffers move (a captured graph then goes stale)
  } work;
  // Decode (one token, one logit row) replays a CUDA graph of the whole step: ~20 launches per layer
  // cost more than the step's kernels on small and mid-size models.
  struct Graph {
    cudaGraphExec_t exec = nullptr;
    const KVCache* cache = nullptr;
    uint64_t generation = 0;
  } graph;
  void drop_graph() {
    if (graph.exec) cudaGraphExecDestroy(graph.exec);
    graph = Graph{};
  }
  void free_pinned() {
    if (work.host_x) cudaFreeHost(work.host_x);
    if (work.host_logits) cudaFreeHost(work.host_logits);
    if (work.host_pos) cudaFreeHost(work.host_pos);
    if (work.host_top) cudaFreeHost(work.host_top);
    work.host_x = work.host_logits = nullptr;
    work.host_pos = nullptr;
    work.host_top = nullptr;
  }
  std::vector<DevBuf> work_bufs;
  uint8_t* arena = nullptr;
  size_t arena_size = 0, arena_used = 0;

  ThreadPool* host_pool = nullptr;  // see GpuDecoder::set_host_pool

  Impl(const Model& m, int dev, KvType kv, bool exact_numerics) : model(m), device(dev), kv_type(kv), exact(exact_numerics) {}

  ~Impl() {
    cudaSetDevice(device);
    drop_graph();
    drop_batch_graph();
    if (graph_refs) cudaFreeHost(graph_refs);
    free_pinned();
    for (auto& [cache, c] : caches) {
      const_cast<KVCache*>(cache)->on_release = nullptr;
      free_kv(c);
    }
    for (DevBuf& b : work_bufs) mem.free(b.ptr, b.n, b.pool);
    for (DevBuf& b : owned) mem.free(b.ptr, b.n, b.pool);
    mem.free(gemm_x.ptr, gemm_x.n, Pool::Work);
    mem.free(batch_attn.ptr, batch_attn.n, Pool::Work);
    mem.free(exact_act.ptr, exact_act.n, Pool::Work);
    for (int b = 0; b < 2; ++b) {
      mem.free(gemm_w[b].ptr, gemm_w[b].n, Pool::Work);
      if (tile_ready[b]) cudaEventDestroy(tile_ready[b]);
      if (tile_free[b]) cudaEventDestroy(tile_free[b]);
    }
    if (dequant_stream) cudaStreamDestroy(dequant_stream);
    if (stream) cudaStreamDestroy(stream);
  }

  // Launches a kernel of the forward pass on `stream` (argument types converted to the kernel's).
  // dependent: a programmatic dependent launch (see await_inputs), for decode steps.
  template <class... Params, class... Args>
  void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, Args&&... args) {
    launch_with(false, kernel, grid, block, smem, std::forward<Args>(args)...);
  }
  template <class... Params, class... Args>
  void launch_with(bool dependent, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, Args&&... args) {
    cudaLaunchConfig_t config{};
    config.gridDim = grid;
    config.blockDim = block;
    config.dynamicSmemBytes = smem;
    config.stream = stream;
    cudaLaunchAttribute attr{};
    if (dependent) {
      attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
      attr.val.programmaticStreamSerializationAllowed = 1;
      config.attrs = &attr;
      config.numAttrs = 1;
    }
    CUDA_OK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
  }

  // Weights live in one allocation (reserve_weights): cudaMalloc rounds each large allocation up to
  // 2 MiB, which over the ~600 matrices of a 70B model held ~0.5 GiB that no tensor used.
  static size_t arena_bytes(size_t n) { return (n + 255) / 256 * 256; }
  void reserve_weights(size_t n) {
    arena = static_cast<uint8_t*>(mem.alloc(n, Pool::Weights));
    owned.push_back({arena, n, Pool::Weights});
    arena_size = n;
  }
  void* weight_alloc(size_t n) {
    if (arena != nullptr && arena_used + arena_bytes(n) <= arena_size) {
      void* p = arena + arena_used;
      arena_used += arena_bytes(n);
      return p;
    }
    void* p = mem.alloc(n, Pool::Weights);
    owned.push_back({p, n, Pool::Weights});
    return p;
  }
  const float* upload_vec(const std::vector<float>& v) {
    if (v.empty()) return nullptr;
    void* ptr = weight_alloc(v.size() * sizeof(float));
    CUDA_OK(cudaMemcpy(ptr, v.data(), v.size() * sizeof(float), cudaMemcpyHostToDevice));
    return static_cast<const float*>(ptr);
  }
  DevMatrix upload_matrix(const Matrix& m) {
    check(!(m.type == QuantType::INT8 && m.outlier_threshold > 0.0f),
          "the CUDA backend has no LLM.int8 outlier path: leave --int8-threshold at 0 with --device cuda");
    DevMatrix d{m.type, m.rows, m.cols, m.row_bytes(), m.double_quant, nullptr};
    // A zeroed tail: the block decoders' word loads (load_words) may read 3 bytes past the last block.
    uint8_t* ptr = static_cast<uint8_t*>(weight_alloc(m.nbytes() + kMatrixTail));
    CUDA_OK(cudaMemsetAsync(ptr + m.nbytes(), 0, kMatrixTail, stream));
    d.data = ptr;
    if (m.data != nullptr) {
      CUDA_OK(cudaMemcpy(ptr, m.data, m.nbytes(), cudaMemcpyHostToDevice));
      return d;
    }
    check(m.random_seed != 0, "matrix without data");
    random_rows_kernel<<<static_cast<unsigned>((m.rows + 127) / 128), 128, 0, stream>>>(m.type, m.double_quant, m.cols,
                                                                                       m.random_seed, m.rows, d.row_bytes, ptr);
    CUDA_OK(cudaGetLastError());
    return d;
  }
  void free_kv(DevKv& c) {
    mem.free(c.k, c.values_bytes, Pool::Kv);
    mem.free(c.v, c.values_bytes, Pool::Kv);
    mem.free(c.k_scale, c.scale_bytes, Pool::Kv);
    mem.free(c.v_scale, c.scale_bytes, Pool::Kv);
  }

  void sample_device_memory() {
    size_t free_b = 0, total_b = 0;
    if (cudaMemGetInfo(&free_b, &total_b) == cudaSuccess) {
      device_total = total_b;
      device_used_peak = std::max(device_used_peak, total_b - free_b);
    }
  }

  size_t work_bytes(int64_t tokens, int64_t logit_rows) const {
    return gpu_work_sizes(model.config(), tokens, logit_rows, attention_splits).bytes();
  }
  void ensure_work(int64_t tokens, int64_t logit_rows) {
    if (tokens <= work.tokens && logit_rows <= work.logit_rows) return;
    drop_graph();
    for (DevBuf& b : work_bufs) mem.free(b.ptr, b.n, b.pool);
    work_bufs.clear();
    free_pinned();
    const ModelConfig& c = model.config();
    tokens = std::max(tokens, work.tokens);
    logit_rows = std::max(logit_rows, work.logit_rows);
    // The buffers gpu_work_sizes lays out (work_bytes adds the same sizes up).
    const auto fbuf = [&](int64_t floats) {
      const size_t bytes = static_cast<size_t>(floats) * sizeof(float);
      void* p = mem.alloc(bytes, Pool::Work);
      work_bufs.push_back({p, bytes, Pool::Work});
      return static_cast<float*>(p);
    };
    const GpuWorkSizes n = gpu_work_sizes(c, tokens, logit_rows, attention_splits);
    work.x = fbuf(n.x);
    work.x2 = fbuf(n.x2);
    work.h = fbuf(n.h);
    work.q = fbuf(n.q);
    work.k = fbuf(n.k);
    work.v = fbuf(n.v);
    work.attn = fbuf(n.attn);
    work.normed = n.normed == 0 ? work.attn : fbuf(n.normed);
    work.gate = fbuf(n.gate);
    work.up = fbuf(n.up);
    work.logits = fbuf(n.logits);
    work.aq = reinterpret_cast<int8_t*>(fbuf(n.aq));
    work.ad = fbuf(n.ad);
    work.as = reinterpret_cast<int*>(fbuf(n.as));
    work.pos = reinterpret_cast<int64_t*>(fbuf(n.pos));
    work.attn_part = fbuf(n.attn_part);
    work.attn_done = reinterpret_cast<int*>(fbuf(n.attn_done));
    work.top = reinterpret_cast<int*>(fbuf(n.top));
    CUDA_OK(cudaMemsetAsync(work.attn_done, 0, static_cast<size_t>(c.n_heads) * sizeof(int), stream));
    CUDA_OK(cudaMallocHost(&work.host_x, static_cast<size_t>(tokens * c.hidden) * sizeof(float)));
    CUDA_OK(cudaMallocHost(&work.host_logits, static_cast<size_t>(logit_rows * c.vocab) * sizeof(float)));
    CUDA_OK(cudaMallocHost(&work.host_pos, static_cast<size_t>(tokens) * sizeof(int64_t)));
    CUDA_OK(cudaMallocHost(&work.host_top, static_cast<size_t>(logit_rows) * sizeof(int)));
    ++work.generation;
    work.tokens = tokens;
    work.logit_rows = logit_rows;
  }

  // Bytes of the K (and of the V) values and of their q8 scales for a cache of `capacity` positions.
  void kv_sizes(int64_t capacity, size_t& values_bytes, size_t& scale_bytes) const {
    gpu_kv_sizes(model.config(), capacity, kv_type, values_bytes, scale_bytes);
  }

  // Under a memory limit (g_memory_limit), the most prompt tokens per sequence a step of these segments
  // can take (0: all of them) so that the KV caches it allocates, its workspace and its tensor-core
  // buffers fit in what the limit leaves: the tensor-core path (and cuBLAS, whose handle holds
  // ~70 MiB) is given up when only the integer kernels' smaller workspace fits. Throws when not
  // even one token per sequence fits.
  int64_t fit_prompt_chunk(std::span<const DecodeSegment> segments) {
    if (prompt_chunk > 0) return prompt_chunk;
    const size_t limit = g_memory_limit;
    if (limit == 0 || segments.empty()) return 0;
    const ModelConfig& c = model.config();
    size_t pending_kv = 0;
    std::vector<const KVCache*> seen;
    int64_t longest = 0, logit_rows = 0;
    for (const DecodeSegment& sg : segments) {
      longest = std::max(longest, sg.n);
      logit_rows += sg.n_logits;
      if (caches.count(sg.cache) == 0 && std::find(seen.begin(), seen.end(), sg.cache) == seen.end()) {
        seen.push_back(sg.cache);
        size_t values = 0, scales = 0;
        kv_sizes(sg.cache->capacity(), values, scales);
        pending_kv += 2 * (page_rounded(values) + page_rounded(scales));
      }
    }
    logit_rows = std::max<int64_t>(logit_rows, 1);
    size_t held_work = 0;
    for (const DevBuf& b : work_bufs) held_work += b.n;
    const size_t held_gemm = gemm_x.n + gemm_w[0].n + gemm_w[1].n;
    const size_t used = device_used_now();
    const size_t margin = size_t{16} << 20;  // graph instantiation, page rounding
    const int64_t widest = std::max({c.hidden, c.q_dim(), c.intermediate});
    const size_t tiles = 2 * std::max(gemm_tile_bytes, static_cast<size_t>(128 * widest * 2));
    // What a step with rows of at most `chunk` tokens per sequence adds to the device's use, prompt rows
    // on cuBLAS (tiles and bf16 activations), on dequant_mma_kernel (bf16 activations) or on the
    // integer kernels.
    enum Mode { kCublas, kMma, kInteger };
    const auto extra = [&](int64_t chunk, Mode mode) {
      int64_t rows = 0, gemm_rows_needed = 0;
      for (const DecodeSegment& sg : segments) {
        const int64_t r = std::min(sg.n, chunk);
        rows += r;
        if (mode != kInteger && r >= kGemmMinTokens) gemm_rows_needed += r;
      }
      if (mode != kInteger && batch_decode_gemm(segments)) gemm_rows_needed = rows;
      size_t add = pending_kv;
      if (rows > work.tokens || logit_rows > work.logit_rows) {
        const size_t want = work_bytes(std::max(rows, work.tokens), std::max(logit_rows, work.logit_rows));
        add += want > held_work ? want - held_work : 0;
      }
      if (gemm_rows_needed > 0) {
        const size_t want = (mode == kCublas ? page_rounded(tiles) : 0) +
                            page_rounded(static_cast<size_t>(gemm_rows_needed * widest * 2));
        add += want > held_gemm ? want - held_gemm : 0;
      }
      return add;
    };
    // The largest chunk in [1, longest] whose step fits in `room` (0: none).
    const auto largest = [&](size_t room, Mode mode) {
      int64_t lo = 0, hi = longest;
      while (lo < hi) {
        const int64_t mid = lo + (hi - lo + 1) / 2;
        if (extra(mid, mode) <= room) lo = mid; else hi = mid - 1;
      }
      return lo;
    };
    const Mode without_cublas = mma_fallback ? kMma : kInteger;
    const size_t room = limit > used + margin ? limit - used - margin : 0;
    int64_t chunk = largest(room, blas.ready() ? kCublas : without_cublas);
    if (blas.ready() && chunk < std::min(longest, kGemmMinTokens)) {
      // Without cuBLAS: its handle and buffers freed (tiles no longer needed).
      const int64_t integer_chunk = largest(room + blas_bytes + held_gemm, without_cublas);
      if (integer_chunk > chunk) {
        blas.release("off (no room under the --gpu-memory limit)");
        for (DevBuf* b : {&gemm_x, &gemm_w[0], &gemm_w[1]}) {
          mem.free(b->ptr, b->n, Pool::Work);
          *b = DevBuf{};
        }
        chunk = integer_chunk;
      }
    }
    if (chunk == 0)
      throw Error("CUDA: the memory limit of " + mib_text(limit) + " (--gpu-memory) leaves " + mib_text(room) +
                  "; this step needs " + mib_text(extra(1, kInteger)) + " for one token per sequence (KV cache " +
                  mib_text(pending_kv) + ")");
    return chunk >= longest ? 0 : chunk;
  }

  DevKv& kv_for(const KVCache& cache) {
    auto it = caches.find(&cache);
    if (it != caches.end()) {
      check(it->second.capacity == cache.capacity(), "KV cache capacity changed");
      return it->second;
    }
    DevKv kv;
    kv_sizes(cache.capacity(), kv.values_bytes, kv.scale_bytes);
    kv.k = mem.alloc(kv.values_bytes, Pool::Kv);
    kv.v = mem.alloc(kv.values_bytes, Pool::Kv);
    kv.k_scale = static_cast<__half*>(mem.alloc(kv.scale_bytes, Pool::Kv));
    kv.v_scale = static_cast<__half*>(mem.alloc(kv.scale_bytes, Pool::Kv));
    kv.capacity = cache.capacity();
    const_cast<KVCache&>(cache).on_release = [this](const KVCache& gone) { release(gone); };
    return caches.emplace(&cache, kv).first->second;
  }

  void* grow(DevBuf& b, size_t bytes) {
    if (b.n < bytes) {
      mem.free(b.ptr, b.n, Pool::Work);
      b = DevBuf{mem.alloc(bytes, Pool::Work), bytes, Pool::Work};
    }
    return b.ptr;
  }

  struct Job {
    const DevMatrix* m;
    float* y;
  };
  // Quantized matmuls (every format) of up to qgemm_max tokens (without cuBLAS: any number) take qgemm_kernel
  // (no dequantized copy), in passes of 32 tokens (BIOQUANT_CUDA_QGEMM=2: the dequantized tiles as other
  // formats). Its column ranges aim at qgemm_blocks blocks per matrix (BIOQUANT_CUDA_QGEMM_BLOCKS: per SM).
  // (Both knobs read either way: a typo in one is an error whatever the other says.)
  int64_t qgemm_max = std::min(cuda_knob_int("BIOQUANT_CUDA_QGEMM_MAX", 64), cuda_knob_int("BIOQUANT_CUDA_QGEMM", 1) == 1 ? 1 << 30 : 0);
  int64_t qgemm_blocks = 0;  // set by GpuDecoder::GpuDecoder
  int64_t qgemm_max_ranges = std::min(cuda_knob_int("BIOQUANT_CUDA_QGEMM_RANGES", kQgemmMaxRanges), kQgemmMaxRanges);
  // The column ranges' partial sums and the blocks' arrival counts live in the first dequantized-tile
  // buffer (memory the plan already holds for prompts); the counts are zeroed again after tiles used it.
  bool tile0_arrivals_zeroed = false;
  // The formats and layouts qgemm_kernel reads (16-byte pieces for cp.async).
  static bool qgemm_format(const DevMatrix& m) {
    if (m.cols % 256 != 0 || reinterpret_cast<uintptr_t>(m.data) % 16 != 0) return false;
    const size_t superblocks = static_cast<size_t>(m.cols / 256);
    switch (m.type) {
      case QuantType::Q4_K:
      case QuantType::Q4_0: return m.row_bytes == superblocks * 144;
      case QuantType::Q5_K: return m.row_bytes == superblocks * 176;
      case QuantType::NF4:
      case QuantType::FP4: {
        const size_t dq_header = 4 + 4 * ((static_cast<size_t>(m.cols) / 64 + 255) / 256);
        return m.row_bytes == (m.dq ? dq_header + superblocks * 132 : superblocks * 144);
      }
      case QuantType::INT8: return m.row_bytes == static_cast<size_t>(m.cols) + 4;
      case QuantType::Q8_0: return m.row_bytes == superblocks * 272;
      case QuantType::Q6_K: return m.row_bytes == superblocks * 210;
      default: return false;
    }
  }
  // Up to qgemm_max tokens with cuBLAS (from ~96 the tiles win); any number without it (a memory limit
  // that gave it up, no libcublas), where the alternative is dequant_mma_kernel.
  bool qgemm_takes(const DevMatrix& m, int64_t n) const {
    return qgemm_max > 0 && (n <= qgemm_max || !blas.ready()) && qgemm_format(m);
  }
  // Up to three matrices of the same input (xb: [n, cols] bf16) and format in one launch per pass.
  void qgemm(const __nv_bfloat16* xb, int64_t n, const Job* all, int count) {
    QgemmJobs jobs{};
    int64_t blocks_x = 0;
    for (int i = 0; i < count; ++i) {
      const DevMatrix& m = *all[i].m;
      jobs.w[i] = m.data;
      jobs.row_bytes[i] = m.row_bytes;
      jobs.rows[i] = m.rows;
      jobs.first_block[i] = static_cast<int>(blocks_x);
      blocks_x += (m.rows + kQgemmRows - 1) / kQgemmRows;
    }
    for (int i = count; i < 4; ++i) jobs.first_block[i] = static_cast<int>(blocks_x);
    const int64_t cols = all[0].m->cols, superblocks = cols / 256;
    // The arrival counts take a fixed place at the buffer's start (zeroed once, left zeroed by every launch):
    // sized per launch, a larger grid's would reach into the partial sums an earlier one left.
    constexpr size_t arrivals_bytes = kQgemmArrivalBytes;
    const size_t budget = blas.ready() && static_cast<size_t>(blocks_x) * 4 <= arrivals_bytes ? gemm_tile_bytes : 0;
    bool used_tile0 = false;
    for (int64_t t0 = 0; t0 < n;) {
      int64_t cnt = std::min(kQgemmMaxTokens, static_cast<int>(n - t0));
      const int ntile = cnt <= 8 ? 1 : cnt <= 16 ? 2 : 4;
      const auto partial_bytes = [&](int64_t ranges) {
        return arrivals_bytes + static_cast<size_t>(ranges * 8 * ntile * blocks_x * kQgemmRows) * 4;
      };
      int64_t ranges = std::clamp<int64_t>((qgemm_blocks + blocks_x - 1) / blocks_x, 1,
                                           std::clamp<int64_t>(superblocks / 2, 1, qgemm_max_ranges));
      while (ranges > 1 && partial_bytes(ranges) > budget) --ranges;
      float* partials = nullptr;
      unsigned* arrivals = nullptr;
      if (ranges > 1) {
        if (gemm_w[0].n < partial_bytes(ranges)) tile0_arrivals_zeroed = false;
        auto* base = static_cast<uint8_t*>(grow(gemm_w[0], partial_bytes(ranges)));
        if (!tile0_arrivals_zeroed) {
          CUDA_OK(cudaMemsetAsync(base, 0, arrivals_bytes, stream));
          tile0_arrivals_zeroed = true;
        }
        arrivals = reinterpret_cast<unsigned*>(base);
        partials = reinterpret_cast<float*>(base + arrivals_bytes);
        used_tile0 = true;
      }
      // One column range: the passes of all the tokens left in one launch (blocks z take tokens 32 z..), so
      // a long prompt's passes (without cuBLAS) fill the card together instead of one small grid at a time.
      const int64_t passes = ranges == 1 ? (n - t0 + kQgemmMaxTokens - 1) / kQgemmMaxTokens : 1;
      if (passes > 1) cnt = n - t0;
      for (int i = 0; i < count; ++i) jobs.y[i] = all[i].y + t0 * all[i].m->rows;
      const dim3 grid(static_cast<unsigned>(blocks_x), static_cast<unsigned>(ranges), static_cast<unsigned>(passes));
      const __nv_bfloat16* xt = xb + t0 * cols;
      t0 += passes * kQgemmMaxTokens;
      const auto by_tokens = [&](auto format, auto dq) {
        constexpr int F = decltype(format)::value;
        constexpr bool DQ = decltype(dq)::value;
        const size_t smem = qgemm_smem(F, 8 * ntile, DQ);
        const auto go = [&](auto kernel) { launch(kernel, grid, 256, smem, jobs, cols, xt, cnt, partials, arrivals); };
        if (ntile == 1) go(qgemm_kernel<F, 1, DQ>);
        else if (ntile == 2) go(qgemm_kernel<F, 2, DQ>);
        else go(qgemm_kernel<F, 4, DQ>);
      };
      with_quantized_format(all[0].m->type, "qgemm kernel", [&](auto format) {
        if constexpr (qgemm_has_dq(decltype(format)::value)) {
          if (all[0].m->dq) return by_tokens(format, std::true_type{});
        }
        by_tokens(format, std::false_type{});
      });
    }
    // The dequantizer (on its own stream) waits for this before writing its first tile there again.
    if (used_tile0) CUDA_OK(cudaEventRecord(tile_free[0], stream));
  }

  // Prompt matmul on tensor cores (see dequant_bf16_kernel); xb: x [n, m.cols] in bf16.
  void gemm(const __nv_bfloat16* xb, int64_t n, const DevMatrix& m, float* y) {
    if (qgemm_takes(m, n)) {
      const Job j{&m, y};
      qgemm(xb, n, &j, 1);
      return;
    }
    if (!blas.ready()) {  // tensor cores without cuBLAS (see tensor_cores)
      const dim3 grid(static_cast<unsigned>((m.rows + 63) / 64), static_cast<unsigned>((n + 127) / 128));
      with_quantized_format(m.type, "tensor-core kernel", [&](auto format) {
        launch(dequant_mma_kernel<decltype(format)::value>, grid, 128, 0, m.data, m.row_bytes, m.rows, m.cols, m.dq, xb, n,
               y, m.rows);
      });
      return;
    }
    if (m.type == QuantType::BF16) {
      blas.gemm(m.rows, n, m.cols, reinterpret_cast<const __nv_bfloat16*>(m.data), xb, y, m.rows);
      return;
    }
    const int64_t chunk = gpu_gemm_tile_rows(m.rows, m.cols, gemm_tile_bytes);
    __nv_bfloat16* tiles[2] = {nullptr, nullptr};
    for (int b = 0; b < (chunk < m.rows ? 2 : 1); ++b)
      tiles[b] = static_cast<__nv_bfloat16*>(grow(gemm_w[b], static_cast<size_t>(chunk * m.cols) * 2));
    for (int64_t r0 = 0, c = 0; r0 < m.rows; r0 += chunk, ++c) {
      const int b = static_cast<int>(c % 2);
      __nv_bfloat16* wb = tiles[b];
      const int64_t cnt = std::min(chunk, m.rows - r0);
      const unsigned grid = blocks_for(cnt * (m.cols / 32));
      const uint8_t* w = m.data + static_cast<size_t>(r0) * m.row_bytes;
      if (b == 0) tile0_arrivals_zeroed = false;
      CUDA_OK(cudaStreamWaitEvent(dequant_stream, tile_free[b], 0));
      with_quantized_format(m.type, "dequantizer", [&](auto format) {
        dequant_bf16_kernel<decltype(format)::value><<<grid, 256, 0, dequant_stream>>>(w, m.row_bytes, cnt, m.cols, m.dq, wb);
      });
      CUDA_OK(cudaEventRecord(tile_ready[b], dequant_stream));
      CUDA_OK(cudaStreamWaitEvent(stream, tile_ready[b], 0));
      blas.gemm(cnt, n, m.cols, wb, xb, y + r0, m.rows);
      CUDA_OK(cudaEventRecord(tile_free[b], stream));
    }
  }

  // y [n, m.rows] = x [n, m.cols] * m^T
  void matmul(const float* x, int64_t n, const DevMatrix& m, float* y, bool prequantized = false,
              const __nv_bfloat16* x_bf16 = nullptr) {
    const Job j{&m, y};
    matmuls(x, n, &j, 1, prequantized, x_bf16);
  }
  // Several matrices of the same input: its activations are quantized once, and consecutive
  // matrices of one format go in one launch.
  // The matrices of these jobs all take the integer kernels for a batch of n tokens (so their
  // activations can be quantized by a fused kernel before matmuls(..., prequantized = true)).
  bool integer_path(int64_t n, std::initializer_list<const DevMatrix*> ms) const {
    for (const DevMatrix* m : ms) {
      const bool plain = m->type == QuantType::F32 || m->type == QuantType::F16 || m->type == QuantType::BF16;
      if (plain || (gemm_capable(*m) && gemm_rows >= n)) return false;
    }
    return true;
  }

  bool gemm_capable(const DevMatrix& m) const {
    if (m.cols % 32 != 0 || m.type == QuantType::F32 || m.type == QuantType::F16) return false;
    return blas.ready() || (tensor_cores() && m.type != QuantType::BF16);  // dequant_mma_kernel: quantized only
  }
  // Prompt rows multiply on tensor cores: through cuBLAS, or, without it (a memory limit gave it up, or
  // libcublas.so.13 is absent), through dequant_mma_kernel. BIOQUANT_CUDA_GEMM=0: neither.
  bool tensor_cores() const { return blas.ready() || mma_fallback; }
  bool mma_fallback = cuda_gemm_knob() != "0";

  // Rows [0, gemm_rows) on tensor cores, the others on the integer (or plain) kernels. With
  // prequantized, the activations of all n rows are already in work.aq/ad/as.
  // x_bf16: x already in bf16 (its first gemm_rows rows at least), else converted here when needed.
  void matmuls(const float* x, int64_t n, const Job* all, int n_all, bool prequantized = false,
               const __nv_bfloat16* x_bf16 = nullptr) {
    constexpr int kThreads = 256, kRowsPerBlock = kThreads / 32;
    Job jobs[3];
    int count = 0;
    int64_t r0 = 0;  // first row left to the integer kernels (one value for all of them: same capability)
    const __nv_bfloat16* xb = x_bf16;
    // Matrices that all take qgemm_kernel for all n rows go in one launch (q, k and v: three small
    // grids would each leave most of the card idle).
    bool together = n_all > 1 && n_all <= 3 && gemm_rows >= n;
    for (int i = 0; i < n_all; ++i)
      together = together && gemm_capable(*all[i].m) && qgemm_takes(*all[i].m, n) && all[i].m->cols == all[0].m->cols &&
                 all[i].m->type == all[0].m->type && all[i].m->dq == all[0].m->dq;
    // The matrices of a group share their input: converted to bf16 once, when it is not already.
    const auto bf16_input = [&](int64_t rows, int64_t cols) {
      if (xb == nullptr) {
        auto* converted = static_cast<__nv_bfloat16*>(grow(gemm_x, static_cast<size_t>(rows * cols) * 2));
        launch(to_bf16_kernel, blocks_for(rows * cols), 256, 0, x, rows * cols, converted);
        xb = converted;
      }
      return xb;
    };
    if (together) {
      qgemm(bf16_input(n, all[0].m->cols), n, all, n_all);
      return;
    }
    for (int i = 0; i < n_all; ++i) {
      const DevMatrix& m = *all[i].m;
      const bool plain = m.type == QuantType::F32 || m.type == QuantType::F16 || m.type == QuantType::BF16;
      const int64_t g = gemm_capable(m) ? std::min(gemm_rows, n) : 0;
      if (g > 0) gemm(bf16_input(g, m.cols), g, m, all[i].y);
      if (g == n) continue;
      if (plain) {
        plain_matmul(x + g * m.cols, n - g, m, all[i].y + g * m.rows);
      } else {
        check(count < 3 && (count == 0 || g == r0), "CUDA: inconsistent matmul group");
        r0 = g;
        jobs[count++] = Job{all[i].m, all[i].y + g * m.rows};
      }
    }
    if (count == 0) return;
    const int64_t cols = jobs[0].m->cols;
    const int64_t nblk = (cols + 31) / 32;
    int64_t act_row0 = r0;  // the first integer row's place in work.aq/ad/as
    x += r0 * cols;
    n -= r0;
    if (!prequantized) {
      const int64_t warps = n * nblk;
      launch(quantize_act_kernel, static_cast<unsigned>((warps * 32 + 255) / 256), 256, 0, x, cols, nblk, n, work.aq,
                                                                                             work.ad, work.as);
      act_row0 = 0;
    }
    for (int first = 0; first < count;) {
      QJobs group{};
      int64_t total_rows = 0;
      const QuantType type = jobs[first].m->type;
      int last = first;
      while (last < count && last - first < (group_launches ? 3 : 1) && jobs[last].m->type == type) {
        const DevMatrix& m = *jobs[last].m;
        check(m.cols == cols, "CUDA: matmul group with different widths");
        group.job[group.count++] = QJob{m.data, m.row_bytes, m.rows, m.dq, nullptr};
        total_rows += m.rows;
        ++last;
      }
      group.total_rows = total_rows;
      // The mma kernels of a batched decode step: dependent for the k-quants only. H200, 8B, same call, 8 / 16
      // sequences, dependent / not: q4_k 1934 / 1847, 2263 / 2185 tok/s; q4_k_m 8: 1838 / 1790; nf4 1410 /
      // 1583, 1984 / 2090; q8_0 1044 / 1198, 1335 / 1705; int8 1512 / 1581, 2127 / 2100 (the other kernels
      // of the step dependent in both).
      const bool kquant = type == QuantType::Q4_K || type == QuantType::Q5_K || type == QuantType::Q6_K;
      const bool dependent = pdl(n), mma_dependent = dependent && (dependent_batch_mma || kquant);
      const unsigned grid = static_cast<unsigned>((total_rows + kRowsPerBlock - 1) / kRowsPerBlock);
      // Passes of up to 16 tokens on the tensor cores (q4k_mma_kernel for q4_k and q5_k, q6k_mma_kernel,
      // int8_mma_kernel, q80_mma_kernel, q40_mma_kernel, bnb4_mma_kernel); of up to 8 on qmatmul_kernel otherwise.
      // q4_k, nf4 and fp4 passes of 2 tokens: q4k_decode_tokens_kernel, bnb4_decode_tokens_kernel.
      const bool two_token_format = type == QuantType::Q4_K ? two_token_q4k
                                    : type == QuantType::NF4 || type == QuantType::FP4 ? two_token_bnb4
                                                                                       : false;
      const bool two_tokens = n == 2 && two_token_format && decode_variant == 0 && cols % 128 == 0 &&
                              cols <= kTwoTokensMaxCols;
      const bool mma_pass = !two_tokens && batch_mma && n >= mma_min_tokens(type) && mma_format(type) &&
                            cols % mma_cols(type) == 0 && rows_multiple_of(group, kMmaRows);
      const int64_t pass_tokens = two_tokens ? n : mma_pass ? 2 * kMmaTileTokens : 8;
      for (int64_t t0 = 0; t0 < n; t0 += pass_tokens) {
        const int64_t nt = std::min<int64_t>(pass_tokens, n - t0);
        for (int i = 0; i < group.count; ++i) group.job[i].y = jobs[first + i].y + t0 * jobs[first + i].m->rows;
        const int8_t* q = work.aq + (act_row0 + t0) * nblk * 32;
        const float* d = work.ad + (act_row0 + t0) * nblk;
        const int* s = work.as + (act_row0 + t0) * nblk;
        // Measured (8B shape, H100): q4_k's pair kernel; int8, q5_k, nf4, fp4 the kernel of two rows
        // per warp; q8_0, q4_0 (word loads + dp4a) the one-token kernel with its loop unrolled twice; q6_k
        // (whole super-blocks) its own kernel (H200), else that one.
        const bool rows_kernel = type == QuantType::INT8 || type == QuantType::Q5_K || type == QuantType::NF4 ||
                                 type == QuantType::FP4;
        const bool bnb4 = type == QuantType::NF4 || type == QuantType::FP4;
        const int variant = decode_variant != 0 ? decode_variant : type == QuantType::Q4_K ? 3 : bnb4 ? (group.job[0].dq ? 5 : 6) : rows_kernel ? 4 : 2;
        with_quantized_format(type, "kernel", [&](auto format) {
          constexpr int T = decltype(format)::value;
          constexpr bool kBnb4 = T == static_cast<int>(QuantType::NF4) || T == static_cast<int>(QuantType::FP4);
          if (kBnb4 && nt == 1 && variant == 5 && cols % 64 == 0 && cols <= 32 * 1024) {
            if constexpr (kBnb4)  // instantiated for nf4 and fp4 only
              launch_with(dependent, bnb4_decode_kernel<T>, grid, kThreads, act_shared_bytes(cols), group, cols, q, d, s);
          } else if (kBnb4 && nt == 1 && variant == 6 && cols % 64 == 0 && cols <= 32 * 1024) {
            if constexpr (kBnb4)
              launch_with(dependent, bnb4_decode_kernel<T, true>, grid, kThreads, act_shared_bytes(cols), group, cols, q, d, s);
          } else if (T == static_cast<int>(QuantType::Q6_K) && nt == 1 && q6k_decode && cols % 256 == 0 &&
                     cols <= kQ6kMaxCols) {
            launch_with(dependent, q6k_decode_kernel, grid, kThreads, q6k_decode_smem(cols), group, cols, q, d, s);
          } else if (T == static_cast<int>(QuantType::Q4_K) && nt == 1 && variant == 3) {
            launch_q4k_decode(group, grid, cols, q, d, s, dependent);
          } else if (kBnb4 && two_tokens) {
            if constexpr (kBnb4) {
              if (group.job[0].dq)
                launch_with(dependent, bnb4_decode_tokens_kernel<T, 2, false>, grid, kThreads, 2 * act_shared_bytes(cols),
                            group, cols, q, d, nblk);
              else
                launch_with(dependent, bnb4_decode_tokens_kernel<T, 2, true>, grid, kThreads, 2 * act_shared_bytes(cols),
                            group, cols, q, d, nblk);
            }
          } else if (T == static_cast<int>(QuantType::Q4_K) && two_tokens) {
            launch_with(dependent, q4k_decode_tokens_kernel<2>, grid, kThreads, 2 * act_shared_bytes(cols), group, cols, q, d,
                        s, nblk);
          } else if (nt == 1 && variant == 4) {
            launch_matvec_rows<T>(group, grid, cols, q, d, s, dependent);
          } else if (nt == 1 && variant == 2) {
            launch_with(dependent, qmatmul_kernel<T, 1, 2>, grid, kThreads, 0, group, cols, q, d, s, nblk, nt);
          } else if (nt == 1 && variant == 1) {
            launch_with(dependent, qmatmul_kernel<T, 1>, grid, kThreads, 0, group, cols, q, d, s, nblk, nt);
          } else if (mma_pass && (T == static_cast<int>(QuantType::Q4_K) || T == static_cast<int>(QuantType::Q5_K) ||
                                  T == static_cast<int>(QuantType::Q6_K) || T == static_cast<int>(QuantType::INT8) ||
                                  T == static_cast<int>(QuantType::Q8_0) || T == static_cast<int>(QuantType::Q4_0) ||
                                  kBnb4)) {
            const unsigned tiles = static_cast<unsigned>(total_rows / kMmaRows);
            if constexpr (T == static_cast<int>(QuantType::Q4_K) || T == static_cast<int>(QuantType::Q5_K)) {
              constexpr bool kQ5 = T == static_cast<int>(QuantType::Q5_K);
              if (nt > 8)
                launch_with(mma_dependent, q4k_mma_kernel<2, kQ5>, tiles, kThreads, 0, group, cols, q, d, s, nblk, nt);
              else
                launch_with(mma_dependent, q4k_mma_kernel<1, kQ5>, tiles, kThreads, 0, group, cols, q, d, s, nblk, nt);
            } else if constexpr (T == static_cast<int>(QuantType::Q4_0)) {
              if (nt > 8)
                launch_with(mma_dependent, q40_mma_kernel<2>, tiles, kThreads, 0, group, cols, q, d, nblk, nt);
              else
                launch_with(mma_dependent, q40_mma_kernel<1>, tiles, kThreads, 0, group, cols, q, d, nblk, nt);
            } else if constexpr (T == static_cast<int>(QuantType::INT8)) {
              if (nt > 8)
                launch_with(mma_dependent, int8_mma_kernel<2>, tiles, kThreads, 0, group, cols, q, d, nblk, nt);
              else
                launch_with(mma_dependent, int8_mma_kernel<1>, tiles, kThreads, 0, group, cols, q, d, nblk, nt);
            } else if constexpr (T == static_cast<int>(QuantType::Q8_0)) {
              if (nt > 8)
                launch_with(mma_dependent, q80_mma_kernel<2>, tiles, kThreads, 0, group, cols, q, d, nblk, nt);
              else
                launch_with(mma_dependent, q80_mma_kernel<1>, tiles, kThreads, 0, group, cols, q, d, nblk, nt);
            } else if constexpr (T == static_cast<int>(QuantType::Q6_K)) {
              if (nt > 8)
                launch_with(mma_dependent, q6k_mma_kernel<2>, tiles, kThreads, 0, group, cols, q, d, nblk, nt);
              else
                launch_with(mma_dependent, q6k_mma_kernel<1>, tiles, kThreads, 0, group, cols, q, d, nblk, nt);
            } else if constexpr (kBnb4) {
              if (nt > 8)
                launch_with(mma_dependent, bnb4_mma_kernel<T, 2>, tiles, kThreads, 0, group, cols, q, d, nblk, nt);
              else
                launch_with(mma_dependent, bnb4_mma_kernel<T, 1>, tiles, kThreads, 0, group, cols, q, d, nblk, nt);
            }
          } else {
            launch_with(dependent, qmatmul_kernel<T, 8>, grid, kThreads, 0, group, cols, q, d, s, nblk, nt);
          }
        });
      }
      first = last;
    }
  }

  static bool rows_multiple_of(const QJobs& group, int64_t k) {
    for (int i = 0; i < group.count; ++i)
      if (group.job[i].rows % k != 0) return false;
    return true;
  }

  // Calls go(std::integral_constant<int, R>{}, grid) with R rows per warp: `rows` (or decode_rows when
  // set) when every matrix of the group has a multiple of it, else fewer; grid = warps-per-row grid / R.
  template <class Go>
  void with_rows_per_warp(const QJobs& group, unsigned grid, int rows, Go&& go) const {
    if (decode_rows > 0) rows = decode_rows;
    for (int i = 0; i < group.count; ++i)
      while (rows > 1 && group.job[i].rows % rows != 0) rows /= 2;
    grid = (grid + rows - 1) / rows;
    if (rows >= 4) {
      go(std::integral_constant<int, 4>{}, grid);
    } else if (rows == 2) {
      go(std::integral_constant<int, 2>{}, grid);
    } else {
      go(std::integral_constant<int, 1>{}, grid);
    }
  }

  // q4k_decode_flat_kernel for rows of fewer than 64 pairs (a lane has at most two) that two rows a warp
  // fill better (3072 columns: 48 pairs, 96 a warp), every job's rows even. Measured (H200, same call,
  // tg128, before / flat): Phi-3-mini q4_k 731 / 778 tok/s; 4 rows a warp for 56 pairs (3584 columns) gave
  // Gemma 2 q4_k 361 / 369 but Qwen2.5-7B q4_k 506 / 480 (its 3584-row matrices left 112-144 blocks).
  static bool q4k_flat_fills(const QJobs& group, int64_t pairs) {
    const int64_t lane_rounds = (pairs + 31) / 32, two_row_rounds = (2 * pairs + 31) / 32;
    return pairs < 64 && two_row_rounds < 2 * lane_rounds && rows_multiple_of(group, 2);
  }

  void launch_q4k_decode(const QJobs& group, unsigned grid, int64_t cols, const int8_t* q, const float* d, const int* s,
                         bool dependent) {
    const bool flat_allowed = q4k_flat && decode_rows == 0 && persist_blocks == 0 && q4k_shared_activations &&
                              cols <= 32 * 1024;
    if (flat_allowed && q4k_flat_fills(group, cols / 64)) {
      launch_with(dependent, q4k_decode_flat_kernel<2>, (grid + 1) / 2, 256, act_shared_bytes(cols), group, cols, q, d, s);
      return;
    }
    with_rows_per_warp(group, grid, 1, [&](auto rows, unsigned g) {
      if (persist_blocks > 0) g = std::min(g, persist_blocks);
      if (q4k_shared_activations && cols <= 32 * 1024)
        launch_with(dependent, q4k_decode_kernel<decltype(rows)::value, true>, g, 256, act_shared_bytes(cols), group,
                    cols, q, d, s);
      else
        launch_with(dependent, q4k_decode_kernel<decltype(rows)::value, false>, g, 256, 0, group, cols, q, d, s);
    });
  }

  template <int T>
  void launch_matvec_rows(const QJobs& group, unsigned grid, int64_t cols, const int8_t* q, const float* d, const int* s,
                          bool dependent) {
    with_rows_per_warp(group, grid, 2, [&](auto rows, unsigned g) {
      launch_with(dependent, qmatvec_kernel<T, decltype(rows)::value>, g, 256, 0, group, cols, q, d, s);
    });
  }

  void plain_matmul(const float* x, int64_t n, const DevMatrix& m, float* y) {
    constexpr int kThreads = 256, kRowsPerBlock = kThreads / 32;
    const unsigned grid = static_cast<unsigned>((m.rows + kRowsPerBlock - 1) / kRowsPerBlock);
    const int t = static_cast<int>(m.type);
    if (t == static_cast<int>(QuantType::BF16) && batch_mma && n > 1 && m.cols % 32 == 0 && m.rows % kMmaRows == 0) {
      const unsigned tiles = static_cast<unsigned>(m.rows / kMmaRows);
      for (int64_t t0 = 0; t0 < n; t0 += 2 * kMmaTileTokens) {
        const int64_t nt = std::min<int64_t>(2 * kMmaTileTokens, n - t0);
        const float* xt = x + t0 * m.cols;
        float* yt = y + t0 * m.rows;
        if (nt > kMmaTileTokens)
          launch(bf16_mma_kernel<2>, tiles, kThreads, 0, m.data, m.row_bytes, m.rows, m.cols, xt, nt, yt);
        else
          launch(bf16_mma_kernel<1>, tiles, kThreads, 0, m.data, m.row_bytes, m.rows, m.cols, xt, nt, yt);
      }
      return;
    }
    for (int64_t t0 = 0; t0 < n; t0 += 8) {
      const int64_t nt = std::min<int64_t>(8, n - t0);
      const float* xt = x + t0 * m.cols;
      float* yt = y + t0 * m.rows;
#define BQ_PLAIN(TYPE)                                                                                            \
  launch(plain_matmul_kernel<static_cast<int>(TYPE), 8>, grid, kThreads, 0, m.data, m.row_bytes, m.rows, m.cols, xt, nt, yt)
      if (t == static_cast<int>(QuantType::BF16) && m.cols % 8 == 0) {
        launch(bf16_matmul_vec_kernel<8>, grid, kThreads, 0, m.data, m.row_bytes, m.rows, m.cols, xt, nt, yt);
        continue;
      }
      if (t == static_cast<int>(QuantType::F32)) BQ_PLAIN(QuantType::F32);
      else if (t == static_cast<int>(QuantType::F16)) BQ_PLAIN(QuantType::F16);
      else BQ_PLAIN(QuantType::BF16);
#undef BQ_PLAIN
    }
  }

  void release(const KVCache& cache) {
    if (graph.cache == &cache) drop_graph();
    if (std::find(batch_graph.caches.begin(), batch_graph.caches.end(), &cache) != batch_graph.caches.end())
      drop_batch_graph();
    if (std::find(last_batch.begin(), last_batch.end(), &cache) != last_batch.end()) last_batch.clear();
    auto it = caches.find(&cache);
    if (it == caches.end()) return;
    cudaSetDevice(device);
    free_kv(it->second);
    caches.erase(it);
  }

  static unsigned blocks_for(int64_t n) { return static_cast<unsigned>((n + 255) / 256); }

  // One sequence's rows in a step: rows [row0, row0 + n) of the stacked batch, its KV cache, and
  // its first position at work.pos[index].
  struct Seg {
    int64_t row0, n, n_logits, index;
    DevKv* kv;
    const DecodeSegment* segment;
  };

  // The step's batched attention buffers: done counters zeroed, the sequences' caches uploaded.
  BatchAttention batch_attention_buffers(const std::vector<Seg>& segs) {
    const ModelConfig& c = model.config();
    const int64_t seqs = static_cast<int64_t>(segs.size()), nz = std::min(seqs, kBatchAttentionSeqs);
    const size_t done_bytes = static_cast<size_t>(kBatchAttentionSeqs * c.n_heads) * sizeof(int);
    const size_t part_bytes = static_cast<size_t>(nz * c.n_heads * attention_splits * (c.head_dim + 2)) * sizeof(float);
    const size_t refs_bytes = static_cast<size_t>(seqs) * sizeof(DevKv);
    auto* base = static_cast<char*>(grow(batch_attn, done_bytes + part_bytes + refs_bytes));
    BatchAttention b;
    b.done = reinterpret_cast<int*>(base);
    b.part = reinterpret_cast<float*>(base + done_bytes);
    b.refs = reinterpret_cast<DevKv*>(base + done_bytes + part_bytes);
    host_refs.clear();
    for (const Seg& sg : segs) host_refs.push_back(*sg.kv);
    CUDA_OK(cudaMemsetAsync(b.done, 0, done_bytes, stream));
    if (capturing_batch) {  // a graph's copy node reads pinned memory, refilled before each replay
      std::copy(host_refs.begin(), host_refs.end(), graph_refs);
      CUDA_OK(cudaMemcpyAsync(b.refs, graph_refs, refs_bytes, cudaMemcpyHostToDevice, stream));
    } else {
      CUDA_OK(cudaMemcpyAsync(b.refs, host_refs.data(), refs_bytes, cudaMemcpyHostToDevice, stream));
    }
    return b;
  }

  // Whether host memory is page-locked (HostFloats, cudaHostAlloc): the copy engine can write it directly.
  static bool page_locked(const void* p) {
    cudaPointerAttributes a{};
    if (cudaPointerGetAttributes(&a, p) != cudaSuccess) {
      cudaGetLastError();
      return false;
    }
    return a.type == cudaMemoryTypeHost;
  }

  // After a step's kernels (work.logits: the segments' logit rows in order), hands each sequence what
  // it asked for and waits. Top tokens: top_token_kernel over the rows, 4 bytes each back. Rows:
  // straight from the device into page-locked destinations, a copy per run of sequences whose
  // destinations follow one another (a batch's rows of one buffer); through the pinned host_logits,
  // then a host copy, into other memory.
  void deliver_logits(const std::vector<Seg>& segs) {
    const int64_t vocab = model.config().vocab;
    const size_t row_bytes = static_cast<size_t>(vocab) * sizeof(float);
    enum Route : char { kNone, kDirect, kStaged };
    std::vector<Route> route(segs.size(), kNone);
    int64_t n_out = 0;
    bool tops = false;
    for (size_t i = 0; i < segs.size(); ++i) {
      n_out += segs[i].n_logits;
      tops = tops || (segs[i].n_logits > 0 && segs[i].segment->top != nullptr);
      if (segs[i].n_logits > 0 && segs[i].segment->logits != nullptr)
        route[i] = page_locked(segs[i].segment->logits) ? kDirect : kStaged;
    }
    if (tops) {
      launch(top_token_kernel, static_cast<unsigned>(n_out), kTopThreads, 0, work.logits, vocab, work.top);
      CUDA_OK(cudaMemcpyAsync(work.host_top, work.top, static_cast<size_t>(n_out) * sizeof(int), cudaMemcpyDeviceToHost, stream));
    }
    int64_t out_row = 0;
    for (size_t i = 0; i < segs.size();) {
      if (route[i] == kNone) {
        out_row += segs[i].n_logits;
        ++i;
        continue;
      }
      float* dst = route[i] == kDirect ? segs[i].segment->logits : work.host_logits + out_row * vocab;
      int64_t rows = segs[i].n_logits;
      size_t j = i + 1;
      for (; j < segs.size() && route[j] == route[i] && (route[i] == kStaged || segs[j].segment->logits == dst + rows * vocab); ++j)
        rows += segs[j].n_logits;
      CUDA_OK(cudaMemcpyAsync(dst, work.logits + out_row * vocab, static_cast<size_t>(rows) * row_bytes, cudaMemcpyDeviceToHost,
                              stream));
      out_row += rows;
      i = j;
    }
    CUDA_OK(cudaStreamSynchronize(stream));
    out_row = 0;
    for (size_t i = 0; i < segs.size(); ++i) {
      const DecodeSegment& sg = *segs[i].segment;
      if (route[i] == kStaged)
        std::memcpy(sg.logits, work.host_logits + out_row * vocab, static_cast<size_t>(sg.n_logits) * row_bytes);
      out_row += sg.n_logits;
      if (sg.top != nullptr && sg.n_logits > 0) *sg.top = work.host_top[out_row - 1];
    }
  }

  // Host side of a step: the embedding rows (Gemma's scaled by sqrt(hidden)) into the pinned buffer.
  // Steps of 2 * kStageRows rows or more (prompts) in tasks of kStageRows on the host pool.
  static constexpr int64_t kStageRows = 16;
  void stage_embeddings(const std::vector<Seg>& segs) {
    const ModelConfig& c = model.config();
    const int64_t hd = c.hidden;
    const float embed_scale = c.embed_scale ? std::sqrt(static_cast<float>(hd)) : 1.0f;
    std::vector<std::pair<int64_t, int32_t>> rows_in;  // (row of the step, token)
    for (const Seg& sg : segs)
      for (int64_t t = 0; t < sg.n; ++t) rows_in.emplace_back(sg.row0 + t, sg.segment->tokens[t]);
    const int64_t rows = static_cast<int64_t>(rows_in.size());
    const auto stage = [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const auto [r, token] = rows_in[static_cast<size_t>(i)];
        float* row = work.host_x + r * hd;
        model.weights().embed.row_to_f32(token, row);
        if (c.embed_scale)
          for (int64_t j = 0; j < hd; ++j) row[j] *= embed_scale;
      }
    };
    if (host_pool == nullptr || host_pool->size() < 2 || rows < 2 * kStageRows) {
      stage(0, rows);
      return;
    }
    host_pool->parallel_for(static_cast<size_t>((rows + kStageRows - 1) / kStageRows), [&](size_t task) {
      const int64_t begin = static_cast<int64_t>(task) * kStageRows;
      stage(begin, std::min(rows, begin + kStageRows));
    });
  }

  // ---- Exact numerics (kernels/exact.h): the CPU engine's exact steps, bit for bit ----
  DevBuf exact_act;  // activation quants and scales of the exact matmuls
  void exact_matmul(const float* x, int64_t n, const DevMatrix& m, float* y) {
    const unsigned row_blocks = static_cast<unsigned>((m.rows + 7) / 8);
    const unsigned token_blocks = static_cast<unsigned>((n + kExactTokens - 1) / kExactTokens);
    if (m.type == QuantType::F32 || m.type == QuantType::F16 || m.type == QuantType::BF16) {
      launch(exact_plain_matvec_kernel, dim3(row_blocks, static_cast<unsigned>(n)), 256, 0, m.type, m.data, m.row_bytes, m.rows,
             m.cols, x, n, y);
      return;
    }
    const int64_t nblk = (m.cols + 31) / 32;
    auto* base = static_cast<char*>(grow(exact_act, static_cast<size_t>(n * nblk) * (32 + sizeof(float))));
    auto* q = reinterpret_cast<int8_t*>(base);
    auto* d = reinterpret_cast<float*>(base + n * nblk * 32);
    launch(exact_quantize_kernel, blocks_for(n * nblk), 256, 0, x, n, m.cols, nblk, q, d);
    launch(n == 1 ? exact_qmatvec_kernel<1> : exact_qmatvec_kernel<kExactTokens>, dim3(row_blocks, token_blocks), 256, 0, m.type, m.data, m.row_bytes, m.rows, m.cols,
           m.dq, q, d, n, y);
  }
  void exact_norm(const float* x, const float* w, int64_t rows, int64_t n, float* out) {
    launch(exact_rms_norm_kernel, static_cast<unsigned>((rows + 7) / 8), 256, 0, x, w, model.config().norm_eps, rows, n, out);
  }

  // exact_attention_kernel's scores, padded as attention_smem_bytes: the compiler's vector loads of the
  // final loop's scores may read up to three past the last (compute-sanitizer: 12-byte reads).
  static size_t exact_score_bytes(int64_t positions) { return attention_smem_bytes(positions); }

  void forward_exact(std::span<const DecodeSegment> segments) {
    const ModelConfig& c = model.config();
    const int64_t hd = c.hidden, qd = c.q_dim(), kvd = c.kv_dim(), ff = c.intermediate;
    int64_t n = 0, n_out = 0;
    for (const DecodeSegment& sg : segments) {
      n += sg.n;
      n_out += sg.n_logits;
    }
    ensure_work(n, std::max<int64_t>(n_out, 1));
    std::vector<Seg> segs;
    int64_t row = 0, longest = 0;
    for (const DecodeSegment& sg : segments) {
      segs.push_back({row, sg.n, sg.n_logits, static_cast<int64_t>(segs.size()), &kv_for(*sg.cache), &sg});
      work.host_pos[segs.size() - 1] = sg.cache->size();
      longest = std::max(longest, sg.cache->size() + sg.n);
      row += sg.n;
    }
    const size_t score_bytes = exact_score_bytes(longest);
    check(score_bytes <= exact_smem_limit, "CUDA exact attention: a context of " + std::to_string(longest) +
                                               " positions is too long (at most " + std::to_string(exact_smem_limit / 4 - 8) + ")");
    stage_embeddings(segs);
    CUDA_OK(cudaMemcpyAsync(work.x, work.host_x, static_cast<size_t>(n * hd) * sizeof(float), cudaMemcpyHostToDevice, stream));
    float* x = work.x;
    for (int64_t li = 0; li < c.n_layers; ++li) {
      const DevLayer& l = layers[static_cast<size_t>(li)];
      exact_norm(x, l.attn_norm, n, hd, work.normed);
      exact_matmul(work.normed, n, l.wq, work.q);
      exact_matmul(work.normed, n, l.wk, work.k);
      exact_matmul(work.normed, n, l.wv, work.v);
      if (l.bq) {
        launch(add_bias_kernel, blocks_for(n * qd), 256, 0, work.q, l.bq, n, qd);
        launch(add_bias_kernel, blocks_for(n * kvd), 256, 0, work.k, l.bk, n, kvd);
        launch(add_bias_kernel, blocks_for(n * kvd), 256, 0, work.v, l.bv, n, kvd);
      }
      if (c.qk_norm) {
        exact_norm(work.q, l.q_norm, n * c.n_heads, c.head_dim, work.q);
        exact_norm(work.k, l.k_norm, n * c.n_kv_heads, c.head_dim, work.k);
      }
      const int64_t window = c.layer_sliding[static_cast<size_t>(li)] ? c.sliding_window : 0;
      for (const Seg& sg : segs) {
        const size_t layer_elems = static_cast<size_t>(sg.kv->capacity * kvd);
        float* kc = static_cast<float*>(sg.kv->k) + li * layer_elems;
        float* vc = static_cast<float*>(sg.kv->v) + li * layer_elems;
        const int64_t pos0 = work.host_pos[sg.index];
        const bool long_rope = sg.segment->long_rope || rope_long_step(c.rope, pos0 + sg.n - 1);
        launch(exact_rope_store_kernel, static_cast<unsigned>(sg.n), 256, 0, work.q + sg.row0 * qd, work.k + sg.row0 * kvd,
               work.v + sg.row0 * kvd, inv_freq + (long_rope ? c.rotary_dim() / 2 : 0), c.rope.attention_factor, pos0,
               static_cast<int>(c.n_heads), static_cast<int>(c.n_kv_heads),
               static_cast<int>(c.head_dim), static_cast<int>(c.rotary_dim()), kc, vc);
        launch(exact_attention_kernel, dim3(static_cast<unsigned>(c.n_heads), static_cast<unsigned>(sg.n)), 128,
               exact_score_bytes(pos0 + sg.n), work.q + sg.row0 * qd, kc, vc, pos0, static_cast<int>(c.n_heads),
               static_cast<int>(c.n_kv_heads), static_cast<int>(c.head_dim), window, c.attention_scale(), c.attn_softcap,
               work.attn + sg.row0 * qd);
      }
      exact_matmul(work.attn, n, l.wo, work.h);
      if (l.bo) launch(add_bias_kernel, blocks_for(n * hd), 256, 0, work.h, l.bo, n, hd);
      if (c.sandwich_norms) exact_norm(work.h, l.attn_post_norm, n, hd, work.h);
      launch(add_kernel, blocks_for(n * hd), 256, 0, x, work.h, n * hd);

      exact_norm(x, l.ffn_norm, n, hd, work.normed);
      exact_matmul(work.normed, n, l.w_gate, work.gate);
      exact_matmul(work.normed, n, l.w_up, work.up);
      if (l.b_gate) {
        launch(add_bias_kernel, blocks_for(n * ff), 256, 0, work.gate, l.b_gate, n, ff);
        launch(add_bias_kernel, blocks_for(n * ff), 256, 0, work.up, l.b_up, n, ff);
      }
      launch(exact_act_mul_kernel, blocks_for(n * ff), 256, 0, work.gate, work.up, n * ff, c.activation == Activation::GeluTanh);
      exact_matmul(work.gate, n, l.w_down, work.h);
      if (l.b_down) launch(add_bias_kernel, blocks_for(n * hd), 256, 0, work.h, l.b_down, n, hd);
      if (c.sandwich_norms) exact_norm(work.h, l.ffn_post_norm, n, hd, work.h);
      launch(add_kernel, blocks_for(n * hd), 256, 0, x, work.h, n * hd);
    }
    if (n_out > 0) {
      int64_t out_row = 0;  // each sequence's logit rows, normalised into consecutive rows of work.h
      for (const Seg& sg : segs) {
        if (sg.n_logits == 0) continue;
        exact_norm(x + (sg.row0 + sg.n - sg.n_logits) * hd, final_norm, sg.n_logits, hd, work.h + out_row * hd);
        out_row += sg.n_logits;
      }
      exact_matmul(work.h, n_out, output, work.logits);
      if (c.final_softcap > 0.0f)
        launch(exact_softcap_kernel, blocks_for(n_out * c.vocab), 256, 0, work.logits, n_out * c.vocab, c.final_softcap);
    }
    CUDA_OK(cudaGetLastError());
    deliver_logits(segs);
    sample_device_memory();
  }

  template <class KV>
  void forward_impl(std::span<const DecodeSegment> segments) {
    const ModelConfig& c = model.config();
    const ModelWeights& w = model.weights();
    int64_t n = 0, n_out = 0;
    for (const DecodeSegment& sg : segments) {
      n += sg.n;
      n_out += sg.n_logits;
    }
    ensure_work(n, std::max<int64_t>(n_out, 1));
    // Sequences with enough rows for the tensor-core GEMM are stacked first (see gemm_rows).
    std::vector<const DecodeSegment*> order;
    for (const DecodeSegment& sg : segments)
      if (tensor_cores() && sg.n >= kGemmMinTokens) order.push_back(&sg);
    // ... and among them those with enough logit rows for the GEMM first too (the output matmul).
    std::stable_sort(order.begin(), order.end(),
                     [](const DecodeSegment* a, const DecodeSegment* b) { return a->n_logits > b->n_logits; });
    gemm_rows = 0;
    for (const DecodeSegment* sg : order) gemm_rows += sg->n;
    for (const DecodeSegment& sg : segments)
      if (!(tensor_cores() && sg.n >= kGemmMinTokens)) order.push_back(&sg);
    if (batch_decode_gemm(segments)) gemm_rows = n;
    std::vector<Seg> segs;
    int64_t smem_len = 0, row = 0;
    for (const DecodeSegment* sg : order) {
      const int64_t index = static_cast<int64_t>(segs.size());
      segs.push_back({row, sg->n, sg->n_logits, index, &kv_for(*sg->cache), sg});
      work.host_pos[index] = sg->cache->size();
      smem_len = std::max(smem_len, sg->cache->size() + sg->n);
      row += sg->n;
    }
    stage_embeddings(segs);
    // Attention's score buffer: the whole cache when replaying a graph (any position), else what is used.
    const KVCache& first_cache = *segments[0].cache;
    const int64_t graph_smem_len = segs[0].kv->capacity;
    const bool use_graph = segments.size() == 1 && n == 1 && n_out == 1 && decode_attention_fits(graph_smem_len);
    bool replay = false;  // an instantiated graph launched again: it allocates nothing
    // A batched decode step on the integer kernels (see batch_graph): the attention sized for the
    // largest cache's capacity, as a one-sequence graph is for its cache's.
    const int64_t seqs = static_cast<int64_t>(segs.size());
    int64_t batch_len = 0;
    for (const Seg& sg : segs) batch_len = std::max(batch_len, sg.kv->capacity);
    const bool batch_step = batch_graphs_on && seqs > 1 && seqs <= kBatchAttentionSeqs && n == seqs && n_out == seqs &&
                            gemm_rows == 0 && fused_decode_ok() && batch_attention_on && decode_attention_fits(batch_len);
    std::vector<const KVCache*> batch_key;
    if (batch_step)
      for (const Seg& sg : segs) batch_key.push_back(sg.segment->cache);
    const bool batch_graph_ready = batch_step && batch_graph.exec != nullptr && batch_graph.caches == batch_key &&
                                   batch_graph.generation == work.generation && batch_graph.attn == batch_attn.ptr;
    const bool capture_batch = batch_step && !batch_graph_ready && batch_key == last_batch;
    last_batch = batch_step ? batch_key : std::vector<const KVCache*>{};
    if (batch_graph_ready) {
      for (size_t i = 0; i < segs.size(); ++i) graph_refs[i] = *segs[i].kv;
      CUDA_OK(cudaGraphLaunch(batch_graph.exec, stream));
      replay = true;
    } else if (capture_batch) {
      drop_batch_graph();
      if (graph_refs == nullptr) CUDA_OK(cudaMallocHost(&graph_refs, static_cast<size_t>(kBatchAttentionSeqs) * sizeof(DevKv)));
      cudaGraph_t g = nullptr;
      CUDA_OK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
      capturing_batch = true;
      try {
        enqueue_step<KV>(segs, n, n_out, batch_len);
      } catch (...) {
        capturing_batch = false;
        cudaStreamEndCapture(stream, &g);
        if (g) cudaGraphDestroy(g);
        cudaGetLastError();  // a launch error invalidated the capture: not the next call's error
        throw;
      }
      capturing_batch = false;
      CUDA_OK(cudaStreamEndCapture(stream, &g));
      const cudaError_t e = cudaGraphInstantiate(&batch_graph.exec, g, 0);
      cudaGraphDestroy(g);
      CUDA_OK(e);
      batch_graph.caches = batch_key;
      batch_graph.generation = work.generation;
      batch_graph.attn = batch_attn.ptr;
      CUDA_OK(cudaGraphLaunch(batch_graph.exec, stream));
    } else if (!use_graph) {
      enqueue_step<KV>(segs, n, n_out, smem_len);
    } else {
      const bool stale = graph.exec == nullptr || graph.cache != &first_cache || graph.generation != work.generation;
      replay = !stale;
      if (stale) {
        drop_graph();
        cudaGraph_t g = nullptr;
        CUDA_OK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
        try {
          enqueue_step<KV>(segs, 1, 1, graph_smem_len);
        } catch (...) {
          cudaStreamEndCapture(stream, &g);
          if (g) cudaGraphDestroy(g);
          cudaGetLastError();  // a launch error invalidated the capture: not the next call's error
          throw;
        }
        CUDA_OK(cudaStreamEndCapture(stream, &g));
        const cudaError_t e = cudaGraphInstantiate(&graph.exec, g, 0);
        cudaGraphDestroy(g);
        CUDA_OK(e);
        graph.cache = &first_cache;
        graph.generation = work.generation;
      }
      CUDA_OK(cudaGraphLaunch(graph.exec, stream));
    }
    deliver_logits(segs);
    // The device's use is sampled after every step that could have changed it (allocations, first
    // launches loading kernels, a graph's instantiation); a replayed graph cannot, and cudaMemGetInfo
    // cost ~1% of a decode step's time (H200, q4_k 8B: 451-459 -> 457-460 tok/s).
    if (!replay) sample_device_memory();
  }

  // Every device operation of one step, on `stream` (capturable): inputs from the pinned buffers,
  // logits back into them. smem_len: positions the attention score buffer must hold.
  // Sequences of a batch share every matmul (their rows stacked); RoPE, the KV cache and attention
  // run per sequence.
  template <class KV>
  void enqueue_step(const std::vector<Seg>& segs, int64_t n, int64_t n_logits, int64_t smem_len) {
    const ModelConfig& c = model.config();
    const int64_t hd = c.hidden, qd = c.q_dim(), kvd = c.kv_dim(), ff = c.intermediate;
    CUDA_OK(cudaMemcpyAsync(work.pos, work.host_pos, segs.size() * sizeof(int64_t), cudaMemcpyHostToDevice, stream));
    CUDA_OK(cudaMemcpyAsync(work.x, work.host_x, static_cast<size_t>(n * hd) * sizeof(float), cudaMemcpyHostToDevice,
                            stream));
    // Residual adds are deferred into the next norm, which also quantizes the activations of the
    // integer matmuls after it (one launch instead of three).
    bool pending = false;  // work.h holds a residual not yet added into the residual stream
    const float* pending_norm = nullptr;  // Gemma 2: the norm work.h takes first (fused into the add when it can)
    const bool fusable = hd % 32 == 0;
    const bool fused_decode = fused_decode_ok();
    bool all_single = true;
    for (const Seg& sg : segs) all_single = all_single && sg.n == 1;
    const BatchAttention batch = fused_decode && all_single && segs.size() > 1 && batch_attention_on
                                     ? batch_attention_buffers(segs)
                                     : BatchAttention{};
    const bool batch_decode_step = all_single && n > 1 && gemm_rows == n;  // see batch_gemm_min
    batch_step_pdl = dependent_batch && all_single && n > 1;
    // The residual stream alternates between two buffers (the fused norm reads one while writing the
    // other); the norm's output goes to work.normed.
    // Column slices of the fused norm: 256 columns per block for a few rows (decode), whole rows for
    // many (a prompt), where every block re-reading its row would cost more than it saves (and one
    // block per row may update its row in place).
    const bool sliced_norm = n <= kSlicedNormRows;
    const int64_t norm_slice = sliced_norm ? 256 : (hd + 31) / 32 * 32;
    float* x = work.x;
    float* x_next = sliced_norm ? work.x2 : work.x;
    // Steps with tensor-core rows: the kernels before each matmul also write its input in bf16 (the
    // GEMM's operand), into this buffer sized for the widest input; no separate conversion pass.
    __nv_bfloat16* step_bf16 = nullptr;
    if (gemm_rows > 0)
      step_bf16 = static_cast<__nv_bfloat16*>(grow(gemm_x, static_cast<size_t>(n * std::max({hd, qd, ff})) * 2));
    const auto add_pending = [&]() {
      if (!pending) return;
      if (pending_norm != nullptr) launch(rms_norm_kernel, static_cast<unsigned>(n), 1024, 0, work.h, pending_norm, c.norm_eps, hd, work.h);
      launch(add_kernel, blocks_for(n * hd), 256, 0, x, work.h, n * hd);
    };
    const auto norm_into_h = [&](const float* w, bool quantize) {
      if (fusable) {
        launch_with(pdl(n), add_norm_quant_kernel, dim3(static_cast<unsigned>(n), static_cast<unsigned>((hd + norm_slice - 1) / norm_slice)),
               1024, 0, x, pending ? work.h : nullptr, pending ? pending_norm : nullptr, x_next, w, c.norm_eps, hd, norm_slice,
               work.normed, step_bf16, quantize ? work.aq : nullptr, work.ad, work.as);
        if (pending && sliced_norm) std::swap(x, x_next);
      } else {
        add_pending();
        launch(rms_norm_kernel, static_cast<unsigned>(n), 1024, 0, x, w, c.norm_eps, hd, work.normed);
      }
      pending = false;
    };
    for (int64_t li = 0; li < c.n_layers; ++li) {
      const DevLayer& l = layers[static_cast<size_t>(li)];
      const bool quant_qkv = fusable && integer_path(n, {&l.wq, &l.wk, &l.wv});
      norm_into_h(l.attn_norm, quant_qkv);
      {
        const Job qkv[3] = {{&l.wq, work.q}, {&l.wk, work.k}, {&l.wv, work.v}};
        matmuls(work.normed, n, qkv, 3, quant_qkv, fusable ? step_bf16 : nullptr);
      }
      if (l.bq) {
        launch(add_bias_kernel, blocks_for(n * qd), 256, 0, work.q, l.bq, n, qd);
        launch(add_bias_kernel, blocks_for(n * kvd), 256, 0, work.k, l.bk, n, kvd);
        launch(add_bias_kernel, blocks_for(n * kvd), 256, 0, work.v, l.bv, n, kvd);
      }
      if (c.qk_norm)
        launch_with(pdl(n), qk_norm_kernel, static_cast<unsigned>(n * (c.n_heads + c.n_kv_heads)), 128, 0, work.q, work.k,
                    l.q_norm, l.k_norm, c.norm_eps, c.head_dim, n * c.n_heads);
      const int64_t window = c.layer_sliding[static_cast<size_t>(li)] ? c.sliding_window : 0;
      // Decode steps (every sequence one new token) quantize the attention output for the output
      // projection inside the fused attention kernel.
      const bool quant_o = fused_decode && all_single && integer_path(n, {&l.wo});
      bool attn_bf16 = false;  // the attention output is in step_bf16 too
      // The fused decode attention's shape for the step (its longest sequence).
      const int64_t nblk_o = qd / 32;
      const int64_t decode_long_from = c.rope.type == RopeType::LongRope ? c.rope.original_max_positions
                                                                         : std::numeric_limits<int64_t>::max();
      const auto decode_attention = [&](const float* q, const float* k_new, const float* v_new, const int64_t* pos,
                                        KV* kc, KV* vc, __half* ks, __half* vs, float* out, int8_t* aq, float* ad, int* as,
                                        float* part, int* done, const DevKv* refs, unsigned sequences) {
        const int64_t split_len = decode_split_len(smem_len);
        check(decode_smem(split_len) <= decode_smem_bytes,
              "CUDA attention: a context of " + std::to_string(smem_len) + " positions is too long for " +
                  std::to_string(attention_splits) + " blocks per head (BIOQUANT_CUDA_SPLITS)");
        // No more blocks per head than the context can give work to (a graph is captured for the cache's capacity).
        const int64_t split_blocks = std::min<int64_t>(attention_splits, std::max<int64_t>(1, (smem_len + attention_min_chunk - 1) / attention_min_chunk));
        const int heads_per_block = decode_heads_per_block(split_len);
        const int64_t blocks_per_group = (c.n_heads / c.n_kv_heads + heads_per_block - 1) / heads_per_block;
        // Each lane's chunks of q in registers: 4 for heads up to 128 wide, 8 up to 256.
        launch_with(pdl(n), c.head_dim <= 128 ? attention_decode_kernel<KV, 4> : attention_decode_kernel<KV, 8>,
               dim3(static_cast<unsigned>(c.n_kv_heads * blocks_per_group), static_cast<unsigned>(split_blocks), sequences),
               heads_per_block * kDecodeHeadThreads, decode_smem(split_len), q, k_new, v_new, inv_freq, pos,
               static_cast<int>(c.n_heads), static_cast<int>(c.n_kv_heads), static_cast<int>(c.head_dim),
               static_cast<int>(c.rotary_dim()), decode_long_from, c.rope.attention_factor, kc, vc, ks, vs, window,
               c.attention_scale(), c.attn_softcap, out, aq, ad, as, attention_min_chunk, part, done, stage_len(split_len), static_cast<int>(decode_score_ld(split_len)), refs,
               static_cast<int>(li));
      };
      if (batch.refs != nullptr) {
        // A decode step of several sequences: one launch per kBatchAttentionSeqs of them (blockIdx.z),
        // each block finding its sequence's cache in batch.refs (sequence i is row i, position i).
        for (int64_t z0 = 0; z0 < static_cast<int64_t>(segs.size()); z0 += kBatchAttentionSeqs) {
          const unsigned nz = static_cast<unsigned>(std::min<int64_t>(kBatchAttentionSeqs, static_cast<int64_t>(segs.size()) - z0));
          decode_attention(work.q + z0 * qd, work.k + z0 * kvd, work.v + z0 * kvd, work.pos + z0, nullptr, nullptr, nullptr,
                           nullptr, work.attn + z0 * qd, quant_o ? work.aq + z0 * nblk_o * 32 : nullptr, work.ad + z0 * nblk_o,
                           work.as + z0 * nblk_o, batch.part, batch.done, batch.refs + z0, nz);
        }
      }
      for (const Seg& sg : segs) {
        if (batch.refs != nullptr) break;
        const size_t layer_elems = static_cast<size_t>(sg.kv->capacity * kvd);
        KV* kc = static_cast<KV*>(sg.kv->k) + li * layer_elems;
        KV* vc = static_cast<KV*>(sg.kv->v) + li * layer_elems;
        __half* ks = sg.kv->k_scale ? sg.kv->k_scale + li * layer_elems / 32 : nullptr;
        __half* vs = sg.kv->v_scale ? sg.kv->v_scale + li * layer_elems / 32 : nullptr;
        float* q = work.q + sg.row0 * qd;
        float* out = work.attn + sg.row0 * qd;
        const int64_t* pos = work.pos + sg.index;
        if (fused_decode && sg.n == 1) {
          decode_attention(q, work.k + sg.row0 * kvd, work.v + sg.row0 * kvd, pos, kc, vc, ks, vs, out,
                           quant_o ? work.aq + sg.row0 * nblk_o * 32 : nullptr, work.ad + sg.row0 * nblk_o,
                           work.as + sg.row0 * nblk_o, work.attn_part, work.attn_done, nullptr, 1);
          continue;
        }
        // Prompts long enough for the tensor-core matmuls also take their attention there, when the
        // cache is bf16 and one query head's scores fit the gate buffer (else: the f32 tiled kernel).
        const int64_t len = work.host_pos[sg.index] + sg.n, ld = (len + 7) / 8 * 8, group = c.n_heads / c.n_kv_heads;
        // The scores of a call live in work.gate: whole KV groups per call when one fits, else a part
        // of a group's query heads (a long context: one group's scores outgrow the buffer from
        // ~3.5K positions of the 8B shape, which sent such prompts to the f32 tiled kernel).
        const int64_t scores_budget = work.tokens * ff * static_cast<int64_t>(sizeof(float));
        const int64_t head_bytes = sg.n * ld * static_cast<int64_t>(sizeof(float));
        const int64_t heads_per_call = std::min(group, scores_budget / head_bytes);
        const int64_t groups_per_call =
            heads_per_call == group ? std::min<int64_t>(c.n_kv_heads, scores_budget / (group * head_bytes)) : 1;
        const bool tensor_attention = std::is_same_v<KV, __nv_bfloat16> && sg.n >= kGemmMinTokens && tensor_core_attention &&
                                      blas.batched_ready() && c.head_dim % 8 == 0 && heads_per_call >= 1;
        __nv_bfloat16* q_heads = nullptr;
        if (tensor_attention)
          q_heads = static_cast<__nv_bfloat16*>(grow(gemm_x, static_cast<size_t>(c.n_heads * sg.n * c.head_dim) * 2));
        launch(rope_store_kernel<KV>, static_cast<unsigned>(sg.n), 1024, 0, q, work.k + sg.row0 * kvd, work.v + sg.row0 * kvd,
               inv_freq, pos, static_cast<int>(c.n_heads), static_cast<int>(c.n_kv_heads), static_cast<int>(c.head_dim),
               static_cast<int>(c.rotary_dim()), rope_long_from(*sg.segment), c.rope.attention_factor, kc, vc, ks, vs,
               q_heads, sg.n);
        if (tensor_attention) {
          const int64_t d = c.head_dim, rows = group * sg.n;  // one KV head's query rows
          const auto* kb = reinterpret_cast<const __nv_bfloat16*>(kc);
          const auto* vb = reinterpret_cast<const __nv_bfloat16*>(vc);
          float* scores = work.gate;
          auto* probs = reinterpret_cast<__nv_bfloat16*>(work.up);
          float* o_heads = work.h;  // free between the norm that consumed it and the output projection
          // Calls of gc KV groups, each of its query heads [h0, h0 + hc): rows r = (head, token) from
          // (g0 * group + h0) * n on (q_heads and o_heads are head-major).
          for (int64_t g0 = 0; g0 < c.n_kv_heads; g0 += groups_per_call) {
            const int64_t gc = std::min(groups_per_call, c.n_kv_heads - g0);
            for (int64_t h0 = 0; h0 < group; h0 += heads_per_call) {
              const int64_t call_rows = std::min(heads_per_call, group - h0) * sg.n;
              const int64_t first_row = g0 * rows + h0 * sg.n;
              // S [call_rows][len] (row-major, ld) = Q_g [call_rows][d] K_g[len][d]^T
              blas.gemm_batched(CUBLAS_OP_T, CUBLAS_OP_N, len, call_rows, d, kb + g0 * d, kvd, d, q_heads + first_row * d, d,
                                rows * d, scores, ld, call_rows * ld, gc);
              launch(attention_softmax_kernel, static_cast<unsigned>(gc * call_rows), 256, 0, scores, ld, sg.n, len, pos,
                     window, c.attention_scale(), c.attn_softcap, probs);
              // O_g [call_rows][d] = P [call_rows][len] V_g [len][d]
              blas.gemm_batched(CUBLAS_OP_N, CUBLAS_OP_N, d, call_rows, len, vb + g0 * d, kvd, d, probs, ld, call_rows * ld,
                                o_heads + first_row * d, d, rows * d, gc);
            }
          }
          launch(heads_to_tokens_kernel, blocks_for(sg.n * qd), 256, 0, o_heads, sg.n, static_cast<int>(c.n_heads),
                 static_cast<int>(c.head_dim), out, segs.size() == 1 ? step_bf16 : nullptr);
          attn_bf16 = segs.size() == 1;
        } else if (sg.n > 1 && c.head_dim <= kMaxHeadDim && c.head_dim % 4 == 0) {
          launch(attention_prefill_kernel<KV>, dim3(static_cast<unsigned>(c.n_heads), static_cast<unsigned>((sg.n + kQTile - 1) / kQTile)), 128,
                 prefill_attention_smem(static_cast<int>(c.head_dim)), q, kc, vc, ks, vs, pos, sg.n, static_cast<int>(c.n_heads), static_cast<int>(c.n_kv_heads),
                  static_cast<int>(c.head_dim), window, c.attention_scale(), c.attn_softcap, out);
        } else {
          const size_t smem = attention_smem_bytes(smem_len);
          check(smem <= attention_smem_limit, "CUDA attention: a context of " + std::to_string(smem_len) + " positions is too long");
          launch(attention_kernel<KV>, dim3(static_cast<unsigned>(c.n_heads), static_cast<unsigned>(sg.n)), 128, smem, q, kc, vc, ks, vs, pos, static_cast<int>(c.n_heads), static_cast<int>(c.n_kv_heads),
              static_cast<int>(c.head_dim), window, c.attention_scale(), c.attn_softcap, out);
        }
      }
      matmul(work.attn, n, l.wo, work.h, quant_o, attn_bf16 ? step_bf16 : nullptr);
      if (l.bo) launch(add_bias_kernel, blocks_for(n * hd), 256, 0, work.h, l.bo, n, hd);
      pending = true;
      pending_norm = c.sandwich_norms ? l.attn_post_norm : nullptr;

      const bool quant_gate_up = fusable && integer_path(n, {&l.w_gate, &l.w_up});
      norm_into_h(l.ffn_norm, quant_gate_up);
      {
        const Job gate_up[2] = {{&l.w_gate, work.gate}, {&l.w_up, work.up}};
        matmuls(work.normed, n, gate_up, 2, quant_gate_up, fusable ? step_bf16 : nullptr);
      }
      if (l.b_gate) {
        launch(add_bias_kernel, blocks_for(n * ff), 256, 0, work.gate, l.b_gate, n, ff);
        launch(add_bias_kernel, blocks_for(n * ff), 256, 0, work.up, l.b_up, n, ff);
      }
      const bool gelu = c.activation == Activation::GeluTanh;
      const bool quant_down = ff % 32 == 0 && integer_path(n, {&l.w_down});
      if (quant_down) {
        launch_with(pdl(n), act_mul_quant_kernel, blocks_for(n * ff), 256, 0, work.gate, work.up, n, ff, gelu, work.aq, work.ad,
                                                                      work.as);
      } else {
        launch(act_mul_kernel, blocks_for(n * ff), 256, 0, work.gate, work.up, n * ff, gelu, step_bf16);
      }
      matmul(work.gate, n, l.w_down, work.h, quant_down, quant_down ? nullptr : step_bf16);
      if (l.b_down) launch(add_bias_kernel, blocks_for(n * hd), 256, 0, work.h, l.b_down, n, hd);
      pending = true;
      pending_norm = c.sandwich_norms ? l.ffn_post_norm : nullptr;
    }
    add_pending();
    CUDA_OK(cudaGetLastError());
    if (n_logits > 0) {
      // Each sequence's last rows, normalised into consecutive rows of work.h.
      // A run of sequences whose logit rows follow each other in x (decode steps: every row) is one launch.
      int64_t out_row = 0;
      for (size_t i = 0; i < segs.size();) {
        if (segs[i].n_logits == 0) {
          ++i;
          continue;
        }
        const int64_t first = segs[i].row0 + segs[i].n - segs[i].n_logits;
        int64_t rows = segs[i].n_logits;
        size_t j = i + 1;
        for (; j < segs.size() && segs[j].n == segs[j].n_logits && segs[j].row0 == first + rows; ++j) rows += segs[j].n;
        launch(rms_norm_kernel, static_cast<unsigned>(rows), 1024, 0, x + first * hd, final_norm, c.norm_eps, hd,
               work.h + out_row * hd);
        out_row += rows;
        i = j;
      }
      // The output matmul's rows: each sequence's logit rows on the GEMM when it has that many.
      const int64_t step_gemm_rows = gemm_rows;
      gemm_rows = 0;
      for (const Seg& sg : segs)
        if (tensor_cores() && sg.n_logits >= kGemmMinTokens) gemm_rows += sg.n_logits;
      if (batch_decode_step) gemm_rows = n_logits;  // see batch_gemm_min
      matmul(work.h, n_logits, output, work.logits);
      gemm_rows = step_gemm_rows;
      if (c.final_softcap > 0.0f)
        launch(softcap_kernel, blocks_for(n_logits * c.vocab), 256, 0, work.logits, n_logits * c.vocab, c.final_softcap);
      CUDA_OK(cudaGetLastError());
    }
  }
};

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

std::string cuda_device_description(int device) {
  check(device >= 0 && device < cuda_device_count(), "no CUDA device " + std::to_string(device));
  cudaDeviceProp p{};
  CUDA_OK(cudaGetDeviceProperties(&p, device));
  char mem[32];
  std::snprintf(mem, sizeof mem, "%.1f", static_cast<double>(p.totalGlobalMem) / (1024.0 * 1024.0 * 1024.0));
  std::string out(p.name);
  out.append(" (sm_").append(std::to_string(p.major)).append(std::to_string(p.minor)).append(", ").append(mem).append(" GiB)");
  return out;
}

double cuda_copy_bandwidth(int device) {
  CUDA_OK(cudaSetDevice(device));
  const size_t n = size_t{1} << 30;
  void *a = nullptr, *b = nullptr;
  CUDA_OK(cudaMalloc(&a, n));
  if (cudaMalloc(&b, n) != cudaSuccess) {
    cudaFree(a);
    throw Error("CUDA: no room for the 2 GiB bandwidth probe");
  }
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  float best_ms = 1e30f;
  cudaMemcpy(b, a, n, cudaMemcpyDeviceToDevice);  // warm-up
  for (int i = 0; i < 5; ++i) {
    cudaEventRecord(e0);
    cudaMemcpy(b, a, n, cudaMemcpyDeviceToDevice);
    cudaEventRecord(e1);
    cudaEventSynchronize(e1);
    float ms = 0.0f;
    cudaEventElapsedTime(&ms, e0, e1);
    best_ms = std::min(best_ms, ms);
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  cudaFree(a);
  cudaFree(b);
  return 2.0 * static_cast<double>(n) / (static_cast<double>(best_ms) * 1e-3) / 1e9;
}

GpuDecoder::GpuDecoder(const Model& model, int device, KvType kv, bool exact)
    : impl_(std::make_unique<Impl>(model, device, kv, exact)) {
  check(!exact || kv == KvType::F32, "exact numerics need an f32 KV cache (--kv-cache f32), as the CPU engine keeps");
  check(device >= 0 && device < cuda_device_count(), "no CUDA device " + std::to_string(device) + " (" +
                                                         std::to_string(cuda_device_count()) + " found)");
  CUDA_OK(cudaSetDevice(device));
  // bf16 tensor cores (the prompt path) need Ampere or newer. The build carries sm_80 and sm_90 code
  // (CMakeLists.txt); the decode steps' dependent launches need the sm_90 code's griddepcontrol
  // instructions, so they are on only where that code runs (not on Ampere or Ada cards).
  int major = 0;
  CUDA_OK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  check(major >= 8, "CUDA: " + cuda_device_description(device) + " is older than the Ampere cards (sm_80) BioQuant's kernels need");
  cudaFuncAttributes kernel_image{};
  const cudaError_t image = cudaFuncGetAttributes(&kernel_image, add_norm_quant_kernel);
  if (image != cudaSuccess) cudaGetLastError();
  check(image == cudaSuccess, "CUDA: this build has no kernels for " + cuda_device_description(device) +
                                  " (set CMAKE_CUDA_ARCHITECTURES to include it): " + cudaGetErrorString(image));
  if (kernel_image.ptxVersion < 90) impl_->dependent_decode = false;
  check(kv != KvType::Q8 || model.config().kv_dim() % 32 == 0,
        "a q8 KV cache needs K/V rows that are a multiple of 32 values (this model has " +
            std::to_string(model.config().kv_dim()) + ")");
  // The context reserves each thread's stack for every thread the card can hold: at the default 1 KB,
  // 264 MiB of an H100 (measured: 527 -> 263 MiB for a bare context at 0). Our kernels' frames are at
  // most 32 bytes, cuBLAS's GEMMs need none, and the driver raises the limit for a kernel that needs
  // more, so 64 bytes costs nothing but the memory it frees (BIOQUANT_CUDA_STACK=bytes to compare).
  {
    const std::optional<size_t> knob = cuda_stack_knob();
    const size_t stack = knob.value_or(kThreadStackBytes);
    size_t current = 0;
    CUDA_OK(cudaDeviceGetLimit(&current, cudaLimitStackSize));
    if (knob || stack < current) CUDA_OK(cudaDeviceSetLimit(cudaLimitStackSize, stack));
  }
  CUDA_OK(cudaStreamCreate(&impl_->stream));
  CUDA_OK(cudaStreamCreateWithFlags(&impl_->dequant_stream, cudaStreamNonBlocking));
  for (int b = 0; b < 2; ++b) {
    CUDA_OK(cudaEventCreateWithFlags(&impl_->tile_ready[b], cudaEventDisableTiming));
    CUDA_OK(cudaEventCreateWithFlags(&impl_->tile_free[b], cudaEventDisableTiming));
  }
  const size_t before_blas = device_used_now();
  impl_->blas.open(impl_->stream);
  impl_->sample_device_memory();
  impl_->blas_bytes = impl_->device_used_peak > before_blas ? impl_->device_used_peak - before_blas : 0;
  impl_->device_used_at_start = impl_->device_used_peak;
  impl_->gemm_tile_bytes = static_cast<size_t>(cuda_knob_int("BIOQUANT_CUDA_TILE_MB", 0)) << 20;
  if (impl_->gemm_tile_bytes == 0) impl_->gemm_tile_bytes = gpu_gemm_tile_bytes(model.weight_bytes());
  int sms = 0;
  CUDA_OK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  if (const int k = cuda_knob_int("BIOQUANT_CUDA_PERSIST", 0); k > 0) impl_->persist_blocks = static_cast<unsigned>(k * sms);
  impl_->qgemm_blocks = static_cast<int64_t>(cuda_knob_int("BIOQUANT_CUDA_QGEMM_BLOCKS", 2)) * sms;
  if (impl_->attention_splits == 0)
    impl_->attention_splits = gpu_attention_splits(sms, static_cast<int>(model.config().n_heads));
  // Shared memory per block (opt-in) sizes the attention kernels' score buffers: long contexts
  // take more decode splits' worth of it, or are refused, on cards with less than an H100. The
  // kernels' attributes (per device, shared by every decoder on it) allow what the card has beside
  // their static shared memory; this decoder's limits (BIOQUANT_CUDA_SMEM_KB: a smaller card's)
  // decide what it launches.
  int smem_optin = 0;
  CUDA_OK(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  size_t card_smem = static_cast<size_t>(smem_optin), usable_smem = card_smem;
  if (const int kb = cuda_knob_int("BIOQUANT_CUDA_SMEM_KB", 0); kb > 0) usable_smem = std::min(usable_smem, static_cast<size_t>(kb) * 1024);
  const auto dynamic_room = [&](auto kernel, size_t total) {  // what `total` leaves beside the kernel's static shared memory
    cudaFuncAttributes a{};
    CUDA_OK(cudaFuncGetAttributes(&a, kernel));
    return total > a.sharedSizeBytes ? total - a.sharedSizeBytes : size_t{0};
  };
  const size_t prefill_smem = prefill_attention_smem(kMaxHeadDim);
  check(dynamic_room(attention_prefill_kernel<float>, usable_smem) >= prefill_smem,
        "CUDA: " + cuda_device_description(device) + " has " + std::to_string(usable_smem / 1024) +
            " KB of shared memory per block; the attention kernels need " + std::to_string(prefill_smem / 1024 + 1) + " KB");
  impl_->decode_smem_bytes = dynamic_room(attention_decode_kernel<float, 8>, usable_smem);
  impl_->attention_smem_limit = std::min(kAttentionSmemBytes, dynamic_room(attention_kernel<float>, usable_smem));
  const int attention_smem = static_cast<int>(std::min(kAttentionSmemBytes, dynamic_room(attention_kernel<float>, card_smem)));
  const int decode_smem = static_cast<int>(dynamic_room(attention_decode_kernel<float, 8>, card_smem));
  const int prefill = static_cast<int>(prefill_smem);
  const auto allow = [](auto kernel, int bytes) { CUDA_OK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes)); };
  allow(attention_kernel<float>, attention_smem);
  allow(attention_kernel<__nv_bfloat16>, attention_smem);
  allow(attention_kernel<int8_t>, attention_smem);
  allow(attention_decode_kernel<float, 4>, decode_smem);
  allow(attention_decode_kernel<__nv_bfloat16, 4>, decode_smem);
  allow(attention_decode_kernel<int8_t, 4>, decode_smem);
  allow(attention_decode_kernel<float, 8>, decode_smem);
  allow(attention_decode_kernel<__nv_bfloat16, 8>, decode_smem);
  allow(attention_decode_kernel<int8_t, 8>, decode_smem);
  allow(attention_prefill_kernel<float>, prefill);
  allow(attention_prefill_kernel<__nv_bfloat16>, prefill);
  allow(attention_prefill_kernel<int8_t>, prefill);
  impl_->exact_smem_limit = dynamic_room(exact_attention_kernel, usable_smem);
  allow(exact_attention_kernel, static_cast<int>(dynamic_room(exact_attention_kernel, card_smem)));
  allow(q6k_decode_kernel, static_cast<int>(q6k_decode_smem(kQ6kMaxCols)));
  // qgemm_kernel's variants: every format with_quantized_format knows (the ones qgemm dispatches through it).
  const auto allow_qgemm = [&](auto format, auto dq) {
    constexpr int F = decltype(format)::value;
    constexpr bool DQ = decltype(dq)::value;
    allow(qgemm_kernel<F, 1, DQ>, static_cast<int>(qgemm_smem(F, 8, DQ)));
    allow(qgemm_kernel<F, 2, DQ>, static_cast<int>(qgemm_smem(F, 16, DQ)));
    allow(qgemm_kernel<F, 4, DQ>, static_cast<int>(qgemm_smem(F, 32, DQ)));
  };
  for (int t = 0; t < kQuantTypeCount; ++t) {
    const auto type = static_cast<QuantType>(t);
    if (type == QuantType::F32 || type == QuantType::F16 || type == QuantType::BF16) continue;
    with_quantized_format(type, "qgemm kernel", [&](auto format) {
      allow_qgemm(format, std::false_type{});
      if constexpr (qgemm_has_dq(decltype(format)::value)) allow_qgemm(format, std::true_type{});
    });
  }
  {
    int16_t nf4[16], fp4[16];  // Q1.14, as the CPU kernels
    bnb_codebook_q14(QuantType::NF4, nf4);
    bnb_codebook_q14(QuantType::FP4, fp4);
    CUDA_OK(cudaMemcpyToSymbol(c_nf4_q14, nf4, sizeof nf4));
    CUDA_OK(cudaMemcpyToSymbol(c_fp4_q14, fp4, sizeof fp4));
    const auto upload_permute = [](const int16_t* levels, const void* symbol, const char* name) {
      const std::optional<Bnb4PermuteTables> t = bnb4_permute_tables(levels);
      if (!t) throw Error(std::string("internal: no byte-permute tables for the ") + name + " codebook");
      CUDA_OK(cudaMemcpyToSymbol(symbol, &*t, sizeof(Bnb4PermuteTables)));  // the symbol's address: the C API
    };
    upload_permute(nf4, c_nf4_permute, "nf4");
    upload_permute(fp4, c_fp4_permute, "fp4");
    CUDA_OK(cudaMemcpyToSymbol(c_dynamic_map, bnb_dynamic_map(), 256 * sizeof(float)));
    const unsigned early = static_cast<unsigned>((cuda_knob_int("BIOQUANT_CUDA_EARLY", 3) - 1) * sms);
    CUDA_OK(cudaMemcpyToSymbol(c_early_blocks, &early, sizeof early));
  }
  const ModelConfig& c = model.config();
  const ModelWeights& w = model.weights();
  // The rotary frequencies, then longrope's long ones (a copy for the other RoPE types).
  const size_t half = static_cast<size_t>(c.rotary_dim() / 2);
  std::vector<float> inv_freq(2 * half);
  rope_inv_freq(c.rope, c.rotary_dim(), inv_freq.data());
  rope_inv_freq(c.rope, c.rotary_dim(), inv_freq.data() + half, true);
  {
    const size_t total = gpu_weight_bytes(model, [](const Matrix& m) { return m.nbytes(); });
    impl_->reserve_weights(total);
  }
  for (const LayerWeights& l : w.layers) {
    DevLayer d;
    d.wq = impl_->upload_matrix(l.wq);
    d.wk = impl_->upload_matrix(l.wk);
    d.wv = impl_->upload_matrix(l.wv);
    d.wo = impl_->upload_matrix(l.wo);
    d.w_gate = impl_->upload_matrix(l.w_gate);
    d.w_up = impl_->upload_matrix(l.w_up);
    d.w_down = impl_->upload_matrix(l.w_down);
    d.bq = impl_->upload_vec(l.bq);
    d.bk = impl_->upload_vec(l.bk);
    d.bv = impl_->upload_vec(l.bv);
    d.bo = impl_->upload_vec(l.bo);
    d.b_gate = impl_->upload_vec(l.b_gate);
    d.b_up = impl_->upload_vec(l.b_up);
    d.b_down = impl_->upload_vec(l.b_down);
    d.attn_norm = impl_->upload_vec(l.attn_norm);
    d.attn_post_norm = impl_->upload_vec(l.attn_post_norm);
    d.ffn_norm = impl_->upload_vec(l.ffn_norm);
    d.ffn_post_norm = impl_->upload_vec(l.ffn_post_norm);
    d.q_norm = impl_->upload_vec(l.q_norm);
    d.k_norm = impl_->upload_vec(l.k_norm);
    impl_->layers.push_back(d);
  }
  impl_->output = impl_->upload_matrix(w.output);
  impl_->final_norm = impl_->upload_vec(w.final_norm);
  impl_->inv_freq = impl_->upload_vec(inv_freq);
  CUDA_OK(cudaStreamSynchronize(impl_->stream));  // synthetic matrices made, errors surfaced
  impl_->sample_device_memory();
}

GpuDecoder::~GpuDecoder() = default;

void GpuDecoder::forward(const int32_t* tokens, int64_t n, KVCache& cache, int64_t n_logits, float* logits) {
  const DecodeSegment segment{tokens, n, &cache, n_logits, logits};
  forward_batch(std::span<const DecodeSegment>(&segment, 1));
}

void GpuDecoder::set_host_pool(ThreadPool* pool) { impl_->host_pool = pool; }

void GpuDecoder::forward_batch(std::span<const DecodeSegment> segments) {
  CUDA_OK(cudaSetDevice(impl_->device));
  switch (impl_->kv_type) {
    case KvType::F32:
      if (impl_->exact) impl_->forward_exact(segments);
      else impl_->forward_impl<float>(segments);
      break;
    case KvType::BF16: impl_->forward_impl<__nv_bfloat16>(segments); break;
    case KvType::Q8: impl_->forward_impl<int8_t>(segments); break;
  }
}

void GpuDecoder::copy_prefix(const KVCache& from, const KVCache& to, int64_t n) {
  CUDA_OK(cudaSetDevice(impl_->device));
  const auto src = impl_->caches.find(&from);
  check(src != impl_->caches.end(), "copy_prefix: the source KV cache has no positions on this GPU");
  const DevKv& s = src->second;
  const DevKv& d = impl_->kv_for(to);  // allocated on first use (std::map: s stays valid)
  // Layout [layer][position][kv_dim] (q8 scales: [layer][position][kv_dim / 32]): one strided copy
  // of n positions per layer, for each of K, V and their scales, on the decoder's stream (after the
  // steps that wrote the source).
  const size_t layers = static_cast<size_t>(impl_->model.config().n_layers);
  const auto copy = [&](const void* from_ptr, void* to_ptr, size_t bytes_per_layer) {
    const size_t row = bytes_per_layer / static_cast<size_t>(s.capacity), width = row * static_cast<size_t>(n);
    CUDA_OK(cudaMemcpy2DAsync(to_ptr, row * static_cast<size_t>(d.capacity), from_ptr, bytes_per_layer, width, layers,
                              cudaMemcpyDeviceToDevice, impl_->stream));
  };
  copy(s.k, d.k, s.values_bytes / layers);
  copy(s.v, d.v, s.values_bytes / layers);
  if (s.scale_bytes > 0) {
    copy(s.k_scale, d.k_scale, s.scale_bytes / layers);
    copy(s.v_scale, d.v_scale, s.scale_bytes / layers);
  }
}

int64_t GpuDecoder::prompt_chunk(std::span<const DecodeSegment> segments) {
  CUDA_OK(cudaSetDevice(impl_->device));
  return impl_->fit_prompt_chunk(segments);
}

void* cuda_pinned_alloc(size_t bytes) {
  void* p = nullptr;
  const cudaError_t e = cudaHostAlloc(&p, bytes, cudaHostAllocPortable);
  if (e != cudaSuccess) {
    cudaGetLastError();
    throw Error("CUDA: cannot allocate " + mib_text(bytes) + " of page-locked host memory: " + cudaGetErrorString(e));
  }
  return p;
}

void cuda_pinned_free(void* p) {
  if (p != nullptr) cudaFreeHost(p);
}

void set_cuda_memory_limit(size_t bytes) { g_memory_limit = bytes; }
size_t cuda_memory_limit() { return g_memory_limit; }

size_t cuda_memory_used(int device) {
  CUDA_OK(cudaSetDevice(device));
  return device_used_now();
}

void GpuDecoder::release(const KVCache& cache) {
  const_cast<KVCache&>(cache).on_release = nullptr;
  impl_->release(cache);
}

GpuMemory GpuDecoder::memory() const {
  GpuMemory m;
  m.weights = impl_->mem.bytes[0];
  m.kv_cache = impl_->mem.bytes[1];
  m.workspace = impl_->mem.bytes[2];
  m.peak_allocated = impl_->mem.peak;
  m.device_used_peak = impl_->device_used_peak;
  m.device_total = impl_->device_total;
  m.device_used_at_start = impl_->device_used_at_start;
  return m;
}

int GpuDecoder::device() const { return impl_->device; }

int64_t GpuDecoder::prompt_gemm_tokens() const { return impl_->tensor_cores() ? Impl::kGemmMinTokens : 0; }

std::string GpuDecoder::prompt_matmuls() const {
  if (impl_->exact) return "exact numerics (one warp per output, no tensor cores)";
  const std::string batches = " for batches of " + std::to_string(Impl::kGemmMinTokens) + "+ tokens";
  if (impl_->blas.ready()) return impl_->blas.status() + batches;
  if (impl_->mma_fallback)
    return "tensor cores without cuBLAS (qgemm_kernel, or WMMA on weights dequantized in shared memory)" + batches + "; cuBLAS " +
           impl_->blas.status();
  return "integer kernels; cuBLAS " + impl_->blas.status();
}

}  // namespace bioquant
