// W8A8 / W6A6 GEMM on mma.sync.m16n8k32 (s8 x s8 -> s32), sm_80 and up: the decode path (small M) and
// the general path (any M). out = fp32(a_q @ w^T) * a_scale * w_scale (+ bias), see gemm.h.
//
// Data: A (activations) int8 [M, K] row-major; B (weights) in the pack_weight layout (gemm_device.cuh),
// 1 byte (8-bit) or 0.75 byte (6-bit) per weight. Each block computes a BM x BN output tile over a range
// of K (split-K: blockIdx.z), streaming K in steps of BK through a STAGES-deep cp.async pipeline.
//
// Decode (M <= 64): the kernel is a weight stream (M*N*K*2 ops against N*K*bits/8 bytes; at M = 16 that
// is ~43 int8 ops per byte, far below the tensor cores' ~600 ops/byte on an H100), so everything serves
// bandwidth: one warp per 16 output channels, weights copied with 16-byte cp.async in the exact order the
// warp's ldmatrix reads them (no shuffles, no bank conflicts), an L2 evict_first hint on the weights, and
// split-K so that N alone need not fill the GPU. M is padded to 16/32/64 rows with zero-filled copies.
//
// General (M > 64): 8 warps, 64x32 or 32x32 warp tiles of m16n8k32 mma; the same loaders.
//
// Per k-step of 32 and warp: A fragments come from ldmatrix.x4 on row-padded shared memory (row stride
// BK + 16 bytes puts the 8 rows of each 8x16-byte matrix in distinct banks); the B fragments of one
// 16-channel panel are one ldmatrix.x4 (8-bit) or three 32-bit loads expanded by expand6 (6-bit, each
// weight becomes 4*w, so the 6-bit accumulator is 4*acc and is shifted right by 2 at the end, exactly).
//
// Edges: rows past M and columns past K of A arrive zero-filled; units of B that are not whole in the
// layout (the last partial panel, the K tail) are built by the loader from the canonical regions with
// ordinary loads (zero outside the matrix), so the consumer sees one format. Unaligned A (lda or the base
// not a multiple of 16 bytes) is loaded byte by byte: correct, slow, only for odd K.
#include <cstdint>

#include <cuda_runtime.h>

#include "gemm.h"
#include "gemm_device.cuh"

