"""Hardware-specific fast paths that sit beside the readable model and are tested equal to it.

`cpu_decode`: oneDNN-packed weights for decoding a few rows at a time on a CPU.
"""
