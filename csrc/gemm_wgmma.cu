// W8A8 / W6A6 GEMM on Hopper (sm_90a): warpgroup wgmma (s8 x s8 -> s32) fed by TMA, a warp-specialised
// producer/consumer pipeline and a persistent grid. Same result as gemm_mma.cu (gemm.h).
//
// Block: a producer warpgroup and one or two consumer warpgroups; K step 128; 3-4 shared-memory stages; a
// persistent grid walking work items blockIdx.x, +gridDim.x, ... (M fastest, so the CTAs of one wave share
// weight tiles in L2). Configurations (WgmmaConfig, gemm.h; WgTraits below):
//  * 0 cooperative: 128 x 128 tiles; both consumers work on every tile, rows 0-63 and 64-127 (4
//    wgmma.m64n128k32 per stage each, 64 accumulator registers), and both run the epilogue while the tensor
//    cores idle;
//  * 1 ping-pong: the consumers take alternate 128 x 128 tiles (8 wgmma per stage, 128 accumulator
//    registers), and an order barrier lets one issue its mainloop while the other runs its epilogue;
//  * 2 cooperative 128 x 256 (m64n256k32, 128 accumulators): a third less L2 and shared-memory traffic;
//  * 3 decode: 64 x 128 tiles, one consumer, two CTAs per SM, split-K over (tile, split) work items;
//  * 4 cluster: 128 x 256 tiles in clusters of two CTAs on M-tiles 2i, 2i+1; each CTA bulk-copies half of the
//    weight stage and multicasts it to both (8-bit weights only).
//  * warpgroup 0, producer. A (activations): one TMA 2D load per stage, BM rows x 128 bytes, 128-byte
//    swizzle (the canonical K-major layout wgmma reads; rows past M and columns past K arrive as zeros).
//    B (weights): the pack_weight units of one k-unit and consecutive panels are contiguous in global
//    memory and are exactly the wgmma canonical K-major *no-swizzle* layout (8 x 16-byte core matrices:
//    K-adjacent ones 128 bytes apart, N-adjacent 8-row groups 256 bytes apart), so 8-bit weights go by
//    4 bulk copies per stage, no reordering. 6-bit weights: the producer's 128 threads cp.async the packed
//    units (3 planes) into a staging ring two stages ahead, then expand them (expand6: masks and shifts,
//    4*w per byte) into the same 4-plane layout, fence the generic->async proxy and arrive.
//  * consumers: per stage wait `full`, issue the wgmma (A: 128B-swizzle descriptor advanced 32 bytes per
//    k32; B: no-swizzle descriptor LBO 128, SBO 256), keep one wgmma group in flight and release the
//    previous stage (`empty`; in a cluster, in both CTAs). Epilogue from registers (6-bit: acc >> 2),
//    overlapping the producer's loads of the next tile.
//    Ping-pong ordering: consumer c may start the mainloop of its tile only after the other consumer has
//    issued the whole mainloop of the previous tile (order_bar[c], one phase per tile). Besides keeping the
//    two mainloops from interleaving, this bounds how far a consumer runs ahead of the producer: every
//    `full` phase it waits for is at most one phase ahead of the barrier's current one, which the parity
//    wait needs. tests/wgmma_protocol.py simulates the whole protocol (every configuration, padding steps,
//    the cluster's multicast); tests/wgmma_emulator.py emulates the data movement and index math.
// Requirements (checked by the host; other shapes use gemm_mma.cu): N % 16 == 0, K % 32 == 0, A rows
// 16-byte aligned (TMA), so every B unit is whole and no edge path is needed.
#include <cstdint>

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include "gemm.h"
#include "gemm_device.cuh"

