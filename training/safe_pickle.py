"""The unpickler for the official CIFAR-10 batches: numpy arrays only, no other code runs."""

from __future__ import annotations

import pickle

import numpy as np

try:  # numpy 2.x; numpy 1.x has it under numpy.core (both already loaded with numpy)
    from numpy._core.multiarray import _reconstruct as _numpy_reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct as _numpy_reconstruct


def _latin1_encode(text: object, encoding: object = "utf-8") -> bytes:
    """``_codecs.encode`` as Python 3 pickles bytes (protocol 2): latin1 of a str, nothing else."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode is allowed only for a str in latin1, not {encoding!r}")
    return text.encode("latin1")


def _reconstruct_array(*args: object) -> np.ndarray:
    """numpy's ``multiarray._reconstruct``, for an ``ndarray`` only (it takes the class to build)."""
    if not args or args[0] is not np.ndarray:
        raise pickle.UnpicklingError("_reconstruct is allowed only for numpy.ndarray")
    return _numpy_reconstruct(*args)


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR-10 batches without running arbitrary code.

    The official files are Python 2 pickles (protocol 2) of a dict of str, lists
    and one uint8 array: their only globals are numpy's ``_reconstruct``,
    ``ndarray`` and ``dtype``.  Exactly those are allowed (under numpy 1.x's
    ``numpy.core`` and numpy 2.x's ``numpy._core`` module name), plus
    ``_codecs.encode`` for latin1 (how Python 3 pickles bytes at protocol 2, as a
    re-pickled batch holds).  Each maps to a fixed object here: no module is
    imported, and any other global is refused before anything is looked up.
    """

    _ALLOWED: dict[tuple[str, str], object] = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct_array,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct_array,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }

    def find_class(self, module: str, name: str):
        allowed = self._ALLOWED.get((module, name))
        if allowed is None:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR-10 batch")
        return allowed
