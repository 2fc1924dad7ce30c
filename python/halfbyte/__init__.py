"""halfbyte: 4-bit and 8-bit weight quantization for PyTorch, bitsandbytes-compatible."""
import torch  # noqa: F401  (loads libtorch before the native library)

from . import _C  # noqa: F401  (registers torch.ops.halfbyte.*)

__version__ = _C.__version__
