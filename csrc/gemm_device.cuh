// Device helpers shared by the hdrq GEMM kernels: the weight layout (mirror of hdrq/reference.py
// pack_weight), PTX wrappers (cp.async, ldmatrix, mma), the 6-bit expansion and the epilogue.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "gemm.h"

namespace hdrq {

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

// =================================================================================================
// Weight layout (hdrq.reference.pack_weight). Change one, change both; tests/test_weight_layout.py
// emulates the kernels' use of it on CPU.
//
// Region 1, *units*: for u < KUf = K/32, for panel p < NPf = N/16, the unit (rows 16p..16p+15,
// columns 32u..32u+31), units of one u contiguous. A unit is 128-byte planes: plane c = 2h + j is the
// 8 x 16-byte core matrix of rows 16p + 8h + g, columns 32u + 16j + [0, 16), row g at byte 16g. Lane
// l = 4g + t of a warp finds its mma.m16n8k32 B-fragment register for (n8 block h, k half j) at byte 4l
// of plane 2h + j. 8-bit: 4 planes (512 bytes). 6-bit: 3 planes P0..P2 (384 bytes), from the 6-bit codes
// x_c of the 4 int8 planes: P_q = (x_q << 2) | ((x_3 >> (4 - 2q)) & 3) per byte.
// Region 2, the K tail of the full panels (columns 32*KUf..K-1), row-major canonical bytes.
// Region 3, the N tail (rows 16*NPf..N-1, all columns), row-major canonical bytes.
// Canonical bytes: raw int8 (8-bit), or pack_int6 (6-bit: v0 | v1 << 6 | v2 << 12 | v3 << 18 in 3 bytes).
// =================================================================================================
namespace layout {

constexpr int kPanelRows = 16;
constexpr int kUnitK = 32;
constexpr int kPlaneBytes = 128;

__host__ __device__ constexpr int unit_bytes(int bits) { return bits == 8 ? 4 * kPlaneBytes : 3 * kPlaneBytes; }
__host__ __device__ constexpr int64_t row_bytes(int bits, int64_t cols) { return bits == 8 ? cols : 3 * cols / 4; }

struct Geometry {
  int n, k;
  int full_panels;     // NPf
  int full_units;      // KUf
  int k_tail;          // K - 32 * KUf
  int64_t tail_start;  // byte offset of region 2
  int64_t rest_start;  // byte offset of region 3
};

__host__ __device__ inline Geometry geometry(int bits, int n, int k) {
  Geometry g;
  g.n = n;
  g.k = k;
  g.full_panels = n / kPanelRows;
  g.full_units = k / kUnitK;
  g.k_tail = k - kUnitK * g.full_units;
  g.tail_start = int64_t(g.full_panels) * g.full_units * unit_bytes(bits);
  g.rest_start = g.tail_start + int64_t(kPanelRows) * g.full_panels * row_bytes(bits, g.k_tail);
  return g;
}

// Byte offset of unit (u, p) in region 1 (u < KUf, p < NPf).
__host__ __device__ inline int64_t unit_offset(int bits, const Geometry& g, int u, int p) {
  return (int64_t(u) * g.full_panels + p) * unit_bytes(bits);
}

// Value of weight (row, col) from the canonical regions 2 and 3: for the units a kernel cannot copy
// whole (a partial panel or a partial unit). Zero outside [0, N) x [0, K), so edge tiles come out
// zero-padded. Precondition: (row, col) is not inside a full unit (row < 16*NPf implies col >= 32*KUf).
template <int BITS>
__device__ inline int edge_weight(const uint8_t* __restrict__ w, const Geometry& g, int row, int col) {
  if (row >= g.n || col >= g.k) return 0;
  const uint8_t* line;
  int c;
  if (row < kPanelRows * g.full_panels) {
    line = w + g.tail_start + int64_t(row) * row_bytes(BITS, g.k_tail);
    c = col - kUnitK * g.full_units;
  } else {
    line = w + g.rest_start + int64_t(row - kPanelRows * g.full_panels) * row_bytes(BITS, g.k);
    c = col;
  }
  if (BITS == 8) return int(int8_t(line[c]));
  const uint8_t* grp = line + 3 * (c >> 2);
  const uint32_t word = uint32_t(grp[0]) | (uint32_t(grp[1]) << 8) | (uint32_t(grp[2]) << 16);
  const int v = int((word >> (6 * (c & 3))) & 0x3Fu);
  return v >= 32 ? v - 64 : v;
}

// The 16 bytes at byte `off` (a multiple of 16) of unit (u, p) of the N x K weight w, built from
// edge_weight: what the copy of a full unit would have delivered had the matrix been zero-padded to whole
// units. Out of line, with scalar arguments only (a reference argument would put a copy of the caller's
// struct on the stack): edge units are rare, and inlining this would cost the pipeline registers.
template <int BITS>
__device__ __noinline__ uint4 edge_chunk(const uint8_t* __restrict__ w, int n, int k, int u, int p, int off) {
  const Geometry g = geometry(BITS, n, k);
  const int plane = off / kPlaneBytes;
  const int grow = (off % kPlaneBytes) / 16;  // row g of the core matrix; the chunk is its 16 columns
  uint32_t words[4];
  if (BITS == 8) {
    const int row = kPanelRows * p + 8 * (plane >> 1) + grow;
    const int col = kUnitK * u + 16 * (plane & 1);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      uint32_t v = 0;
#pragma unroll
      for (int b = 0; b < 4; ++b) v |= (uint32_t(edge_weight<8>(w, g, row, col + 4 * i + b)) & 0xFFu) << (8 * b);
      words[i] = v;
    }
  } else {
    // P_q mixes plane q (its 6 bits, shifted up by 2) with two bits of plane 3 (rows 8 + g, cols 16..31).
    const int row_q = kPanelRows * p + 8 * (plane >> 1) + grow;
    const int col_q = kUnitK * u + 16 * (plane & 1);
    const int row_3 = kPanelRows * p + 8 + grow;
    const int col_3 = kUnitK * u + 16;
    const int shift = 4 - 2 * plane;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      uint32_t v = 0;
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const uint32_t xq = uint32_t(edge_weight<6>(w, g, row_q, col_q + 4 * i + b)) & 0x3Fu;
        const uint32_t x3 = uint32_t(edge_weight<6>(w, g, row_3, col_3 + 4 * i + b)) & 0x3Fu;
        v |= ((xq << 2) | ((x3 >> shift) & 0x3u)) << (8 * b);
      }
      words[i] = v;
    }
  }
  return make_uint4(words[0], words[1], words[2], words[3]);
}

}  // namespace layout

