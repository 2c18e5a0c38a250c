// CPU kernel of vskip::visual_mass for few queries per sequence (decode steps,
// FlashVLM calibration). One task per (sequence, KV head): each key row is read
// and widened to fp32 once and scored against every query head of its GQA group,
// so K streams through memory once; the PyTorch path instead materialises fp32
// copies of K chunks and runs per-sequence Python loops. Scores are kept per row
// (O(Nk) floats per query, never N x N), then one max and one exp pass.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "../common/tile_rules.h"

namespace vskip {
namespace {

template <typename T>
void widen(const T* src, float* dst, int64_t d) {
  for (int64_t i = 0; i < d; ++i) dst[i] = static_cast<float>(src[i]);
}

inline float dot(const float* a, const float* b, int64_t d) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < d; ++i) acc += a[i] * b[i];
  return acc;
}

template <typename T>
void visual_mass_kernel(const at::Tensor& q, const at::Tensor& k, const int8_t* kind, const int32_t* q_pos,
                        int32_t policy, bool visual_self, float scale, float* out) {
  const int64_t bsz = q.size(0), hq = q.size(1), s_len = q.size(2), d = q.size(3);
  const int64_t hkv = k.size(1), nk = k.size(2), g = hq / hkv;
  const int64_t ks_b = k.stride(0), ks_h = k.stride(1), ks_n = k.stride(2);
  const T* qp = q.const_data_ptr<T>();
  const T* kp = k.const_data_ptr<T>();
  const float neg_inf = -std::numeric_limits<float>::infinity();

  at::parallel_for(0, bsz * hkv, 1, [&](int64_t t0, int64_t t1) {
    const int64_t rows = g * s_len;
    std::vector<float> qf(rows * d), kf(d), scores(rows * nk), row_max(rows);
    std::vector<int32_t> pos(rows), qkind(rows);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / hkv, h = t % hkv;
      const int8_t* kb = kind + b * nk;
      int32_t last = -1;  // last key any row of the group can see
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t head = h * g + r / s_len, s = r % s_len;
        widen(qp + ((b * hq + head) * s_len + s) * d, qf.data() + r * d, d);
        for (int64_t i = 0; i < d; ++i) qf[r * d + i] *= scale;
        pos[r] = q_pos[s];
        const int8_t qk = kb[pos[r]];
        // 0: no row (padding, frozen visual); 1: all real keys; 2: text keys (+ itself)
        qkind[r] = row_unrestricted(qk, policy) ? 1 : (row_restricted(qk, policy) ? 2 : 0);
        if (qkind[r] && pos[r] > last) last = pos[r];
        row_max[r] = neg_inf;
      }
      const T* kh = kp + b * ks_b + h * ks_h;
      for (int32_t j = 0; j <= last; ++j) {
        const int8_t kk = kb[j];
        if (kk == KIND_PAD) continue;
        bool widened = false;
        for (int64_t r = 0; r < rows; ++r) {
          const bool allowed = j <= pos[r] && (qkind[r] == 1 || (qkind[r] == 2 && (kk == KIND_TEXT || (visual_self && j == pos[r]))));
          if (!allowed) {
            scores[r * nk + j] = neg_inf;
            continue;
          }
          if (!widened) {
            widen(kh + j * ks_n, kf.data(), d);
            widened = true;
          }
          const float sc = dot(qf.data() + r * d, kf.data(), d);
          scores[r * nk + j] = sc;
          if (sc > row_max[r]) row_max[r] = sc;
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t head = h * g + r / s_len, s = r % s_len;
        float& dst = out[(b * hq + head) * s_len + s];
        const float mx = row_max[r];
        if (qkind[r] == 0 || mx == neg_inf) {
          dst = 0.f;  // no allowed key
          continue;
        }
        float total = 0.f, vis = 0.f;
        for (int32_t j = 0; j <= pos[r]; ++j) {
          const int8_t kk = kb[j];
          if (kk == KIND_PAD) continue;
          const float sc = scores[r * nk + j];
          if (sc == neg_inf) continue;
          const float p = std::exp(sc - mx);
          total += p;
          if (kk == KIND_VISUAL) vis += p;
        }
        dst = vis / total;
      }
    }
  });
}

