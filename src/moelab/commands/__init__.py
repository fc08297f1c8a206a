"""Sub-commands of the ``moelab`` CLI, one module each (see :mod:`moelab.cli`)."""
