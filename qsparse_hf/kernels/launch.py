"""Launching a Triton kernel with little host work per call, on the device of its tensors.

An eager decode step is bound by host time: a 7B model runs ~250 of our launches per token, and Triton's generic
launch path (binding arguments, computing their specialization, hashing the cache key) costs several times the C
launch itself. `KernelLaunch` fixes a kernel's grid and compile-time constants once; after the first launch for a
given argument *signature* (tensor dtypes and 16-byte alignment, and for integers the ``== 1`` / ``% 16`` / width
properties, everything Triton specializes on) it calls the compiled kernel's launcher directly. Anything it does
not recognise (a new signature, launch hooks set, Triton's interpreter) goes through Triton's own path.

It also launches on the device that holds the tensors: Triton launches on the *current* CUDA device, which is not
the tensors' device when a model is spread over several GPUs (``device_map="auto"``).
"""

from __future__ import annotations

import os

import torch
from triton import knobs
from triton.runtime import driver

__all__ = ["KernelLaunch", "direct_launches"]

# Set QSPARSE_DIRECT_LAUNCH=0 to send every launch through Triton's generic path (to rule this module out).
_DIRECT = os.environ.get("QSPARSE_DIRECT_LAUNCH", "1") != "0" and os.environ.get("TRITON_INTERPRET") != "1"

#: How many launches went straight to a compiled kernel (read by the tests that check this path is taken).
_DIRECT_COUNT = [0]


def direct_launches() -> int:
    """Launches so far that skipped Triton's generic launch path (a diagnostic for tests and benchmarks).

    Example:
        >>> isinstance(direct_launches(), int)
        True
    """
    return _DIRECT_COUNT[0]


def _signature(args: tuple) -> tuple:
    """What Triton specializes a launch on, per argument (at least as fine: equal signatures, same compiled kernel)."""
    out = []
    for arg in args:
        if isinstance(arg, torch.Tensor):
            out.append((arg.dtype, arg.data_ptr() % 16 == 0))
        elif isinstance(arg, bool) or not isinstance(arg, int):
            out.append((type(arg), arg if arg is None or isinstance(arg, bool) else None))
        else:
            out.append((arg == 1, arg % 16 == 0, -(2**31) <= arg < 2**31, 0 <= arg < 2**64))
    return tuple(out)


class KernelLaunch:
    """A Triton kernel with its ``constants`` (constexpr arguments and launch options such as ``num_warps``)
    fixed; calling it with a grid and the runtime arguments launches it on their device.

    Example:
        >>> launch = KernelLaunch(my_kernel, dict(BLOCK=128, num_warps=4))  # doctest: +SKIP
        >>> launch((4,), x, out, x.numel())  # doctest: +SKIP
    """

    def __init__(self, kernel, constants: dict) -> None:
        self.kernel = kernel
        self.constants = constants
        names = getattr(kernel, "arg_names", None)
        # constexpr values in the kernel's argument order: the compiled launcher takes every argument
        self._constexprs = None if names is None else tuple(constants[n] for n in names if n in constants)
        self._runtime_args = None if names is None else sum(1 for n in names if n not in constants)
        self._compiled: dict[tuple, object] = {}

    def _device(self, args: tuple) -> torch.device | None:
        for arg in args:
            if isinstance(arg, torch.Tensor):
                return arg.device
        return None

    def __call__(self, grid: tuple[int, ...], *args) -> None:
        device = self._device(args)
        if device is not None and device.type == "cuda" and device.index != torch.cuda.current_device():
            with torch.cuda.device(device):
                return self._launch(grid, args)
        return self._launch(grid, args)

    def _launch(self, grid: tuple[int, ...], args: tuple) -> None:
        if not (_DIRECT and self._constexprs is not None and len(args) == self._runtime_args):
            self.kernel.run(*args, grid=grid, warmup=False, **self.constants)
            return
        plain = knobs.runtime.launch_enter_hook is None and knobs.runtime.launch_exit_hook is None
        signature = _signature(args)
        compiled = self._compiled.get(signature) if plain else None
        if compiled is None:
            compiled = self.kernel.run(*args, grid=grid, warmup=False, **self.constants)
            if plain and hasattr(compiled, "packed_metadata") and hasattr(compiled, "function"):
                self._compiled[signature] = compiled
            return
        grid_y = grid[1] if len(grid) > 1 else 1
        stream = driver.active.get_current_stream(driver.active.get_current_device())
        compiled.run(grid[0], grid_y, 1, stream, compiled.function, compiled.packed_metadata, None, None, None,
                     *args, *self._constexprs)
        _DIRECT_COUNT[0] += 1