at::Tensor visual_mass_cpu(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& kind_in,
                           const at::Tensor& q_pos_in, int64_t policy, bool visual_self, double scale) {
  TORCH_CHECK_VALUE(q_in.dim() == 4 && k_in.dim() == 4, "vskip::visual_mass: q and k must be 4-D [B, H, N, D]");
  TORCH_CHECK_TYPE(q_in.scalar_type() == k_in.scalar_type(), "vskip::visual_mass: q and k must share a dtype");
  TORCH_CHECK_TYPE(kind_in.scalar_type() == at::kChar, "vskip::visual_mass: kind must be int8 [B, Nk]");
  TORCH_CHECK_TYPE(q_pos_in.scalar_type() == at::kInt, "vskip::visual_mass: q_pos must be int32 [S]");
  const int64_t bsz = q_in.size(0), hq = q_in.size(1), s_len = q_in.size(2), d = q_in.size(3);
  const int64_t hkv = k_in.size(1), nk = k_in.size(2);
  TORCH_CHECK_VALUE(k_in.size(0) == bsz && k_in.size(3) == d, "vskip::visual_mass: k must be [B, Hkv, Nk, D] matching q");
  TORCH_CHECK_VALUE(hkv > 0 && hq % hkv == 0, "vskip::visual_mass: Hq (", hq, ") must be a multiple of Hkv (", hkv, ")");
  TORCH_CHECK_VALUE(kind_in.dim() == 2 && kind_in.size(0) == bsz && kind_in.size(1) == nk,
                    "vskip::visual_mass: kind must be [B, Nk] = [", bsz, ", ", nk, "]");
  TORCH_CHECK_VALUE(q_pos_in.dim() == 1 && q_pos_in.size(0) == s_len, "vskip::visual_mass: q_pos must be [S] = [", s_len, "]");
  TORCH_CHECK_VALUE(policy >= 0 && policy <= 2, "vskip::visual_mass: policy must be 0, 1 or 2, got ", policy);
  const at::Tensor q = q_in.contiguous(), kind = kind_in.contiguous(), q_pos = q_pos_in.contiguous();
  // any layout over (B, H, N) is fine; only the head dimension must be dense
  const at::Tensor k = k_in.stride(3) == 1 ? k_in : k_in.contiguous();
  const int32_t* qp = q_pos.const_data_ptr<int32_t>();
  for (int64_t s = 0; s < s_len; ++s) {
    TORCH_CHECK_VALUE(qp[s] >= 0 && qp[s] < nk, "vskip::visual_mass: q_pos values must be in [0, Nk=", nk, "), got ", qp[s]);
  }
  at::Tensor out = at::zeros({bsz, hq, s_len}, q.options().dtype(at::kFloat));
  if (out.numel() == 0 || nk == 0) return out;
  const int8_t* kd = kind.const_data_ptr<int8_t>();
  float* o = out.mutable_data_ptr<float>();
  const int32_t pol = int32_t(policy);
  const float sc = float(scale);
  switch (q.scalar_type()) {
    case at::kFloat: visual_mass_kernel<float>(q, k, kd, qp, pol, visual_self, sc, o); break;
    case at::kHalf: visual_mass_kernel<c10::Half>(q, k, kd, qp, pol, visual_self, sc, o); break;
    case at::kBFloat16: visual_mass_kernel<c10::BFloat16>(q, k, kd, qp, pol, visual_self, sc, o); break;
    default: TORCH_CHECK_TYPE(false, "vskip::visual_mass: q must be float32, float16 or bfloat16, got ", q.scalar_type());
  }
  return out;
}

}  // namespace
}  // namespace vskip

TORCH_LIBRARY_IMPL(vskip, CPU, m) { m.impl("visual_mass", &vskip::visual_mass_cpu); }
