// CPU kernel of vskip::plan_schedule: per-tile aggregates in O(B * N), then one
// pass over the (query tile, key tile) pairs of each row that writes both lists
// directly, in the order schedule.py's stable sort produces.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../common/plan_checks.h"
#include "../common/tile_rules.h"

namespace vskip {
namespace {

KeyAgg key_tile_agg(const int8_t* kind, int32_t nk, int32_t n, int32_t bn) {
  KeyAgg a{BIG, BIG, 1, 1};
  for (int32_t p = n * bn; p < (n + 1) * bn; ++p) {
    const int8_t k = p < nk ? kind[p] : KIND_PAD;
    if (k != KIND_PAD && a.first_real == BIG) a.first_real = p;
    if (k == KIND_TEXT && a.first_text == BIG) a.first_text = p;
    a.all_real &= k != KIND_PAD;
    a.all_text &= k == KIND_TEXT;
  }
  return a;
}

QueryAgg query_tile_agg(const int8_t* kind_q, int32_t nq, int32_t off, int32_t m, int32_t bm, int32_t policy) {
  QueryAgg a{-1, -1, BIG, 1, 0};
  for (int32_t r = m * bm; r < (m + 1) * bm; ++r) {
    const int8_t k = r < nq ? kind_q[r] : KIND_PAD;
    const bool u = row_unrestricted(k, policy), rs = row_restricted(k, policy);
    const int32_t pos = r + off;
    if (u) a.max_u = pos;  // rows ascend, so the last hit is the maximum
    if (rs) a.max_r = pos;
    if ((u || rs) && a.min_all == BIG) a.min_all = pos;
    a.all_live &= u || rs;
    a.has_r |= rs;
  }
  return a;
}

// Flagged tiles first, then the others, each ascending (a stable descending sort of the flags).
void write_list(const uint8_t* flags, uint8_t bit, int32_t nt, int32_t* cnt, int32_t* idx) {
  int32_t c = 0;
  for (int32_t n = 0; n < nt; ++n) c += (flags[n] & bit) != 0;
  *cnt = c;
  int32_t hit = 0, miss = c;
  for (int32_t n = 0; n < nt; ++n) idx[(flags[n] & bit) ? hit++ : miss++] = n;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> plan_schedule_cpu(const at::Tensor& kind_in, int64_t nq64,
                                                                             int64_t policy64, bool visual_self,
                                                                             int64_t block_m, int64_t block_n) {
  const PlanShape s = check_plan_args(kind_in, nq64, policy64, block_m, block_n);
  auto out = alloc_plan_outputs(kind_in, s);
  if (s.b == 0) return out;
  const at::Tensor kind_t = kind_in.contiguous();
  const int8_t* kind = kind_t.const_data_ptr<int8_t>();
  const int32_t nk = int32_t(s.nk), nq = int32_t(s.nq), off = nk - nq, mt = int32_t(s.mt), nt = int32_t(s.nt);
  const int32_t bm = int32_t(block_m), bn = int32_t(block_n), policy = int32_t(policy64), rows = mt * bm;
  const bool self_term = policy == POLICY_VSKIP && visual_self;

  std::vector<KeyAgg> kagg(size_t(s.b) * nt);
  std::vector<QueryAgg> qagg(size_t(s.b) * mt);
  const int64_t tiles = s.b * (nt + mt);
  at::parallel_for(0, tiles, std::max<int64_t>(1, 8192 / std::max<int64_t>(1, std::min(block_m, block_n))),
                   [&](int64_t t0, int64_t t1) {
                     for (int64_t t = t0; t < t1; ++t) {
                       const int64_t b = t / (nt + mt), j = t % (nt + mt);
                       const int8_t* kb = kind + b * nk;
                       if (j < nt) {
                         kagg[b * nt + j] = key_tile_agg(kb, nk, int32_t(j), bn);
                       } else {
                         qagg[b * mt + (j - nt)] = query_tile_agg(kb + off, nq, off, int32_t(j - nt), bm, policy);
                       }
                     }
                   });

  int32_t* full_cnt = std::get<0>(out).mutable_data_ptr<int32_t>();
  int32_t* full_idx = std::get<1>(out).mutable_data_ptr<int32_t>();
  int32_t* part_cnt = std::get<2>(out).mutable_data_ptr<int32_t>();
  int32_t* part_idx = std::get<3>(out).mutable_data_ptr<int32_t>();
  at::parallel_for(0, s.b * mt, std::max<int64_t>(1, 32768 / nt), [&](int64_t r0, int64_t r1) {
    std::vector<uint8_t> flags(nt);
    for (int64_t row = r0; row < r1; ++row) {
      const int64_t b = row / mt;
      const int32_t m = int32_t(row % mt);
      const QueryAgg& q = qagg[row];
      const KeyAgg* kb = kagg.data() + b * nt;
      const int8_t* kind_q = kind + b * nk + off;
      for (int32_t n = 0; n < nt; ++n) {
        bool self_hit = false;
        if (self_term) {
          int32_t lo, hi;
          self_rows(m, n, bm, bn, off, rows, &lo, &hi);
          self_hit = lo < hi && any_restricted(kind_q, nq, lo, hi, policy);
        }
        const uint32_t c = classify_pair(q, kb[n], n, bn, self_hit);
        // partial = live and not full
        flags[n] = uint8_t(((c & TILE_FULL) ? 1u : 0u) | ((c == TILE_LIVE) ? 2u : 0u));
      }
      write_list(flags.data(), 1, nt, full_cnt + row, full_idx + row * nt);
      write_list(flags.data(), 2, nt, part_cnt + row, part_idx + row * nt);
    }
  });
  return out;
}

}  // namespace
}  // namespace vskip

TORCH_LIBRARY_IMPL(vskip, CPU, m) { m.impl("plan_schedule", &vskip::plan_schedule_cpu); }
