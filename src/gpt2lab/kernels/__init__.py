"""Hardware-specific fast paths that sit beside the readable model and are tested equal to it.

`cpu_decode`: oneDNN-packed weights for decoding a few rows at a time on a CPU.
`native`: the decoding step in C (`decode.c`, up to 16 rows a step), compiled on first use.
`gelu`: GPT-2's GELU and its gradient in C (`gelu.c`) for training on a CPU.
`int8`: per-channel int8 linear layers (`gpt2lab.quantize`).
"""
