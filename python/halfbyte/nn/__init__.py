"""4-bit layers, bitsandbytes-shaped: ``halfbyte.nn.Linear4bit`` is used like ``bitsandbytes.nn.Linear4bit``."""

from .embedding4bit import Embedding4bit, EmbeddingFP4, EmbeddingNF4
from .linear4bit import Linear4bit, LinearFP4, LinearNF4
from .params4bit import Params4bit
from .replace_linear import replace_linear

__all__ = [
    "Embedding4bit", "EmbeddingFP4", "EmbeddingNF4", "Linear4bit", "LinearFP4", "LinearNF4", "Params4bit",
    "replace_linear",
]  # fmt: skip

# The INT8 tier (LLM.int8): bitsandbytes' Int8Params and Linear8bitLt.
from .linear8bit import Int8Params, Linear8bitLt  # noqa: E402

__all__ += ["Int8Params", "Linear8bitLt"]