namespace hdrq {
// Not an anonymous namespace: these are used only in the sm_90a pass, and internal-linkage helpers would
// draw "declared but never referenced" warnings in the sm_80 pass.
namespace wgmma_detail {

constexpr int kBK = 128;
constexpr int kBKU = kBK / layout::kUnitK;                // 4 k-units per stage
constexpr int kLookahead = 2;                             // 6-bit: staging copies run this many stages ahead
constexpr int kSlots = kLookahead + 1;

// What depends on the configuration: the tile width and, through the shared-memory budget, the stages.
template <int BITS, int CONFIG>
struct WgTraits {
  static constexpr bool kDecode = CONFIG == kWgmmaDecode64;  // 64-row tiles, one consumer, split-K, 2 CTAs/SM
  static constexpr int kBM = kDecode ? 64 : 128;
  static constexpr int kConsumers = kDecode ? 1 : 2;
  static constexpr int kThreads = 128 * (1 + kConsumers);
  static constexpr int kMinBlocks = kDecode ? 2 : 1;
  static constexpr int kAStageBytes = kBM * kBK;  // 8 or 16 KB
  // Cluster of two CTAs on vertically adjacent tiles (M-tiles 2i, 2i+1 of one N-tile): each loads half of the
  // weight stage and multicasts it to both, halving the weight traffic from L2. 8-bit weights only.
  static constexpr bool kMulticast = CONFIG == kWgmmaCluster256;
  static constexpr int kClusterSize = kMulticast ? 2 : 1;
  static constexpr bool kWide = CONFIG == kWgmmaCooperative256 || kMulticast;
  static constexpr int kBN = kWide ? 256 : 128;
  static constexpr int kStages = (kWide || kDecode) && BITS == 6 ? 3 : 4;
  static constexpr int kPanels = kBN / layout::kPanelRows;                          // 8 or 16 per tile
  static constexpr int kBStageBytes = kBKU * kPanels * 4 * layout::kPlaneBytes;    // 16 or 32 KB (int8)
  static constexpr int kStagingBytes = kBKU * kPanels * 3 * layout::kPlaneBytes;   // packed 6-bit units
  static constexpr int kItems = kBKU * kPanels * 8;  // 16-byte quads per plane per stage (6-bit)
  static constexpr int kAcc = kBN / 2;               // accumulator registers of one m64nBNk32
  // Split-K: the decode configuration only (the 128-accumulator configurations would spill the reduction's
  // registers, and the cooperative kernel keeps the register allocation it was measured with).
  static constexpr bool kSplitK = kDecode;
  // Configurations whose consumers hold 128 accumulators reallocate registers (setmaxnreg).
  static constexpr bool kRealloc = CONFIG == kWgmmaPingPong || kWide;
  static constexpr int kSmemBytes = 1024 /* alignment slack: 128B-swizzled TMA tiles need 1024-byte aligned stages */ +
                                    kStages * (kAStageBytes + kBStageBytes) + (BITS == 6 ? kSlots * kStagingBytes : 0);
  static_assert(kItems % 128 == 0, "every producer thread expands the same number of quads");
  static_assert(kSmemBytes <= 227 * 1024, "shared memory per block");
  static_assert(kMinBlocks == 1 || kMinBlocks * (kSmemBytes + 1024) <= 228 * 1024, "blocks per SM");
};

// setmaxnreg split of the ping-pong schedule: 128 * producer + 256 * consumer <= 384 * 168 (the launch's
// registers per thread under __launch_bounds__(384, 1)). The 6-bit producer expands weights: more registers.
template <int BITS>
constexpr int kProducerRegs = BITS == 8 ? 40 : 72;
template <int BITS>
constexpr int kConsumerRegs = BITS == 8 ? 232 : 216;
constexpr int kLaunchRegs = 168;  // registers per thread of a 384-thread, 1-block-per-SM kernel (65536 / 384, floor 8)
static_assert(128 * kProducerRegs<8> + 256 * kConsumerRegs<8> <= 384 * kLaunchRegs, "register split (8-bit)");
static_assert(128 * kProducerRegs<6> + 256 * kConsumerRegs<6> <= 384 * kLaunchRegs, "register split (6-bit)");


// ---- PTX wrappers (sm_90a) ------------------------------------------------------------------------

__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}

__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}

__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes)
               : "memory");
}

// Wait until the phase of parity `parity` has completed. A watchdog, not a timeout: a pipeline that never
// completes (a bug) traps after ~2^26 polls (seconds; every legitimate wait here is microseconds), so a
// broken kernel fails with a launch error instead of hanging the process.
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done = 0;
  for (uint32_t polls = 0;; ++polls) {
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n"
        "}\n"
        : "=r"(done)
        : "r"(smem_addr(bar)), "r"(parity)
        : "memory");
    if (done) return;
    if (polls == (1u << 26)) __trap();
  }
}

__device__ __forceinline__ void tma_load_2d(void* dst, const CUtensorMap* map, uint64_t* bar, int x, int y) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], "
      "[%4];\n" ::"r"(smem_addr(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(x), "r"(y), "r"(smem_addr(bar))
      : "memory");
}

__device__ __forceinline__ void bulk_load(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
                   smem_addr(dst)),
               "l"(src), "r"(bytes), "r"(smem_addr(bar))
               : "memory");
}

// The same bulk copy, written at the same shared-memory offset of every CTA in cta_mask (of the cluster),
// each completing on its own mbarrier at bar's offset.
__device__ __forceinline__ void bulk_load_multicast(void* dst, const void* src, uint32_t bytes, uint64_t* bar,
                                                    uint16_t cta_mask) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster [%0], [%1], %2, [%3], "
      "%4;\n" ::"r"(smem_addr(dst)),
      "l"(src), "r"(bytes), "r"(smem_addr(bar)), "h"(cta_mask)
      : "memory");
}

__device__ __forceinline__ uint32_t cluster_ctarank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  return r;
}

// Arrive on the mbarrier at bar's offset in CTA `rank` of the cluster. Default semantics (release at CTA
// scope): the arrive only has to follow this warp's completed wgmma reads (wgmma.wait_group); .release.cluster
// would add two GPU-scope memory barriers per call.
__device__ __forceinline__ void mbar_arrive_cluster(uint64_t* bar, uint32_t rank) {
  asm volatile(
      "{\n"
      ".reg .b32 remote;\n"
      "mapa.shared::cluster.u32 remote, %0, %1;\n"
      "mbarrier.arrive.shared::cluster.b64 _, [remote];\n"
      "}\n" ::"r"(smem_addr(bar)),
      "r"(rank)
      : "memory");
}

// Every thread of both CTAs of the cluster (not .aligned: threads may reach it from different places).
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release;\nbarrier.cluster.wait.acquire;\n" ::: "memory");
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(smem)), "l"(gmem) : "memory");
}

__device__ __forceinline__ uint4 ld_shared_v4(const void* smem) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(smem_addr(smem))
               : "memory");
  return v;
}

