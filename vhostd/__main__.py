"""`python -m vhostd` is the daemon's command line."""
import sys

from vhostd.cli import vhostd_main

sys.exit(vhostd_main())
