"""`python -m bench.scale [--streams 1000,5000,10000] [--quick]` (see run.py)."""

from .run import main

main()
