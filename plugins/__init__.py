"""filtergate's built-in filter plugins, one module (or package) each.

Every module or package directly in this package is a built-in plugin: the engine
registers it with the plugin manager under its name (``rate_limit`` as ``rate-limit``),
and it provides filter types through the ``filtergate_filters`` hook of
:mod:`engine.plugins`.
"""

import pkgutil

BUILTIN: tuple[str, ...] = tuple(
    f"{__name__}.{m.name}" for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")
)
