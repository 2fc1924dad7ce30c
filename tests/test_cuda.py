"""CUDA-only behaviour: bit-identity with the CPU kernels on large inputs, CUDA-graph capture of the ops,
and the current stream. (Per-op parity with the reference runs on CUDA through the `device` parameter of
the other test files.)"""

import halfbyte
import halfbyte.functional as F
import pytest
import torch
from conftest import assert_graph_and_compile_equal_eager, assert_same_bits, assert_same_values, random_tensor

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 512, 1024, 2048, 4096])
def test_cuda_equals_cpu_on_large_odd_tensors(dtype, blocksize):
    A = random_tensor((1000, 4099), dtype, seed=blocksize, scale=4.0)
    A.view(-1)[12345] = float("nan")
    A.view(-1)[:blocksize] = 0
    for quant_type in ("nf4", "fp4"):
        cpu = torch.ops.halfbyte.quantize_4bit(A, blocksize, quant_type, torch.uint8)
        gpu = torch.ops.halfbyte.quantize_4bit(A.cuda(), blocksize, quant_type, torch.uint8)
        assert_same_bits(gpu[0].cpu(), cpu[0])
        assert_same_bits(gpu[1].cpu(), cpu[1])
        out_cpu = torch.ops.halfbyte.dequantize_4bit(*cpu, blocksize, quant_type, list(A.shape), dtype)
        out_gpu = torch.ops.halfbyte.dequantize_4bit(*gpu, blocksize, quant_type, list(A.shape), dtype)
        assert_same_values(out_gpu.cpu(), out_cpu)
    code = F.create_dynamic_map()
    cpu = torch.ops.halfbyte.quantize_blockwise(A, code, blocksize)
    gpu = torch.ops.halfbyte.quantize_blockwise(A.cuda(), code.cuda(), blocksize)
    assert_same_bits(gpu[0].cpu(), cpu[0])
    assert_same_bits(gpu[1].cpu(), cpu[1])


def test_unaligned_input_pointer():
    base = random_tensor((4096 * 3 + 7,), torch.bfloat16, "cuda")
    for offset in (1, 2, 3, 5):
        A = base[offset : offset + 4096 * 2]
        cpu = torch.ops.halfbyte.quantize_4bit(A.cpu(), 64, "nf4", torch.uint8)
        gpu = torch.ops.halfbyte.quantize_4bit(A, 64, "nf4", torch.uint8)
        assert_same_bits(gpu[0].cpu(), cpu[0])
        out = torch.empty(4096 * 2 + 1, dtype=torch.bfloat16, device="cuda")[1:]  # unaligned output
        torch.ops.halfbyte.dequantize_4bit.out(*gpu, 64, "nf4", [4096 * 2], torch.bfloat16, out=out)
        assert_same_bits(out.cpu(), torch.ops.halfbyte.dequantize_4bit(*cpu, 64, "nf4", [4096 * 2], torch.bfloat16))


@pytest.mark.parametrize("nested", [False, True])
def test_quantize_and_dequantize_capture_in_a_cuda_graph(nested):
    W = random_tensor((1024, 1024), torch.bfloat16, "cuda")
    F.quantize_4bit(W, quant_type="nf4", compress_statistics=nested)  # warm-up: caches the code tables
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        F.quantize_4bit(W, quant_type="nf4", compress_statistics=nested)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        packed, state = F.quantize_4bit(W, quant_type="nf4", compress_statistics=nested)
        out = F.dequantize_4bit(packed, state)
    W.copy_(random_tensor((1024, 1024), torch.bfloat16, "cuda", seed=5))
    graph.replay()
    torch.cuda.synchronize()
    eager_packed, eager_state = F.quantize_4bit(W, quant_type="nf4", compress_statistics=nested)
    assert_same_bits(packed, eager_packed)
    assert_same_bits(out, F.dequantize_4bit(eager_packed, eager_state))


@pytest.mark.parametrize("M", [1, 4, 16, 64])
def test_matmul_capture_and_compile_reduce_overhead(M):
    W = random_tensor((512, 1024), torch.bfloat16, "cuda")
    packed, state = F.quantize_4bit(W, quant_type="nf4", compress_statistics=True)
    x = random_tensor((M, 1024), torch.bfloat16, "cuda", seed=M)
    assert_graph_and_compile_equal_eager(lambda a: halfbyte.matmul_4bit(a, packed.t(), state), x)


def test_ops_run_on_the_current_stream():
    A = random_tensor((4096, 4096), torch.bfloat16, "cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        packed, absmax = torch.ops.halfbyte.quantize_4bit(A, 64, "nf4", torch.uint8)
        out = torch.ops.halfbyte.dequantize_4bit(packed, absmax, 64, "nf4", [4096, 4096], torch.bfloat16)
    stream.synchronize()
    ref = torch.ops.halfbyte.dequantize_4bit(
        *torch.ops.halfbyte.quantize_4bit(A, 64, "nf4", torch.uint8), 64, "nf4", [4096, 4096], torch.bfloat16
    )
    assert_same_bits(out, ref)
