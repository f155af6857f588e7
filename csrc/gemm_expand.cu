// 6-bit -> 8-bit weight expansion (sm_80 and up): pack_weight(q, 6) -> pack_weight(q, 8), for the W6A6 path
// that runs the 8-bit wgmma kernel at large M (where expanding 6-bit weights inside the wgmma producer is
// producer-bound; see hdrq/_cuda.py GemmDispatch.w6_expand_min_m). One pass over the weights: 0.75 bytes
// read and 1 byte written per weight, coalesced 16-byte accesses.
//
// Only region 1 of the layout (whole 16 x 32 units) exists when N % 16 == 0 and K % 32 == 0, which the
// wgmma path requires; the host checks it. A unit is 3 packed planes of 128 bytes (6-bit) and 4 planes of
// 128 bytes (8-bit), units in the same order, so thread i converts 16-byte quad (i % 8) of unit (i / 8).
#include <cstdint>

#include <cuda_runtime.h>

#include "gemm.h"
#include "gemm_device.cuh"

namespace hdrq {
namespace {

// Per byte: arithmetic shift right by 2 of an int8 that is a multiple of 4 (expand6's 4 * w -> w).
__device__ __forceinline__ uint32_t sar2x4(uint32_t r) {
  const uint32_t s = r & 0x80808080u;
  return ((r >> 2) & 0x3F3F3F3Fu) | s | (s >> 1);
}

__global__ void __launch_bounds__(256) expand_w6_kernel(const uint8_t* __restrict__ w6, uint8_t* __restrict__ w8,
                                                        int64_t quads) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < quads; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t unit = i / 8, quad = i % 8;
    const uint8_t* src = w6 + unit * layout::unit_bytes(6) + quad * 16;
    uint8_t* dst = w8 + unit * layout::unit_bytes(8) + quad * 16;
    const uint4 q0 = __ldg(reinterpret_cast<const uint4*>(src));
    const uint4 q1 = __ldg(reinterpret_cast<const uint4*>(src + layout::kPlaneBytes));
    const uint4 q2 = __ldg(reinterpret_cast<const uint4*>(src + 2 * layout::kPlaneBytes));
    uint32_t rx[4], ry[4], rz[4], rw[4];
    expand6(q0.x, q1.x, q2.x, rx);
    expand6(q0.y, q1.y, q2.y, ry);
    expand6(q0.z, q1.z, q2.z, rz);
    expand6(q0.w, q1.w, q2.w, rw);
#pragma unroll
    for (int c = 0; c < 4; ++c)
      *reinterpret_cast<uint4*>(dst + c * layout::kPlaneBytes) =
          make_uint4(sar2x4(rx[c]), sar2x4(ry[c]), sar2x4(rz[c]), sar2x4(rw[c]));
  }
}

}  // namespace

bool expand_w6_supports(int n, int k) { return n > 0 && k > 0 && n % layout::kPanelRows == 0 && k % layout::kUnitK == 0; }

cudaError_t launch_expand_w6(const uint8_t* w6, uint8_t* w8, int n, int k, cudaStream_t stream) {
  if (!expand_w6_supports(n, k)) return cudaErrorInvalidValue;
  const int64_t quads = int64_t(n / layout::kPanelRows) * (k / layout::kUnitK) * 8;
  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  const int64_t want = (quads + 255) / 256;
  const int blocks = int(want < int64_t(sms) * 8 ? want : int64_t(sms) * 8);  // grid-stride beyond 8 per SM
  expand_w6_kernel<<<blocks, 256, 0, stream>>>(w6, w8, quads);
  return cudaGetLastError();
}

}  // namespace hdrq
