"""Record bitsandbytes' CUDA outputs as a test fixture (run on a GPU machine with bitsandbytes importable).

    python tests/data/make_bnb_cuda_fixture.py tests/data/bnb_cuda_fixture.pt

The CPU tests (tests/test_bnb_cuda_fixture.py) compare halfbyte against these recorded outputs, so the
claim "byte-identical to bitsandbytes' CUDA kernels" is checked in CI, where there is no GPU. Inputs are
generated here with a fixed seed and stored with the outputs. Cases: every dtype x blocksize x
quant_type on an odd-sized tensor (4-bit and 8-bit, raw absmax), the values that sit exactly on each
threshold (so the threshold constants and the reciprocal are pinned down), zero / tiny / NaN / inf /
subnormal blocks, and the double quantization of an absmax vector.
"""

import sys

import bitsandbytes as bnb
import bitsandbytes.functional as F
import torch

torch.manual_seed(1234)
device = "cuda"
out = {"bitsandbytes": bnb.__version__, "torch": str(torch.__version__), "device": torch.cuda.get_device_name()}


def record_4bit(w, blocksize, quant_type):
    q, st = F.quantize_4bit(w.to(device), blocksize=blocksize, quant_type=quant_type)
    d = F.dequantize_4bit(q, st)
    return {"w": w.cpu(), "q": q.cpu(), "absmax": st.absmax.cpu(), "d": d.cpu()}


def record_8bit(w, blocksize):
    q, st = F.quantize_blockwise(w.to(device), blocksize=blocksize)
    d = F.dequantize_blockwise(q, st)
    return {"w": w.cpu(), "q": q.cpu(), "absmax": st.absmax.cpu(), "d": d.cpu()}


random_cases = {}
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    for blocksize in (32, 64, 128, 256, 512, 1024, 2048, 4096):
        w = (torch.randn(23, 311) * 2.5).to(dtype)  # 7153 elements: odd, not a multiple of any blocksize
        for quant_type in ("nf4", "fp4"):
            random_cases[(str(dtype), blocksize, quant_type)] = record_4bit(w, blocksize, quant_type)
        if blocksize >= 64:  # bitsandbytes' CUDA 8-bit path accepts 64..4096
            random_cases[(str(dtype), blocksize, "8bit")] = record_8bit(w, blocksize)
out["random"] = random_cases

# Values on and next to every threshold, in blocks whose absmax is exactly 1 (so x is its own scaled value).
nf4 = [-0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544,
       -0.23460740596055984, -0.13791173323988914, -0.045525018125772476, 0.03979014977812767,
       0.1202552504837513, 0.2035212516784668, 0.2920137718319893, 0.3893125355243683, 0.5016634166240692,
       0.6427869200706482, 0.8614784181118011]  # fmt: skip
fp4 = [0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333]
fp4 = fp4 + [-t for t in fp4]
code = F.create_dynamic_map()
mids = ((code[:-1] + code[1:]) / 2).tolist()


def neighbourhood(values):
    """Each value and its float32 neighbours up to 2 ulps away, in blocks of 64 led by 1.0 (absmax 1)."""
    t = torch.tensor(values, dtype=torch.float32)
    down1 = torch.nextafter(t, t - 1)
    up1 = torch.nextafter(t, t + 1)
    x = torch.stack([torch.nextafter(down1, t - 1), down1, t, up1, torch.nextafter(up1, t + 1)], 1).reshape(-1)
    blocks = -(-x.numel() // 63)
    padded = torch.zeros(blocks * 63)
    padded[: x.numel()] = x
    return torch.cat([torch.ones(blocks, 1), padded.view(blocks, 63)], dim=1).reshape(-1)


ties = {
    "nf4": record_4bit(neighbourhood(nf4), 64, "nf4"),
    "fp4": record_4bit(neighbourhood(fp4), 64, "fp4"),
    "8bit": record_8bit(neighbourhood(mids), 64),
}
out["ties"] = ties

# Special blocks: zeros, +-tiny, subnormals, NaN, inf, -inf, huge range, exact +-1.
special = torch.randn(16, 64)
special[0] = 0.0
special[1] = torch.tensor([1e-6, -1e-6] * 32)
special[2, :] = 1e-40  # subnormal float32
special[2, 1] = -1e-41
special[3, 5] = float("nan")
special[4, 7] = float("inf")
special[5, 9] = float("-inf")
special[6] = torch.logspace(-30, 30, 64) * torch.tensor([1.0, -1.0] * 32)
special[7] = torch.tensor([1.0, -1.0] * 32)
special[8, :32] = 0.0
special[9] = torch.linspace(-1, 1, 64)
flat = special.reshape(-1)
out["special"] = {
    "nf4": record_4bit(flat, 64, "nf4"),
    "fp4": record_4bit(flat, 64, "fp4"),
    "8bit": record_8bit(flat, 64),
}

# Double quantization of an absmax vector (the step after mean): blocks of 256, dynamic map.
absmax = torch.rand(1000) * 3 + 0.5
offset = absmax.mean()
nested = record_8bit(absmax - offset, 256)
out["nested"] = nested

torch.save(out, sys.argv[1])
print("saved", sys.argv[1], {k: len(v) if isinstance(v, dict) else v for k, v in out.items()})