// Four B-fragment registers (planes 0..3: b0, b1 of n8 block 0, then of block 1) from the three 6-bit
// planes: each byte becomes 4 * value, an int8. Masks and shifts only: no per-byte arithmetic.
__device__ __forceinline__ void expand6(uint32_t p0, uint32_t p1, uint32_t p2, uint32_t (&r)[4]) {
  r[0] = p0 & 0xFCFCFCFCu;
  r[1] = p1 & 0xFCFCFCFCu;
  r[2] = p2 & 0xFCFCFCFCu;
  r[3] = ((p0 & 0x03030303u) << 6) | ((p1 & 0x03030303u) << 4) | ((p2 & 0x03030303u) << 2);
}

// =================================================================================================
// PTX wrappers
// =================================================================================================

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy global -> shared, bypassing L1 (.cg); bytes past src_bytes (0..16) are zero-filled,
// so rows past M and columns past K arrive as zeros without being read.
__device__ __forceinline__ void cp_async16_zfill(void* smem, const void* gmem, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
               "r"(src_bytes));
}

// 16-byte async copy with an L2 cache policy (weights are streamed once: evict_first keeps the
// activations and the split-K partials in L2).
__device__ __forceinline__ void cp_async16_policy(void* smem, const void* gmem, uint64_t policy) {
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)),
               "l"(gmem), "l"(policy));
}

__device__ __forceinline__ uint64_t l2_evict_first_policy() {
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
  return policy;
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void st_shared_v4(void* smem, uint4 v) {
  asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(smem_addr(smem)), "r"(v.x), "r"(v.y),
               "r"(v.z), "r"(v.w));
}

__device__ __forceinline__ uint32_t ld_shared_u32(const void* smem) {
  uint32_t v;
  asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(v) : "r"(smem_addr(smem)));
  return v;
}

// Four 8x8 b16 matrices (8 rows of 16 bytes each): lanes 8i..8i+7 give the row addresses of matrix i;
// register i of lane l receives bytes [4(l%4), 4(l%4)+4) of row l/4 of matrix i.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem)));
}

