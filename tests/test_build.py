"""The native library: build information and the registered ops."""

import halfbyte
import torch


def test_build_info_reports_version_and_kernels():
    info = halfbyte.build_info()
    assert info["version"] == halfbyte.__version__ == "0.1.0"
    assert isinstance(info["cuda"], bool)
    assert "cpu:quantize_4bit" in info["kernels"] and "cpu:gemm_4bit" in info["kernels"]
    assert ("cuda:quantize_4bit" in info["kernels"]) == info["cuda"]
    assert (info["cuda_archs"] != "") == info["cuda"]


def test_every_op_is_registered():
    for name in (
        "quantize_blockwise",
        "dequantize_blockwise",
        "quantize_4bit",
        "dequantize_4bit",
        "gemm_4bit",
        "gemv_4bit",
    ):
        assert hasattr(torch.ops.halfbyte, name), name
    assert torch.ops.halfbyte.dequantize_4bit.out is not None
    assert torch.ops.halfbyte.dequantize_blockwise.out is not None
    assert torch.ops.halfbyte.gemv_4bit.out is not None


def test_import_as_bnb_covers_the_common_4bit_api():
    import halfbyte as bnb

    for name in (
        "quantize_4bit",
        "dequantize_4bit",
        "quantize_blockwise",
        "dequantize_blockwise",
        "quantize_nf4",
        "dequantize_fp4",
        "gemv_4bit",
        "get_4bit_type",
        "create_dynamic_map",
        "create_normal_map",
        "QuantState",
    ):
        assert hasattr(bnb.functional, name), name
    assert callable(bnb.matmul_4bit)
