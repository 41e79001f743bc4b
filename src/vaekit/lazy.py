"""Package namespaces that import their modules only when a name is first used.

`vaekit.model.load_vae` works without `import vaekit.model` loading diffusers for a caller that only
wants `vaekit.model.presets`; the command line builds its parser from the light modules this way.
"""

import importlib


def lazy_exports(package, names):
    """Module `__getattr__` and `__dir__` for `package`, exporting {name: submodule} on first access."""

    def __getattr__(name):
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{names[name]}"), name)

    def __dir__():
        return sorted(names)

    return __getattr__, __dir__
