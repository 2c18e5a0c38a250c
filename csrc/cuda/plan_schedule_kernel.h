// Launcher interface of the plain-CUDA schedule kernels (see plan_schedule_kernel.cu).
#pragma once

#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

namespace vskip {

// Bytes of device scratch the launcher needs for the per-tile aggregates.
size_t plan_schedule_workspace_bytes(int32_t b_sz, int32_t nk, int32_t nq, int32_t block_m, int32_t block_n);

// Enqueues the schedule build on `stream`; returns the launch status without synchronising.
cudaError_t plan_schedule_cuda_launch(const int8_t* kind, int32_t b_sz, int32_t nk, int32_t nq, int32_t policy,
                                      bool visual_self, int32_t block_m, int32_t block_n, void* workspace,
                                      int32_t* full_cnt, int32_t* full_idx, int32_t* part_cnt, int32_t* part_idx,
                                      cudaStream_t stream);

}  // namespace vskip
