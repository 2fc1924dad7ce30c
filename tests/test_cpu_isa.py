"""The CPU kernels pick an instruction set at run time (portable, AVX-512, AVX-512 VBMI); HALFBYTE_CPU_ISA
forces a lower one. Every path must give the same bits: the bit-exact op and parity suites run under each."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


@pytest.mark.parametrize("isa", ["scalar", "avx512"])
def test_bit_exact_suites_pass_on_every_cpu_path(isa):
    env = dict(os.environ, HALFBYTE_CPU_ISA=isa, CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", "-k", "not cuda",
         str(HERE / "test_ops.py"), str(HERE / "test_bnb_parity.py")],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and " failed" not in result.stdout
