"""Subcommands of the `gpt2lab` CLI: each parses its flags and calls one library function."""
