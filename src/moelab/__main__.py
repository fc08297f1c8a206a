"""``python -m moelab ...`` (also under ``torchrun -m moelab``): the command line."""

import sys

from moelab.cli import main

sys.exit(main())