// d += a (16x32, row) * b (32x8, col), s8 x s8 -> s32.
__device__ __forceinline__ void mma_s8_16832(int32_t (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// =================================================================================================
// Epilogue: two adjacent outputs (m, n), (m, n+1) of one thread.
// =================================================================================================

__device__ __forceinline__ float load_bias(const void* bias, int kind, int n) {
  switch (kind) {
    case kBiasBF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(bias)[n]);
    case kBiasFP16: return __half2float(static_cast<const __half*>(bias)[n]);
    default: return static_cast<const float*>(bias)[n];
  }
}

// Scales exactly as the reference: fp32(acc) * a_scale, then * w_scale, then + bias, each rounded
// (__fmul_rn / __fadd_rn stop nvcc from contracting into an FMA, which would round once less).
__device__ __forceinline__ float scale_one(const GemmArgs& p, int32_t acc, float sa, int n) {
  float v = __fmul_rn(__fmul_rn(__int2float_rn(acc), sa), p.w_scale[n]);
  if (p.bias_kind != kBiasNone) v = __fadd_rn(v, load_bias(p.bias, p.bias_kind, n));
  return v;
}

// The scale factors of output columns n and n + 1 (what scale_one reads), loaded once for several rows.
struct ColScales {
  float w0, w1, b0, b1;
};

__device__ __forceinline__ ColScales col_scales(const GemmArgs& p, int n) {
  ColScales c{0.f, 0.f, 0.f, 0.f};
  if (p.out_kind == kOutInt32 || n >= p.n) return c;
  c.w0 = p.w_scale[n];
  if (p.bias_kind != kBiasNone) c.b0 = load_bias(p.bias, p.bias_kind, n);
  if (n + 1 < p.n) {
    c.w1 = p.w_scale[n + 1];
    if (p.bias_kind != kBiasNone) c.b1 = load_bias(p.bias, p.bias_kind, n + 1);
  }
  return c;
}

// The activation scale of row m (0 for rows past M or int32 output, which do not use it).
__device__ __forceinline__ float row_scale(const GemmArgs& p, int m) {
  return (p.out_kind == kOutInt32 || m >= p.m) ? 0.f : p.a_scale[p.a_scale_per_token ? m : 0];
}

// scale_one with the factors already loaded: the same operations in the same order.
__device__ __forceinline__ float scale_with(const GemmArgs& p, int32_t acc, float sa, float ws, float b) {
  float v = __fmul_rn(__fmul_rn(__int2float_rn(acc), sa), ws);
  if (p.bias_kind != kBiasNone) v = __fadd_rn(v, b);
  return v;
}

// Stores two adjacent outputs whose fp32 values (or, for int32 output, accumulators) are computed.
__device__ __forceinline__ void store_pair_values(const GemmArgs& p, int m, int n, int32_t v0, int32_t v1, float f0,
                                                  float f1, bool pair_ok) {
  const bool two = n + 1 < p.n;
  const int64_t idx = int64_t(m) * p.ldo + n;
  if (p.out_kind == kOutInt32) {
    int32_t* o = static_cast<int32_t*>(p.out) + idx;
    if (two && pair_ok) {
      *reinterpret_cast<int2*>(o) = make_int2(v0, v1);
    } else {
      o[0] = v0;
      if (two) o[1] = v1;
    }
    return;
  }
  if (p.out_kind == kOutBF16) {
    __nv_bfloat16* o = static_cast<__nv_bfloat16*>(p.out) + idx;
    if (two && pair_ok) {
      *reinterpret_cast<__nv_bfloat162*>(o) = __halves2bfloat162(__float2bfloat16_rn(f0), __float2bfloat16_rn(f1));
    } else {
      o[0] = __float2bfloat16_rn(f0);
      if (two) o[1] = __float2bfloat16_rn(f1);
    }
  } else if (p.out_kind == kOutFP16) {
    __half* o = static_cast<__half*>(p.out) + idx;
    if (two && pair_ok) {
      *reinterpret_cast<__half2*>(o) = __halves2half2(__float2half_rn(f0), __float2half_rn(f1));
    } else {
      o[0] = __float2half_rn(f0);
      if (two) o[1] = __float2half_rn(f1);
    }
  } else {
    float* o = static_cast<float*>(p.out) + idx;
    if (two && pair_ok) {
      *reinterpret_cast<float2*>(o) = make_float2(f0, f1);
    } else {
      o[0] = f0;
      if (two) o[1] = f1;
    }
  }
}

// `pair_ok`: ldo is even and out is aligned, so (m, n) with n even takes a 2-element vector store.
__device__ __forceinline__ void store_pair(const GemmArgs& p, int m, int n, int32_t v0, int32_t v1, bool pair_ok) {
  if (m >= p.m || n >= p.n) return;
  if (p.out_kind == kOutInt32) return store_pair_values(p, m, n, v0, v1, 0.f, 0.f, pair_ok);
  const bool two = n + 1 < p.n;
  const float sa = p.a_scale[p.a_scale_per_token ? m : 0];
  const float f0 = scale_one(p, v0, sa, n);
  const float f1 = two ? scale_one(p, v1, sa, n + 1) : 0.f;
  store_pair_values(p, m, n, v0, v1, f0, f1, pair_ok);
}

// store_pair with the row's activation scale and the columns' factors loaded by the caller (row_scale,
// col_scales), so an epilogue loads each once per tile instead of once per output pair. Same results.
__device__ __forceinline__ void store_pair_scaled(const GemmArgs& p, int m, int n, int32_t v0, int32_t v1, float sa,
                                                  const ColScales& c, bool pair_ok) {
  if (m >= p.m || n >= p.n) return;
  if (p.out_kind == kOutInt32) return store_pair_values(p, m, n, v0, v1, 0.f, 0.f, pair_ok);
  const float f0 = scale_with(p, v0, sa, c.w0, c.b0);
  const float f1 = n + 1 < p.n ? scale_with(p, v1, sa, c.w1, c.b1) : 0.f;
  store_pair_values(p, m, n, v0, v1, f0, f1, pair_ok);
}

}  // namespace hdrq
