// Torch binding of the hdrq CUDA kernels, built as hdrq._C. All torch code lives here; the kernels
// (csrc/*.cu) see only plain pointers and sizes (gemm.h). The schemas are defined once, with every other hdrq
// op, in hdrq/ops.py; this file registers their implementations under the same namespace:
//
//   hdrq::int_gemm(out!, a_q, a_scale, w, w_scale, bias?, counters!, partials!, w_bits, path, config,
//                  splits) -> ()                                                                     [CUDA]
//       out = epilogue(a_q @ w^T) written into `out` (bf16 / fp16 / fp32, or int32: the accumulator).
//       Launches on the current stream; no host sync; allocates nothing (the caller owns `out` and the
//       split-K workspace `counters` (zero on entry, left zero) and `partials`).
//       path 0: the mma.sync kernels (config = MmaConfig, gemm.h); path 1: the Hopper wgmma kernel (config =
//       WgmmaConfig: 0 cooperative, 1 ping-pong, 2 cooperative 128x256, 3 decode 64x128 with split-K,
//       4 128x256 in 2-CTA clusters).
//   hdrq::gemm_info(path, config, w_bits) -> int[]  [bm, bn, bk, threads, smem_bytes, split-K counters]
//                                                                            [CompositeExplicitAutograd]
//   hdrq::expand_w6(w8!, w6, n, k) -> ()                                                             [CUDA]
//       w8 = pack_weight(q, 8) from w6 = pack_weight(q, 6) (N % 16 == 0, K % 32 == 0), on the current stream.
//
// hdrq/_cuda.py plans the calls (tiles, split-K, workspace) and routes hdrq::int_matmul to them.
#include <torch/extension.h>
#include <torch/library.h>

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "gemm.h"

