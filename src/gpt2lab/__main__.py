"""`python -m gpt2lab` runs the command-line interface."""

from gpt2lab.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
