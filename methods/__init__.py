"""METHODS registry: method name -> SSLMethod subclass. Add a method by importing its module here."""

from __future__ import annotations

from methods.base import SSLMethod, StepContext, StepOutput
from methods.registry import METHODS, register_method


def build_method(cfg) -> SSLMethod:
    """Instantiate ``cfg.method`` with the resolved config."""
    return METHODS.get_or_raise(cfg.method)(cfg)


from methods import (
    cw_rgp,  # noqa: E402,F401
    dino,  # noqa: E402,F401  (registration side effect)
    intl,  # noqa: E402,F401
    mvmr,  # noqa: E402,F401
    resa,  # noqa: E402,F401
    ressl,  # noqa: E402,F401
    scfs,  # noqa: E402,F401
)

__all__ = ["METHODS", "SSLMethod", "StepContext", "StepOutput", "build_method", "register_method"]
