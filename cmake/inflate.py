"""Build step: write the zlib-decompressed bytes of argv[1] to argv[2]."""

import sys
import zlib

with open(sys.argv[1], "rb") as src, open(sys.argv[2], "wb") as dst:
    dst.write(zlib.decompress(src.read()))
