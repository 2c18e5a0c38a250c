"""Every Triton kernel natively on CUDA tensors (compiled for the GPU, not interpreted),
against the reference.

cuda-marked: skipped without a GPU, run by ``pytest python_tests -m cuda`` (and by
``bench/gpu_check.sh``). Covers every dtype the API accepts (fp16, bf16, fp32) and head
dims across its 16..256 range (the tuned 64, 80, 96, 128, 256 and untuned ones between)
for the prefill, split-KV decode and visual-mass kernels; the autotuned launch; varlen;
the CUDA schedule builder against the PyTorch one; and decode captured in a CUDA graph.

Launches inside ``count_tiles`` take one config without autotuning (one compile per
kernel variant keeps the grid to minutes) and count the tile pairs they process, which
must equal the schedule's live pairs: block sparsity checked on the real kernels.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from python_tests._shared import assert_matches_reference, assert_rule, build_layout, make_qkv, spans
from vskip_kernels import modality_attention, modality_attention_varlen, plan_schedule, visual_attention_mass
from vskip_kernels.ops.triton import attention as ta
from vskip_kernels.ops.triton import decode as td
from vskip_kernels.reference import allowed_mask, attention_ref, live_tile_pairs, token_kind, visual_mass_ref
from vskip_kernels.schedule import classify_tiles

pytestmark = pytest.mark.cuda

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_DIMS = (16, 32, 64, 80, 96, 112, 128, 192, 256)
POLICIES = ("dense", "vskip", "frozen")
# fp32 takes exact (IEEE) dots, as the fp32 reference does: only the summation order differs
FP32_OUT_ATOL = 1e-4

# (policy, dtype, head dim): the policy rotates over the dtype x head-dim grid, so each
# (dtype, head dim) and each (dtype, policy) pair is covered.
GRID = [
    (POLICIES[(i + j) % 3], dt, d) for (i, dt), (j, d) in itertools.product(enumerate(DTYPES), enumerate(HEAD_DIMS))
]


def cuda(*ts):
    return tuple(None if t is None else t.cuda() for t in ts)


def prefill_layout(n=700):
    """Two sequences: one image; two images after 37 positions of left padding."""
    return cuda(*build_layout(n, [(40, 420)], [(100, 300), (380, 640)], pad=(0, 37)))


def out_atol(dtype):
    return FP32_OUT_ATOL if dtype == torch.float32 else 1e-5


# ----------------------------------------------------------------------------- prefill


@pytest.mark.parametrize("policy,dtype,d", GRID)
def test_prefill_every_dtype_and_head_dim(dtype, d, policy):
    vis, am = prefill_layout()
    n = vis.shape[1]
    q, k, v = cuda(*make_qkv(2, 4, 2, n, n, d, dtype, seed=d))
    bm, bn = ta.block_sizes(q)
    sched = plan_schedule(vis, am, nq=n, policy=policy, block_m=bm, block_n=bn)
    with ta.count_tiles() as counter:
        res = modality_attention(
            q,
            k,
            v,
            vis,
            policy=policy,
            attention_mask=am,
            schedule=sched,
            return_visual_mass=True,
            return_lse=True,
            backend="triton",
        )
    assert res[0].device == q.device and res[0].dtype == dtype
    assert_matches_reference(res, q, k, v, vis, am, policy, True, out_atol=out_atol(dtype))
    live = live_tile_pairs(allowed_mask(vis, am, n, policy, True), bm, bn)
    assert counter.value == 4 * int(live.sum()) == 4 * int(sched.live_pairs())


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
@pytest.mark.parametrize("policy", POLICIES)
def test_prefill_autotuned_launch(policy, dtype):
    """The launch the benchmarks time: autotuned over the configs that fit this GPU."""
    vis, am = prefill_layout(1500)
    n = vis.shape[1]
    q, k, v = cuda(*make_qkv(2, 8, 2, n, n, 128, dtype, seed=1))
    out = modality_attention(q, k, v, vis, policy=policy, attention_mask=am, backend="triton")
    assert_matches_reference((out, None, None), q, k, v, vis, am, policy, True)
    again = modality_attention(q, k, v, vis, policy=policy, attention_mask=am, backend="triton")
    assert torch.equal(out, again)  # the tuned config is reused, deterministically


@pytest.mark.parametrize("visual_self", (True, False))
@pytest.mark.parametrize("want", ((False, False), (True, False), (False, True)), ids=("out", "out+mass", "out+lse"))
def test_prefill_variants_chunked(visual_self, want):
    """Nq < Nk (chunked prefill), visual_self off, and each subset of the extra outputs."""
    vis, am = cuda(*build_layout(900, [(20, 600)], [(0, 300), (650, 800)], pad=(0, 9)))
    q, k, v = cuda(*make_qkv(2, 8, 4, 300, 900, 128, torch.bfloat16, seed=3))
    res = modality_attention(
        q,
        k,
        v,
        vis,
        policy="vskip",
        attention_mask=am,
        visual_self=visual_self,
        return_visual_mass=want[0],
        return_lse=want[1],
        backend="triton",
    )
    res = res if isinstance(res, tuple) else (res,)
    full = [res[0], None, None]
    if want[0]:
        full[1] = res[1]
    if want[1]:
        full[2] = res[-1]
    assert_matches_reference(tuple(full), q, k, v, vis, am, "vskip", visual_self)


def test_prefill_long_sequence_with_gqa_7():
    """A OneVision-like shape (28 query heads on 4 KV heads) at 8k tokens, head dim 128."""
    n = 8192
    vis = spans(n, [(35, n - 40)])[None].cuda()
    q, k, v = cuda(*make_qkv(1, 28, 4, n, n, 128, torch.bfloat16, seed=5))
    for policy in POLICIES:
        res = modality_attention(q, k, v, vis, policy=policy, return_lse=True, backend="triton")
        ref32 = attention_ref(q, k, v, vis, policy=policy)
        reflp = attention_ref(q, k, v, vis, policy=policy, upcast=False)
        assert_rule(f"{policy} out", res[0], ref32[0], reflp[0])
        assert_rule(f"{policy} lse", res[1], ref32[2], reflp[2])
        del ref32, reflp
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- varlen


@pytest.mark.parametrize("dtype,d", [(torch.bfloat16, 128), (torch.float16, 64), (torch.float32, 80)])
@pytest.mark.parametrize("policy", POLICIES)
def test_varlen_matches_per_sequence(dtype, d, policy):
    lens_q, lens_k = [300, 1, 517, 64], [300, 700, 517, 200]
    g = torch.Generator().manual_seed(11)
    tq, tk = sum(lens_q), sum(lens_k)
    q = torch.randn(tq, 8, d, generator=g).to(dtype).cuda()
    k = torch.randn(tk, 2, d, generator=g).to(dtype).cuda()
    v = torch.randn(tk, 2, d, generator=g).to(dtype).cuda()
    vis = (torch.rand(tk, generator=g) < 0.7).cuda()
    cu = lambda lens: torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32).cuda()
    cq, ck = cu(lens_q), cu(lens_k)
    out, mass, lse = modality_attention_varlen(
        q,
        k,
        v,
        cq,
        ck,
        max(lens_q),
        max(lens_k),
        vis,
        policy=policy,
        return_visual_mass=True,
        return_lse=True,
        backend="triton",
    )
    for i in range(len(lens_q)):
        qs, ks = slice(int(cq[i]), int(cq[i + 1])), slice(int(ck[i]), int(ck[i + 1]))
        to4 = lambda t: t.transpose(0, 1)[None]
        got = tuple(x[qs].transpose(0, 1)[None] for x in (out, mass, lse))
        assert_matches_reference(
            got, to4(q[qs]), to4(k[ks]), to4(v[ks]), vis[ks][None], None, policy, True, out_atol=out_atol(dtype)
        )


# ----------------------------------------------------------------------------- decode


@pytest.mark.parametrize("policy,dtype,d", GRID)
def test_decode_every_dtype_and_head_dim(dtype, d, policy):
    """The split-KV path (Nq <= 16) against a 3k cache, with GQA 7 and left padding."""
    nk = 3000
    image = [(35, 2500)]
    vis, am = cuda(*build_layout(nk, image, image, pad=(0, 400)))
    for nq in (1, 5):
        q, k, v = cuda(*make_qkv(2, 28, 4, nq, nk, d, dtype, seed=nq))
        sched = plan_schedule(vis, am, nq=nq, policy=policy, block_m=64, block_n=64)
        assert td.use_decode_path(q, k)
        with ta.count_tiles() as counter:
            res = modality_attention(
                q,
                k,
                v,
                vis,
                policy=policy,
                attention_mask=am,
                schedule=sched,
                return_visual_mass=True,
                return_lse=True,
                backend="triton",
            )
        assert_matches_reference(res, q, k, v, vis, am, policy, True, out_atol=out_atol(dtype))
        assert counter.value == 28 * int(sched.live_pairs())


def _static_decode_inputs(nk, seed):
    q, k, v = make_qkv(1, 32, 8, 1, nk, 128, torch.bfloat16, seed=seed)
    return q.cuda(), k.cuda(), v.cuda()


def test_decode_replays_in_a_cuda_graph():
    """Decode attention captured once in a CUDA graph and replayed on new inputs (what a
    compiled decode step does): no host sync inside, and the replay matches the reference."""
    nk = 8192
    vis = spans(nk, [(35, 7000)])[None].cuda()
    q, k, v = _static_decode_inputs(nk, 0)
    sched = plan_schedule(vis, nq=1, policy="vskip", block_m=64, block_n=64)

    def step():
        return modality_attention(
            q, k, v, vis, policy="vskip", schedule=sched, return_visual_mass=True, backend="triton"
        )

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # compile and warm up outside the capture
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, mass = step()
    for seed in (1, 2):
        nq_, nk_, nv_ = _static_decode_inputs(nk, seed)
        q.copy_(nq_), k.copy_(nk_), v.copy_(nv_)
        graph.replay()
        torch.cuda.synchronize()
        assert_matches_reference((out, mass, None), q, k, v, vis, None, "vskip", True)


def test_schedule_planned_inside_a_cuda_graph():
    """With the native CUDA schedule kernel, planning joins the captured graph too (the
    token kinds change between replays, the schedule follows)."""
    if not torch._C._dispatch_has_kernel_for_dispatch_key("vskip::plan_schedule", "CUDA"):
        pytest.skip("native extension built without its CUDA kernels: planning on CUDA uses PyTorch")
    nk = 4096
    vis = spans(nk, [(35, 3000)])[None].cuda()
    q, k, v = _static_decode_inputs(nk, 0)

    def step():
        sched = plan_schedule(vis, nq=1, policy="vskip", block_m=64, block_n=64)
        return modality_attention(q, k, v, vis, policy="vskip", schedule=sched, backend="triton")

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    vis.copy_(spans(nk, [(35, 1000), (2000, 4000)])[None].cuda())  # the newest token is now visual
    graph.replay()
    torch.cuda.synchronize()
    assert_matches_reference((out, None, None), q, k, v, vis, None, "vskip", True)


# ----------------------------------------------------------------------------- visual mass


@pytest.mark.parametrize("policy,dtype,d", GRID)
def test_visual_mass_every_dtype_and_head_dim(dtype, d, policy):
    nk = 2000
    image = [(35, 1500)]
    vis, am = cuda(*build_layout(nk, image, image, pad=(0, 300)))
    q, k, _ = cuda(*make_qkv(2, 28, 4, 6, nk, d, dtype, seed=d))
    for positions in (None, [-1], [0, 3]):
        got = visual_attention_mass(
            q, k, vis, policy=policy, attention_mask=am, query_positions=positions, backend="triton"
        )
        ref = visual_mass_ref(q, k, vis, policy=policy, attention_mask=am, query_positions=positions)
        reflp_full = attention_ref(
            q,
            k,
            torch.zeros_like(k[..., :1]).expand(*k.shape[:-1], 1).contiguous(),
            vis,
            policy=policy,
            attention_mask=am,
            upcast=False,
        )[1]
        reflp = reflp_full if positions is None else reflp_full[:, :, torch.tensor(positions, device=q.device)]
        assert got.device == q.device and got.dtype == torch.float32
        assert_rule(f"visual mass {positions}", got, ref, reflp)


def test_visual_mass_newest_token_of_32k():
    """FlashVLM's calibration query: the newest token against a 32k cache, O(N) per head."""
    nk = 32768
    vis = spans(nk, [(35, nk - 40)])[None].cuda()
    q, k, _ = cuda(*make_qkv(1, 32, 32, 1, nk, 128, torch.bfloat16, seed=2))
    got = visual_attention_mass(q, k, vis, query_positions=[-1], backend="triton")
    ref = visual_mass_ref(q, k, vis, query_positions=[-1])
    assert (got - ref).abs().max().item() < 2e-3


