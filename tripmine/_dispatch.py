"""Backend choice: NumPy inputs go to the C core, CuPy inputs to tripmine._gpu.

Every public function that takes arrays is wrapped by :func:`dispatch`.  It
looks at the arguments *without importing CuPy*: an array is a CuPy array
when its type comes from a ``cupy`` module.  When one is found, the call goes,
with all its arguments (new keywords included), to the function of the same
name in :mod:`tripmine._gpu`, which is imported then and only then.

Mixed inputs: when the embeddings (``x``, ``ref``) or ``out`` or the given
triplets are split between host and device, the call is refused with a
``TypeError`` naming the arguments.  Labels are the exception: on the GPU
path they may be NumPy or CuPy arrays (they are encoded on the host anyway);
on the CPU path they must be host arrays.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

from . import _range

#: Arguments holding embeddings or outputs: these must all sit on one side.
ARRAY_ARGUMENTS = ("x", "ref", "out", "mining")
LABEL_ARGUMENTS = ("labels", "ref_labels")


def is_cupy(value: Any) -> bool:
    """True for a CuPy array (decided from its type's module: CuPy is not imported)."""
    module = type(value).__module__ or ""
    return module == "cupy" or module.startswith("cupy.") or module.startswith("cupy_")


def _sides(value: Any) -> set[str]:
    """{'gpu'} / {'cpu'} for an array (or a tuple of arrays, like Triplets), empty for
    anything else (None, strings, scalars, lists)."""
    if is_cupy(value):
        return {"gpu"}
    if isinstance(value, tuple):
        return set().union(*(_sides(v) for v in value)) if value else set()
    if hasattr(value, "__array_interface__") or hasattr(value, "__array__"):
        return {"cpu"}
    return set()


def backend(bound: dict[str, Any]) -> str:
    """'gpu' or 'cpu' for one call's named arguments; TypeError for a mixed call."""
    sides = {name: _sides(bound[name]) for name in ARRAY_ARGUMENTS if name in bound}
    labels = {name: _sides(bound[name]) for name in LABEL_ARGUMENTS if name in bound}
    on_gpu = sorted(name for name, s in sides.items() if "gpu" in s)
    on_cpu = sorted(name for name, s in sides.items() if "cpu" in s)
    if on_gpu and on_cpu:
        raise TypeError(
            f"mixed devices: {', '.join(on_gpu)} on the GPU (CuPy) but {', '.join(on_cpu)} on "
            f"the host (NumPy); move them to one side (cupy.asarray / cupy.asnumpy)")
    if on_gpu:
        return "gpu"
    label_gpu = sorted(name for name, s in labels.items() if "gpu" in s)
    if label_gpu and on_cpu:
        raise TypeError(
            f"mixed devices: {', '.join(label_gpu)} on the GPU (CuPy) but "
            f"{', '.join(on_cpu)} on the host (NumPy); labels may be host arrays with GPU "
            f"embeddings, not the reverse")
    return "gpu" if label_gpu else "cpu"


def _gpu_function(name: str) -> Callable:
    try:
        from . import _gpu
    except ImportError as exc:  # CuPy missing or broken
        raise ImportError(f"tripmine.{name} was given CuPy arrays, but the GPU backend could "
                          f"not load: {exc}. Install CuPy for your CUDA version, e.g. "
                          f"pip install cupy-cuda12x") from exc
    return getattr(_gpu, name)


def _any_cupy(values) -> bool:
    for value in values:
        if is_cupy(value) or (isinstance(value, tuple) and _any_cupy(value)):
            return True
    return False


def dispatch(func: Callable) -> Callable:
    """Route a public function to its GPU twin when given CuPy arrays."""
    names = tuple(inspect.signature(func).parameters)
    name = func.__name__

    def on_cpu(args, kwargs):
        try:
            result, refused = func(*args, **kwargs), None
        except _range.OutOfRange as exc:  # rows outside the C core's window: rerun
            result, refused = None, exc
        if refused is not None:  # outside the except block: no chained internal error
            result = _range.rerun(func, names, args, kwargs, refused)
        if hasattr(result, "loss"):
            _range.check_loss(result, name, names, args, kwargs)
        return result

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        # The CPU fast path: no CuPy array anywhere (the common case costs a scan).
        if not (_any_cupy(args) or _any_cupy(kwargs.values())):
            return on_cpu(args, kwargs)
        bound = dict(zip(names, args))
        bound.update(kwargs)  # keywords the CPU signature does not know are kept too
        if backend(bound) == "gpu":
            gpu = _gpu_function(name)
            try:
                return gpu(*args, **kwargs)
            except _range.OutOfRange:  # rows outside the GPU engine's window
                pass
            return _range.rerun_device(gpu, names, args, kwargs)
        return on_cpu(args, kwargs)

    wrapper.__wrapped_cpu__ = func  # the CPU implementation, for tests
    return wrapper
