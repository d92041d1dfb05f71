"""Triton kernels that make Q-Sparse cheaper than dense: exact top-K in one pass, a decode GEMV that reads only
the weight rows of kept input features, and one-token attention over the key/value cache in one launch for compiled
decode steps (`attention`, through `qsparse_hf.attention`).

`QSparseLinear` uses them by itself on CUDA (bf16/fp16): the top-K kernel for every forward (training included,
with the straight-through gradient) and the sparse GEMV for decode steps of at most
`MAX_DECODE_TOKENS` tokens once the weights are stored for it (`prepare_for_decode`, or lazily at the first eager
inference forward on the GPU: q/k/v and gate/up side by side, one launch per group). Everything falls back to the reference path of `qsparse_hf.functional` elsewhere: on CPU, without
Triton, with ``QSPARSE_KERNELS=0``, or for options the kernels do not cover (block top-K, re-scaling, ste=False,
quantized variants). Launches go through `launch.KernelLaunch`: on the tensors' own GPU, and after the first call of
a shape straight to the compiled kernel (eager decode is bound by host time per launch).
"""

from __future__ import annotations

import os

import torch

__all__ = ["MAX_DECODE_TOKENS", "kernels_available", "set_kernels_enabled", "prepare_for_decode", "is_input_major"]

#: The sparse GEMV serves at most this many tokens per call (decode, speculative decode); prefill uses cuBLAS.
MAX_DECODE_TOKENS = 8

_ENABLED = os.environ.get("QSPARSE_KERNELS", "1") != "0"
# CPU tensors go through Triton's interpreter only when asked (it is a debugging aid, orders of magnitude slower).
_ON_CPU = os.environ.get("QSPARSE_KERNELS") == "interpret"
#: Eager one-token decode selects inside the GEMV launch (`gemv.select_gemv`: one launch per projection group instead
#: of two; eager decode waits on host time, not on the GPU). ``QSPARSE_SELECT_IN_GEMV=0`` keeps two launches.
SELECT_IN_GEMV = os.environ.get("QSPARSE_SELECT_IN_GEMV", "1") != "0"
#: Compiled one-token steps of a gated FFN whose activation is wider than `topk.SPLIT_FROM_KEYS` compute SiLU, the
#: top-K and the product with up in the split selection's two launches (`ops.silu_select`), instead of the
#: compiler's SiLU and product kernels around the top-K: 4.09 -> 4.03 ms per step on Qwen2-7B shapes, 4.43 -> 4.32
#: on Mistral-7B at keep 0.5 (H200, benchmarks/README.md). ``QSPARSE_FUSED_ACTIVATION=0`` turns it off (the A/B:
#: ``bench_decode.py --ways compile,compile2``).
FUSED_ACTIVATION = os.environ.get("QSPARSE_FUSED_ACTIVATION", "1") != "0"
#: One-token attention of a converted model in one launch over the cache (`attention.decode_attention`, through the
#: ``"qsparse_sdpa"`` attention implementation that `convert_to_qsparse` selects) instead of transformers' SDPA
#: path, five kernels a layer on a compiled step. ``QSPARSE_DECODE_ATTENTION=0`` keeps SDPA (the A/B:
#: ``bench_decode.py --ways compile,compile6``).
DECODE_ATTENTION = os.environ.get("QSPARSE_DECODE_ATTENTION", "1") != "0"
#: With `DECODE_ATTENTION`, a compiled one-token step over transformers' static cache also applies the rotary
#: embedding and appends the step's key and value inside that launch (`attention.decode_attention_append`, through
#: `qsparse_hf.attention.DecodeAttentionForward`), where the compiler runs three kernels a layer for them.
#: ``QSPARSE_DECODE_APPEND=0`` leaves them to the model's own code (the A/B: ``bench_decode.py --ways
#: compile,compile7``).
DECODE_APPEND = os.environ.get("QSPARSE_DECODE_APPEND", "1") != "0"
#: A compiled one-token step's GEMVs over listed kept rows (q/k/v, o, gate/up) ask L2, before they wait for the
#: selection that lists the rows (programmatic dependent launch), for the rows they are likely to read first,
#: guessed from the selection's input and its last threshold (`gemv._prefetch_likely_rows`): memory idles while a
#: one-token selection runs (a compiled Qwen2-7B step at keep 0.5: 4.15 -> 4.05 ms on an H100). The result is the
#: same either way. ``QSPARSE_GEMV_PREFETCH=0`` turns it off (the A/B: ``bench_decode.py --ways compile,compile8``).
GEMV_PREFETCH = os.environ.get("QSPARSE_GEMV_PREFETCH", "1") != "0"
#: With `GEMV_PREFETCH`, down's GEMV too guesses its rows, from the activation's input (through SiLU where the split
#: selection computes it), and a fused activation's split selection lets that GEMV start while its counting launch
#: runs, so the guess overlaps both of its launches (a compiled Qwen2-7B step at keep 0.5: 3.91-3.92 -> 3.87-3.89
#: ms on an H100, both orders). ``QSPARSE_GEMV_PREFETCH_DOWN=0`` turns it off (the A/B: ``bench_decode.py --ways
#: compile,compile9``); `prefetches_down` reads both switches.
GEMV_PREFETCH_DOWN = os.environ.get("QSPARSE_GEMV_PREFETCH_DOWN", "1") != "0"
#: A compiled one-token step of a decoder layer whose code is Llama's runs each residual add and RMSNorm in the
#: launch of the selection after it (`topk.norm_topk_rows`, `layers.DecoderLayerForward`): two launches a layer
#: fewer than the compiler's add-and-norm kernels before the selections (a compiled Qwen2-7B step at keep 0.5:
#: 3.91-3.92 -> 3.88-3.89 ms on an H100, both orders). ``QSPARSE_FUSED_NORM=0`` leaves the norms to the compiler
#: (the A/B: ``bench_decode.py --ways compile,compile10``).
FUSED_NORM = os.environ.get("QSPARSE_FUSED_NORM", "1") != "0"