# ----------------------------------------------------------------------------- schedule


@pytest.mark.parametrize("visual_self", (True, False))
@pytest.mark.parametrize("policy", POLICIES)
def test_schedule_on_cuda_matches_torch_planner(policy, visual_self):
    """plan_schedule on CUDA tensors (the native CUDA kernel when built, else PyTorch on the
    GPU) equals the pure-PyTorch planner on CPU, tile for tile."""
    g = torch.Generator().manual_seed(4)
    for trial in range(12):
        b, nk = 1 + trial % 3, int(torch.randint(1, 5000, (1,), generator=g))
        nq = nk if trial % 2 else int(torch.randint(1, nk + 1, (1,), generator=g))
        vis = torch.rand(b, nk, generator=g) < 0.6
        am = (torch.rand(b, nk, generator=g) < 0.95).int()
        bm, bn = ((64, 64), (128, 64), (64, 32), (16, 128))[trial % 4]
        cpu = plan_schedule(
            vis, am, nq=nq, policy=policy, visual_self=visual_self, block_m=bm, block_n=bn, backend="torch"
        )
        vis_gpu = vis.cuda()
        gpu = plan_schedule(vis_gpu, am.cuda(), nq=nq, policy=policy, visual_self=visual_self, block_m=bm, block_n=bn)
        for name in ("full_cnt", "full_idx", "part_cnt", "part_idx"):
            a, c = getattr(cpu, name), getattr(gpu, name)
            assert c.device == vis_gpu.device, name
            if name.endswith("idx"):  # only the first cnt entries of each list are meaningful
                cnt = getattr(cpu, name.replace("idx", "cnt"))
                keep = torch.arange(a.shape[-1])[None, None, :] < cnt[..., None]
                a, c = a[keep], c.cpu()[keep]
            assert torch.equal(a, c.cpu()), (name, trial)
        live, full = classify_tiles(token_kind(vis, am), nq, policy, visual_self, bm, bn)
        assert int(gpu.live_pairs()) == int(live.sum())
