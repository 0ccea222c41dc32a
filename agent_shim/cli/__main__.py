"""`python -m agent_shim.cli` runs the agent-shim command."""

import sys

from agent_shim.cli import main

sys.exit(main())
