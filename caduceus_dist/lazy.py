"""Lazy package exports (PEP 562): importing a light submodule, such as the tokenizer or the FASTA
reader, must not pay for importing torch through the package's `__init__`."""

from __future__ import annotations

import sys
from importlib import import_module


def lazy_exports(package: str, exports: dict[str, str]):
    """A module `__getattr__` resolving `name` from `package.exports[name]` on first use, then cached."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(f"{package}.{exports[name]}"), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
