"""pytest plugin shared by bench/ and accuracy/: options, fixtures and session hooks.

Registered through the ``pytest11`` entry point (and by the repo's conftest.py when run
from a checkout). The suite-specific parts live in sibling modules, loaded below.
"""
# noise and bench_options before bench: bench imports them, and a plugin module imported before pytest
# registers it is not rewritten.
pytest_plugins = ["npuinfer.pytest_plugin.common", "npuinfer.pytest_plugin.noise",
                  "npuinfer.pytest_plugin.bench_options", "npuinfer.pytest_plugin.bench",
                  "npuinfer.pytest_plugin.serving",
                  "npuinfer.pytest_plugin.accuracy"]
