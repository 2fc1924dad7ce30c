"""QuantizedParameter: what Params4bit and Int8Params share as Parameters that carry attributes.

bitsandbytes' quantized Parameters keep their format in instance attributes (``quant_state``, ``SCB``, ...), and
code rebuilds them from ``__dict__``. This base gives them one implementation of the Parameter protocol around
those attributes: ``.cpu()`` / ``.cuda()`` through the subclass's ``.to``, ``__getstate__`` / ``__setstate__``
(bitsandbytes' state layout), a shallow ``copy.copy`` that shares every tensor, and pickling that keeps the
class (a plain ``torch.nn.Parameter`` would come back without it).
"""

from __future__ import annotations

from typing import Any

import torch


def _rebuild_quantized_parameter(
    cls: type[QuantizedParameter], data: torch.Tensor, requires_grad: bool, attributes: dict[str, Any]
) -> QuantizedParameter:
    """Unpickling: the same class and attributes (module-level so pickle finds it by name)."""
    return cls(data, requires_grad=requires_grad, **attributes)


class QuantizedParameter(torch.nn.Parameter):
    """Base of Params4bit and Int8Params; a subclass names its attributes in ``_attribute_names``."""

    _attribute_names: tuple[str, ...] = ()

    def cpu(self) -> QuantizedParameter:
        return self.to(device="cpu")

    def cuda(self, device: int | torch.device | str | None = None, non_blocking: bool = False):
        return self.to(device="cuda" if device is None else device, non_blocking=non_blocking)

    def _attributes(self) -> dict[str, Any]:
        return {name: self.__dict__.get(name) for name in self._attribute_names}

    def _pickled_attributes(self) -> dict[str, Any]:
        return self._attributes()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["data"] = self.data
        state["requires_grad"] = self.requires_grad
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.requires_grad = state["requires_grad"]
        for name in self._attribute_names:
            setattr(self, name, state[name])
        self.data = state["data"]

    def __copy__(self) -> QuantizedParameter:
        """Shares the data and every attribute (as bitsandbytes)."""
        new = type(self).__new__(type(self))
        new.__setstate__(self.__getstate__())
        return new

    def __reduce_ex__(self, protocol):
        return _rebuild_quantized_parameter, (type(self), self.data, self.requires_grad, self._pickled_attributes())
