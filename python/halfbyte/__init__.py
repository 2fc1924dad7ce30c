"""halfbyte: 4-bit and 8-bit weight quantization for PyTorch, bitsandbytes-compatible.

``import halfbyte as bnb`` covers the common 4-bit code: ``bnb.functional.quantize_4bit`` /
``dequantize_4bit`` / ``quantize_blockwise`` / ..., ``bnb.matmul_4bit`` and ``QuantState``, with
bitsandbytes' byte formats.
"""

import torch  # noqa: F401  (loads libtorch before the native library)

from . import (  # noqa: F401
    _C,  # noqa: F401  (registers torch.ops.halfbyte.*)
    _ops,
    functional,
    nn,
    reference,
)
from .autograd import matmul_4bit
from .nn import replace_linear
from .quant_state import QuantState

__version__ = _C.__version__

__all__ = ["QuantState", "build_info", "functional", "matmul_4bit", "nn", "reference", "replace_linear"]


def build_info() -> dict:
    """How the native library was built: version, CUDA kernels yes/no, CUDA architectures, kernel list."""
    return {
        "version": _C.version(),
        "cuda": _C.built_with_cuda(),
        "cuda_archs": _C.cuda_archs(),
        "kernels": list(_C.compiled_kernels()),
    }


# Hugging Face transformers integration: HalfbyteConfig, registered with transformers when it is installed.
from .config import HalfbyteConfig  # noqa: E402


def _register_with_transformers() -> None:
    """Register HalfbyteConfig and its quantizer with transformers, when transformers is installed."""
    import logging

    try:
        from .integrations import transformers as _transformers_integration  # noqa: F401  (registers on import)
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] != "transformers":  # transformers itself missing: nothing to register
            logging.getLogger("halfbyte").warning("halfbyte: not registered with transformers (%s)", error)
    except Exception as error:  # an incompatible transformers must not break `import halfbyte`
        logging.getLogger("halfbyte").warning(
            "halfbyte: not registered with transformers (%s: %s)", type(error).__name__, error
        )


_register_with_transformers()
__all__ += ["HalfbyteConfig"]
