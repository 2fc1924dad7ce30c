"""One tensor for the double-quantized scales of a QuantState, so that a compiled model guards fewer tensors.

torch.compile re-checks every tensor the traced code read before each call of the compiled model (a tensor match
and five dynamic-dimension checks each); with 224 4-bit layers and three scale tensors per double-quantized layer
(8-bit absmax, nested absmax, offset) beside the nested code that check is a millisecond of every decode step on
a GPU host (benchmarks/README.md, issue 7). ``pack_nested_scales`` copies the three into one uint8 buffer and
makes the state's fields views into it (same values, dtypes and shapes; no second copy is kept), so the traced
forward reads the buffer and slices it inside the graph, where views cost nothing.

When: once, as a Params4bit gets its state (quantized on a move to a device, or loaded), and QuantState.to moves
the buffer whole; never in a forward (a CUDA graph captured before would keep reading the freed tensors) and
never during CUDA-graph capture. States made otherwise (functional.quantize_4bit, bitsandbytes) stay as they
are and work the same, with more guards under torch.compile. The nested code (256 floats) stays a tensor of
its own: it is usually one tensor shared by every layer, which a per-layer copy would undo.

Buffer layout (byte offsets, each part 16-byte aligned): [0, n) the 8-bit absmax codes; then the nested absmax
(float32, one per 256 blocks); then the float32 offset.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .quant_state import QuantState

_ALIGN = 16
PACKED_KEY = "_packed_scales"  # in a packed state's __dict__: (buffer, layout)


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
    packed = packed_scales_of(state)
    if packed is not None:
        return packed
    nested = state.state2
    layout = packed_layout(state.absmax.numel(), nested.absmax.numel())
    buffer = torch.zeros(layout[3] + _ALIGN, dtype=torch.uint8, device=state.absmax.device)
    absmax, nested_absmax, offset = unpack_scales(buffer, layout)
    absmax.copy_(state.absmax.reshape(-1))
    nested_absmax.copy_(nested.absmax.reshape(-1))
    offset.copy_(state.offset.reshape(()))
    _adopt(state, buffer, layout)
    return buffer, layout


def _adopt(state: QuantState, buffer: torch.Tensor, layout: tuple[int, int, int, int]) -> None:
    """Make the state's three fields views of `buffer` (plain attribute sets: they empty the kernel-input caches)
    and remember the buffer for ``packed_scales_of``."""
    absmax, nested_absmax, offset = unpack_scales(buffer, layout)
    state.absmax = absmax.view(state.absmax.shape)
    state.offset = offset.view(state.offset.shape)
    state.state2.absmax = nested_absmax.view(state.state2.absmax.shape)
    object.__setattr__(state, PACKED_KEY, (buffer, layout))


def packed_scales_of(state: QuantState) -> tuple[torch.Tensor, tuple[int, int, int, int]] | None:
    """(buffer, layout) when the state's 8-bit absmax, nested absmax and offset are still the views
    ``pack_nested_scales`` made (checked by address: a field set since then, or moved alone, fails it), else None.
    Reads no tensor data."""
    packed = state.__dict__.get(PACKED_KEY)
    nested = state.state2
    if packed is None or nested is None:
        return None
    buffer, layout = packed
    n_codes, n_nested, nested_at, offset_at = layout
    base = buffer.data_ptr()
    parts = ((state.absmax, 0, n_codes), (nested.absmax, nested_at, n_nested), (state.offset, offset_at, 1))
    for tensor, at, numel in parts:
        if not isinstance(tensor, torch.Tensor) or tensor.device != buffer.device:
            return None
        if tensor.data_ptr() != base + at or tensor.numel() != numel or not tensor.is_contiguous():
            return None
    return packed


def move_packed_scales(state: QuantState, device: torch.device | str) -> bool:
    """Move a packed state's buffer to `device` in one copy and re-view the fields; False when not packed."""
    packed = packed_scales_of(state)
    if packed is None:
        return False
    buffer, layout = packed
    _adopt(state, buffer.to(device), layout)
    return True


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


def with_own_storage(t: Any) -> Any:
    """`t`, or a copy of it when it is a view into a larger buffer (a packed one): safetensors refuses tensors
    that share storage, and torch.save would write the whole buffer (or refuse views of it as other dtypes)."""
    if not isinstance(t, torch.Tensor) or t.device.type == "meta":
        return t
    whole = t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()
    return t if whole else t.clone()
