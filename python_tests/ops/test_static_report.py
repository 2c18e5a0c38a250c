"""The static report's readers (ops/static.py) on hand-made input with known answers.

The compile pass that feeds them real ptxas logs and cubins runs in the compile gate
(test_compile_gate.py); here each reader is checked against values worked out by hand.
"""

from __future__ import annotations

import pytest

from vskip_kernels.ops import static

PTXAS_LOG = """ptxas info    : 11 bytes gmem, 8 bytes cmem[4]
ptxas info    : Compiling entry function 'paged_attn_kernel' for 'sm_80'
ptxas info    : Function properties for paged_attn_kernel
    384 bytes stack frame, 384 bytes spill stores, 320 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 384 bytes cumulative stack size, 512 bytes cmem[0]
"""

SASS = """        /*0000*/                   IMAD.MOV.U32 R1, RZ, RZ, c[0x0][0x28] ;
.L_x_3:
        /*0010*/                   LDG.E R2, [R2.64] ;
        /*0020*/                   HMMA.16816.F32 R4, R8, R12, R4 ;
        /*0030*/                   HMMA.16816.F32 R4, R8, R14, R4 ;
        /*0040*/              @!P0 BRA `(.L_x_3) ;
.L_x_4:
        /*0050*/                   HMMA.16816.F32 R4, R8, R12, R4 ;
        /*0060*/                   STL [R1], R4 ;
        /*0070*/                   BRA `(.L_x_4) ;
        /*0080*/                   EXIT ;
"""


def test_ptxas_log_is_read():
    assert static.parse_ptxas_log(PTXAS_LOG) == {
        "registers": 255,
        "spill_stores": 384,
        "spill_loads": 320,
        "stack_frame": 384,
    }


def test_ptxas_log_of_no_function_is_refused():
    with pytest.raises(ValueError, match="ptxas -v"):
        static.parse_ptxas_log("ptxas info    : 0 bytes gmem")


def test_sass_opcodes_and_main_loop():
    ops = [op for _, op, _ in static.parse_sass(SASS)]
    assert ops == ["IMAD", "LDG", "HMMA", "HMMA", "BRA", "HMMA", "STL", "BRA", "EXIT"]
    # two loops: [0x10, 0x40] with 2 MMAs, [0x50, 0x70] with 1: the first is the main one
    assert static.main_loop(SASS) == (4, 2)


@pytest.mark.parametrize(
    "cc,regs,shared,warps,expect",
    [
        # 255 regs -> 8160 per warp (units of 256: 8192); 4 warps = 32768: 2 CTAs of 65536
        (80, 255, 22528, 4, (2, "registers")),
        # 64 regs x 4 warps = 8192 per CTA: 8 by registers; 16 KiB + 1 KiB reserved: 164 / 17 = 9;
        # 2048 threads / 128 = 16 by warps: registers bind
        (80, 64, 16 * 1024, 4, (8, "registers")),
        # sm86: 1536 threads / 256 = 6 CTAs by warps; 32 regs: 65536 / 8192 = 8 by registers
        (86, 32, 8 * 1024, 8, (6, "warps")),
        # sm89: 48 KiB + 1 KiB per CTA in 100 KiB: 2
        (89, 32, 48 * 1024, 4, (2, "shared")),
    ],
)
def test_occupancy_by_hand(cc, regs, shared, warps, expect):
    assert static.occupancy(cc, regs, shared, warps) == expect
