"""Leaf vocabulary shared by every layer: units, addresses, errors, bitmaps, clocks."""
