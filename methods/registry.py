"""The METHODS registry (method name -> SSLMethod subclass), filled by ``@register_method`` in each method's module.

Method modules import the decorator from here, not from the ``methods`` package, so the package can import them for
their registration without an import cycle.
"""

from __future__ import annotations

from methods.base import SSLMethod
from runtime.registry import Registry

METHODS: Registry[type[SSLMethod]] = Registry("method")


def register_method(name: str):
    return METHODS.register(name)