// wgmma matrix descriptor: start address, leading / stride byte offsets (16-byte units), layout type
// (0: no swizzle, 1: 128-byte swizzle), base offset 0 (stages are 1024-byte aligned).
__device__ __forceinline__ uint64_t smem_desc(const void* p, uint32_t lbo, uint32_t sbo, uint32_t layout_type) {
  const uint32_t a = smem_addr(p);
  return uint64_t((a & 0x3FFFF) >> 4) | (uint64_t((lbo & 0x3FFFF) >> 4) << 16) |
         (uint64_t((sbo & 0x3FFFF) >> 4) << 32) | (uint64_t(layout_type) << 62);
}

// Keeps the compiler from moving accumulator accesses across the asynchronous wgmma.
template <int N>
__device__ __forceinline__ void fence_operands(int32_t (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(d[i])::"memory");
}

// Register reallocation between warpgroups (sm_90a): the producer gives registers back, the consumers
// take them (the ping-pong consumers hold 128 accumulators each). Every warp of a warpgroup executes it.
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}

__device__ __forceinline__ void wgmma_s8_m64n128k32(int32_t (&d)[64], uint64_t desc_a, uint64_t desc_b) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, "
      "%23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, "
      "%44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "%64, %65, p;\n"
      "}\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]),
        "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]),
        "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]),
        "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31]),
        "+r"(d[32]), "+r"(d[33]), "+r"(d[34]), "+r"(d[35]), "+r"(d[36]), "+r"(d[37]), "+r"(d[38]), "+r"(d[39]),
        "+r"(d[40]), "+r"(d[41]), "+r"(d[42]), "+r"(d[43]), "+r"(d[44]), "+r"(d[45]), "+r"(d[46]), "+r"(d[47]),
        "+r"(d[48]), "+r"(d[49]), "+r"(d[50]), "+r"(d[51]), "+r"(d[52]), "+r"(d[53]), "+r"(d[54]), "+r"(d[55]),
        "+r"(d[56]), "+r"(d[57]), "+r"(d[58]), "+r"(d[59]), "+r"(d[60]), "+r"(d[61]), "+r"(d[62]), "+r"(d[63])
      : "l"(desc_a), "l"(desc_b), "r"(1));
}

__device__ __forceinline__ void wgmma_s8_m64n256k32(int32_t (&d)[128], uint64_t desc_a, uint64_t desc_b) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %130, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k32.s32.s8.s8 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, "
      "%24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, "
      "%72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
      "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, "
      "%120, %121, %122, %123, %124, %125, %126, %127}, "
      "%128, %129, p;\n"
      "}\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]),
        "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]),
        "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]),
        "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31]),
        "+r"(d[32]), "+r"(d[33]), "+r"(d[34]), "+r"(d[35]), "+r"(d[36]), "+r"(d[37]), "+r"(d[38]), "+r"(d[39]),
        "+r"(d[40]), "+r"(d[41]), "+r"(d[42]), "+r"(d[43]), "+r"(d[44]), "+r"(d[45]), "+r"(d[46]), "+r"(d[47]),
        "+r"(d[48]), "+r"(d[49]), "+r"(d[50]), "+r"(d[51]), "+r"(d[52]), "+r"(d[53]), "+r"(d[54]), "+r"(d[55]),
        "+r"(d[56]), "+r"(d[57]), "+r"(d[58]), "+r"(d[59]), "+r"(d[60]), "+r"(d[61]), "+r"(d[62]), "+r"(d[63]),
        "+r"(d[64]), "+r"(d[65]), "+r"(d[66]), "+r"(d[67]), "+r"(d[68]), "+r"(d[69]), "+r"(d[70]), "+r"(d[71]),
        "+r"(d[72]), "+r"(d[73]), "+r"(d[74]), "+r"(d[75]), "+r"(d[76]), "+r"(d[77]), "+r"(d[78]), "+r"(d[79]),
        "+r"(d[80]), "+r"(d[81]), "+r"(d[82]), "+r"(d[83]), "+r"(d[84]), "+r"(d[85]), "+r"(d[86]), "+r"(d[87]),
        "+r"(d[88]), "+r"(d[89]), "+r"(d[90]), "+r"(d[91]), "+r"(d[92]), "+r"(d[93]), "+r"(d[94]), "+r"(d[95]),
        "+r"(d[96]), "+r"(d[97]), "+r"(d[98]), "+r"(d[99]), "+r"(d[100]), "+r"(d[101]), "+r"(d[102]), "+r"(d[103]),
        "+r"(d[104]), "+r"(d[105]), "+r"(d[106]), "+r"(d[107]), "+r"(d[108]), "+r"(d[109]), "+r"(d[110]), "+r"(d[111]),
        "+r"(d[112]), "+r"(d[113]), "+r"(d[114]), "+r"(d[115]), "+r"(d[116]), "+r"(d[117]), "+r"(d[118]), "+r"(d[119]),
        "+r"(d[120]), "+r"(d[121]), "+r"(d[122]), "+r"(d[123]), "+r"(d[124]), "+r"(d[125]), "+r"(d[126]), "+r"(d[127])
      : "l"(desc_a), "l"(desc_b), "r"(1));
}

// m64nNk32 for the tile widths used here.
template <int N>
__device__ __forceinline__ void wgmma_s8_m64nNk32(int32_t (&d)[N / 2], uint64_t desc_a, uint64_t desc_b) {
  if constexpr (N == 128)
    wgmma_s8_m64n128k32(d, desc_a, desc_b);
  else
    wgmma_s8_m64n256k32(d, desc_a, desc_b);
}

