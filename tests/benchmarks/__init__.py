"""Benchmarks, run from the checkout as `python -m tests.benchmarks.NAME` with the Python that
has imgproxy installed (scripts/test makes .venv: `.venv/bin/python -m tests.benchmarks.NAME`).

They measure the installed imgproxy, as users run it. `python -m` puts the checkout first on
sys.path, where `imgproxy/` is not a whole package (pyproject.toml maps `schemas/` and
`plugins/` into it at install time), so the checkout is taken off sys.path here, before any
benchmark imports imgproxy.
"""

import os
import sys

_CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != _CHECKOUT]
if "imgproxy" not in sys.modules:
    try:
        import imgproxy.schemas  # noqa: F401  (only in an installed copy)
    except ModuleNotFoundError:
        sys.exit(
            f"imgproxy is not installed for {sys.executable}: run the benchmarks with the Python of a venv that has it "
            "(scripts/test creates .venv: .venv/bin/python -m tests.benchmarks.NAME)"
        )
