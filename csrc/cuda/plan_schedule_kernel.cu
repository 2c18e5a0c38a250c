// CUDA kernels of vskip::plan_schedule. Plain CUDA on raw pointers (no torch
// headers) so the file compiles with nvcc alone for every target; the torch
// glue is plan_schedule_cuda.cpp. No host synchronisation anywhere: sizes come
// from the arguments, so the launch can be captured in a CUDA graph.
#include <cuda_runtime.h>
#include <stdint.h>

#include "../common/tile_rules.h"
#include "plan_schedule_kernel.h"

namespace vskip {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr unsigned kAll = 0xffffffffu;

// One warp per tile: key tiles [0, B*Nt), then query tiles [B*Nt, B*(Nt+Mt)).
// Lanes walk the tile 32 positions at a time; ballots give first/last hits in order.
__global__ void tile_aggregates_kernel(const int8_t* __restrict__ kind, int32_t b_sz, int32_t nk, int32_t nq,
                                       int32_t mt, int32_t nt, int32_t bm, int32_t bn, int32_t policy,
                                       KeyAgg* __restrict__ kagg, QueryAgg* __restrict__ qagg) {
  const int64_t warp = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  const int64_t total = int64_t(b_sz) * (nt + mt);
  if (warp >= total) return;  // warp-uniform
  const int64_t b = warp / (nt + mt);
  const int32_t j = int32_t(warp % (nt + mt));
  const int8_t* kb = kind + b * nk;
  const int32_t off = nk - nq;
  if (j < nt) {
    KeyAgg a{BIG, BIG, 1, 1};
    const int32_t base = j * bn;
    for (int32_t c = 0; c < bn; c += 32) {
      const bool in = c + lane < bn;
      const int32_t p = base + c + lane;
      const int8_t k = (in && p < nk) ? kb[p] : KIND_PAD;
      const unsigned in_mask = __ballot_sync(kAll, in);
      const unsigned real = __ballot_sync(kAll, in && k != KIND_PAD);
      const unsigned text = __ballot_sync(kAll, in && k == KIND_TEXT);
      if (a.first_real == BIG && real) a.first_real = base + c + __ffs(real) - 1;
      if (a.first_text == BIG && text) a.first_text = base + c + __ffs(text) - 1;
      a.all_real &= real == in_mask;
      a.all_text &= text == in_mask;
    }
    if (lane == 0) kagg[b * nt + j] = a;
  } else {
    const int32_t m = j - nt;
    QueryAgg a{-1, -1, BIG, 1, 0};
    const int32_t base = m * bm;
    for (int32_t c = 0; c < bm; c += 32) {
      const bool in = c + lane < bm;
      const int32_t r = base + c + lane;
      const int8_t k = (in && r < nq) ? kb[off + r] : KIND_PAD;
      const unsigned in_mask = __ballot_sync(kAll, in);
      const unsigned u = __ballot_sync(kAll, in && row_unrestricted(k, policy));
      const unsigned rs = __ballot_sync(kAll, in && row_restricted(k, policy));
      const int32_t pos0 = base + c + off;
      if (u) a.max_u = pos0 + 31 - __clz(u);
      if (rs) a.max_r = pos0 + 31 - __clz(rs);
      if (a.min_all == BIG && (u | rs)) a.min_all = pos0 + __ffs(u | rs) - 1;
      a.all_live &= (u | rs) == in_mask;
      a.has_r |= rs != 0u;
    }
    if (lane == 0) qagg[b * mt + m] = a;
  }
}

__device__ __forceinline__ uint32_t pair_flags(const QueryAgg& q, const KeyAgg* kb, const int8_t* kind_q, int32_t m,
                                               int32_t n, int32_t nq, int32_t off, int32_t rows, int32_t bm,
                                               int32_t bn, int32_t policy, bool self_term) {
  bool self_hit = false;
  if (self_term) {
    int32_t lo, hi;
    self_rows(m, n, bm, bn, off, rows, &lo, &hi);
    self_hit = lo < hi && any_restricted(kind_q, nq, lo, hi, policy);
  }
  return classify_pair(q, kb[n], n, bn, self_hit);
}

// One warp per (sequence, query tile): a counting pass, then a pass that places
// each key tile with a ballot prefix count, flagged tiles first, both ascending.
__global__ void tile_lists_kernel(const int8_t* __restrict__ kind, const KeyAgg* __restrict__ kagg,
                                  const QueryAgg* __restrict__ qagg, int32_t b_sz, int32_t nk, int32_t nq,
                                  int32_t mt, int32_t nt, int32_t bm, int32_t bn, int32_t policy, bool self_term,
                                  int32_t* __restrict__ full_cnt, int32_t* __restrict__ full_idx,
                                  int32_t* __restrict__ part_cnt, int32_t* __restrict__ part_idx) {
  const int64_t row = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (row >= int64_t(b_sz) * mt) return;  // warp-uniform
  const int64_t b = row / mt;
  const int32_t m = int32_t(row % mt);
  const int32_t off = nk - nq, rows = mt * bm;
  const QueryAgg q = qagg[row];
  const KeyAgg* kb = kagg + b * nt;
  const int8_t* kind_q = kind + b * nk + off;

  int32_t n_full = 0, n_part = 0;
  for (int32_t c = 0; c < nt; c += 32) {
    const int32_t n = c + lane;
    const uint32_t f = n < nt ? pair_flags(q, kb, kind_q, m, n, nq, off, rows, bm, bn, policy, self_term) : 0u;
    n_full += __popc(__ballot_sync(kAll, (f & TILE_FULL) != 0u));
    n_part += __popc(__ballot_sync(kAll, f == TILE_LIVE));
  }
  if (lane == 0) {
    full_cnt[row] = n_full;
    part_cnt[row] = n_part;
  }
  int32_t* fi = full_idx + row * nt;
  int32_t* pi = part_idx + row * nt;
  const unsigned below = (1u << lane) - 1u;
  int32_t seen_full = 0, seen_part = 0;  // flagged tiles before this chunk
  for (int32_t c = 0; c < nt; c += 32) {
    const int32_t n = c + lane;
    const uint32_t f = n < nt ? pair_flags(q, kb, kind_q, m, n, nq, off, rows, bm, bn, policy, self_term) : 0u;
    const bool is_full = (f & TILE_FULL) != 0u, is_part = f == TILE_LIVE;
    const unsigned bf = __ballot_sync(kAll, is_full), bp = __ballot_sync(kAll, is_part);
    if (n < nt) {
      const int32_t pf = seen_full + __popc(bf & below), pp = seen_part + __popc(bp & below);
      // a tile that is not flagged goes after all flagged ones, behind the unflagged tiles before it
      fi[is_full ? pf : n_full + (n - pf)] = n;
      pi[is_part ? pp : n_part + (n - pp)] = n;
    }
    seen_full += __popc(bf);
    seen_part += __popc(bp);
  }
}

}  // namespace