// ---- the kernel -------------------------------------------------------------------------------------

struct TileIndex {
  int m0, n0, kt;
  int tile, split;  // output tile index, K split of the work item
};

// Work items are (output tile, K split); every item has kt_per_item pipeline steps, so that steps map to items
// by a division. The last split's steps past K are padding: the producer loads nothing and arrives, the
// consumers wait for them and release them at once (keeping the barrier phases in step). The f-th step:
template <int kBM, int kBN>
__device__ inline TileIndex step_of(int f, int kt_per_item, int m_tiles, int num_tiles) {
  const int item = blockIdx.x + (f / kt_per_item) * gridDim.x;
  const int tile = item % num_tiles, split = item / num_tiles;
  return TileIndex{(tile % m_tiles) * kBM, (tile / m_tiles) * kBN, split * kt_per_item + f % kt_per_item, tile, split};
}

__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

}  // namespace wgmma_detail

namespace {
using namespace wgmma_detail;

template <int BITS, int CONFIG>
__global__ void __launch_bounds__(WgTraits<BITS, CONFIG>::kThreads, WgTraits<BITS, CONFIG>::kMinBlocks)
    gemm_wgmma_kernel(const GemmArgs p, const __grid_constant__ CUtensorMap tmap_a) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using T = WgTraits<BITS, CONFIG>;
  constexpr int kBM = T::kBM, kBN = T::kBN, kStages = T::kStages, kPanels = T::kPanels;
  constexpr int kAStageBytes = T::kAStageBytes, kBStageBytes = T::kBStageBytes;
  constexpr int kStagingBytes = T::kStagingBytes, kItems = T::kItems;
  __shared__ int s_is_last;  // split-K: this CTA's split of the item arrived last
  extern __shared__ uint8_t smem_raw[];
  __shared__ __align__(8) uint64_t full_bar[kStages];   // producer -> consumers: stage loaded
  __shared__ __align__(8) uint64_t empty_bar[kStages];  // consumers -> producer: stage read
  __shared__ __align__(8) uint64_t order_bar[2];        // ping-pong: the other consumer issued its mainloop
  constexpr bool kPingPong = CONFIG == kWgmmaPingPong;

  // 1024-byte alignment of the *shared-window* address (what TMA swizzling and the descriptors see).
  uint8_t* smem = smem_raw + ((1024u - (smem_addr(smem_raw) & 1023u)) & 1023u);
  uint8_t* sA = smem;
  uint8_t* sB = sA + kStages * kAStageBytes;
  uint8_t* staging = sB + kStages * kBStageBytes;

  const int tid = threadIdx.x;
  const int wg = tid / 128;
  const int lane = tid & 31;
  const int m_tiles = ceil_div(p.m, kBM);
  const int num_tiles = m_tiles * ceil_div(p.n, kBN);
  const int kt_total = ceil_div(p.k, kBK);
  const int kt_per_item = ceil_div(kt_total, p.splits);
  // Work items of this CTA (a cluster: of its cluster, the same for both CTAs): (tile, split), or, with
  // multicast, (pair of M-tiles, N-tile) of which CTA `rank` takes M-tile 2 * pair + rank.
  const uint32_t rank = T::kMulticast ? cluster_ctarank() : 0;
  const int m_pairs = ceil_div(m_tiles, 2);
  const int num_items = T::kMulticast ? m_pairs * ceil_div(p.n, kBN) : num_tiles * p.splits;
  const int walker = int(blockIdx.x) / T::kClusterSize, walkers = int(gridDim.x) / T::kClusterSize;
  const int my_items = walker < num_items ? (num_items - 1 - walker) / walkers + 1 : 0;
  const int steps = my_items * kt_per_item;
  auto step = [&](int f) -> TileIndex {
    if constexpr (T::kMulticast) {
      const int item = walker + (f / kt_per_item) * walkers;
      const int pair = item % m_pairs, nt = item / m_pairs;
      return TileIndex{(2 * pair + int(rank)) * kBM, nt * kBN, f % kt_per_item, 0, 0};
    } else {
      return step_of<kBM, kBN>(f, kt_per_item, m_tiles, num_tiles);
    }
  };
  const int full_panels = p.n / layout::kPanelRows;
  const int full_units = p.k / layout::kUnitK;
  const layout::Geometry geo = layout::geometry(BITS, p.n, p.k);