def prefetches_down() -> bool:
    """Whether down's GEMV guesses its rows too (`GEMV_PREFETCH` and `GEMV_PREFETCH_DOWN`), read at call time so
    that a switch changed in the process counts.

    Example:
        >>> prefetches_down() == (GEMV_PREFETCH and GEMV_PREFETCH_DOWN)
        True
    """
    return GEMV_PREFETCH and GEMV_PREFETCH_DOWN


_FFN_MODES = {"0": None, "1": "masked", "masked": "masked", "listed": "listed"}
#: How a compiled one-token step of a gated FFN runs, besides as shipped (None: the gate/up GEMV, the split
#: selection's two launches, down's GEMV over the kept list). ``"masked"``: two launches (`ffn.gated_select`: the
#: gate/up GEMV computes the activation and resolves its top-K; `gemv.masked_gemv`: down's GEMV applies it as it
#: reads). ``"listed"``: three (`ffn.gated_select_listed`: the same GEMV, then the split selection's writing launch
#: and down's GEMV over the kept list). Both are exact, and neither is faster on an H200 (one token through
#: Qwen2-7B's FFN: 77.1 µs shipped, 88.3 masked, 78.7 listed; a compiled step 3.96, 4.24, 3.97 ms; benchmarks/
#: README.md), so both are off; ``QSPARSE_FUSED_FFN=masked`` (or ``1``) / ``listed`` turns one on, for the A/B
#: (``bench_decode.py --ways compile,compile3,compile4``, ``bench_gemv.py --ffn``).
FUSED_FFN = _FFN_MODES.get(os.environ.get("QSPARSE_FUSED_FFN", "0"), "invalid")
if FUSED_FFN == "invalid":
    raise ValueError(f"QSPARSE_FUSED_FFN must be one of {', '.join(_FFN_MODES)}, got "
                     f"{os.environ['QSPARSE_FUSED_FFN']!r}")

#: The one-launch decode attention asks L2, before its programmatic-dependent wait, for the cached keys and values
#: its programs read (`attention._prefetch_split`): a layer's attention measured 9.9 µs of a compiled Qwen2-7B step's
#: wall time on an H100 against 6.2 µs of kernel time alone (benchmarks/README.md, thirty-ninth stop), and those
#: loads are its first wait on memory. Off until timed on a GPU: ``QSPARSE_ATTENTION_PREFETCH=1`` turns it on
#: (``bench_decode.py --ways compile,compile12`` is the A/B).
ATTENTION_PREFETCH = os.environ.get("QSPARSE_ATTENTION_PREFETCH", "0") == "1"

#: A decode token's split selection (the gated FFN's activation: counting by many programs, the last resolving the
#: threshold) writes its parts in the same launch: every program waits for its row's last one at a GPU-wide
#: barrier, then writes from the values it still holds, instead of a second launch reading them again (one launch a
#: layer fewer). Only where each program can have an SM of its own (`topk._one_launch`). Off until timed on a
#: GPU: ``QSPARSE_SPLIT_SELECT_ONE_LAUNCH=1`` turns it on (``bench_decode.py --ways compile,compile13``).
SPLIT_SELECT_ONE_LAUNCH = os.environ.get("QSPARSE_SPLIT_SELECT_ONE_LAUNCH", "0") == "1"

_TRITON_IMPORTABLE: bool | None = None


