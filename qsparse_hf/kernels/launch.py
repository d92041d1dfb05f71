"""Launching a Triton kernel with little host work per call, on the device of its tensors.

An eager decode step is bound by host time: a 7B model runs ~250 of our launches per token, and Triton's generic
launch path (binding arguments, computing their specialization, hashing the cache key) costs several times the C
launch itself. `KernelLaunch` fixes a kernel's grid and compile-time constants once; after the first launch for a
given argument signature (tensor dtypes and 16-byte alignment, scalar values: everything Triton specializes on)
it calls the compiled kernel's C launch function directly, with the tensors' addresses as integers (Triton's
launcher would otherwise ask the driver about every pointer argument, at every launch). Anything else (a new
signature, launch hooks installed, e.g. by a profiler, Triton's interpreter) goes through Triton's own path.

It also launches on the device that holds the tensors: Triton launches on the *current* CUDA device, which is not
the tensors' device when a model is spread over several GPUs (``device_map="auto"``).

On Hopper and later GPUs the decode kernels use programmatic dependent launch (`pdl_enabled`; ``QSPARSE_PDL=0``
turns it off): a kernel may start while the one before it is still running, waits at its first instruction
(``gdc_wait``) until that one has finished and its writes are visible, and lets the next kernel start early in turn.
What it saves is the gap between two dependent kernels, which a one-token decode step pays at every boundary: on an
H100 a compiled Qwen2-7B step at ``topk=0.5`` took 4.67 ms with it against 4.76 without, and transformers' compiled
``generate(cache_implementation="static")`` 6.81 against 7.28 ms per decode token (benchmarks/README.md,
eighteenth stop).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.runtime import driver

try:
    from triton import knobs
except ImportError:  # Triton before 3.4: no direct launches (its launcher signature differs too)
    knobs = None

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    _GRID_DEPENDENCY_CONTROL = True
except ImportError:  # Triton before 3.3 has no programmatic dependent launch (`pdl_enabled` is then False)
    _GRID_DEPENDENCY_CONTROL = False

    @triton.jit
    def gdc_wait():
        pass

    @triton.jit
    def gdc_launch_dependents():
        pass


__all__ = ["KernelLaunch", "direct_launches", "pdl_enabled", "reserve_tickets", "reserve_scratch"]

# Set QSPARSE_DIRECT_LAUNCH=0 to send every launch through Triton's generic path (to rule this module out).
_DIRECT = (knobs is not None and os.environ.get("QSPARSE_DIRECT_LAUNCH", "1") != "0"
           and os.environ.get("TRITON_INTERPRET") != "1")

#: How many launches went straight to a compiled kernel (read by the tests that check this path is taken).
_DIRECT_COUNT = [0]


def direct_launches() -> int:
    """Launches so far that skipped Triton's generic launch path (a diagnostic for tests and benchmarks).

    Example:
        >>> isinstance(direct_launches(), int)
        True
    """
    return _DIRECT_COUNT[0]


_PDL: bool | None = None


def pdl_enabled() -> bool:
    """Whether the decode kernels launch with programmatic dependent launch: on unless ``QSPARSE_PDL=0``, where
    every visible GPU is a Hopper or later one (compute capability 9+), torch is built with CUDA 12.3 or later (the
    first whose CUDA graphs capture such launches), Triton is 3.3 or later and compiles (not its interpreter).
    Decided once per process: it is a compile-time constant of the kernels.

    Example:
        >>> isinstance(pdl_enabled(), bool)
        True
    """
    global _PDL
    if _PDL is None:
        _PDL = (_pdl_asked() and os.environ.get("TRITON_INTERPRET") != "1" and _captures_dependent_launches()
                and _GRID_DEPENDENCY_CONTROL and torch.cuda.is_available() and torch.cuda.device_count() > 0
                and all(torch.cuda.get_device_capability(i)[0] >= 9 for i in range(torch.cuda.device_count())))
    return _PDL


def _pdl_asked() -> bool:
    """``QSPARSE_PDL``: 1 (the default) or 0.

    Example:
        >>> _pdl_asked() in (True, False)
        True
    """
    asked = os.environ.get("QSPARSE_PDL", "1")
    if asked not in ("0", "1"):
        raise ValueError(f"QSPARSE_PDL must be 1 (on, the default) or 0 (off), got {asked!r}")
    return asked == "1"


def _captures_dependent_launches(cuda_version: str | None = None) -> bool:
    """Whether torch's CUDA (``torch.version.cuda`` by default) is 12.3 or later: graph capture of programmatic
    dependent launches (what a compiled or captured decode step records) came with 12.3.

    Example:
        >>> _captures_dependent_launches("12.1"), _captures_dependent_launches("13.0")
        (False, True)
    """
    version = torch.version.cuda if cuda_version is None else cuda_version
    try:
        return tuple(int(part) for part in version.split(".")[:2]) >= (12, 3)
    except (AttributeError, ValueError):  # a CPU or ROCm build: no CUDA version
        return False


def pdl_constants() -> dict:
    """The launch constants of a decode kernel with a ``PDL`` constexpr (Triton's ``launch_pdl`` option with it)."""
    return dict(PDL=True, launch_pdl=True) if pdl_enabled() else dict(PDL=False)


@triton.jit
def _dependent_launch_start(PDL: tl.constexpr):
    """A decode kernel's first step with programmatic dependent launch (``PDL``, from `pdl_constants`): wait until
    the kernel before this one has finished (its writes visible), then let the next kernel's programs start --
    before anything is read or written, so every later kernel still sees this one's inputs complete."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def _dependent_launch_early(PDL: tl.constexpr):
    """`_dependent_launch_start` with the next kernel's programs let in first: they start while this one still
    waits for its own predecessor, so what they do before their wait overlaps two kernels (a GEMV's L2 prefetch
    over both launches of a split selection). Still safe: their wait ends only when this kernel has finished,
    which is after its predecessor has."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()



@triton.jit
def _dependent_launch_wait(PDL: tl.constexpr):
    """The first half of `_dependent_launch_start`: wait for the kernel before this one, without letting the next
    one start yet (`_dependents_may_launch` does, once this kernel has written what the next one guesses from)."""
    if PDL:
        gdc_wait()


@triton.jit
def _dependents_may_launch(PDL: tl.constexpr):
    """Let the next kernel's programs start (after `_dependent_launch_wait`): every store this kernel's programs
    made before it is done first. Their reads before their own wait are still a guess (a GEMV's L2 prefetch), never
    what they compute."""
    if PDL:
        tl.debug_barrier()
        gdc_launch_dependents()

def _no_launch_hooks() -> bool:
    # Triton >= 3.5 keeps launch hooks in (normally empty) chains; older versions use None
    return all(hook is None or getattr(hook, "calls", None) == []
               for hook in (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook))


class KernelLaunch:
    """A Triton kernel with its ``constants`` (constexpr arguments and launch options such as ``num_warps``)
    fixed; calling it with a grid, the tensor arguments and the scalar arguments (the kernel takes them in that
    order) launches it on the tensors' device.

    The direct launch keys compiled kernels on the tensors' dtypes and 16-byte alignment and on the scalars' exact
    values: at least as fine as Triton's specialization, so equal keys always mean the same compiled kernel. With
    ``scalars_by_class``, integer scalars are keyed by what Triton specializes them on (32- or 64-bit, equal to 1,
    divisible by 16) instead: for scalars that change at every call (a growing cache's length and strides), which
    would otherwise take Triton's generic path each time.

    Example:
        >>> launch = KernelLaunch(my_kernel, dict(BLOCK=128, num_warps=4))  # doctest: +SKIP
        >>> launch((4,), (x, out), (x.numel(),))  # doctest: +SKIP
    """

    def __init__(self, kernel, constants: dict, scalars_by_class: bool = False) -> None:
        self.kernel = kernel
        self.constants = constants
        self.scalars_by_class = scalars_by_class
        names = getattr(kernel, "arg_names", None)
        # constexpr values in the kernel's argument order: the compiled launcher takes every argument
        self._constexprs = None if names is None else tuple(constants[n] for n in names if n in constants)
        self._runtime_args = None if names is None else sum(1 for n in names if n not in constants)
        self._compiled: dict[tuple, object] = {}

    def __call__(self, grid: tuple[int, ...], tensors: tuple, scalars: tuple) -> None:
        device = tensors[0].device
        # (torch._C's getter: CUDA is initialised once a tensor lives there, and the public one checks that again)
        if device.type == "cuda" and device.index != torch._C._cuda_getDevice():
            with torch.cuda.device(device):
                return self._launch(grid, tensors, scalars)
        return self._launch(grid, tensors, scalars)

    def _launch(self, grid: tuple[int, ...], tensors: tuple, scalars: tuple) -> None:
        args = tensors + scalars
        if not (_DIRECT and self._constexprs is not None and len(args) == self._runtime_args and _no_launch_hooks()):
            self.kernel.run(*args, grid=grid, warmup=False, **self.constants)
            return
        pointers = tuple([t.data_ptr() for t in tensors])
        # is_cuda in the key: a CPU tensor never reaches a cached launcher (Triton's own path rejects it), since the
        # launcher takes the pointers as plain integers and no longer checks them with the driver.
        key = (tuple([(t.dtype, t.is_cuda, p % 16 == 0) for t, p in zip(tensors, pointers)]),
               tuple(map(_specialization, scalars)) if self.scalars_by_class else scalars)
        cached = self._compiled.get(key)
        if cached is None:
            compiled = self.kernel.run(*args, grid=grid, warmup=False, **self.constants)
            if all(t.is_cuda for t in tensors):
                self._compiled[key] = _launcher(compiled)
            return
        launch, function, metadata, cooperative, pdl = cached
        dims = len(grid)  # (conditionals rather than padding a tuple: every eager decode launch passes here)
        grid_y = grid[1] if dims > 1 else 1
        grid_z = grid[2] if dims > 2 else 1
        # the tensors' device is the current one (`__call__`): no need to ask Triton's driver which it is
        stream = driver.active.get_current_stream(tensors[0].device.index)
        if cooperative is None:  # Triton's launcher object, for a layout `_launcher` does not know
            launch(grid[0], grid_y, grid_z, stream, function, metadata, None, None, None,
                   *pointers, *scalars, *self._constexprs)
        else:
            launch(grid[0], grid_y, grid_z, stream, function, cooperative, pdl, None, None,
                   metadata, None, None, None, *pointers, *scalars, *self._constexprs)
        _DIRECT_COUNT[0] += 1


def _specialization(scalar) -> tuple:
    """What Triton compiles a scalar argument for: its type, and for integers whether they fit 32 bits, equal 1 and
    are divisible by 16 (floats and other scalars: their type and value).

    Example:
        >>> _specialization(304) == _specialization(305), _specialization(304) == _specialization(320)
        (False, True)
    """
    if type(scalar) is int:
        return int, -(1 << 31) <= scalar < (1 << 31), scalar == 1, scalar % 16 == 0
    return type(scalar), scalar


def _launcher(compiled) -> tuple | None:
    """``(launch, function, packed metadata, cooperative, pdl)`` of a compiled kernel: its C launch function when it
    needs no scratch memory (Triton >= 3.5 layout; ``cooperative`` None otherwise: the Python launcher object, which
    allocates scratch itself), or None for an object that is not a compiled kernel."""
    run = getattr(compiled, "run", None)
    if run is None or not hasattr(compiled, "packed_metadata") or not hasattr(compiled, "function"):
        return None
    if (getattr(run, "global_scratch_size", None) == 0 and getattr(run, "profile_scratch_size", None) == 0
            and hasattr(run, "launch") and hasattr(run, "launch_pdl")):
        return run.launch, compiled.function, compiled.packed_metadata, run.launch_cooperative_grid, run.launch_pdl
    return run, compiled.function, compiled.packed_metadata, None, None


_SEMAPHORES: dict[torch.device, torch.Tensor] = {}
_SCRATCH: dict[torch.device, torch.Tensor] = {}
# Shared buffers outgrown by a reservation: CUDA graphs captured earlier still hold their addresses, so they are
# kept for the life of the process rather than freed (and reused by the allocator under a graph's feet).
_OUTGROWN: list[torch.Tensor] = []
#: Smallest shared ticket buffer (int32).
_MIN_TICKETS = 4096
#: Smallest shared scratch buffer (float32, 4 MiB): it also holds a decode attention launch's partial softmaxes
#: (about 128 programs of 16 padded query rows by up to 256 dimensions, `attention`), so they need no buffer of
#: their own.
_MIN_SCRATCH = 1 << 20


def reserve_tickets(device: torch.device, count: int) -> None:
    """Grow the shared tickets of ``device`` to at least ``count`` (all zero), outside graph capture (under one,
    nothing changes: launches then take tickets of their own, see `_semaphores`). The decode launches' prepare
    functions (`gemv.prepare_weight`, `ffn.prepare_gated`) call it with what their launches take.

    Example:
        >>> reserve_tickets(torch.device("cpu"), 10); _semaphores(torch.device("cpu"), 10).numel() >= 10
        True
    """
    _reserve(_SEMAPHORES, device, count, lambda n: torch.zeros(max(n, _MIN_TICKETS), dtype=torch.int32,
                                                               device=device))


def reserve_scratch(device: torch.device, count: int) -> None:
    """Grow the shared fp32 scratch of ``device`` to at least ``count`` entries, outside graph capture (as
    `reserve_tickets`).

    Example:
        >>> reserve_scratch(torch.device("cpu"), 10); _scratch(torch.device("cpu"), 10).numel() >= 10
        True
    """
    _reserve(_SCRATCH, device, count, lambda n: torch.empty(max(n, _MIN_SCRATCH), dtype=torch.float32,
                                                            device=device))


def _reserve(shared: dict, device: torch.device, count: int, allocate) -> None:
    # (the outgrown buffer is kept: a graph captured earlier may hold its address)
    current = shared.get(device)
    if (current is None or current.numel() < count) and not _capturing(device):
        if current is not None:
            _OUTGROWN.append(current)
        shared[device] = allocate(count)


def _grows_when_launching(device: torch.device) -> bool:
    """Whether a launch may grow the shared buffers itself: not on CUDA, where the first run of a compiled step
    with CUDA graphs (``mode="reduce-overhead"``) is a warm-up whose allocations come from the graph's memory pool,
    and a buffer kept alive there is refused by the compiled step ("tensor(s) in the cudagraph pool not tracked as
    outputs"); there only the prepare functions grow them, and a launch that needs more gets a buffer of its own."""
    return device.type != "cuda"


def _semaphores(device: torch.device, count: int) -> torch.Tensor:
    """Per-device tickets of the decode kernels whose last program to finish completes the work (split-K GEMVs,
    split top-K rows), all zero between launches (each launch re-arms the ones it used). Launches on one stream
    never overlap, so they can share them: the shared buffer when it holds ``count`` (`reserve_tickets`), else
    zeroed tickets of this launch's own."""
    tickets = _SEMAPHORES.get(device)
    if tickets is not None and tickets.numel() >= count:  # (every call of an eager decode step: kept cheap)
        return tickets
    return _grown_or_own(_SEMAPHORES, device, count, reserve_tickets, torch.zeros, torch.int32)


def _scratch(device: torch.device, count: int) -> torch.Tensor:
    """Per-device fp32 partials (split-K sums; viewed as int32: split top-K histograms) of at least ``count``
    entries. Each launch writes and reads its partials within itself, and launches on one stream never overlap
    (as for the tickets), so one buffer serves them all and an eager decode step allocates only its outputs: the
    shared buffer when it holds ``count`` (`reserve_scratch`), else partials of this launch's own."""
    partials = _SCRATCH.get(device)
    if partials is not None and partials.numel() >= count:
        return partials
    return _grown_or_own(_SCRATCH, device, count, reserve_scratch, torch.empty, torch.float32)


def _grown_or_own(shared: dict, device: torch.device, count: int, reserve, allocate, dtype) -> torch.Tensor:
    # a shared buffer too small for this launch: grown where launches may grow it, else one of the launch's own
    if _grows_when_launching(device):
        reserve(device, count)
        buffer = shared.get(device)
        if buffer is not None and buffer.numel() >= count:
            return buffer
    return allocate(count, dtype=dtype, device=device)


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()