  if (tid == 0) {
#pragma unroll
    for (int s = 0; s < kStages; ++s) {
      mbar_init(&full_bar[s], BITS == 8 ? 1 : 128);
      // lane 0 of each warp of its reader(s), in every CTA of the cluster (multicast writes into all of them)
      mbar_init(&empty_bar[s], (kPingPong ? 4 : 4 * T::kConsumers) * T::kClusterSize);
    }
    mbar_init(&order_bar[0], 4);
    mbar_init(&order_bar[1], 4);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  if constexpr (T::kMulticast) {
    cluster_sync();  // the peer's barriers are initialised before anyone arrives on them or multicasts
  } else {
    __syncthreads();
  }

  if (wg == 0) {
    // ================================ producer ================================
    if constexpr (T::kRealloc) setmaxnreg_dec<kProducerRegs<BITS>>();
    if (BITS == 8) {
      for (int f = 0; f < (tid == 0 ? steps : 0); ++f) {  // thread 0 issues every load
        const int s = f % kStages;
        mbar_wait(&empty_bar[s], ((f / kStages) & 1) ^ 1);
        const TileIndex ti = step(f);
        if (ti.kt >= kt_total) {  // padding step: nothing to load
          mbar_arrive(&full_bar[s]);
          continue;
        }
        const int p0 = ti.n0 / layout::kPanelRows;
        const int panels = min(kPanels, full_panels - p0);
        const int units = min(kBKU, full_units - ti.kt * kBKU);
        // The full barrier expects this CTA's A tile and the whole B stage. In a cluster pair, the A tile is
        // skipped when this CTA's M-tile is past M (the odd last tile of a pair), and this CTA copies only
        // k-units [2 * rank, 2 * rank + 2) of B, multicast to both CTAs; the peer copies the other half.
        static_assert(!T::kMulticast || (T::kClusterSize == 2 && kBKU % 2 == 0), "each CTA multicasts half the k-units");
        const bool has_a = !T::kMulticast || ti.m0 < p.m;
        const int ku_begin = T::kMulticast ? int(rank) * (kBKU / 2) : 0;
        const int ku_end = T::kMulticast ? min(units, ku_begin + kBKU / 2) : units;
        mbar_arrive_expect_tx(&full_bar[s], (has_a ? kAStageBytes : 0) + units * panels * 4 * layout::kPlaneBytes);
        if (has_a) tma_load_2d(sA + s * kAStageBytes, &tmap_a, &full_bar[s], ti.kt * kBK, ti.m0);
        for (int ku = ku_begin; ku < ku_end; ++ku) {
          uint8_t* dst = sB + s * kBStageBytes + ku * kPanels * 4 * layout::kPlaneBytes;
          const uint8_t* src = p.w + layout::unit_offset(8, geo, ti.kt * kBKU + ku, p0);
          if constexpr (T::kMulticast) {
            bulk_load_multicast(dst, src, panels * 4 * layout::kPlaneBytes, &full_bar[s], uint16_t(0x3));
          } else {
            bulk_load(dst, src, panels * 4 * layout::kPlaneBytes, &full_bar[s]);
          }
        }
      }
      if constexpr (T::kMulticast) {
        __syncwarp();    // (warp 0 reconverged after thread 0's loop)
        cluster_sync();  // every producer thread, once
      }
      return;
    } else {
      // Thread t copies (and later expands) items t and t + 128: item = (unit, 16-byte quad of lanes).
      auto issue = [&](int f) {
        const TileIndex ti = step(f);
        const int p0 = ti.n0 / layout::kPanelRows;
        uint8_t* slot = staging + (f % kSlots) * kStagingBytes;
#pragma unroll
        for (int i = 0; i < kItems / 128; ++i) {
          const int item = tid + i * 128;
          const int unit = item / 8, quad = item % 8;
          const int u = ti.kt * kBKU + unit / kPanels, pn = p0 + unit % kPanels;
          if (u < full_units && pn < full_panels) {
            const uint8_t* src = p.w + layout::unit_offset(6, geo, u, pn) + quad * 16;
#pragma unroll
            for (int q = 0; q < 3; ++q) cp_async16(slot + (item * 3 + q) * 16, src + q * layout::kPlaneBytes);
          }
        }
      };
#pragma unroll
      for (int d = 0; d < kLookahead; ++d) {
        if (d < steps) issue(d);
        cp_async_commit();
      }
      for (int f = 0; f < steps; ++f) {
        if (f + kLookahead < steps) issue(f + kLookahead);
        cp_async_commit();
        cp_async_wait<kLookahead>();  // this thread's copies of step f have landed
        const int s = f % kStages;
        mbar_wait(&empty_bar[s], ((f / kStages) & 1) ^ 1);
        const TileIndex ti = step(f);
        const int p0 = ti.n0 / layout::kPanelRows;
        const uint8_t* slot = staging + (f % kSlots) * kStagingBytes;
#pragma unroll
        for (int i = 0; i < kItems / 128; ++i) {
          const int item = tid + i * 128;
          const int unit = item / 8, quad = item % 8;
          const int u = ti.kt * kBKU + unit / kPanels, pn = p0 + unit % kPanels;
          if (u < full_units && pn < full_panels) {
            const uint4 q0 = ld_shared_v4(slot + (item * 3 + 0) * 16);
            const uint4 q1 = ld_shared_v4(slot + (item * 3 + 1) * 16);
            const uint4 q2 = ld_shared_v4(slot + (item * 3 + 2) * 16);
            uint32_t rx[4], ry[4], rz[4], rw[4];
            expand6(q0.x, q1.x, q2.x, rx);
            expand6(q0.y, q1.y, q2.y, ry);
            expand6(q0.z, q1.z, q2.z, rz);
            expand6(q0.w, q1.w, q2.w, rw);
            uint8_t* dst = sB + s * kBStageBytes + unit * 4 * layout::kPlaneBytes + quad * 16;
#pragma unroll
            for (int c = 0; c < 4; ++c)
              st_shared_v4(dst + c * layout::kPlaneBytes, make_uint4(rx[c], ry[c], rz[c], rw[c]));
          }
        }
        // The expanded planes were written by the generic proxy; wgmma reads through the async proxy.
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        if (tid == 0 && ti.kt < kt_total) {  // (a padding step past K loads nothing)
          mbar_arrive_expect_tx(&full_bar[s], kAStageBytes);
          tma_load_2d(sA + s * kAStageBytes, &tmap_a, &full_bar[s], ti.kt * kBK, ti.m0);
        } else {
          mbar_arrive(&full_bar[s]);
        }
      }
      cp_async_wait<0>();
    }
    return;
  }

  // ================================ consumers ================================
  const int c = wg - 1;                // cooperative: rows 64c .. 64c+63 of each tile; ping-pong: tiles c, c+2, ...
  const int ctid = tid - 128;          // thread index among the consumers
  const int w = (tid % 128) / 32;      // warp within the warpgroup: rows 16w .. 16w+15 of a 64-row half
  const int g = lane >> 2, t = lane & 3;
  const int out_bytes = (p.out_kind == kOutBF16 || p.out_kind == kOutFP16) ? 2 : 4;
  const bool pair_ok = (p.ldo % 2) == 0 && reinterpret_cast<uintptr_t>(p.out) % (2 * out_bytes) == 0;
  // accumulator j*4 + r of a 64 x kBN half: row 16w + g + 8*(r >> 1), column 8j + 2t + (r & 1)
  // The row scales are loaded once per tile and each column pair's scales once for both rows.
  auto epilogue = [&](const auto& acc, int row0, int n0) {  // acc: int32_t[kBN / 2]
    const int r = row0 + 16 * w + g;
    const float sa[2] = {row_scale(p, r), row_scale(p, r + 8)};
#pragma unroll
    for (int j = 0; j < kBN / 8; ++j) {
      const ColScales cs = col_scales(p, n0 + 8 * j + 2 * t);
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        int32_t v0 = acc[4 * j + 2 * hr], v1 = acc[4 * j + 2 * hr + 1];
        if (BITS == 6) {
          v0 >>= 2;
          v1 >>= 2;
        }
        store_pair_scaled(p, r + 8 * hr, n0 + 8 * j + 2 * t, v0, v1, sa[hr], cs, pair_ok);
      }
    }
  };
  auto a_desc = [&](int s, int half, int ku) {
    return smem_desc(sA + s * kAStageBytes + half * 64 * kBK + ku * 32, 16, 1024, 1);
  };
  auto b_desc = [&](int s, int ku) {
    return smem_desc(sB + s * kBStageBytes + ku * kPanels * 4 * layout::kPlaneBytes, layout::kPlaneBytes,
                     2 * layout::kPlaneBytes, 0);
  };
  // Lane 0 of a consumer warp: this warp is done reading stage s (with multicast, in both CTAs' barriers:
  // either producer's next multicast writes into this CTA's stage).
  auto release = [&](int s) {
    if constexpr (T::kMulticast) {
      mbar_arrive_cluster(&empty_bar[s], 0);
      mbar_arrive_cluster(&empty_bar[s], 1);
    } else {
      mbar_arrive(&empty_bar[s]);
    }
  };

