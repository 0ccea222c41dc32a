import sys

from lbserver.cli import main

sys.exit(main())
