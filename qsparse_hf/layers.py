"""Thin modules over `qsparse_hf.functional`: `QSparseLinear` and `QSparseActivation`.

Both record how sparse the tensor they produce is (zeros / elements), accumulated on the device so that no forward
pass waits for the host; `qsparse_hf.stats.sparsity_report` reads the counters.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import functional as QF
from . import kernels

__all__ = ["InputSparsifier", "QSparseLinear", "QSparseActivation", "SparsityCounter"]


_KERNEL_DTYPES = (torch.bfloat16, torch.float16)


def _kernel_ops():
    from .kernels import ops  # imports Triton: only once a kernel is actually wanted

    return ops


class SparsityCounter:
    """Zeros and elements seen by one module, accumulated without host synchronisation.

    Example:
        >>> counter = SparsityCounter()
        >>> counter.add(torch.tensor([[0.0, 1.0], [0.0, 0.0]]))
        >>> counter.sparsity()
        0.75
    """

    def __init__(self) -> None:
        self.enabled = True
        self.reset()

    def reset(self) -> None:
        """Forget everything counted so far."""
        self.zeros: torch.Tensor | None = None
        self.elements = 0

    def add(self, tensor: torch.Tensor, zeros: torch.Tensor | None = None) -> None:
        """Count the zeros of ``tensor`` (or take a precomputed count of them)."""
        if not self.active():
            return
        with torch.no_grad():
            count = (tensor == 0).sum() if zeros is None else zeros
            if self.zeros is None:
                self.zeros = count.clone()
            else:
                if self.zeros.device != count.device:
                    self.zeros = self.zeros.to(count.device)
                self.zeros += count
        self.elements += tensor.numel()

    def active(self) -> bool:
        """Whether the current forward pass is counted: tracking is on, the code is not being traced by
        ``torch.compile``, and this is not a recomputation inside the backward pass (gradient checkpointing re-runs
        forwards in the autograd engine; those must not be counted twice)."""
        return self.enabled and not torch.compiler.is_compiling() and torch._C._current_graph_task_id() == -1

    def counts(self) -> tuple[int, int]:
        """(zeros, elements) as Python ints; synchronises with the device once."""
        return (0 if self.zeros is None else int(self.zeros.item())), self.elements

    def sparsity(self) -> float:
        """Fraction of zeros seen, NaN when nothing was seen yet."""
        zeros, elements = self.counts()
        return zeros / elements if elements else float("nan")


class InputSparsifier:
    """Top-K (optionally quantize-then-top-K) of a linear's input, shared by the linears that read the same tensor.

    q/k/v read one tensor and so do gate/up: the first member to see an input computes the sparse tensor, the
    others get the cached result as long as the input is the very same tensor object, unmodified. The cache is
    dropped once every member has used it, so no activation outlives its layer.

    Example:
        >>> sparsifier = InputSparsifier(topk=0.5)
        >>> sparsifier.members = 2  # as when two linears share it
        >>> x = torch.tensor([[1.0, -4.0, 2.0, 0.5]])
        >>> sparsifier(x) is sparsifier(x)
        True
    """

    def __init__(
        self,
        topk: float | int,
        *,
        block_size: int | None = None,
        ste: bool = True,
        rescale: bool = False,
        activation_bits: int | None = None,
    ) -> None:
        self.topk = topk
        self.block_size = block_size
        self.ste = ste
        self.rescale = rescale
        self.activation_bits = activation_bits
        self.members = 0
        #: Set by `convert_to_qsparse` when the input is known to have at most K non-zeros per token (down_proj
        #: after a top-K activation): the top-K is then the identity and is skipped.
        self.input_within_topk = False
        self._clear()

    def settings(self) -> tuple:
        """Everything that determines the output; linears may share a sparsifier only if these are equal."""
        return (self.topk, self.block_size, self.ste, self.rescale, self.activation_bits)

    def keep(self, dim: int) -> int:
        """Entries kept per token (per block with ``block_size``) for an input of ``dim`` features."""
        return QF.keep_count(self.topk, self.block_size or dim)

    def _clear(self) -> None:
        self._input: torch.Tensor | None = None
        self._version = -1
        self._output: torch.Tensor | None = None
        self._zeros: torch.Tensor | None = None
        self._uses = 0

    def uses_kernel(self, x: torch.Tensor) -> bool:
        """Whether the Triton top-K kernel computes this input (CUDA bf16/fp16, plain per-token top-K, and the
        straight-through gradient or no gradient at all); otherwise `functional.sparsify` does."""
        return (
            x.dtype in _KERNEL_DTYPES
            and self.block_size is None
            and not self.rescale
            and (self.ste or not (torch.is_grad_enabled() and x.requires_grad))
            and kernels.kernels_available(x)
        )

    def _sparsify(self, x: torch.Tensor) -> torch.Tensor:
        k = self.keep(x.shape[-1])
        if self.input_within_topk or (self.block_size is None and k >= x.shape[-1]):
            return x
        if self.uses_kernel(x):
            return _kernel_ops().topk_sparsify(x, k)
        return QF.sparsify(x, k, block_size=self.block_size, ste=self.ste, rescale=self.rescale)

    def __call__(self, x: torch.Tensor, want_zeros: bool = False) -> torch.Tensor:
        out, _ = self.forward_with_zeros(x, want_zeros)
        return out

    def forward_with_zeros(self, x: torch.Tensor, want_zeros: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Sparse input and (if asked) its zero count, from the cache when another member already computed them."""
        # Under torch.compile every member computes its own (identical, side-effect free) op; the compiler can
        # merge them, and the Python-side cache would only cause graph breaks.
        compiling = torch.compiler.is_compiling()
        if not compiling and self._input is x and self._version == x._version:
            out, zeros = self._output, self._zeros
        else:
            out = x
            if self.activation_bits is not None:
                out = QF.absmax_quantize(out, bits=self.activation_bits, ste=self.ste)
            out = self._sparsify(out)
            zeros = None
            self._clear()
            if self.members > 1 and not compiling:
                self._input, self._version, self._output = x, x._version, out
        if want_zeros and zeros is None:
            with torch.no_grad():
                zeros = (out == 0).sum()
            if self._output is out:
                self._zeros = zeros
        if self._output is out:
            self._uses += 1
            if self._uses >= self.members:
                self._clear()
        return out, zeros