  // Split-K (p.splits > 1): every split stores its int32 partial tile; the last to arrive (counted in
  // p.counters, one per tile, left at zero) adds the others' partials in split order and runs the epilogue.
  // Returns whether this CTA runs the epilogue of the item (acc then holds the whole sum).
  auto reduce_splits = [&](auto& acc, const TileIndex& ti) -> bool {
    const int64_t tile_elems = int64_t(kBM) * kBN;
    int32_t* mine = p.partials + (int64_t(ti.tile) * p.splits + ti.split) * tile_elems;
    const int row0 = 64 * c + 16 * w + g;  // tile-local rows row0 and row0 + 8
#pragma unroll
    for (int j = 0; j < kBN / 8; ++j)
#pragma unroll
      for (int hr = 0; hr < 2; ++hr)
        if (ti.m0 + row0 + 8 * hr < p.m)
          *reinterpret_cast<int2*>(mine + (row0 + 8 * hr) * kBN + 8 * j + 2 * t) =
              make_int2(acc[4 * j + 2 * hr], acc[4 * j + 2 * hr + 1]);
    __threadfence();  // publish the partial tile before counting this split in
    named_barrier_sync(1, 128 * T::kConsumers);
    if (ctid == 0) {
      s_is_last = atomicAdd(p.counters + ti.tile, 1) == p.splits - 1;
      __threadfence();
    }
    named_barrier_sync(1, 128 * T::kConsumers);
    if (!s_is_last) return false;
    for (int z = 0; z < p.splits; ++z) {
      if (z == ti.split) continue;
      const int32_t* other = p.partials + (int64_t(ti.tile) * p.splits + z) * tile_elems;
#pragma unroll
      for (int j = 0; j < kBN / 8; ++j)
#pragma unroll
        for (int hr = 0; hr < 2; ++hr)
          if (ti.m0 + row0 + 8 * hr < p.m) {  // .cg: from L2, never a stale L1 line
            const int2 v = __ldcg(reinterpret_cast<const int2*>(other + (row0 + 8 * hr) * kBN + 8 * j + 2 * t));
            acc[4 * j + 2 * hr] += v.x;
            acc[4 * j + 2 * hr + 1] += v.y;
          }
    }
    if (ctid == 0) p.counters[ti.tile] = 0;
    return true;
  };

