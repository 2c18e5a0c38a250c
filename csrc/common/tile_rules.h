// Tile classification rules shared by the CPU and CUDA schedule builders.
//
// This is the native mirror of vskip_kernels/schedule.py::classify_tiles: the
// same per-key-tile and per-query-tile aggregates and the same predicates, so
// both backends produce schedules bitwise equal to the PyTorch path. Plain C++
// (no torch headers) so nvcc can compile it alone for every target.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define VSKIP_HD __host__ __device__ __forceinline__
#else
#define VSKIP_HD inline
#endif

namespace vskip {

constexpr int8_t KIND_PAD = 0;
constexpr int8_t KIND_TEXT = 1;
constexpr int8_t KIND_VISUAL = 2;
// "no such position" for minima; positions stay below it (schedule.py's _BIG)
constexpr int32_t BIG = 1 << 30;

enum Policy : int32_t { POLICY_DENSE = 0, POLICY_VSKIP = 1, POLICY_FROZEN = 2 };

// Per key tile, over positions [n*bn, (n+1)*bn); positions >= Nk count as padding.
struct KeyAgg {
  int32_t first_real;  // first non-padding position, BIG if none
  int32_t first_text;  // first text position, BIG if none
  int32_t all_real;
  int32_t all_text;
};

// Per query tile, over rows [m*bm, (m+1)*bm) at positions row + (Nk - Nq);
// rows >= Nq count as padding.
struct QueryAgg {
  int32_t max_u;     // last position of an unrestricted row (sees every earlier key), -1 if none
  int32_t max_r;     // last position of a restricted row (vskip visual: text keys only), -1 if none
  int32_t min_all;   // first position of any live row, BIG if none
  int32_t all_live;  // every row is unrestricted or restricted
  int32_t has_r;
};

VSKIP_HD bool row_unrestricted(int8_t k, int32_t policy) {
  return k == KIND_TEXT || (k == KIND_VISUAL && policy == POLICY_DENSE);
}

VSKIP_HD bool row_restricted(int8_t k, int32_t policy) {
  return k == KIND_VISUAL && policy == POLICY_VSKIP;
}

VSKIP_HD int32_t clamp_i32(int32_t x, int32_t lo, int32_t hi) {
  return x < lo ? lo : (x > hi ? hi : x);
}

// Rows [*lo, *hi) of query tile m whose own position lies in key tile n: the
// only rows that can see themselves there (vskip with visual_self).
// rows = Mt * bm, off = Nk - Nq.
VSKIP_HD void self_rows(int32_t m, int32_t n, int32_t bm, int32_t bn, int32_t off, int32_t rows,
                        int32_t* lo, int32_t* hi) {
  const int32_t m_lo = m * bm;
  const int32_t n_lo = n * bn - off;
  const int32_t l = clamp_i32(m_lo > n_lo ? m_lo : n_lo, 0, rows);
  const int32_t e = m_lo + bm < n_lo + bn ? m_lo + bm : n_lo + bn;
  const int32_t h = clamp_i32(e, 0, rows);
  *lo = l;
  *hi = h > l ? h : l;
}

// Whether any restricted row in [lo, hi) (from self_rows) exists. schedule.py
// counts them with a prefix sum; a direct scan is equivalent and, because the
// ranges of one query tile partition its rows, costs O(Nq) per sequence in total.
// kind_q points at the first query position (kind + Nk - Nq); rows >= nq are padding.
VSKIP_HD bool any_restricted(const int8_t* kind_q, int32_t nq, int32_t lo, int32_t hi, int32_t policy) {
  if (policy != POLICY_VSKIP) return false;
  if (hi > nq) hi = nq;
  for (int32_t r = lo; r < hi; ++r) {
    if (kind_q[r] == KIND_VISUAL) return true;
  }
  return false;
}

constexpr uint32_t TILE_LIVE = 1u;
constexpr uint32_t TILE_FULL = 2u;

// Live: at least one allowed (query, key) entry in the pair. Full: every entry
// allowed, so the kernel can skip the mask. self_hit: a restricted row of the
// query tile sits in this key tile (only meaningful for vskip + visual_self).
VSKIP_HD uint32_t classify_pair(const QueryAgg& q, const KeyAgg& k, int32_t n, int32_t bn, bool self_hit) {
  const bool live = q.max_u >= k.first_real || q.max_r >= k.first_text || self_hit;
  if (!live) return 0u;
  const int32_t last_pos = (n + 1) * bn - 1;
  const bool full = q.all_live && k.all_real && last_pos <= q.min_all && (!q.has_r || k.all_text);
  return TILE_LIVE | (full ? TILE_FULL : 0u);
}

}  // namespace vskip
