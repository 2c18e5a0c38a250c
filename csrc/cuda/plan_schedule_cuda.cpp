// Torch glue of the CUDA plan_schedule kernel: checks, output and workspace
// allocation through the caching allocator, launch on the current stream.
// Only built by CUDAExtension (needs a CUDA build of torch).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../common/plan_checks.h"
#include "plan_schedule_kernel.h"

namespace vskip {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> plan_schedule_cuda(const at::Tensor& kind_in, int64_t nq,
                                                                              int64_t policy, bool visual_self,
                                                                              int64_t block_m, int64_t block_n) {
  const PlanShape s = check_plan_args(kind_in, nq, policy, block_m, block_n);
  TORCH_CHECK_VALUE(kind_in.is_cuda(), "vskip::plan_schedule (CUDA): kind must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(kind_in.device());
  auto out = alloc_plan_outputs(kind_in, s);
  if (s.b == 0) return out;
  const at::Tensor kind = kind_in.contiguous();
  const size_t ws_bytes = plan_schedule_workspace_bytes(int32_t(s.b), int32_t(s.nk), int32_t(s.nq),
                                                        int32_t(block_m), int32_t(block_n));
  at::Tensor ws = at::empty({int64_t(ws_bytes)}, kind.options().dtype(at::kByte));
  const cudaError_t err = plan_schedule_cuda_launch(
      kind.const_data_ptr<int8_t>(), int32_t(s.b), int32_t(s.nk), int32_t(s.nq), int32_t(policy), visual_self,
      int32_t(block_m), int32_t(block_n), ws.mutable_data_ptr(), std::get<0>(out).mutable_data_ptr<int32_t>(),
      std::get<1>(out).mutable_data_ptr<int32_t>(), std::get<2>(out).mutable_data_ptr<int32_t>(),
      std::get<3>(out).mutable_data_ptr<int32_t>(), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "vskip::plan_schedule (CUDA) launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace
}  // namespace vskip

TORCH_LIBRARY_IMPL(vskip, CUDA, m) { m.impl("plan_schedule", &vskip::plan_schedule_cuda); }