  if constexpr (!kPingPong) {
    if constexpr (T::kRealloc) setmaxnreg_inc<kConsumerRegs<BITS>>();
    int32_t acc[T::kAcc];
    int f = 0;
    for (int i = 0; i < my_items; ++i) {
      const TileIndex ti = step(f);
#pragma unroll
      for (int r = 0; r < T::kAcc; ++r) acc[r] = 0;
      // Steps before K ends, then the item's padding steps (split-K only). Two loops, no branch around the
      // wgmma: a conditional wgmma makes ptxas serialise every wgmma (warning C7520).
      const int kt_valid = min(kt_per_item, kt_total - ti.kt);
      int prev = -1;
      for (int kt = 0; kt < kt_valid; ++kt, ++f) {
        const int s = f % kStages;
        mbar_wait(&full_bar[s], (f / kStages) & 1);
        fence_operands(acc);
        asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
        for (int ku = 0; ku < kBKU; ++ku) wgmma_s8_m64nNk32<kBN>(acc, a_desc(s, c, ku), b_desc(s, ku));
        asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
        asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");  // the previous stage's group is done
        fence_operands(acc);
        if (prev >= 0 && lane == 0) release(prev);
        prev = s;
      }
      asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
      fence_operands(acc);
      if (prev >= 0 && lane == 0) release(prev);
      for (int kt = max(kt_valid, 0); kt < kt_per_item; ++kt, ++f) {  // padding: nothing loaded, nothing read
        const int s = f % kStages;
        mbar_wait(&full_bar[s], (f / kStages) & 1);
        if (lane == 0) release(s);
      }
      if constexpr (T::kSplitK) {
        if (p.splits > 1 && !reduce_splits(acc, ti)) continue;
      }
      if (ti.m0 + 64 * c < p.m) epilogue(acc, ti.m0 + 64 * c, ti.n0);  // (a half past M stores nothing)
    }
  } else {
    static_assert(kBN == 128, "ping-pong: two 64 x 128 accumulators per consumer");
    setmaxnreg_inc<kConsumerRegs<BITS>>();
    int32_t acc0[64], acc1[64];  // rows 0-63 and 64-127 of the tile
    for (int i = c, mine = 0; i < my_items; i += 2, ++mine) {  // p.splits == 1 here (host check)
      int f = i * kt_per_item;
      const TileIndex ti = step(f);
#pragma unroll
      for (int r = 0; r < 64; ++r) acc0[r] = acc1[r] = 0;
      // order_bar[c] completes once per mainloop of the other consumer: consumer 1's tile number `mine` needs
      // completion `mine` (consumer 0's tile 2*mine), consumer 0's needs completion mine - 1 (tile 2*mine - 1).
      if (i > 0) mbar_wait(&order_bar[c], (c == 1 ? mine : mine - 1) & 1);
      int prev = -1;
      for (int kt = 0; kt < kt_per_item; ++kt, ++f) {
        const int s = f % kStages;
        mbar_wait(&full_bar[s], (f / kStages) & 1);
        fence_operands(acc0);
        fence_operands(acc1);
        asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
        for (int ku = 0; ku < kBKU; ++ku) {
          const uint64_t db = b_desc(s, ku);
          wgmma_s8_m64n128k32(acc0, a_desc(s, 0, ku), db);
          wgmma_s8_m64n128k32(acc1, a_desc(s, 1, ku), db);
        }
        asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
        asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");
        fence_operands(acc0);
        fence_operands(acc1);
        if (prev >= 0 && lane == 0) mbar_arrive(&empty_bar[prev]);
        prev = s;
      }
      // The whole mainloop is issued: the other consumer may start issuing its tile's.
      if (lane == 0) mbar_arrive(&order_bar[c ^ 1]);
      asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
      fence_operands(acc0);
      fence_operands(acc1);
      if (lane == 0) mbar_arrive(&empty_bar[prev]);
      epilogue(acc0, ti.m0, ti.n0);
      epilogue(acc1, ti.m0 + 64, ti.n0);
    }
  }
  if constexpr (T::kMulticast) cluster_sync();  // the peer may still arrive on this CTA's barriers until then
#else
  // Built without sm_90a features (the sm_80 pass, or a plain sm_90 target): never run silently empty.
  __trap();
#endif
}

// ---- host ---------------------------------------------------------------------------------------

PFN_cuTensorMapEncodeTiled_v12000 encode_fn() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult status;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault, &status) !=
            cudaSuccess ||
        status != cudaDriverEntryPointSuccess)
      ptr = nullptr;
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(ptr);
  }();
  return fn;
}