namespace hdrq {
namespace {

template <int BITS_, int MF_, int WM_, int WN_, int NPW_, int BKU_, int STAGES_>
struct MmaTraits {
  static constexpr int BITS = BITS_;
  static constexpr int MF = MF_;          // m16 fragments per warp (warp tile rows = 16 * MF)
  static constexpr int WM = WM_;          // warps along M
  static constexpr int WN = WN_;          // warps along N
  static constexpr int NPW = NPW_;        // 16-channel panels per warp (warp tile columns = 16 * NPW)
  static constexpr int BKU = BKU_;        // 32-wide k units per stage
  static constexpr int STAGES = STAGES_;  // pipeline depth
  static constexpr int kThreads = 32 * WM * WN;
  static constexpr int kBM = 16 * MF * WM;
  static constexpr int kBN = 16 * NPW * WN;
  static constexpr int kBK = 32 * BKU;
  static constexpr int kPanels = kBN / 16;
  static constexpr int kUnitBytes = layout::unit_bytes(BITS);
  static constexpr int kAStride = kBK + 16;  // padded rows: conflict-free ldmatrix
  static constexpr int kAStageBytes = kBM * kAStride;
  static constexpr int kBStageBytes = BKU * kPanels * kUnitBytes;  // [ku][panel] units, as in global
  static constexpr int kStageBytes = kAStageBytes + kBStageBytes;
  static constexpr int kSmemBytes = STAGES * kStageBytes;
  static constexpr int kAChunks = kBM * kBK / 16;
  static constexpr int kBChunks = kBStageBytes / 16;
  static constexpr int kChunksPerUnit = kUnitBytes / 16;
  static constexpr int kNB = 2 * NPW;     // n8 blocks per warp
  static_assert(kAStride % 16 == 0 && kAStageBytes % 16 == 0, "16-byte aligned shared-memory chunks");
};

// 16 bytes of row m of A from column k, one byte at a time, zero past M and K: the path for A whose rows
// are not 16-byte aligned (odd K). Out of line (scalar arguments: see edge_chunk) to keep it from
// costing the aligned path registers.
__device__ __noinline__ uint4 load_a_bytes(const int8_t* a, int64_t lda, int m_total, int k_total, int m, int k) {
  uint32_t words[4] = {0u, 0u, 0u, 0u};
  if (m < m_total) {
    const int8_t* src = a + int64_t(m) * lda;
#pragma unroll
    for (int b = 0; b < 16; ++b)
      if (k + b < k_total) words[b >> 2] |= uint32_t(uint8_t(src[k + b])) << (8 * (b & 3));
  }
  return make_uint4(words[0], words[1], words[2], words[3]);
}

// Loads k-tile `kt` (K columns [kt*BK, kt*BK + BK)) of A rows [m0, m0+BM) and of B panels [n0/16, ...)
// into one pipeline stage. Whole units of B go by cp.async; edge units by ordinary loads + st.shared.
template <class T>
__device__ __forceinline__ void load_stage(const GemmArgs& p, const layout::Geometry& geo, uint8_t* sA,
                                           uint8_t* sB, int m0, int n0, int kt, bool a_vec, uint64_t policy) {
  const int tid = threadIdx.x;
  const int k0 = kt * T::kBK;
#pragma unroll
  for (int i = 0; i < ceil_div(T::kAChunks, T::kThreads); ++i) {
    const int c = tid + i * T::kThreads;
    if (T::kAChunks % T::kThreads == 0 || c < T::kAChunks) {
      const int row = c / (T::kBK / 16);
      const int col = (c % (T::kBK / 16)) * 16;
      const int m = m0 + row;
      const int k = k0 + col;
      uint8_t* dst = sA + row * T::kAStride + col;
      if (a_vec) {
        const int left = p.k - k;
        const int bytes = m < p.m ? (left >= 16 ? 16 : (left > 0 ? left : 0)) : 0;
        // With nothing to read, point at the (valid) base: cp.async still needs a legal address.
        const int8_t* src = bytes > 0 ? p.a + int64_t(m) * p.lda + k : p.a;
        cp_async16_zfill(dst, src, bytes);
      } else {
        st_shared_v4(dst, load_a_bytes(p.a, p.lda, p.m, p.k, m, k));
      }
    }
  }
  const int p0 = n0 / layout::kPanelRows;
#pragma unroll
  for (int i = 0; i < ceil_div(T::kBChunks, T::kThreads); ++i) {
    const int c = tid + i * T::kThreads;
    if (T::kBChunks % T::kThreads == 0 || c < T::kBChunks) {
      const int unit = c / T::kChunksPerUnit;
      const int off = (c % T::kChunksPerUnit) * 16;
      const int ku = unit / T::kPanels;
      const int pl = unit % T::kPanels;
      const int u = kt * T::BKU + ku;
      const int pn = p0 + pl;
      uint8_t* dst = sB + unit * T::kUnitBytes + off;
      if (pn < geo.full_panels && u < geo.full_units) {
        cp_async16_policy(dst, p.w + layout::unit_offset(T::BITS, geo, u, pn) + off, policy);
      } else {
        st_shared_v4(dst, layout::edge_chunk<T::BITS>(p.w, p.n, p.k, u, pn, off));
      }
    }
  }
}

template <class T>
__global__ void __launch_bounds__(T::kThreads) gemm_mma_kernel(const GemmArgs p) {
  extern __shared__ __align__(128) uint8_t smem[];
  __shared__ int s_is_last;

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int warp_m = warp / T::WN;
  const int warp_n = warp % T::WN;
  const int m0 = blockIdx.y * T::kBM;
  const int n0 = blockIdx.x * T::kBN;
  const layout::Geometry geo = layout::geometry(T::BITS, p.n, p.k);

  // This split's k-tiles: a balanced partition, every split non-empty when splits <= k-tiles.
  const int kt_total = ceil_div(p.k, T::kBK);
  const int kt_begin = int(int64_t(kt_total) * blockIdx.z / gridDim.z);
  const int kt_end = int(int64_t(kt_total) * (blockIdx.z + 1) / gridDim.z);
  const int nkt = kt_end - kt_begin;

  const bool a_vec = (p.lda % 16 == 0) && (reinterpret_cast<uintptr_t>(p.a) % 16 == 0);
  const uint64_t policy = l2_evict_first_policy();

  int32_t acc[T::MF][T::kNB][4];
#pragma unroll
  for (int i = 0; i < T::MF; ++i)
#pragma unroll
    for (int j = 0; j < T::kNB; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = 0;

  auto stage_a = [&](int s) { return smem + s * T::kStageBytes; };
  auto stage_b = [&](int s) { return smem + s * T::kStageBytes + T::kAStageBytes; };

#pragma unroll
  for (int s = 0; s < T::STAGES - 1; ++s) {
    if (s < nkt) load_stage<T>(p, geo, stage_a(s), stage_b(s), m0, n0, kt_begin + s, a_vec, policy);
    cp_async_commit();
  }

  // ldmatrix row addresses of this lane. A: matrix i = lane/8 is (rows +8*(i&1), k half i>>1) of the
  // 16x32 fragment, so registers come out as a0..a3 of mma.m16n8k32. B: matrix i is plane i of the unit.
  const int a_row = warp_m * T::MF * 16 + (lane & 7) + 8 * ((lane >> 3) & 1);
  const int a_col = 16 * (lane >> 4);
  const int b_plane_off = (lane >> 3) * layout::kPlaneBytes + (lane & 7) * 16;

  for (int it = 0; it < nkt; ++it) {
    cp_async_wait<T::STAGES - 2>();
    __syncthreads();  // stage it is complete for all threads; stage it-1 is free for the next load
    {
      const int next = it + T::STAGES - 1;
      if (next < nkt) {
        const int s = next % T::STAGES;
        load_stage<T>(p, geo, stage_a(s), stage_b(s), m0, n0, kt_begin + next, a_vec, policy);
      }
      cp_async_commit();
    }
    const uint8_t* sA = stage_a(it % T::STAGES);
    const uint8_t* sB = stage_b(it % T::STAGES);
#pragma unroll
    for (int ku = 0; ku < T::BKU; ++ku) {
      uint32_t af[T::MF][4];
#pragma unroll
      for (int mf = 0; mf < T::MF; ++mf)
        ldmatrix_x4(af[mf], sA + (a_row + 16 * mf) * T::kAStride + 32 * ku + a_col);
      uint32_t bf[T::NPW][4];
#pragma unroll
      for (int np = 0; np < T::NPW; ++np) {
        const uint8_t* unit = sB + (ku * T::kPanels + warp_n * T::NPW + np) * T::kUnitBytes;
        if (T::BITS == 8) {
          ldmatrix_x4(bf[np], unit + b_plane_off);
        } else {
          const uint32_t q0 = ld_shared_u32(unit + 4 * lane);
          const uint32_t q1 = ld_shared_u32(unit + layout::kPlaneBytes + 4 * lane);
          const uint32_t q2 = ld_shared_u32(unit + 2 * layout::kPlaneBytes + 4 * lane);
          expand6(q0, q1, q2, bf[np]);
        }
      }
#pragma unroll
      for (int mf = 0; mf < T::MF; ++mf)
#pragma unroll
        for (int np = 0; np < T::NPW; ++np)
#pragma unroll
          for (int h = 0; h < 2; ++h) mma_s8_16832(acc[mf][2 * np + h], af[mf], bf[np][2 * h], bf[np][2 * h + 1]);
    }
  }
  cp_async_wait<0>();

  // Accumulator element (mf, nb, r) of this thread sits at tile row/column:
  const int g = lane >> 2;
  const int t = lane & 3;
  auto row_of = [&](int mf, int r) { return warp_m * T::MF * 16 + 16 * mf + g + 8 * (r >> 1); };
  auto col_of = [&](int nb, int r) { return (warp_n * T::kNB + nb) * 8 + 2 * t + (r & 1); };

  if (p.splits > 1) {
    const int tile = blockIdx.y * gridDim.x + blockIdx.x;
    const int64_t tile_elems = int64_t(T::kBM) * T::kBN;
    int32_t* mine = p.partials + (int64_t(tile) * p.splits + blockIdx.z) * tile_elems;
#pragma unroll
    for (int mf = 0; mf < T::MF; ++mf)
#pragma unroll
      for (int nb = 0; nb < T::kNB; ++nb)
#pragma unroll
        for (int r = 0; r < 4; ++r)
          if (m0 + row_of(mf, r) < p.m) mine[row_of(mf, r) * T::kBN + col_of(nb, r)] = acc[mf][nb][r];
    __threadfence();  // publish the partial tile before counting this split in
    __syncthreads();
    if (tid == 0) {
      const int arrived = atomicAdd(p.counters + tile, 1);
      s_is_last = arrived == p.splits - 1;
      __threadfence();
    }
    __syncthreads();
    if (!s_is_last) return;
    // The last split sums the others' partials (from L2: .cg loads never see a stale L1 line), in a fixed
    // order, and leaves the counter at zero for the next launch.
    for (int z = 0; z < p.splits; ++z) {
      if (z == int(blockIdx.z)) continue;
      const int32_t* other = p.partials + (int64_t(tile) * p.splits + z) * tile_elems;
#pragma unroll
      for (int mf = 0; mf < T::MF; ++mf)
#pragma unroll
        for (int nb = 0; nb < T::kNB; ++nb)
#pragma unroll
          for (int r = 0; r < 4; ++r)
            if (m0 + row_of(mf, r) < p.m) acc[mf][nb][r] += __ldcg(other + row_of(mf, r) * T::kBN + col_of(nb, r));
    }
    if (tid == 0) p.counters[tile] = 0;
  }

  // Two adjacent outputs go as one vector store when their address is aligned for it (n is even).
  const int out_bytes = (p.out_kind == kOutBF16 || p.out_kind == kOutFP16) ? 2 : 4;
  const bool pair_ok = (p.ldo % 2) == 0 && reinterpret_cast<uintptr_t>(p.out) % (2 * out_bytes) == 0;
#pragma unroll
  for (int mf = 0; mf < T::MF; ++mf)
#pragma unroll
    for (int nb = 0; nb < T::kNB; ++nb)
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        int32_t v0 = acc[mf][nb][2 * hr];
        int32_t v1 = acc[mf][nb][2 * hr + 1];
        if (T::BITS == 6) {  // the 6-bit weights were 4*w: exact, the accumulator is a multiple of 4
          v0 >>= 2;
          v1 >>= 2;
        }
        store_pair(p, m0 + row_of(mf, 2 * hr), n0 + col_of(nb, 2 * hr), v0, v1, pair_ok);
      }
}

// ---- configurations ------------------------------------------------------------------------------
//                                 MF WM WN NPW BKU STAGES
template <int B> using Decode16 = MmaTraits<B, 1, 1, 4, 1, 4, 4>;
template <int B> using Decode32 = MmaTraits<B, 2, 1, 4, 1, 4, 4>;
template <int B> using Decode64 = MmaTraits<B, 4, 1, 4, 1, 4, 4>;
template <int B> using Tile64 = MmaTraits<B, 2, 2, 4, 2, 2, 4>;
template <int B> using Tile128 = MmaTraits<B, 4, 2, 4, 2, 2, 4>;
template <int B> using Decode16K256 = MmaTraits<B, 1, 1, 4, 1, 8, 4>;
template <int B> using Decode16Deep = MmaTraits<B, 1, 1, 4, 1, 4, 8>;
template <int B> using Decode32N128 = MmaTraits<B, 2, 1, 4, 2, 4, 4>;
template <int B> using Decode64N128 = MmaTraits<B, 4, 1, 4, 2, 4, 4>;

template <class T>
TileShape shape_of() {
  return TileShape{T::kBM, T::kBN, T::kBK, T::kThreads, T::kSmemBytes};
}

template <class T>
cudaError_t launch(const GemmArgs& args, cudaStream_t stream) {
  auto kernel = gemm_mma_kernel<T>;
  // Above 48 KB of dynamic shared memory a kernel must opt in (cheap; legal during graph capture).
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, T::kSmemBytes);
  if (err != cudaSuccess) return err;
  const dim3 grid(ceil_div(args.n, T::kBN), ceil_div(args.m, T::kBM), args.splits);
  kernel<<<grid, T::kThreads, T::kSmemBytes, stream>>>(args);
  return cudaGetLastError();
}

template <int B, class F>
auto with_config(int config, F&& f) {
  switch (config) {
    case kMmaDecode16: return f(Decode16<B>{});
    case kMmaDecode32: return f(Decode32<B>{});
    case kMmaDecode64: return f(Decode64<B>{});
    case kMmaTile64: return f(Tile64<B>{});
    case kMmaDecode16K256: return f(Decode16K256<B>{});
    case kMmaDecode16Deep: return f(Decode16Deep<B>{});
    case kMmaDecode32N128: return f(Decode32N128<B>{});
    case kMmaDecode64N128: return f(Decode64N128<B>{});
    default: return f(Tile128<B>{});
  }
}

}  // namespace

TileShape mma_tile_shape(int config, int w_bits) {
  if (config < 0 || config >= kMmaNumConfigs || (w_bits != 6 && w_bits != 8)) return TileShape{0, 0, 0, 0, 0};
  auto f = [](auto traits) { return shape_of<decltype(traits)>(); };
  return w_bits == 8 ? with_config<8>(config, f) : with_config<6>(config, f);
}

cudaError_t launch_gemm_mma(const GemmArgs& args, int config, cudaStream_t stream) {
  if (config < 0 || config >= kMmaNumConfigs || (args.w_bits != 6 && args.w_bits != 8)) return cudaErrorInvalidValue;
  auto f = [&](auto traits) { return launch<decltype(traits)>(args, stream); };
  return args.w_bits == 8 ? with_config<8>(config, f) : with_config<6>(config, f);
}

}  // namespace hdrq