cudaError_t plan_schedule_cuda_launch(const int8_t* kind, int32_t b_sz, int32_t nk, int32_t nq, int32_t policy,
                                      bool visual_self, int32_t block_m, int32_t block_n, void* workspace,
                                      int32_t* full_cnt, int32_t* full_idx, int32_t* part_cnt, int32_t* part_idx,
                                      cudaStream_t stream) {
  const int32_t mt = (nq + block_m - 1) / block_m, nt = (nk + block_n - 1) / block_n;
  if (b_sz == 0) return cudaSuccess;
  KeyAgg* kagg = static_cast<KeyAgg*>(workspace);
  QueryAgg* qagg = reinterpret_cast<QueryAgg*>(kagg + int64_t(b_sz) * nt);
  const int threads = 32 * kWarpsPerBlock;
  const int64_t tiles = int64_t(b_sz) * (nt + mt);
  tile_aggregates_kernel<<<unsigned((tiles + kWarpsPerBlock - 1) / kWarpsPerBlock), threads, 0, stream>>>(
      kind, b_sz, nk, nq, mt, nt, block_m, block_n, policy, kagg, qagg);
  const int64_t rows = int64_t(b_sz) * mt;
  tile_lists_kernel<<<unsigned((rows + kWarpsPerBlock - 1) / kWarpsPerBlock), threads, 0, stream>>>(
      kind, kagg, qagg, b_sz, nk, nq, mt, nt, block_m, block_n, policy, policy == POLICY_VSKIP && visual_self,
      full_cnt, full_idx, part_cnt, part_idx);
  return cudaGetLastError();
}

size_t plan_schedule_workspace_bytes(int32_t b_sz, int32_t nk, int32_t nq, int32_t block_m, int32_t block_n) {
  const int64_t mt = (nq + block_m - 1) / block_m, nt = (nk + block_n - 1) / block_n;
  return size_t(b_sz) * (size_t(nt) * sizeof(KeyAgg) + size_t(mt) * sizeof(QueryAgg));
}

}  // namespace vskip