def _triton_importable() -> bool:
    # A plain global rather than functools.lru_cache: this runs inside compiled forwards, where Dynamo warns about
    # (and traces through) lru_cache wrappers.
    global _TRITON_IMPORTABLE
    if _TRITON_IMPORTABLE is None:
        try:
            import triton  # noqa: F401

            _TRITON_IMPORTABLE = hasattr(torch, "library") and hasattr(torch.library, "custom_op")
        except ImportError:
            _TRITON_IMPORTABLE = False
    return _TRITON_IMPORTABLE


def kernels_available(tensor: torch.Tensor | None = None) -> bool:
    """Whether the Triton path can run (for ``tensor``'s device when given): enabled, Triton importable, and CUDA.
    CPU tensors qualify only with ``QSPARSE_KERNELS=interpret`` and ``TRITON_INTERPRET=1`` (Triton's interpreter,
    for debugging and CPU tests).

    Example:
        >>> isinstance(kernels_available(), bool)
        True
    """
    if not _ENABLED or not _triton_importable():
        return False
    if _ON_CPU and os.environ.get("TRITON_INTERPRET") == "1" and (tensor is None or tensor.device.type == "cpu"):
        return True
    return torch.cuda.is_available() if tensor is None else tensor.is_cuda


def set_kernels_enabled(enabled: bool, *, on_cpu: bool | None = None) -> bool:
    """Switch the Triton path on or off for the whole process (e.g. to compare against the reference); returns the
    previous setting. ``QSPARSE_KERNELS=0`` in the environment starts with it off. ``on_cpu=True`` also routes CPU
    tensors through Triton's interpreter when ``TRITON_INTERPRET=1`` (``QSPARSE_KERNELS=interpret`` does the same).

    Example:
        >>> previous = set_kernels_enabled(False); kernels_available()
        False
        >>> _ = set_kernels_enabled(previous)
    """
    global _ENABLED, _ON_CPU
    previous, _ENABLED = _ENABLED, bool(enabled)
    if on_cpu is not None:
        _ON_CPU = bool(on_cpu)
    return previous


def is_input_major(weight: torch.Tensor) -> bool:
    """True when an ``[out, in]`` weight is stored input-major: its transpose is row-major (unit stride along the
    outputs), as the sparse GEMV reads it. Rows may be padded, as for a member of a side-by-side block.

    Example:
        >>> is_input_major(torch.empty(4, 8)), is_input_major(torch.empty(8, 4).t()), is_input_major(torch.empty(8, 6)[:, :4].t())
        (False, True, True)
    """
    return weight.dim() == 2 and weight.stride(0) == 1 and weight.stride(1) >= weight.shape[0]


def prepare_for_decode(model: torch.nn.Module) -> int:
    """Store every `QSparseLinear` weight for the sparse decode GEMV, in place: input-major, and the linears that
    read one input (q/k/v, gate/up) side by side in one block, so one launch serves each group.

    Each Parameter keeps its ``[out, in]`` shape, name and values (it becomes a view of the block; no second copy
    stays alive). Dense matmuls (prefill, training) read that layout at the same speed, and ``state_dict`` /
    ``save_pretrained`` write ordinary contiguous weights. Each selecting sparsifier also gets its threshold hint
    (one-token top-Ks start from the last token's threshold) on the weights' device. In eager mode the first
    inference forward on the GPU does this lazily (so ``model.generate`` with transformers' compiled static cache
    finds it done by the eager prefill); call it yourself before capturing a CUDA graph or compiling a forward
    that never ran eagerly. Returns the number of weights re-laid (0 when everything is already in place).

    Example:
        >>> from qsparse_hf import QSparseLinear
        >>> from qsparse_hf.layers import InputSparsifier
        >>> linear = torch.nn.Linear(8, 4, dtype=torch.bfloat16)
        >>> model = torch.nn.Sequential(QSparseLinear.from_linear(linear, InputSparsifier(0.5)))
        >>> prepare_for_decode(model), is_input_major(model[0].weight)
        (1, True)
    """
    from ..layers import DecodeWeights, QSparseLinear

    count = 0
    seen = set()
    for module in model.modules():
        sparsifier = getattr(module, "sparsifier", None)
        if not isinstance(module, QSparseLinear) or id(sparsifier) in seen:
            continue
        seen.add(id(sparsifier))
        weights = sparsifier.decode_weights
        if weights is not None and weights.current():
            weights.prepare()  # (what a switch turned on since, e.g. FUSED_FFN, may need)
            continue
        sparsifier.decode_weights = DecodeWeights.build(sparsifier.linears)
        if sparsifier.decode_weights is not None:
            count += len(sparsifier.linears)
    return count
