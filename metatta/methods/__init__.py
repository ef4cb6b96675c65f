"""Test-time adaptation methods, one per module, all subclasses of `TTAMethod`.

Importing this package registers the baselines (source, bn, tent, eata, eta,
sar, cotta, deyo, lame, t3a, rpl, ttaug, memo). Methods that build on other
subpackages (mgtta, on metatta.learned) register on the first registry lookup (`build_method`,
`available_methods`, `method_class`) through `import_builtin_methods`: importing
them here would be circular, since metatta.learned imports methods.common.
"""
from __future__ import annotations

import importlib

from metatta.methods import (  # noqa: F401  (registers them)
    bn, cotta, deyo, eata, lame, memo, rpl, sar, source, t3a, tent, ttaug,
)
from metatta.methods.base import (
    MethodConfig,
    TTAMethod,
    available_methods,
    build_method,
    method_class,
    register,
)

_LATE_METHOD_MODULES = ("metatta.methods.mgtta", "metatta.methods.law", "metatta.methods.palm",
                        "metatta.methods.ttt", "metatta.methods.cta", "metatta.methods.nanoadapt",
                        "metatta.methods.delta", "metatta.methods.rotta",
                        "metatta.methods.rmt", "metatta.methods.roid", "metatta.methods.cmf",
                        "metatta.methods.santa", "metatta.methods.adacontrast")


def import_builtin_methods() -> None:
    """Register every built-in method (the baselines are already registered)."""
    for module in _LATE_METHOD_MODULES:
        importlib.import_module(module)


__all__ = ["MethodConfig", "TTAMethod", "available_methods", "build_method", "method_class", "register",
           "import_builtin_methods"]