class QSparseLinear(nn.Linear):
    """An ``nn.Linear`` that multiplies only the top-K entries of ``|x|`` of each token.

    Same parameters and state-dict keys as the ``nn.Linear`` it replaces, so checkpoints, peft, ``device_map``
    and sharded loading see an ordinary linear. Training passes the gradient straight through the top-K
    (``functional.sparsify``). With ``weight_bits=1.58`` the weight is fake-quantized to ``{−α, 0, α}``.

    Attributes:
        sparsifier: the `InputSparsifier`, possibly shared with siblings that read the same input.
        role: projection kind used in reports (``"q"``, ``"k"``, ``"v"``, ``"o"``, ``"gate"``, ``"up"``,
            ``"down"``, or the module's own name outside known architectures).
        layer_index: decoder layer number, or None.

    Example:
        >>> linear = QSparseLinear.from_linear(nn.Linear(8, 4), InputSparsifier(topk=0.5))
        >>> linear(torch.randn(2, 3, 8)).shape
        torch.Size([2, 3, 4])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        sparsifier: InputSparsifier | None = None,
        weight_bits: float | None = None,
        role: str | None = None,
        layer_index: int | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._setup(sparsifier or InputSparsifier(topk=1.0), weight_bits, role, layer_index)

    def _setup(self, sparsifier, weight_bits, role, layer_index) -> None:
        self.sparsifier = sparsifier
        sparsifier.members += 1
        self.weight_bits = weight_bits
        self.role = role
        self.layer_index = layer_index
        self.counter = SparsityCounter()

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        sparsifier: InputSparsifier,
        *,
        weight_bits: float | None = None,
        role: str | None = None,
        layer_index: int | None = None,
    ) -> "QSparseLinear":
        """Wrap an existing linear, sharing (not copying) its weight and bias Parameters."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight
        new.bias = linear.bias
        new._setup(sparsifier, weight_bits, role, layer_index)
        return new

    def to_linear(self) -> nn.Linear:
        """The plain ``nn.Linear`` with the same Parameters (used to undo a conversion)."""
        linear = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(linear)
        linear.in_features, linear.out_features = self.in_features, self.out_features
        linear.weight, linear.bias = self.weight, self.bias
        return linear

    def effective_weight(self) -> torch.Tensor:
        """The weight actually multiplied: ternary fake-quantized with ``weight_bits=1.58``, else ``weight``.

        A model loaded from a packed ternary export holds ``weight`` in {−1, 0, 1} and its scale α in the
        ``weight_scale`` buffer; the product is the same tensor the fake-quantizer produced before export.
        """
        if self.weight_bits is None:
            return self.weight
        scale = getattr(self, "weight_scale", None)
        if scale is not None:
            return (self.weight.float() * scale).to(self.weight.dtype)
        return QF.ternary_quantize(self.weight, ste=self.sparsifier.ste)

    def to_input_major(self) -> bool:
        """Store the weight as its contiguous transpose (same Parameter, values and shape), the layout the sparse
        decode GEMV reads. Returns False when there is nothing to do or the kernel would not be used anyway."""
        weight = self.weight
        if kernels.is_input_major(weight) or self.weight_bits is not None or weight.dtype not in _KERNEL_DTYPES:
            return False
        with torch.no_grad():
            weight.data = weight.data.t().contiguous().t()
        return True

    def _decode_kernel_ready(self, x: torch.Tensor) -> bool:
        if (
            x.numel() > kernels.MAX_DECODE_TOKENS * self.in_features
            or self.weight_bits is not None
            or x.dtype not in _KERNEL_DTYPES
            or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
            or not kernels.kernels_available(x)
        ):
            return False
        if kernels.is_input_major(self.weight):
            return True
        # Re-lay once, lazily, in eager mode only (compiled graphs and captured graphs must not see it happen).
        if torch.compiler.is_compiling() or (x.is_cuda and torch.cuda.is_current_stream_capturing()):
            return False
        return self.to_input_major()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        key = prefix + "weight"
        if key in destination and not destination[key].is_contiguous():  # input-major layout: save the usual one
            destination[key] = destination[key].contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_sparse, zeros = self.sparsifier.forward_with_zeros(x, want_zeros=self.counter.active())
        if zeros is not None:
            self.counter.add(x_sparse, zeros)
        if self._decode_kernel_ready(x_sparse):
            return _kernel_ops().sparse_linear(x_sparse, self.weight.t(), self.bias)
        return F.linear(x_sparse, self.effective_weight(), self.bias)

    def extra_repr(self) -> str:
        s = self.sparsifier
        keep = f"keep={s.topk} (K={s.keep(self.in_features)}" + (f" per {s.block_size})" if s.block_size else ")")
        quant = ""
        if self.weight_bits is not None or s.activation_bits is not None:
            quant = f", weight_bits={self.weight_bits}, activation_bits={s.activation_bits}"
        return f"{super().extra_repr()}, {keep}{quant}, ste={s.ste}"


