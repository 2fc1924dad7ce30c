"""``python -m halfbyte``: the ``halfbyte`` command (see halfbyte.cli): memory (the default), info, quantize,
verify, eval, demo."""

from __future__ import annotations

import sys

from .cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
