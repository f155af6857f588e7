// hdrq GEMM kernels: the plain C++ interface between the CUDA sources (csrc/*.cu, which include only CUDA
// headers so that `make nvcc-check` compiles them without torch) and the torch binding (csrc/bindings.cpp).
//
// Every kernel computes, for a_q int8 [M, K] (row stride lda) and weights w in the hdrq.ops.pack_weight
// layout (int8 or 6-bit, N x K, see hdrq/reference.py pack_weight and csrc/gemm_device.cuh):
//   acc[m, n] = sum_k a_q[m, k] * w[n, k]                          (exact int32)
//   out[m, n] = fp32(acc) * a_scale[m or 0] * w_scale[n] (+ bias[n])  (fp32, in that order, no FMA)
// cast once to bf16 / fp16 / fp32, or (kOutInt32, the debug op) acc itself.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace hdrq {

enum OutKind : int { kOutBF16 = 0, kOutFP16 = 1, kOutFP32 = 2, kOutInt32 = 3 };
enum BiasKind : int { kBiasNone = 0, kBiasBF16 = 1, kBiasFP16 = 2, kBiasFP32 = 3 };

struct GemmArgs {
  const int8_t* a;        // [M, K], row stride lda (bytes), unit stride along K
  int64_t lda;
  const float* a_scale;   // [M] (per token) or [1] (per tensor)
  int a_scale_per_token;  // 1: a_scale[m]; 0: a_scale[0]
  const uint8_t* w;       // pack_weight(w_q, w_bits): N * K (8-bit) or N * 3K/4 (6-bit) bytes
  const float* w_scale;   // [N]
  const void* bias;       // [N] of bias_kind, or nullptr
  int bias_kind;
  void* out;              // [M, N] of out_kind, row stride ldo (elements)
  int64_t ldo;
  int out_kind;
  int m, n, k;
  int w_bits;             // 6 or 8
  // Split-K (splits > 1): every split of an output tile writes its int32 partial tile to `partials`; the
  // last split to arrive (counted in `counters`, one per tile, zero on entry, reset to zero on exit) sums
  // them and runs the epilogue. Unused when splits == 1.
  int splits;
  int32_t* partials;
  int64_t partials_elems;
  int32_t* counters;
  int64_t counters_elems;
};

struct TileShape {
  int bm, bn, bk;   // output tile rows (M), columns (N), and the K step of one pipeline stage
  int threads;      // threads per block
  int smem_bytes;   // dynamic shared memory per block
};

// ---- mma.sync kernels (sm_80 and up; csrc/gemm_mma.cu) -------------------------------------------
// Configurations, by index. Decode: one warp per 16 output channels, 4 warps, the whole (padded) M in
// one tile; general: 8 warps of 64x32 or 32x32 warp tiles.
enum MmaConfig : int {
  kMmaDecode16 = 0,   // M <= 16 : 16 x 64 tile, K step 128, 4 stages
  kMmaDecode32 = 1,   // M <= 32 : 32 x 64
  kMmaDecode64 = 2,   // M <= 64 : 64 x 64
  kMmaTile64 = 3,     // 64 x 128, K step 64, 4 stages
  kMmaTile128 = 4,    // 128 x 128, K step 64, 4 stages
  // Decode variants, measured against the three above by bench/tune_gemm.py (GemmDispatch picks per M):
  kMmaDecode16K256 = 5,   // M <= 16 : 16 x 64, K step 256, 4 stages (twice the bytes per barrier)
  kMmaDecode16Deep = 6,   // M <= 16 : 16 x 64, K step 128, 8 stages (twice the bytes in flight)
  kMmaDecode32N128 = 7,   // M <= 32 : 32 x 128 (two panels per warp: half the A re-reads per weight byte)
  kMmaDecode64N128 = 8,   // M <= 64 : 64 x 128
  kMmaNumConfigs = 9,
};

// Tile shape of a configuration; bm == 0 for an unknown (config, w_bits).
TileShape mma_tile_shape(int config, int w_bits);

// Launches the kernel on `stream` (no host sync). Grid: (ceil(N/bn), ceil(M/bm), splits). Returns the
// launch error (cudaSuccess on success). The caller checks shapes, alignment and workspace capacity.
cudaError_t launch_gemm_mma(const GemmArgs& args, int config, cudaStream_t stream);

// ---- wgmma kernel (sm_90a only; csrc/gemm_wgmma.cu) ----------------------------------------------
// Persistent over work items (output tile, K split); needs N % 16 == 0, K % 32 == 0, A rows 16-byte aligned;
// split-K (splits > 1, the GemmArgs workspace) in the decode configuration.
// Configurations (consumer schedule and tile), by index:
enum WgmmaConfig : int {
  kWgmmaCooperative = 0,  // both consumer warpgroups on every tile (64 rows each); epilogue not overlapped
  kWgmmaPingPong = 1,     // consumers on alternate tiles (128 rows each); one's epilogue under the other's MMAs
  kWgmmaCooperative256 = 2,  // cooperative with 128 x 256 tiles: a third less L2 and shared-memory traffic per op
  kWgmmaDecode64 = 3,        // M <= 64: 64 x 128 tiles, one consumer, split-K, two CTAs per SM
  kWgmmaCluster256 = 4,      // 128 x 256 tiles in clusters of two M-tiles sharing (multicasting) the weights; 8-bit
  kWgmmaNumConfigs = 5,
};
TileShape wgmma_tile_shape(int config, int w_bits);
bool wgmma_supports(const GemmArgs& args, int config);
cudaError_t launch_gemm_wgmma(const GemmArgs& args, int config, cudaStream_t stream);

// ---- 6-bit -> 8-bit weight expansion (csrc/gemm_expand.cu) -------------------------------------
// w8 = pack_weight(q, 8) from w6 = pack_weight(q, 6), N * K bytes written; needs N % 16 == 0, K % 32 == 0.
bool expand_w6_supports(int n, int k);
cudaError_t launch_expand_w6(const uint8_t* w6, uint8_t* w8, int n, int k, cudaStream_t stream);

// Split-K counters the workspace must provide per concurrent stream (one per output tile).
constexpr int64_t kSplitKCounters = 1 << 13;

}  // namespace hdrq
