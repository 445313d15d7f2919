"""The torch version ewc_rs is built against: the one place to change it.

The extension links libtorch through the ``tch`` crate, and each ``tch`` release supports exactly
one libtorch, so ``tch``'s version in Cargo.toml must match this one. ``ewc_rs/__init__.py`` checks
the installed torch against it before loading the native module; the Makefile installs
``torch==TORCH_VERSION``; pyproject.toml's ``dependencies`` pin cannot read this file, so
``tests/test_packaging.py`` checks that it says the same.
"""

TORCH_VERSION = "2.11.0"
