"""The native vskip::plan_schedule op against the PyTorch schedule path, plus tracing and fallback."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from vskip_kernels import _native
from vskip_kernels.reference import token_kind
from vskip_kernels.schedule import plan_schedule

needs_native = pytest.mark.skipif(
    not _native.available(),
    reason="vskip_kernels._C is not built (pip install --no-build-isolation --use-pep517 -e .) or VSKIP_DISABLE_NATIVE=1",
)

FIELDS = ("full_cnt", "full_idx", "part_cnt", "part_idx")


def _random_layout(g, b, nk):
    """is_visual and attention_mask mixing i.i.d. tokens, image blocks and left/right padding."""
    style = int(torch.randint(0, 3, (1,), generator=g))
    if style == 0:
        is_visual = torch.rand(b, nk, generator=g) < float(torch.rand(1, generator=g))
    else:
        is_visual = torch.zeros(b, nk, dtype=torch.bool)
        for i in range(b):
            start = int(torch.randint(0, nk, (1,), generator=g))
            length = int(torch.randint(0, nk - start + 1, (1,), generator=g))
            is_visual[i, start : start + length] = True
    mask_style = int(torch.randint(0, 4, (1,), generator=g))
    if mask_style == 0:
        return is_visual, None
    if mask_style == 1:
        return is_visual, (torch.rand(b, nk, generator=g) < 0.85).long()
    lens = torch.randint(0, nk + 1, (b,), generator=g)
    pos = torch.arange(nk)[None, :]
    if mask_style == 2:  # left padding, as batched generation uses
        return is_visual, pos >= (nk - lens)[:, None]
    return is_visual, pos < lens[:, None]


def _assert_same(a, b):
    for f in FIELDS:
        x, y = getattr(a, f), getattr(b, f)
        assert x.dtype == y.dtype == torch.int32, f
        assert x.shape == y.shape, f
        assert torch.equal(x, y), f"{f} differs"


@needs_native
def test_native_schedule_bitwise_equal_to_torch_path():
    g = torch.Generator().manual_seed(1234)
    blocks = (16, 32, 64, 128)
    for trial in range(160):
        b = int(torch.randint(1, 4, (1,), generator=g))
        nk = int(torch.randint(1, 400, (1,), generator=g))
        nq = nk if trial % 3 == 0 else int(torch.randint(1, nk + 1, (1,), generator=g))
        is_visual, mask = _random_layout(g, b, nk)
        bm = blocks[int(torch.randint(0, 4, (1,), generator=g))]
        bn = blocks[int(torch.randint(0, 4, (1,), generator=g))]
        for policy in ("dense", "vskip", "frozen"):
            for visual_self in (True, False):
                kw = dict(nq=nq, policy=policy, visual_self=visual_self, block_m=bm, block_n=bn)
                ref = plan_schedule(is_visual, mask, backend="torch", **kw)
                got = plan_schedule(is_visual, mask, backend="native", **kw)
                _assert_same(ref, got)


@needs_native
@pytest.mark.parametrize("policy", ["dense", "vskip", "frozen"])
def test_native_edge_layouts(policy):
    """All text, all visual, all padding but one token, single token, decode (Nq=1)."""
    nk = 97
    layouts = [
        (torch.zeros(2, nk, dtype=torch.bool), None),
        (torch.ones(2, nk, dtype=torch.bool), None),
        (torch.ones(1, nk, dtype=torch.bool), torch.nn.functional.one_hot(torch.tensor([50]), nk)),
        (torch.ones(1, 1, dtype=torch.bool), None),
    ]
    for is_visual, mask in layouts:
        for nq in {1, is_visual.shape[1]}:
            for bm, bn in ((16, 16), (64, 32), (128, 128)):
                kw = dict(nq=nq, policy=policy, block_m=bm, block_n=bn)
                _assert_same(
                    plan_schedule(is_visual, mask, backend="torch", **kw),
                    plan_schedule(is_visual, mask, backend="native", **kw),
                )


@needs_native
def test_op_rejects_bad_arguments():
    op = torch.ops.vskip.plan_schedule
    kind = torch.ones(2, 10, dtype=torch.int8)
    with pytest.raises(TypeError, match="int8"):
        op(kind.int(), 10, 1, True, 16, 16)
    with pytest.raises(ValueError, match="2-D"):
        op(kind[0], 10, 1, True, 16, 16)
    with pytest.raises(ValueError, match="nq"):
        op(kind, 11, 1, True, 16, 16)
    with pytest.raises(ValueError, match="policy"):
        op(kind, 10, 3, True, 16, 16)
    with pytest.raises(ValueError, match="block_m"):
        op(kind, 10, 1, True, 0, 16)


@needs_native
def test_fake_and_meta_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        kind = torch.empty(3, 70, dtype=torch.int8)
        outs = torch.ops.vskip.plan_schedule(kind, 50, 1, True, 16, 32)
    meta = torch.ops.vskip.plan_schedule(torch.empty(3, 70, dtype=torch.int8, device="meta"), 50, 1, True, 16, 32)
    for res in (outs, meta):
        assert [tuple(t.shape) for t in res] == [(3, 4), (3, 4, 3), (3, 4), (3, 4, 3)]
        assert all(t.dtype == torch.int32 for t in res)


@needs_native
def test_opcheck():
    kind = torch.tensor([[1, 2, 2, 2, 0, 1, 2, 1, 1, 2, 2, 2, 1, 1, 1, 1, 2, 0]], dtype=torch.int8).repeat(2, 1)
    torch.library.opcheck(torch.ops.vskip.plan_schedule.default, (kind, 12, 1, True, 16, 16))


@needs_native
def test_compile_fullgraph_through_plan_schedule():
    def f(is_visual, mask):
        s = plan_schedule(is_visual, mask, nq=100, policy="vskip", block_m=16, block_n=32, backend="native")
        return s.full_cnt, s.full_idx, s.part_cnt, s.part_idx

    g = torch.Generator().manual_seed(7)
    is_visual = torch.rand(2, 150, generator=g) < 0.5
    mask = torch.rand(2, 150, generator=g) < 0.9
    compiled = torch.compile(f, fullgraph=True, backend="eager")
    for got, ref in zip(compiled(is_visual, mask), f(is_visual, mask)):
        assert torch.equal(got, ref)


@pytest.mark.cuda
@needs_native
def test_cuda_schedule_equals_cpu_and_captures_in_a_graph():
    if not torch._C._dispatch_has_kernel_for_dispatch_key("vskip::plan_schedule", "CUDA"):
        pytest.skip("extension built without CUDA kernels")
    op = torch.ops.vskip.plan_schedule
    g = torch.Generator().manual_seed(3)
    for trial in range(60):
        b, nk = int(torch.randint(1, 4, (1,), generator=g)), int(torch.randint(1, 2000, (1,), generator=g))
        nq = nk if trial % 2 else int(torch.randint(1, nk + 1, (1,), generator=g))
        kind = token_kind(*_random_layout(g, b, nk))
        bm, bn = (16, 32, 64, 128)[trial % 4], (16, 64, 128, 32)[(trial // 4) % 4]
        for policy in (0, 1, 2):
            for visual_self in (True, False):
                args = (nq, policy, visual_self, bm, bn)
                for x, y in zip(op(kind, *args), op(kind.cuda(), *args)):
                    assert torch.equal(x, y.cpu())
    kind = token_kind(*_random_layout(g, 2, 3000)).cuda()
    static = kind.clone()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        op(static, 3000, 1, True, 64, 64)  # warm-up outside capture
        with torch.cuda.graph(graph, stream=side):
            outs = op(static, 3000, 1, True, 64, 64)
    new_kind = token_kind(*_random_layout(g, 2, 3000)).cuda()
    static.copy_(new_kind)
    graph.replay()
    torch.cuda.synchronize()
    for x, y in zip(op(new_kind.cpu(), 3000, 1, True, 64, 64), outs):
        assert torch.equal(x, y.cpu())


def test_extension_module_imports_when_built():
    if os.environ.get("VSKIP_DISABLE_NATIVE") == "1":
        pytest.skip("VSKIP_DISABLE_NATIVE=1")
    try:
        import vskip_kernels._C  # noqa: F401
    except ImportError:
        assert not _native.available()
        assert _native.get_op("plan_schedule") is None
    else:
        assert _native.available()
        assert _native.get_op("plan_schedule") is torch.ops.vskip.plan_schedule


def test_fallback_without_native_warns_once():
    script = textwrap.dedent(
        """
        import logging
        notices = []

        class Collect(logging.Handler):
            def emit(self, record):
                notices.append(record.getMessage())

        logging.getLogger("vskip_kernels").addHandler(Collect())
        import torch
        from vskip_kernels import _native
        from vskip_kernels.schedule import plan_schedule
        iv = torch.tensor([[False, True, True, False, True]] * 2)
        a = plan_schedule(iv, nq=5, policy="vskip", block_m=16, block_n=16)
        b = plan_schedule(iv, nq=3, policy="frozen", block_m=16, block_n=16, backend="auto")
        c = plan_schedule(iv, nq=5, policy="vskip", block_m=16, block_n=16, backend="torch")
        assert not _native.available() and _native.get_op("plan_schedule") is None
        assert all(torch.equal(getattr(a, f), getattr(c, f)) for f in ("full_cnt", "full_idx", "part_cnt", "part_idx"))
        assert int(a.live_pairs()) == 2 and int(b.live_pairs()) == 2  # one tile pair per sequence
        try:
            plan_schedule(iv, backend="native")
        except RuntimeError as exc:
            assert "not built" in str(exc)
        else:
            raise AssertionError("backend='native' without the extension must raise")
        native = [m for m in notices if "native extension" in m]
        assert len(native) == 1, notices
        print("OK")
        """
    )
    env = dict(os.environ, VSKIP_DISABLE_NATIVE="1")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("OK")


def test_extension_is_built_from_a_source_checkout():
    """The README's install command builds vskip_kernels._C; a silent fallback would leave
    every native test above skipped (this caught pip's legacy `setup.py develop` path,
    which builds in an isolated environment without torch)."""
    import shutil
    from pathlib import Path

    import vskip_kernels

    source_tree = (Path(vskip_kernels.__file__).resolve().parents[1] / "csrc").is_dir()
    opted_out = os.environ.get("VSKIP_BUILD_NATIVE") == "0" or os.environ.get("VSKIP_DISABLE_NATIVE") == "1"
    if not source_tree or opted_out or shutil.which("c++") is None:
        pytest.skip("not a source checkout with a C++ compiler, or the native build was opted out")
    assert _native.available(), (
        "vskip_kernels._C was not built: install with "
        "`pip install --no-build-isolation --use-pep517 -e .` after installing torch"
    )
