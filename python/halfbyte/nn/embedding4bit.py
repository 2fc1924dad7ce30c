"""Embedding4bit, EmbeddingNF4, EmbeddingFP4: an embedding table stored in 4 bits.

The table is a Params4bit quantized on ``.to(device)`` like Linear4bit's weight. When ``embedding_dim`` is a
multiple of the blocksize, every row is a whole number of blocks, so a lookup gathers only the looked-up rows'
packed bytes and absmax (resolving double-quantized absmax for those blocks only) and dequantizes those rows:
the cost is proportional to the tokens looked up, not to the vocabulary. Otherwise the table is dequantized
whole and indexed (correct, slow; a warning says so at construction). The output is in ``dtype`` (the table's
dtype before quantization).

State dicts save and load like Linear4bit's (bitsandbytes' Embedding4bit raises NotImplementedError).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .. import functional as F
from ..quant_state import QuantState
from .linear4bit import ensure_quant_state
from .params4bit import Params4bit
from .quantized_state_dict import QuantizedWeightStateDict

logger = logging.getLogger("halfbyte")


def gathered_absmax(state: QuantState, blocks: torch.Tensor) -> torch.Tensor:
    """float32 absmax of the given block indices; double-quantized absmax is resolved as the kernels do
    (code[q] * nested_absmax[block // 256] + offset, in float32)."""
    if not state.nested:
        return state.absmax[blocks]
    nested = state.state2
    scaled = (
        nested.code[state.absmax[blocks].long()]
        * nested.absmax[torch.div(blocks, nested.blocksize, rounding_mode="floor")]
    )
    return scaled + state.offset


class Embedding4bit(QuantizedWeightStateDict, nn.Embedding):
    """nn.Embedding with a 4-bit table. ``compress_statistics`` (double quantization) is off by default, as in
    bitsandbytes; ``blocksize`` is 64 by default."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        dtype: torch.dtype | None = None,
        quant_type: str = "fp4",
        quant_storage: torch.dtype = torch.uint8,
        device=None,
        blocksize: int = 64,
        compress_statistics: bool = False,
    ):
        super().__init__(num_embeddings, embedding_dim, device=device, dtype=dtype)
        self.dtype = self.weight.data.dtype
        self.weight = Params4bit(
            self.weight.data,
            requires_grad=False,
            blocksize=blocksize,
            compress_statistics=compress_statistics,
            quant_type=quant_type,
            quant_storage=quant_storage,
            module=self,
        )
        self.quant_state = None
        if embedding_dim % blocksize != 0:
            logger.warning(
                "Embedding4bit: embedding_dim %d is not a multiple of blocksize %d; every lookup dequantizes the "
                "whole table (slow). Pick a blocksize that divides embedding_dim.",
                embedding_dim,
                blocksize,
            )

    def _expected_weight_shape(self) -> list[int]:
        return [self.num_embeddings, self.embedding_dim]

    def _lookup_rows(self, input: torch.Tensor) -> torch.Tensor:
        state = self.weight.quant_state
        row_bytes = self.embedding_dim // 2
        table = self.weight.data.view(torch.uint8).reshape(-1)[: self.num_embeddings * row_bytes]
        rows = torch.nn.functional.embedding(input.reshape(-1), table.view(self.num_embeddings, row_bytes))
        blocks_per_row = self.embedding_dim // state.blocksize
        blocks = input.reshape(-1, 1) * blocks_per_row + torch.arange(blocks_per_row, device=input.device)
        rows_state = QuantState(
            absmax=gathered_absmax(state, blocks.reshape(-1)),
            shape=(*input.shape, self.embedding_dim),
            code=state.code,
            blocksize=state.blocksize,
            quant_type=state.quant_type,
            dtype=state.dtype,
        )
        return F.dequantize_4bit(rows.reshape(-1, 1), rows_state)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        ensure_quant_state(self)
        if input.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"Embedding4bit: input must hold int32 or int64 indices, got {input.dtype}")
        if self.embedding_dim % self.weight.quant_state.blocksize == 0:
            output = self._lookup_rows(input)
        else:
            table = F.dequantize_4bit(self.weight.data, self.weight.quant_state)
            output = torch.nn.functional.embedding(input, table)
        return output.to(self.dtype)

    def extra_repr(self) -> str:
        weight = self.weight
        return (
            f"{super().extra_repr()}, quant_type={weight.quant_type}, blocksize={weight.blocksize}, "
            f"compress_statistics={weight.compress_statistics}"
        )


class EmbeddingFP4(Embedding4bit):
    """Embedding4bit with quant_type='fp4'."""

    def __init__(self, num_embeddings, embedding_dim, dtype=None, quant_storage=torch.uint8, device=None, blocksize=64):
        super().__init__(num_embeddings, embedding_dim, dtype, "fp4", quant_storage, device, blocksize)


class EmbeddingNF4(Embedding4bit):
    """Embedding4bit with quant_type='nf4'."""

    def __init__(self, num_embeddings, embedding_dim, dtype=None, quant_storage=torch.uint8, device=None, blocksize=64):
        super().__init__(num_embeddings, embedding_dim, dtype, "nf4", quant_storage, device, blocksize)