namespace {

enum GemmPath : int64_t { kPathMma = 0, kPathWgmma = 1 };

hdrq::TileShape tile_shape(int64_t path, int64_t config, int64_t w_bits) {
  TORCH_CHECK(path == kPathMma || path == kPathWgmma, "hdrq: unknown GEMM path ", path);
  if (path == kPathWgmma) return hdrq::wgmma_tile_shape(static_cast<int>(config), static_cast<int>(w_bits));
  return hdrq::mma_tile_shape(static_cast<int>(config), static_cast<int>(w_bits));
}

std::vector<int64_t> gemm_info(int64_t path, int64_t config, int64_t w_bits) {
  const hdrq::TileShape s = tile_shape(path, config, w_bits);
  TORCH_CHECK(s.bm > 0, "hdrq: unknown GEMM config ", config, " for w_bits = ", w_bits);
  return {s.bm, s.bn, s.bk, s.threads, s.smem_bytes, hdrq::kSplitKCounters};
}

void check_cuda(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK(t.is_cuda() && t.device() == device, "hdrq::int_gemm: ", name, " must be on ", device,
              ", got ", t.device());
}

void int_gemm(const at::Tensor& out, const at::Tensor& a_q, const at::Tensor& a_scale, const at::Tensor& w,
              const at::Tensor& w_scale, const std::optional<at::Tensor>& bias, const at::Tensor& counters,
              const at::Tensor& partials, int64_t w_bits, int64_t path, int64_t config, int64_t splits) {
  const at::Device device = a_q.device();
  for (auto [t, name] : {std::pair{&out, "out"}, {&a_scale, "a_scale"}, {&w, "w"}, {&w_scale, "w_scale"},
                         {&counters, "counters"}, {&partials, "partials"}})
    check_cuda(*t, name, device);
  TORCH_CHECK(w_bits == 6 || w_bits == 8, "hdrq::int_gemm: w_bits must be 6 or 8, got ", w_bits);
  TORCH_CHECK(a_q.scalar_type() == at::kChar && a_q.dim() == 2 && a_q.stride(1) == 1,
              "hdrq::int_gemm: a_q must be int8 [M, K] with unit stride along K, got ", a_q.scalar_type(),
              " of shape ", a_q.sizes(), " and strides ", a_q.strides());
  const int64_t m = a_q.size(0), k = a_q.size(1);
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.dim() == 1 && w_scale.is_contiguous(),
              "hdrq::int_gemm: w_scale must be a contiguous float32 [N], got ", w_scale.scalar_type(),
              " of shape ", w_scale.sizes());
  const int64_t n = w_scale.size(0);
  TORCH_CHECK(m > 0 && n > 0 && k > 0 && m < INT32_MAX && n < INT32_MAX && k < INT32_MAX,
              "hdrq::int_gemm: M, N, K must be in [1, 2^31), got ", m, ", ", n, ", ", k);
  TORCH_CHECK(w_bits == 8 || k % 4 == 0, "hdrq::int_gemm: 6-bit weights need K % 4 == 0, got K = ", k);
  const int64_t w_bytes = w_bits == 8 ? n * k : n * (3 * k / 4);
  TORCH_CHECK(w.is_contiguous() && w.element_size() == 1 && w.numel() == w_bytes &&
                  reinterpret_cast<uintptr_t>(w.data_ptr()) % 16 == 0,
              "hdrq::int_gemm: w must be the contiguous, 16-byte aligned pack_weight layout of ", w_bytes,
              " bytes, got ", w.scalar_type(), " of shape ", w.sizes());
  TORCH_CHECK(a_scale.scalar_type() == at::kFloat && a_scale.dim() == 1 && a_scale.is_contiguous() &&
                  (a_scale.size(0) == m || a_scale.size(0) == 1),
              "hdrq::int_gemm: a_scale must be a contiguous float32 [M] or [1], got ", a_scale.scalar_type(),
              " of shape ", a_scale.sizes());
  int bias_kind = hdrq::kBiasNone;
  const void* bias_ptr = nullptr;
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    check_cuda(b, "bias", device);
    TORCH_CHECK(b.dim() == 1 && b.size(0) == n && b.is_contiguous(),
                "hdrq::int_gemm: bias must be a contiguous [N] = [", n, "], got shape ", b.sizes());
    switch (b.scalar_type()) {
      case at::kBFloat16: bias_kind = hdrq::kBiasBF16; break;
      case at::kHalf: bias_kind = hdrq::kBiasFP16; break;
      case at::kFloat: bias_kind = hdrq::kBiasFP32; break;
      default: TORCH_CHECK(false, "hdrq::int_gemm: bias must be bf16, fp16 or fp32, got ", b.scalar_type());
    }
    bias_ptr = b.data_ptr();
  }
  int out_kind;
  switch (out.scalar_type()) {
    case at::kBFloat16: out_kind = hdrq::kOutBF16; break;
    case at::kHalf: out_kind = hdrq::kOutFP16; break;
    case at::kFloat: out_kind = hdrq::kOutFP32; break;
    case at::kInt: out_kind = hdrq::kOutInt32; break;
    default: TORCH_CHECK(false, "hdrq::int_gemm: out must be bf16, fp16, fp32 or int32, got ", out.scalar_type());
  }
  TORCH_CHECK(out.dim() == 2 && out.size(0) == m && out.size(1) == n && out.stride(1) == 1,
              "hdrq::int_gemm: out must be [M, N] = [", m, ", ", n, "] with unit stride along N, got shape ",
              out.sizes(), " and strides ", out.strides());

  const hdrq::TileShape shape = tile_shape(path, config, w_bits);
  TORCH_CHECK(shape.bm > 0, "hdrq::int_gemm: config ", config, " of path ", path, " does not exist or does not take ",
              w_bits, "-bit weights (the wgmma cluster configuration, 4, takes 8-bit weights only)");
  const int64_t m_tiles = (m + shape.bm - 1) / shape.bm;
  const int64_t n_tiles = (n + shape.bn - 1) / shape.bn;
  const int64_t k_tiles = (k + shape.bk - 1) / shape.bk;
  TORCH_CHECK(m_tiles <= 65535 && splits >= 1 && splits <= 65535 && splits <= k_tiles,
              "hdrq::int_gemm: grid out of range: ", m_tiles, " M tiles, ", splits, " splits, ", k_tiles,
              " K tiles");
  if (splits > 1) {
    TORCH_CHECK(counters.scalar_type() == at::kInt && counters.is_contiguous() &&
                    counters.numel() >= m_tiles * n_tiles && partials.scalar_type() == at::kInt &&
                    partials.is_contiguous() && partials.numel() >= m_tiles * n_tiles * splits * shape.bm * shape.bn &&
                    reinterpret_cast<uintptr_t>(partials.data_ptr()) % 8 == 0,  // (the wgmma kernel's int2 accesses)
                "hdrq::int_gemm: split-K workspace too small (or partials not 8-byte aligned) for ", m_tiles * n_tiles,
                " tiles x ", splits,
                " splits: counters ", counters.numel(), ", partials ", partials.numel());
  }

  hdrq::GemmArgs args{};
  args.a = a_q.data_ptr<int8_t>();
  args.lda = a_q.stride(0);
  args.a_scale = a_scale.data_ptr<float>();
  args.a_scale_per_token = a_scale.size(0) == m && m != 1 ? 1 : 0;
  args.w = static_cast<const uint8_t*>(w.data_ptr());
  args.w_scale = w_scale.data_ptr<float>();
  args.bias = bias_ptr;
  args.bias_kind = bias_kind;
  args.out = out.data_ptr();
  args.ldo = out.stride(0);
  args.out_kind = out_kind;
  args.m = static_cast<int>(m);
  args.n = static_cast<int>(n);
  args.k = static_cast<int>(k);
  args.w_bits = static_cast<int>(w_bits);
  args.splits = static_cast<int>(splits);
  args.partials = splits > 1 ? partials.data_ptr<int32_t>() : nullptr;
  args.partials_elems = partials.numel();
  args.counters = splits > 1 ? counters.data_ptr<int32_t>() : nullptr;
  args.counters_elems = counters.numel();

  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (path == kPathWgmma)
    TORCH_CHECK(hdrq::wgmma_supports(args, static_cast<int>(config)),
                "hdrq::int_gemm: the wgmma path needs N % 16 == 0, K % 32 == 0, 16-byte aligned A rows and ",
                "splits == 1 except in the decode configuration (3); got N=", n, ", K=", k, ", lda=", args.lda, ", config=", config,
                ", splits=", splits);
  const cudaError_t err = path == kPathWgmma ? hdrq::launch_gemm_wgmma(args, static_cast<int>(config), stream)
                                             : hdrq::launch_gemm_mma(args, static_cast<int>(config), stream);
  TORCH_CHECK(err == cudaSuccess, "hdrq::int_gemm: launch failed (M=", m, ", N=", n, ", K=", k,
              ", w_bits=", w_bits, ", path=", path, ", config=", config, ", splits=", splits, "): ",
              cudaGetErrorString(err));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void expand_w6(const at::Tensor& w8, const at::Tensor& w6, int64_t n, int64_t k) {
  TORCH_CHECK(n > 0 && k > 0 && n < INT32_MAX && k < INT32_MAX && hdrq::expand_w6_supports(int(n), int(k)),
              "hdrq::expand_w6: needs N % 16 == 0 and K % 32 == 0, got N=", n, ", K=", k);
  const at::Device device = w6.device();
  TORCH_CHECK(w6.is_cuda(), "hdrq::expand_w6: w6 must be a CUDA tensor, got ", w6.device());
  check_cuda(w8, "w8", device);
  for (auto [t, name, bytes] : {std::tuple{&w6, "w6", n * (3 * k / 4)}, {&w8, "w8", n * k}})
    TORCH_CHECK(t->is_contiguous() && t->element_size() == 1 && t->numel() >= bytes &&
                    reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0,
                "hdrq::expand_w6: ", name, " must be a contiguous, 16-byte aligned byte tensor of at least ", bytes,
                " bytes, got ", t->scalar_type(), " of shape ", t->sizes());
  TORCH_CHECK(w6.numel() == n * (3 * k / 4), "hdrq::expand_w6: w6 holds ", w6.numel(), " bytes, pack_weight(q, 6) of ",
              n, " x ", k, " has ", n * (3 * k / 4));
  const c10::cuda::CUDAGuard guard(device);
  const cudaError_t err = hdrq::launch_expand_w6(static_cast<const uint8_t*>(w6.data_ptr()),
                                                 static_cast<uint8_t*>(w8.data_ptr()), int(n), int(k),
                                                 c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "hdrq::expand_w6: launch failed: ", cudaGetErrorString(err));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(hdrq, CUDA, m) {
  m.impl("int_gemm", &int_gemm);
  m.impl("expand_w6", &expand_w6);
}

// No tensor arguments: the dispatcher takes this kernel for any call.
TORCH_LIBRARY_IMPL(hdrq, CompositeExplicitAutograd, m) { m.impl("gemm_info", &gemm_info); }

// `import hdrq._C` loads this library, which runs the registrations above.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) { (void)module; }
