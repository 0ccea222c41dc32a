"""`python -m bench.scale [--protocol grpclb|xds|both] [--streams 1000,5000,10000]
[--xds-streams 1000,5000] [--quick]` (see run.py)."""

from .run import main

main()