class QSparseActivation(nn.Module):
    """The FFN activation followed by top-K: ``sparsify(act(gate(x)))``, the Q-Sparse recipe for gated FFNs.

    Wraps the model's own activation module (no parameters, so no state-dict change); with ``relu2=True`` the
    activation becomes squared ReLU instead (training from scratch).

    Example:
        >>> act = QSparseActivation(nn.SiLU(), InputSparsifier(topk=0.5))
        >>> int((act(torch.randn(3, 8)) == 0).sum())
        12
    """

    def __init__(
        self,
        act: nn.Module | Callable | None,
        sparsifier: InputSparsifier,
        *,
        relu2: bool = False,
        layer_index: int | None = None,
    ) -> None:
        super().__init__()
        self.act = act
        self.relu2 = relu2
        self.sparsifier = sparsifier
        sparsifier.members += 1
        self.role = "act"
        self.layer_index = layer_index
        self.counter = SparsityCounter()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = QF.relu2(x) if self.relu2 else self.act(x)
        y_sparse, zeros = self.sparsifier.forward_with_zeros(y, want_zeros=self.counter.active())
        if zeros is not None:
            self.counter.add(y_sparse, zeros)
        return y_sparse

    def extra_repr(self) -> str:
        act = "relu2" if self.relu2 else type(self.act).__name__
        return f"activation={act}, keep={self.sparsifier.topk}"
