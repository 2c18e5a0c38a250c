"""The torch backend never builds an N x N buffer: a 32k-token, 31k-visual-token prompt on CPU."""

import os
import subprocess
import sys
import textwrap

import pytest

from python_tests import REPO_ROOT

N = 32768
NN_FP32_MIB = N * N * 4 / 2**20  # one N x N fp32 matrix: 4096 MiB

# Runs in a fresh process so ru_maxrss (the process's peak RSS) reflects only this workload. A small
# warm-up call first pays the one-off import / op-registration memory, so the measured growth is the
# attention call itself.
SCRIPT = textwrap.dedent(f"""
    import resource, sys, torch
    torch.set_num_threads(2)
    from vskip_kernels import modality_attention, visual_attention_mass
    policy = sys.argv[1]
    def run(n):
        g = torch.Generator().manual_seed(0)
        q = torch.randn(1, 2, n, 64, generator=g)
        k = torch.randn(1, 1, n, 64, generator=g)
        v = torch.randn(1, 1, n, 64, generator=g)
        vis = torch.zeros(1, n, dtype=torch.bool)
        vis[:, n // 64: n // 64 + 31 * n // 32] = True
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out, mass, lse = modality_attention(q, k, v, vis, policy=policy, return_visual_mass=True,
                                            return_lse=True, backend="torch")
        last = visual_attention_mass(q, k, vis, policy="dense", query_positions=[-1], backend="torch")
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert torch.isfinite(out).all() and torch.isfinite(last).all()
        return (after - before) / 1024  # ru_maxrss is in KiB on Linux
    run(1024)
    print(run({N}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss units differ off Linux")
@pytest.mark.parametrize("policy", ("vskip", "frozen"))
def test_32k_tokens_bounded_memory(policy):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", SCRIPT, policy], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr
    grown_mib = float(res.stdout.strip().splitlines()[-1])
    # inputs are 16 MiB each; the tiles are bounded to tens of MiB. 512 MiB is 1/8 of one N x N matrix.
    assert grown_mib < NN_FP32_MIB / 8, f"peak RSS grew by {grown_mib:.0f} MiB"
