// Argument checks and output allocation shared by the CPU and CUDA plan_schedule
// kernels (torch glue only; the CUDA kernel body does not include this).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <tuple>

namespace vskip {

struct PlanShape {
  int64_t b, nk, nq, mt, nt;
};

inline PlanShape check_plan_args(const at::Tensor& kind, int64_t nq, int64_t policy, int64_t block_m,
                                 int64_t block_n) {
  TORCH_CHECK_TYPE(kind.scalar_type() == at::kChar, "vskip::plan_schedule: kind must be int8 [B, Nk], got ",
                   kind.scalar_type());
  TORCH_CHECK_VALUE(kind.dim() == 2, "vskip::plan_schedule: kind must be 2-D [B, Nk], got ", kind.dim(), " dims");
  const int64_t b = kind.size(0), nk = kind.size(1);
  TORCH_CHECK_VALUE(nq >= 1 && nq <= nk, "vskip::plan_schedule: nq must be in [1, Nk=", nk, "], got ", nq);
  TORCH_CHECK_VALUE(policy >= 0 && policy <= 2, "vskip::plan_schedule: policy must be 0 (dense), 1 (vskip) or 2 (frozen), got ",
                    policy);
  TORCH_CHECK_VALUE(block_m >= 1 && block_n >= 1, "vskip::plan_schedule: block_m and block_n must be positive, got ",
                    block_m, " and ", block_n);
  const int64_t mt = (nq + block_m - 1) / block_m, nt = (nk + block_n - 1) / block_n;
  // positions are int32 and must stay below BIG (1 << 30), as in schedule.py
  TORCH_CHECK_VALUE(nt * block_n < (int64_t(1) << 30) && mt * block_m < (int64_t(1) << 30),
                    "vskip::plan_schedule: sequence too long (Nk=", nk, ")");
  return {b, nk, nq, mt, nt};
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> alloc_plan_outputs(const at::Tensor& kind,
                                                                                   const PlanShape& s) {
  auto opts = kind.options().dtype(at::kInt);
  return {at::empty({s.b, s.mt}, opts), at::empty({s.b, s.mt, s.nt}, opts), at::empty({s.b, s.mt}, opts),
          at::empty({s.b, s.mt, s.nt}, opts)};
}

}  // namespace vskip
