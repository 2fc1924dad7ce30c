"""One tensor for the double-quantized scales of a QuantState, so that a compiled model guards fewer tensors.

torch.compile re-checks every tensor the traced code read before each call of the compiled model (a tensor match
and five dynamic-dimension checks each); with 224 4-bit layers and three scale tensors per double-quantized layer
(8-bit absmax, nested absmax, offset) beside the nested code that check is a millisecond of every decode step on
a GPU host (benchmarks/README.md, issue 7). ``pack_nested_scales`` copies the three into one uint8 buffer and
makes the state's fields views into it (same values, dtypes and shapes; no second copy is kept), so the traced
forward reads the buffer and slices it inside the graph, where views cost nothing. The nested code (256 floats)
stays a tensor of its own: it is usually one tensor shared by every layer, which a per-layer copy would undo.

Buffer layout (byte offsets, each part 16-byte aligned): [0, n) the 8-bit absmax codes; then the nested absmax
(float32, one per 256 blocks); then the float32 offset.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .quant_state import QuantState

_ALIGN = 16


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _packable(state: QuantState) -> bool:
    nested = state.state2
    if nested is None or state.shape is None:
        return False
    parts = (state.absmax, nested.absmax, state.offset)
    if not all(isinstance(t, torch.Tensor) for t in parts):
        return False
    device = state.absmax.device
    # Never while a CUDA graph is captured: the captured copies would read the old tensors' memory on every
    # replay, after it was freed and reused.
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    return (
        device.type != "meta"
        and not capturing
        and all(t.device == device and t.is_contiguous() and not t.requires_grad for t in parts)
        and state.absmax.dtype == torch.uint8
        and all(t.dtype == torch.float32 for t in parts[1:])
        and state.offset.numel() == 1
    )


def packed_layout(n_codes: int, n_nested: int) -> tuple[int, int, int, int]:
    """(8-bit codes, nested absmax count, nested absmax byte offset, offset byte offset) of a packed buffer."""
    nested_at = _aligned(n_codes)
    offset_at = _aligned(nested_at + 4 * n_nested)
    return n_codes, n_nested, nested_at, offset_at


def pack_nested_scales(state: QuantState) -> tuple[torch.Tensor, tuple[int, int, int, int]] | None:
    """Move a double-quantized state's 8-bit absmax, nested absmax and offset into one buffer; returns (buffer,
    layout), or None (state left as it is) when the state is not double-quantized, its tensors are not
    contiguous float32 / uint8 tensors on one real device, or a CUDA graph is being captured. A tensor of the
    state that someone else still holds keeps its old memory: writes into it no longer reach the state."""
    if not _packable(state):
        return None
    nested = state.state2
    layout = packed_layout(state.absmax.numel(), nested.absmax.numel())
    buffer = torch.zeros(layout[3] + _ALIGN, dtype=torch.uint8, device=state.absmax.device)
    absmax, nested_absmax, offset = unpack_scales(buffer, layout)
    absmax.copy_(state.absmax.reshape(-1))
    nested_absmax.copy_(nested.absmax.reshape(-1))
    offset.copy_(state.offset.reshape(()))
    # Plain attribute sets: they empty the states' kernel-input caches, which the caller then rebuilds.
    state.absmax = absmax.view(state.absmax.shape)
    state.offset = offset.view(state.offset.shape)
    nested.absmax = nested_absmax.view(nested.absmax.shape)
    return buffer, layout


def unpack_scales(
    buffer: torch.Tensor, layout: tuple[int, int, int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(8-bit absmax, nested absmax, 0-dim offset) as views of a packed buffer."""
    n_codes, n_nested, nested_at, offset_at = layout
    return (
        buffer[:n_codes],
        buffer[nested_at : nested_at + 4 * n_nested].view(torch.float32),
        buffer[offset_at : offset_at + 4].view(torch.float32).view(()),
    )


def owns_storage(t: torch.Tensor) -> bool:
    """Whether `t` is the whole of its storage (a view into a packed buffer is not: safetensors refuses tensors
    that share one, so serialization copies those)."""
    return t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()
