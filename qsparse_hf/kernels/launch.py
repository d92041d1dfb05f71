"""Low-overhead launches of the Triton kernels, for eager decode.

An eager decode step is bound by host time, not by the GPU: ``kernel[grid](...)`` spends tens of microseconds in
Triton's Python launcher (argument binding, cache-key hashing, hook and global checks) for a kernel that runs in a
few. `FastKernel` keeps the compiled kernel of each call signature and calls its launcher directly the next time.

A signature is everything Triton specialises a compiled kernel on for our kernels: the integer arguments' values,
each tensor's dtype and 16-byte alignment, and the constexprs. The first call of a signature goes through Triton's
own launch (which compiles, and returns the kernel). Anything unexpected — an interpreter, launch hooks, another
Triton whose compiled kernels lack the launcher — sends every call through Triton's own path.
"""

from __future__ import annotations

import os

import torch

__all__ = ["FastKernel"]


_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas")


def _signature(args: tuple) -> tuple:
    return tuple((a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor) else a for a in args)


class FastKernel:
    """Wrap a ``@triton.jit`` function: ``FastKernel(fn)(grid, *args, **constexprs)`` launches it like
    ``fn[grid](*args, **constexprs)``, minus Triton's per-launch host overhead after the first call of a signature.
    Arguments must be positional in the kernel's order, with all constexprs (and only those) passed by keyword
    after the runtime arguments, as the kernels of this package declare them.

    Example:
        >>> import triton, triton.language as tl  # doctest: +SKIP
        >>> copy = FastKernel(my_copy_kernel)  # doctest: +SKIP
        >>> copy((blocks,), src, dst, n, BLOCK=1024)  # doctest: +SKIP
    """

    #: False once a fast launch failed or is not possible here: every launch then goes through Triton.
    enabled = os.environ.get("TRITON_INTERPRET") != "1" and os.environ.get("QSPARSE_FAST_LAUNCH", "1") != "0"

    def __init__(self, fn) -> None:
        self.fn = fn
        self._compiled: dict[tuple, object] = {}

    def __call__(self, grid: tuple, *args, **constexprs):
        if not FastKernel.enabled:
            return self.fn[grid](*args, **constexprs)
        # Launch options are compile options, not kernel parameters: part of the key, not of the argument list.
        options = tuple((name, constexprs.pop(name)) for name in _LAUNCH_OPTIONS if name in constexprs)
        key = (_signature(args), tuple(constexprs.items()), options, args[0].device.index if args else None)
        kernel = self._compiled.get(key)
        if kernel is None:
            kernel = self.fn[grid](*args, **constexprs, **dict(options))
            if not self._usable(kernel):
                FastKernel.enabled = False
            else:
                self._compiled[key] = kernel
            return kernel
        from triton.runtime import driver

        device = driver.active.get_current_device()
        stream = driver.active.get_current_stream(device)
        grid = tuple(grid) + (1,) * (3 - len(grid))
        kernel.run(grid[0], grid[1], grid[2], stream, kernel.function, kernel.packed_metadata, None, None, None,
                   *args, *constexprs.values())
        return kernel

    @staticmethod
    def _usable(kernel) -> bool:
        try:
            from triton import knobs

            hooks = (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook)
        except (ImportError, AttributeError):
            return False
        return all(h is None for h in hooks) and all(
            hasattr(kernel, attr) for attr in ("run", "function", "packed_metadata")
        )