template <int BITS, int CONFIG>
cudaError_t launch(const GemmArgs& args, cudaStream_t stream) {
  auto encode = encode_fn();
  if (encode == nullptr) return cudaErrorNotSupported;
  // A: 2-D uint8 tensor {K (contiguous), M}, row stride lda bytes; box 128 x 128 with 128-byte swizzle.
  CUtensorMap tmap;
  const cuuint64_t dims[2] = {cuuint64_t(args.k), cuuint64_t(args.m)};
  const cuuint64_t strides[1] = {cuuint64_t(args.lda)};
  using T = WgTraits<BITS, CONFIG>;
  const cuuint32_t box[2] = {kBK, T::kBM};
  const cuuint32_t elem_strides[2] = {1, 1};
  const CUresult r = encode(&tmap, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, const_cast<int8_t*>(args.a), dims, strides, box,
                            elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) return cudaErrorInvalidValue;
  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  auto kernel = gemm_wgmma_kernel<BITS, CONFIG>;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, T::kSmemBytes);
  if (err != cudaSuccess) return err;
  if constexpr (T::kMinBlocks > 1) {  // the grid assumes kMinBlocks CTAs per SM: ask for all of shared memory
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
    if (err != cudaSuccess) return err;
  }
  if constexpr (T::kRealloc) {
    // setmaxnreg's split assumes the kernel enters with 168 registers per thread (its static_assert): with
    // fewer, the consumers' register request could never be met and the kernel would hang. Refuse instead.
    static const int regs = [&] {
      cudaFuncAttributes attr{};
      return cudaFuncGetAttributes(&attr, kernel) == cudaSuccess ? attr.numRegs : -1;
    }();
    if (regs != kLaunchRegs) return cudaErrorNotSupported;
  }
  if constexpr (T::kMulticast) {
    // Clusters of two CTAs over pairs of M-tiles: as many clusters as pairs, up to half the SMs.
    const int pairs = ceil_div(ceil_div(args.m, T::kBM), 2) * ceil_div(args.n, T::kBN);
    const int clusters = max(1, pairs < sms / 2 ? pairs : sms / 2);
    cudaLaunchConfig_t cfg{};
    cfg.gridDim = dim3(2 * clusters);
    cfg.blockDim = dim3(T::kThreads);
    cfg.dynamicSmemBytes = T::kSmemBytes;
    cfg.stream = stream;
    cudaLaunchAttribute attr[1] = {};
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = 2;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    return cudaLaunchKernelEx(&cfg, kernel, args, tmap);
  }
  const int items = ceil_div(args.m, T::kBM) * ceil_div(args.n, T::kBN) * args.splits;
  const int slots = T::kMinBlocks * sms;
  kernel<<<items < slots ? items : slots, T::kThreads, T::kSmemBytes, stream>>>(args, tmap);
  return cudaGetLastError();
}

}  // namespace

TileShape wgmma_tile_shape(int config, int w_bits) {
  if ((w_bits != 6 && w_bits != 8) || config < 0 || config >= kWgmmaNumConfigs) return TileShape{0, 0, 0, 0, 0};
  auto shape = [](auto traits) {
    using T = decltype(traits);
    return TileShape{T::kBM, T::kBN, kBK, T::kThreads, T::kSmemBytes};
  };
  switch (config * 2 + (w_bits == 8)) {
    case 0: return shape(WgTraits<6, kWgmmaCooperative>{});
    case 1: return shape(WgTraits<8, kWgmmaCooperative>{});
    case 2: return shape(WgTraits<6, kWgmmaPingPong>{});
    case 3: return shape(WgTraits<8, kWgmmaPingPong>{});
    case 4: return shape(WgTraits<6, kWgmmaCooperative256>{});
    case 5: return shape(WgTraits<8, kWgmmaCooperative256>{});
    case 6: return shape(WgTraits<6, kWgmmaDecode64>{});
    case 7: return shape(WgTraits<8, kWgmmaDecode64>{});
    case 8: return TileShape{0, 0, 0, 0, 0};  // the cluster configuration takes 8-bit weights only
    default: return shape(WgTraits<8, kWgmmaCluster256>{});
  }
}

bool wgmma_supports(const GemmArgs& a, int config) {
  const bool split_ok =
      a.splits == 1 || (config == kWgmmaDecode64 && a.splits > 1 && a.partials != nullptr && a.counters != nullptr);
  if (config == kWgmmaCluster256 && a.w_bits != 8) return false;
  return (a.w_bits == 6 || a.w_bits == 8) && a.n % layout::kPanelRows == 0 && a.k % layout::kUnitK == 0 &&
         a.lda % 16 == 0 && reinterpret_cast<uintptr_t>(a.a) % 16 == 0 && split_ok && config >= 0 &&
         config < kWgmmaNumConfigs;
}

cudaError_t launch_gemm_wgmma(const GemmArgs& args, int config, cudaStream_t stream) {
  if (!wgmma_supports(args, config)) return cudaErrorInvalidValue;
  // The sm_80 build of this kernel is empty: refuse anything but compute capability 9.0.
  int device = 0, major = 0, minor = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  if (err != cudaSuccess) return err;
  if (major != 9 || minor != 0) return cudaErrorNotSupported;
  if (config == kWgmmaPingPong)
    return args.w_bits == 8 ? launch<8, kWgmmaPingPong>(args, stream) : launch<6, kWgmmaPingPong>(args, stream);
  if (config == kWgmmaCooperative256)
    return args.w_bits == 8 ? launch<8, kWgmmaCooperative256>(args, stream)
                            : launch<6, kWgmmaCooperative256>(args, stream);
  if (config == kWgmmaDecode64)
    return args.w_bits == 8 ? launch<8, kWgmmaDecode64>(args, stream) : launch<6, kWgmmaDecode64>(args, stream);
  if (config == kWgmmaCluster256) return launch<8, kWgmmaCluster256>(args, stream);
  return args.w_bits == 8 ? launch<8, kWgmmaCooperative>(args, stream) : launch<6, kWgmmaCooperative>(args, stream);
}

}  // namespace hdrq
