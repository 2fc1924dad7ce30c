"""Shared test helpers: devices, bitsandbytes (optional, skipped visibly), bit-exact comparisons."""

import halfbyte  # noqa: F401  (registers the ops)
import pytest
import torch

HAS_CUDA = torch.cuda.is_available() and halfbyte.build_info()["cuda"]
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU and a CUDA build of halfbyte")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def bnb_or_skip():
    """bitsandbytes.functional, or a visible skip when bitsandbytes is not installed."""
    return pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes not installed: parity not checked")


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Bit-identical tensors (shape, dtype and every byte, so -0.0 != 0.0 and NaN payloads count)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    a, e = as_bytes(actual), as_bytes(expected)
    if not torch.equal(a, e):
        diff = (a != e).nonzero().reshape(-1)
        raise AssertionError(f"{what}: {diff.numel()} of {a.numel()} bytes differ, first at byte {diff[0].item()}")


def assert_same_values(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Bit-identical except that any NaN equals any NaN (NaN payloads differ between CPU and GPU)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    nan = torch.isnan(actual.float())
    assert torch.equal(nan, torch.isnan(expected.float())), f"{what}: NaN positions differ"
    assert_same_bits(actual[~nan], expected[~nan], what)


def random_tensor(shape, dtype, device="cpu", seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype).to(device)


def assert_graph_and_compile_equal_eager(call, x: torch.Tensor) -> None:
    """`call(x)` captured in a CUDA graph and compiled with torch.compile(fullgraph=True,
    mode="reduce-overhead") gives the eager result bit for bit."""
    eager = call(x)
    static_x = x.clone()
    call(static_x)  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = call(static_x)
    graph.replay()
    torch.cuda.synchronize()
    assert_same_bits(static_out, eager, "CUDA graph")
    torch._dynamo.reset()
    compiled = torch.compile(call, fullgraph=True, mode="reduce-overhead")
    for _ in range(3):
        result = compiled(x)
    assert_same_bits(result, eager, "torch.compile")
