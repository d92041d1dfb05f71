"""Thin modules over `qsparse_hf.functional`: `QSparseLinear` and `QSparseActivation`.

Both record how sparse the tensor they produce is (zeros / elements), accumulated on the device so that no forward
pass waits for the host; `qsparse_hf.stats.sparsity_report` reads the counters.
"""

from __future__ import annotations

import contextvars
import inspect
import itertools
import weakref
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _torch_module

from . import functional as QF
from . import kernels

__all__ = [
    "DecodeWeights", "DecoderLayerForward", "GatedFFNForward", "ModuleForward", "InputSparsifier", "QSparseActivation",
    "QSparseExpertInput", "QSparseLinear", "RealTokenTracker", "SparsityCounter",
]


_KERNEL_DTYPES = (torch.bfloat16, torch.float16)
_MAX_LISTED_FEATURES = 32768  # kernels.topk.MAX_LISTED_FEATURES, without importing Triton here
_MAX_SELECT_FEATURES = 8192  # kernels.gemv.MAX_SELECT_FEATURES, likewise
_SPLIT_FROM_KEYS = 8192  # kernels.topk.SPLIT_FROM_KEYS, likewise
_MAX_NORM_FEATURES = 8192  # kernels.topk.MAX_NORM_FEATURES, likewise


_OPS = None

# What the members of a sparsifier share within one compiled forward (the sparse input or the decode outputs, and
# an activation's list of kept features), keyed by `InputSparsifier.key`. Under torch.compile the sharing must not
# live on the sparsifiers themselves: Dynamo replays, after every call of the compiled graph, each attribute the
# traced code left changed on a persistent object -- 22 per decoder layer, each reached through module attribute
# chains (with the guards, +0.78 ms of host time per token in transformers' compiled generate() on 8 layers of a
# 7B model, against 0.16 ms the sparse kernels saved). A dict mutated in the graph costs one clear-and-update per
# call however many entries came and went (and every entry is gone by the end).
_TRACED_SHARED: dict = {}
_TRACED_KEPT: dict = {}
# A one-token selection made ahead for a sparsifier's input by the launch that computed that input (a decoder
# layer's norm: `DecoderLayerForward`), ``(input, sparse, kept)`` by key, and the residual sum a folded decoder layer
# left for the next one to compute in its norm's launch, ``(output, residual, delta)``: like the two above, gone by
# the end of the compiled forward.
_TRACED_SELECTED: dict = {}
_TRACED_LAYER_SUM: dict = {}
_SPARSIFIER_KEYS = itertools.count()


def _take_traced_shared(key: int, x: torch.Tensor, decoded_only: bool):
    """In a compiled forward: what the sparsifier ``key`` shared for this very input, counted as one more use (the
    entry goes with its last member), else None; ``decoded_only``: only the members' outputs of a decode step.
    Looked up by key, so a member need not read its sibling's sparsifier: reaching one object through two modules
    makes Dynamo check their identity in Python before every call (five such checks per decoder layer)."""
    entry = _TRACED_SHARED.get(key)
    # The identity test is traced, so one op serves q/k/v in a compiled graph too; the graph never mutates its
    # own activations, so no version check is needed.
    if entry is None or entry[0] is not x or (decoded_only and type(entry[1]) is not tuple):
        return None
    _, output, uses, members = entry
    if uses + 1 >= members:
        del _TRACED_SHARED[key]
    else:
        _TRACED_SHARED[key] = (x, output, uses + 1, members)
    return output


def _unhooked(*modules: nn.Module) -> bool:
    """Whether calling these modules would run nothing but their class's forward: no forward hooks (module or
    global) and no forward set on the instance (accelerate's offloading and device hooks wrap it so). A fused step
    that skips their calls must not skip any of that."""
    # (read through torch's module, as Dynamo does: the same dicts under a second name cost compiled calls an
    # identity check each)
    if _torch_module._global_forward_hooks or _torch_module._global_forward_pre_hooks:
        return False
    for module in modules:
        if module._forward_hooks or module._forward_pre_hooks or "forward" in module.__dict__:
            return False
    return True


def _is_silu(act) -> bool:
    """Whether ``act`` is a plain SiLU module (PyTorch's or transformers'), which the fused activation computes."""
    if type(act) is nn.SiLU:
        return True
    try:
        from transformers.activations import SiLUActivation
    except ImportError:
        return False
    return type(act) is SiLUActivation


def _kernel_ops():
    global _OPS
    if _OPS is None:
        from .kernels import ops  # imports Triton: only once a kernel is actually wanted

        _OPS = ops
    return _OPS


# The real (non-padding) tokens of the forward pass in progress: (flat bool mask over its tokens, how many are
# real), or None when every token is real or no attention mask was given. Set by `RealTokenTracker`.
_REAL_TOKENS: contextvars.ContextVar[tuple[torch.Tensor, int] | None] = contextvars.ContextVar(
    "qsparse_real_tokens", default=None
)


class RealTokenTracker:
    """Forward hooks on a converted model that tell the sparsity counters which tokens are padding.

    Before the forward it reads the 2-D ``attention_mask`` (the columns of the tokens being processed: the last
    ``seq`` of them when a KV cache holds the rest); the counters then count zeros and elements over real tokens
    only, so a padded batch and the same text unpadded report the same sparsity. It does nothing while the model is
    compiled or captured in a CUDA graph (nothing is counted there), and costs one host synchronisation per
    forward that has an attention mask.

    Example:
        >>> model = convert_to_qsparse(AutoModelForCausalLM.from_pretrained(path))  # doctest: +SKIP
        >>> RealTokenTracker.attach(model) is not None    # done by convert_to_qsparse  # doctest: +SKIP
        True
    """

    def __init__(self, forward: Callable) -> None:
        parameters = list(inspect.signature(forward).parameters)
        self._positions = {name: parameters.index(name) for name in ("input_ids", "attention_mask", "inputs_embeds")
                           if name in parameters}
        self._tokens: list[contextvars.Token | None] = []
        self._handles: list = []

    @classmethod
    def attach(cls, model: nn.Module) -> "RealTokenTracker | None":
        """Hook ``model`` (once) if its forward takes an ``attention_mask``; the tracker, or None."""
        existing = model.__dict__.get("_qsparse_real_tokens")
        if existing is not None:
            return existing
        try:
            tracker = cls(model.forward)
        except (TypeError, ValueError):  # no inspectable signature
            return None
        if "attention_mask" not in tracker._positions:
            return None
        tracker._handles = [
            model.register_forward_pre_hook(tracker._enter, with_kwargs=True),
            model.register_forward_hook(tracker._leave, always_call=True),
        ]
        model.__dict__["_qsparse_real_tokens"] = tracker
        return tracker

    @staticmethod
    def detach(model: nn.Module) -> None:
        """Remove the hooks `attach` added, if any."""
        tracker = model.__dict__.pop("_qsparse_real_tokens", None)
        for handle in tracker._handles if tracker is not None else ():
            handle.remove()

    def _argument(self, name: str, args: tuple, kwargs: dict):
        if name in kwargs:
            return kwargs[name]
        position = self._positions.get(name)
        return args[position] if position is not None and position < len(args) else None

    def _real_tokens(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, int] | None:
        mask = self._argument("attention_mask", args, kwargs)
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.device.type == "meta":
            return None
        if torch.compiler.is_compiling() or (mask.is_cuda and torch.cuda.is_current_stream_capturing()):
            return None
        tokens = self._argument("input_ids", args, kwargs)
        if not isinstance(tokens, torch.Tensor):
            tokens = self._argument("inputs_embeds", args, kwargs)
        if not isinstance(tokens, torch.Tensor) or tokens.dim() < 2 or tokens.shape[0] != mask.shape[0]:
            return None
        seq = tokens.shape[1]
        if seq > mask.shape[1]:
            return None
        real = mask[:, mask.shape[1] - seq:].reshape(-1) != 0
        count = int(real.sum())
        return None if count == real.numel() else (real, count)

    def _enter(self, module, args, kwargs):
        if torch.compiler.is_compiling():  # nothing is counted in compiled code (and Dynamo cannot trace this)
            return
        self._tokens.append(_REAL_TOKENS.set(self._real_tokens(args, kwargs)))

    def _leave(self, module, args, output):
        if self._tokens and not torch.compiler.is_compiling():
            _REAL_TOKENS.reset(self._tokens.pop())


def _one_token_inference(x: torch.Tensor) -> bool:
    return x.numel() == x.shape[-1] and not (torch.is_grad_enabled() and x.requires_grad)


def _decode_tokens(x: torch.Tensor) -> bool:
    """Few enough tokens for the sparse GEMV (a decode step), not a prompt."""
    return x.numel() <= kernels.MAX_DECODE_TOKENS * x.shape[-1]


def _listable(x: torch.Tensor) -> bool:
    """One token, narrow enough for the top-K kernel to list its kept features."""
    return x.numel() == x.shape[-1] and x.shape[-1] <= _MAX_LISTED_FEATURES


def _real_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """The real-token mask of the forward in progress if ``tensor`` holds one row per token of it, else None."""
    real = _REAL_TOKENS.get()
    if real is None or tensor.dim() < 2 or tensor.numel() != real[0].numel() * tensor.shape[-1]:
        return None
    mask, count = real
    return (mask if mask.device == tensor.device else mask.to(tensor.device)), count


class SparsityCounter:
    """Zeros and elements seen by one module, accumulated without host synchronisation, kept apart for forwards
    in training mode and in eval mode (so a Trainer's evaluation never mixes into the training numbers).

    Example:
        >>> counter = SparsityCounter()
        >>> counter.add(torch.tensor([[0.0, 1.0], [0.0, 0.0]]))
        >>> counter.sparsity()
        0.75
    """

    __slots__ = ("enabled", "_zeros", "_elements")  # see InputSparsifier.__slots__

    def __init__(self) -> None:
        self.enabled = True
        self._zeros: dict[bool, torch.Tensor | None] = {}
        self._elements: dict[bool, int] = {}
        self.reset()

    def reset(self, training: bool | None = None) -> None:
        """Forget everything counted so far (only the training- or eval-mode counts when ``training`` is given)."""
        for mode in (True, False) if training is None else (training,):
            self._zeros[mode] = None
            self._elements[mode] = 0

    def accumulator(self, device: torch.device, training: bool = False) -> torch.Tensor:
        """The int64 zero count on ``device`` (created at 0), for kernels that add to it in place."""
        zeros = self._zeros[training]
        if zeros is None:
            zeros = self._zeros[training] = torch.zeros((), dtype=torch.int64, device=device)
        elif zeros.device != device:
            zeros = self._zeros[training] = zeros.to(device)
        return zeros

    def kernel_accumulator(self, tensor: torch.Tensor, training: bool = False, *,
                           checked: bool = False) -> torch.Tensor | None:
        """The accumulator a kernel producing ``tensor`` may add all its zeros to, or None where this forward is
        not counted or has padding tokens (their rows are left out of the count, by `add`). ``checked``: the
        caller has just found `active` true for this forward (eager decode skips asking again)."""
        if not (checked or self.active(tensor)) or _real_rows(tensor) is not None:
            return None
        return self.accumulator(tensor.device, training)

    def add(self, tensor: torch.Tensor, already_added: bool = False, training: bool = False, *,
            checked: bool = False) -> None:
        """Count the zeros and elements of ``tensor``, over the real (non-padding) tokens when `RealTokenTracker`
        knows them (``already_added``: a kernel already added the zeros to `kernel_accumulator`; ``checked``: as
        there)."""
        if not (checked or self.active(tensor)):
            return
        real = None if already_added else _real_rows(tensor)
        if not already_added:
            with torch.no_grad():
                zero = tensor == 0
                if real is None:
                    count = zero.sum()
                else:
                    count = torch.where(real[0], zero.reshape(real[0].numel(), -1).sum(-1), 0).sum()
                self.accumulator(count.device, training).add_(count)
        self._elements[training] += tensor.numel() if real is None else real[1] * tensor.shape[-1]

    def window(self, training: bool | None = None) -> tuple[list[torch.Tensor], int]:
        """The zero-count tensors (still on their device) and the element count, of one mode or of both."""
        modes = (True, False) if training is None else (training,)
        return [self._zeros[m] for m in modes if self._zeros[m] is not None], sum(self._elements[m] for m in modes)

    @property
    def elements(self) -> int:
        """Elements counted in both modes."""
        return self._elements[True] + self._elements[False]

    def active(self, tensor: torch.Tensor | None = None) -> bool:
        """Whether the current forward pass is counted: tracking is on, the code is not being traced by
        ``torch.compile``, this is not a recomputation inside the backward pass (gradient checkpointing re-runs
        forwards in the autograd engine; those must not be counted twice), and ``tensor`` holds real data (a
        forward on the meta device, as in shape inference, counts nothing; nor does a CUDA-graph capture, whose
        replays would count zeros but not elements)."""
        return (
            self.enabled
            and not torch.compiler.is_compiling()
            and torch._C._current_graph_task_id() == -1
            and (tensor is None or tensor.device.type != "meta")
            and not (tensor is not None and tensor.is_cuda and torch.cuda.is_current_stream_capturing())
        )

    def counts(self, training: bool | None = None) -> tuple[int, int]:
        """(zeros, elements) as Python ints, of one mode or of both; synchronises with the device once."""
        tensors, elements = self.window(training)
        return sum(int(t.item()) for t in tensors), elements

    def sparsity(self) -> float:
        """Fraction of zeros seen, NaN when nothing was seen yet."""
        zeros, elements = self.counts()
        return zeros / elements if elements else float("nan")


class _Settings(NamedTuple):
    """What an `InputSparsifier`'s forwards depend on besides their input (`InputSparsifier.stamp`)."""

    key: int
    topk: float | int
    block_size: int | None
    ste: bool
    rescale: bool
    activation_bits: int | None
    members: int = 0
    input_within_topk: bool = False
    publishes_kept: bool = False
    feeds_adapters: bool = False
    hint_slot: int = -1
    source_key: int | None = None
    #: The decode layout's ``(width, member widths, bias source)`` (`DecodeWeights`), None while there is none.
    layout: tuple | None = None


class _LinearSettings(NamedTuple):
    """What a `QSparseLinear`'s compiled forward reads of the linear itself (`QSparseLinear.stamp`): one guard per
    linear instead of one per attribute (four attributes of seven linears were some 28 guards per decoder layer,
    each checked before every compiled call)."""

    share_key: int
    decode_slot: int = 0
    decode_column: int = 0
    weight_bits: float | None = None


_SETTINGS_BY_STAMP: dict[int, tuple] = {}
_STAMP_OF: dict[tuple, int] = {}


def _stamp(settings: tuple) -> int:
    """The number that stands for ``settings`` (a `_Settings` or `_LinearSettings`) in this process (equal settings,
    equal stamps)."""
    # (with the types: ``topk=1`` (K) and ``topk=1.0`` (all) are equal as tuple items but different settings)
    identity = (type(settings), settings, tuple(map(type, settings)))
    stamp = _STAMP_OF.get(identity)
    if stamp is None:
        stamp = _STAMP_OF[identity] = len(_SETTINGS_BY_STAMP)
        _SETTINGS_BY_STAMP[stamp] = settings
    return stamp


# (older torch releases have it under torch._dynamo only)
_assume_constant_result = getattr(torch.compiler, "assume_constant_result", None)
if _assume_constant_result is None:
    import torch._dynamo

    _assume_constant_result = torch._dynamo.assume_constant_result


@_assume_constant_result
def _settings_of(stamp: int) -> tuple:
    """The settings ``stamp`` stands for. A compiled forward takes the result as a constant and guards only the
    stamp it read (one guard per sparsifier instead of one per setting: each is checked before every call)."""
    return _SETTINGS_BY_STAMP[stamp]


def _setting(name: str, doc: str) -> property:
    """An `InputSparsifier` setting, held in its `_Settings` (or a `QSparseLinear`'s, in its `_LinearSettings`):
    setting it gives the object a new stamp."""

    def get(self):
        return getattr(self._state, name)

    def set_(self, value) -> None:
        self._update(**{name: value})

    return property(get, set_, doc=doc)


class InputSparsifier:
    """Top-K (optionally quantize-then-top-K) of a linear's input, shared by the linears that read the same tensor.

    q/k/v read one tensor and so do gate/up: the first member to see an input computes the sparse tensor, the
    others get the cached result as long as the input is the very same tensor object, unmodified. The cache is
    dropped once every member has used it, so no activation outlives its layer. The members share one
    `SparsityCounter` too: they read the same tensor, so one count serves them all.

    On the decode path (a few tokens, inference, CUDA) the sparsifier also runs its linears' products: their
    weights are stored side by side, input-major (`DecodeWeights`), so one sparse GEMV launch serves q/k/v or
    gate/up, and the first member's call computes the outputs the others then take from the cache.

    Example:
        >>> sparsifier = InputSparsifier(topk=0.5)
        >>> sparsifier.members = 2  # as when two linears share it
        >>> x = torch.tensor([[1.0, -4.0, 2.0, 0.5]])
        >>> sparsifier(x) is sparsifier(x)
        True
    """

    # Slots, not an instance dict: a compiled forward guards every sparsifier it reads, and with an instance dict
    # Dynamo must also check at each call that no method it called is shadowed there (a guard per method and
    # sparsifier, evaluated before every compiled decode step: 315 -> 239 µs for 32 layers on a CPU). The settings
    # live in one `_Settings` tuple with a `stamp`: compiled forwards read them through `_settings_of(stamp)`, one
    # guard per sparsifier (they were ~15, 3.6 µs per decoder layer of a compiled call's host time on a CPU).
    __slots__ = (
        "counter", "kept", "linears", "plan", "stamp",
        "_decode_weights", "_hint_device", "_input", "_kept_counts", "_kept_width", "_output", "_produced", "_source",
        "_state", "_uses", "_version",
    )

    block_size = _setting("block_size", "Features per block of the per-block top-K, or None: per token.")
    ste = _setting("ste", "Whether training passes the gradient straight through the top-K.")
    rescale = _setting("rescale", "Whether the kept entries are rescaled to keep the input's norm.")
    activation_bits = _setting("activation_bits", "Bits of the absmax activation quantizer before the top-K, or None.")
    members = _setting("members", "How many modules share this sparsifier (each takes the cached result once).")
    input_within_topk = _setting(
        "input_within_topk", "Set by `convert_to_qsparse` when the input is known to have at most K non-zeros per "
        "token (down_proj after a top-K activation): the top-K is then the identity and is skipped.")
    publishes_kept = _setting(
        "publishes_kept", "Whether one-token inference forwards publish the kept features in `kept` (an activation "
        "that a down_proj's sparsifier names as its `source`).")
    feeds_adapters = _setting(
        "feeds_adapters", "Set by `convert.sparsify_adapter_inputs`: peft adapter layers sparsify the input for both "
        "their branches and hand the result back to this sparsifier, which then recognises it (the last sparse "
        "tensor returned, held weakly with its version). Off otherwise, so plain forwards do none of this.")
    hint_slot = _setting(
        "hint_slot", "Slot of the threshold hint that one-token selections start from (`kernels.ops.register_hint`), "
        "-1: none.")

    @property
    def key(self) -> int:
        """This sparsifier's entry in what compiled forwards share (`_TRACED_SHARED`, `_TRACED_KEPT`)."""
        return self._state.key

    def __init__(
        self,
        topk: float | int,
        *,
        block_size: int | None = None,
        ste: bool = True,
        rescale: bool = False,
        activation_bits: int | None = None,
    ) -> None:
        self._state = _Settings(key=next(_SPARSIFIER_KEYS), topk=topk, block_size=block_size, ste=ste,
                                rescale=rescale, activation_bits=activation_bits)
        #: The number that stands for the current settings (`_settings_of`); it changes with any setting.
        self.stamp = _stamp(self._state)
        self._kept_counts: dict[int, int] = {}
        #: The last eager one-token decode step, worked out for repeating (`EagerDecodePlan`), or None.
        self.plan: EagerDecodePlan | None = None
        #: The `QSparseLinear` members, in the order they were converted (the column order of `decode_weights`).
        self.linears: list[QSparseLinear] = []
        self.counter = SparsityCounter()
        self._source = None
        self.kept: torch.Tensor | None = None
        self._kept_width = 0
        self._decode_weights: DecodeWeights | None = None
        self._hint_device: torch.device | None = None
        self._produced: tuple[weakref.ref, int] | None = None
        self._clear()

    def _update(self, **changes) -> None:
        self._state = self._state._replace(**changes)
        self.stamp = _stamp(self._state)

    def _now(self) -> _Settings:
        """The settings, as a compiled forward reads them (a constant, guarded by the stamp) or as they are."""
        return _settings_of(self.stamp) if torch.compiler.is_compiling() else self._state

    def __setstate__(self, state) -> None:
        # (copied or unpickled: stamps are numbered per process, so the copy takes the stamp of its settings here)
        for name, value in state[1].items():
            object.__setattr__(self, name, value)
        self.stamp = _stamp(self._state)

    @property
    def source(self) -> "InputSparsifier | None":
        """The activation's sparsifier whose kept features bound this input (down_proj after a top-K activation,
        set with ``input_within_topk``): on one-token decode steps its list of kept features is exactly the list
        of weight rows the GEMV has to read, so no selection runs here."""
        return self._source

    @source.setter
    def source(self, value: "InputSparsifier | None") -> None:
        self._source = value
        self._update(source_key=None if value is None else value.key)  # what compiled forwards read instead

    @property
    def decode_weights(self) -> "DecodeWeights | None":
        """The members' weights stored for the sparse decode GEMV (`DecodeWeights`), or None."""
        return self._decode_weights

    @decode_weights.setter
    def decode_weights(self, weights: "DecodeWeights | None") -> None:
        self._decode_weights = weights
        self._update(layout=None if weights is None else (weights.width, weights.widths, weights.bias_source))

    def settings(self) -> tuple:
        """Everything that determines the output; linears may share a sparsifier only if these are equal."""
        return (self.topk, self.block_size, self.ste, self.rescale, self.activation_bits)

    def keep(self, dim: int) -> int:
        """Entries kept per token (per block with ``block_size``) for an input of ``dim`` features."""
        if torch.compiler.is_compiling():  # folded while tracing, from the settings
            settings = self._now()
            return QF.keep_count(settings.topk, settings.block_size or dim)
        settings = self._state
        width = settings.block_size or dim
        count = self._kept_counts.get(width)
        if count is None:  # remembered per width (until `topk` changes): this runs on every eager forward
            count = self._kept_counts[width] = QF.keep_count(settings.topk, width)
        return count

    @property
    def topk(self) -> float | int:
        """The keep setting: a fraction of the features (float) or K itself (int)."""
        return self._state.topk

    @topk.setter
    def topk(self, value: float | int) -> None:
        self._update(topk=value)
        self._kept_counts = {}
        self.plan = None

    def _clear(self) -> None:
        self._input: torch.Tensor | None = None
        self._version = -1
        self._output = None
        self._uses = 0

    def _plain_topk(self) -> bool:
        """A per-token top-K of the input as it is (no blocks, no rescaling): what the kernels compute."""
        settings = self._now()
        return settings.block_size is None and not settings.rescale

    def uses_kernel(self, x: torch.Tensor) -> bool:
        """Whether the Triton top-K kernel computes this input (CUDA bf16/fp16, plain per-token top-K, and the
        straight-through gradient or no gradient at all); otherwise `functional.sparsify` does."""
        return (
            x.dtype in _KERNEL_DTYPES
            and self._plain_topk()
            and (not (torch.is_grad_enabled() and x.requires_grad) or self._now().ste)
            and kernels.kernels_available(x)
        )

    def _sparsify(self, x: torch.Tensor, zeros: torch.Tensor | None,
                  select: bool = False) -> tuple[torch.Tensor, bool, torch.Tensor | None]:
        """The sparse input, whether its zeros were added to ``zeros`` on the way, and (``select``: an inference
        forward, the kernel path) the list of kept features, else None."""
        settings = self._now()
        if settings.activation_bits is not None:
            x = QF.absmax_quantize(x, bits=settings.activation_bits, ste=settings.ste)
        k = self.keep(x.shape[-1])
        if settings.input_within_topk or (settings.block_size is None and k >= x.shape[-1]):
            return x, False, None
        if select and torch.compiler.is_compiling():
            made = _TRACED_SELECTED.pop(settings.key, None)  # by the launch that computed x (`DecoderLayerForward`)
            if made is not None and made[0] is x:
                return made[1], False, made[2]
        if self.uses_kernel(x):
            if select:
                out, kept = _kernel_ops().topk_select(x, k, zeros, settings.hint_slot)
                return out, zeros is not None, kept
            return _kernel_ops().topk_sparsify(x, k, zeros), zeros is not None, None
        return (QF.sparsify(x, k, block_size=settings.block_size, ste=settings.ste, rescale=settings.rescale),
                False, None)

    def ensure_hint(self, device: torch.device) -> None:
        """Give this sparsifier's decode selections a threshold hint on ``device`` (done with the decode layout,
        outside any graph capture): each one-token top-K then starts its search from the last token's threshold.
        A hint is registered once per device and kept for the process, as captured graphs hold its address."""
        if self._hint_device != device and kernels._triton_importable():
            from .kernels.topk import new_hint

            self.hint_slot = _kernel_ops().register_hint(new_hint(device, kernels.MAX_DECODE_TOKENS))
            self._hint_device = device

    def _publish_kept(self, kept: torch.Tensor | None, width: int, compiling: bool,
                      guide: torch.Tensor | None = None, guide_silu: bool = False) -> None:
        """Publish the kept features of this one-token selection for the sparsifier that reads its output (down_proj
        of a gated FFN); on a compiled step also ``guide``, the dense tensor they were selected from (``guide_silu``:
        of its SiLU), with which that GEMV guesses its rows before the selection is done (`kernels.GEMV_PREFETCH`)."""
        if compiling:
            key = self._now().key
            if kept is None:
                _TRACED_KEPT.pop(key, None)
            else:
                prefetch = None if guide is None else (guide, self._now().hint_slot, guide_silu)
                _TRACED_KEPT[key] = (kept, width, prefetch)
        else:
            self.kept, self._kept_width = kept, width

    def _take_source_kept(self, x: torch.Tensor) -> tuple[torch.Tensor | None, tuple | None]:
        """The source activation's kept features for this one-token input (used once), or None, and on a compiled
        step what guides the GEMV's prefetch (`_publish_kept`: ``(guide, hint slot, guide_silu)``), or None."""
        prefetch = None
        if torch.compiler.is_compiling():
            source_key = self._now().source_key
            if source_key is None:
                return None, None
            kept, width, prefetch = _TRACED_KEPT.pop(source_key, (None, 0, None))
        else:
            source = self._source
            if source is None or source.kept is None:
                return None, None
            kept, width, source.kept = source.kept, source._kept_width, None
        if kept is not None and width == x.shape[-1] and kept.device == x.device:
            return kept, prefetch
        return None, None

    def _cached(self, x: torch.Tensor, compiling: bool, decoded_only: bool = False):
        """The shared result for this very input (counted as one more use), else None; ``decoded_only``: only
        the members' outputs of a decode step, not a sparse input."""
        if compiling:
            return _take_traced_shared(self._now().key, x, decoded_only)
        if self._input is x and self._version == x._version and not (decoded_only and type(self._output) is not tuple):
            output = self._output
            self._uses += 1
            if self._uses >= self._state.members:
                self._clear()
            return output
        return None

    def _remember(self, x: torch.Tensor, output, compiling: bool) -> None:
        if compiling:  # (a single member never stores an entry, so none can be stale)
            settings = self._now()
            if settings.members > 1:
                _TRACED_SHARED[settings.key] = (x, output, 1, settings.members)
            return
        self._clear()
        if self._state.members > 1:
            self._input, self._output, self._uses = x, output, 1
            self._version = x._version

    def produced(self, x: torch.Tensor) -> bool:
        """Whether ``x`` is the sparse tensor this sparsifier returned last, unmodified (outside compilation)."""
        if torch.compiler.is_compiling() or not self._state.feeds_adapters:  # (compiling first: no guard on it)
            return False
        produced = self._produced
        return produced is not None and produced[0]() is x and produced[1] == x._version

    def __call__(self, x: torch.Tensor, training: bool = False) -> torch.Tensor:
        """The sparse input, counted once (when tracking is on; as a training- or eval-mode forward) and shared
        with the other members."""
        compiling = torch.compiler.is_compiling()
        # (compiling first: Dynamo folds it, so a compiled forward neither reads nor guards on the plan)
        if not compiling and self.plan is not None and self.plan.kind == "select":
            out = self.plan.run(self, x, training)
            if out is not None:
                return out
        if self.produced(x):  # already sparse: an adapter layer sparsified it for its base layer and itself
            return x
        out = self._cached(x, compiling, False)  # (every argument given: defaults cost compiled calls a guard each)
        if out is None:
            counting = not compiling and self.counter.active(x)  # (compiling first: no guards on the counter)
            zeros = self.counter.kernel_accumulator(x, training, checked=True) if counting else None
            publishes_kept = self._now().publishes_kept
            select = publishes_kept and _one_token_inference(x) and _listable(x)
            out, counted, kept = self._sparsify(x, zeros, select)
            if publishes_kept:
                # down's GEMV guesses its rows from this selection's input (`kernels.GEMV_PREFETCH_DOWN`)
                guides = compiling and kernels.prefetches_down() and out is not x
                self._publish_kept(kept, x.shape[-1], compiling, x if guides else None)
                if kept is not None and not compiling:
                    self.plan = EagerDecodePlan.build(self, "select", x, training, counting, zeros)
            if counting:
                self.counter.add(out, already_added=counted, training=training, checked=True)
            self._remember(x, out, compiling)
            if not compiling and self._state.feeds_adapters:
                self._produced = (weakref.ref(out), out._version)
        return out

    def select_silu(self, x: torch.Tensor, training: bool = False) -> torch.Tensor | None:
        """``self(F.silu(x))`` in one launch, for a gated FFN's activation on an eager one-token inference step
        through the kernels (its list of kept features published for down_proj, as `__call__` does); None where
        the general path must run (SiLU first, then `__call__`). The same result bit for bit."""
        plan = self.plan
        if plan is not None and plan.kind == "silu_select":
            out = plan.run(self, x, training)
            if out is not None:
                return out
        if not self.fuses_silu(x):
            return None
        width = x.shape[-1]
        counting = self.counter.active(x)
        zeros = self.counter.kernel_accumulator(x, training, checked=True) if counting else None
        out, kept = _kernel_ops().silu_select(x, self.keep(width), None, zeros, self._state.hint_slot)
        self._publish_kept(kept, width, False)
        self.plan = EagerDecodePlan.build(self, "silu_select", x, training, counting, zeros)
        if counting:
            self.counter.add(out, already_added=zeros is not None, training=training, checked=True)
        self._remember(x, out, False)
        return out

    def fuses_silu(self, x: torch.Tensor) -> bool:
        """Whether this activation sparsifier's top-K of ``F.silu(x)`` runs in one launch with SiLU: one token of
        inference through the kernels, a plain top-K that drops features, its kept features listed for down_proj."""
        return self._selects_silu_of(x, x.shape[-1])

    def _selects_silu_of(self, x: torch.Tensor, width: int) -> bool:
        """`fuses_silu` for an activation ``width`` features wide, of a step whose tokens, dtype and device are
        ``x``'s."""
        settings = self._now()
        return (settings.publishes_kept and settings.activation_bits is None and _one_token_inference(x)
                and width <= _MAX_LISTED_FEATURES and self.uses_kernel(x) and self.keep(width) < width)

    def fuses_silu_product(self, x: torch.Tensor, width: int) -> bool:
        """Whether a compiled one-token inference step of a gated FFN whose input is ``x`` computes this
        activation's top-K of ``silu(gate)``, ``width`` features wide, and the product with up in one op
        (`select_silu_product`): the kernels serve ``x``, a plain top-K that drops features, a threshold hint, and
        rows wide enough for the split selection (`kernels.topk.SPLIT_FROM_KEYS`). (`GatedFFNForward` asks only
        with `kernels.FUSED_ACTIVATION` on.)"""
        return self._now().hint_slot >= 0 and width > _SPLIT_FROM_KEYS and self._selects_silu_of(x, width)

    def select_silu_product(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """``self(F.silu(gate)) * up`` of a compiled one-token step (`fuses_silu_product`), its kept features
        published for down_proj as `__call__` does; the same result bit for bit."""
        width = gate.shape[-1]
        out, kept = _kernel_ops().silu_select(gate, self.keep(width), up, None, self._now().hint_slot)
        guide = gate if kernels.prefetches_down() else None
        self._publish_kept(kept, width, True, guide, guide_silu=True)
        return out

    # -- decode path -------------------------------------------------------------------------------------------

    def decoded(self, x: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        """The members' outputs that a sibling's decode step computed for this very input, else None."""
        return self._cached(x, torch.compiler.is_compiling(), decoded_only=True)

    def decodes(self, x: torch.Tensor, linear: "QSparseLinear") -> bool:
        """Whether ``linear(x)`` runs on the decode path: inference, at most `MAX_DECODE_TOKENS` tokens, a kernel
        dtype on a kernel device, and the members' weights stored for the sparse GEMV (done here, lazily, in
        eager mode, prefill included: a compiled or captured graph must find it done, e.g. by the eager prefill)."""
        # Cheapest tests first: eager decode is bound by the host time of calls like this one (and so is an eager
        # prefill: transformers' compiled generate() runs it eagerly).
        compiling = torch.compiler.is_compiling()
        if (
            x.dtype not in _KERNEL_DTYPES
            or _linear_settings(linear, compiling).weight_bits is not None
            or (torch.is_grad_enabled() and (x.requires_grad or linear.weight.requires_grad))
            or not kernels.kernels_available(x)
            or self.produced(x)  # sparsified by an adapter layer for both its branches: a plain product
        ):
            return False
        # A traced or captured step uses the layout as it is (set up by an eager forward).
        if compiling or (x.is_cuda and torch.cuda.is_current_stream_capturing()):
            return self._now().layout is not None and _decode_tokens(x)
        weights = self._decode_weights
        if weights is None or not weights.current():
            self.decode_weights = DecodeWeights.build(self.linears)
        # A prompt (more tokens than the GEMV serves) also takes this path in eager mode: one product over the
        # whole block (`DecodeWeights.multiply_prompt`); a compiled or captured one multiplies member by member.
        return self._decode_weights is not None

    def selects_in_gemv(self, x: torch.Tensor, compiling: bool) -> bool:
        """Whether this decode step finds the top-K inside the GEMV launch: eager (not compiled, not captured:
        there the separate selection, run once, is faster on the GPU), one token, a plain per-token top-K that
        actually drops features, an input no wider than the in-launch selection takes."""
        return (
            kernels.SELECT_IN_GEMV
            and not compiling
            and x.numel() == x.shape[-1] <= _MAX_SELECT_FEATURES
            and not self._state.input_within_topk
            and self._state.activation_bits is None
            and self._plain_topk()
            and self.keep(x.shape[-1]) < x.shape[-1]
            and not (x.is_cuda and torch.cuda.is_current_stream_capturing())
        )

    def decode(self, x: torch.Tensor, linear: "QSparseLinear") -> torch.Tensor:
        """``linear(x)`` on the decode path: one top-K and one sparse GEMV for all members (in one launch for an
        eager one-token step, `selects_in_gemv`; for an eager prompt, one cuBLAS product over their block); the
        members after the first take their outputs from the cache (`decoded`)."""
        compiling = torch.compiler.is_compiling()
        counting = not compiling and self.counter.active(x)  # (compiling first: no guards on the counter)
        zeros = self.counter.kernel_accumulator(x, linear.training, checked=True) if counting else None
        plan = kept = prefetch = None
        if self.selects_in_gemv(x, compiling):
            outputs = self._decode_weights.multiply_selecting(x, self.keep(x.shape[-1]), zeros,
                                                              self._state.hint_slot)
            x_sparse = x  # never built: counted below only when it is a padding token (no zeros, no elements)
            plan = "select_gemv"
        else:
            listable = _listable(x)
            x_sparse, counted, kept = self._sparsify(x, zeros, select=listable)
            if listable and self._now().input_within_topk:
                kept, prefetch = self._take_source_kept(x)
                plan = "gather_gemv" if kept is not None and not counted else None
            if plan is None and x_sparse is x and kept is None and not counted:
                # The top-K kept everything (keep 1.0) or down_proj's source listed nothing: a plain GEMV
                plan = "gemv"
            # A top-K that did not count (skipped as the identity, or the reference path) is counted by the GEMV.
            if compiling:
                # The GEMV guesses its first rows from the selection's input (`kernels.GEMV_PREFETCH`): this
                # sparsifier's own, or the source activation's (published with its kept features)
                if prefetch is None and kernels.GEMV_PREFETCH and kept is not None and x_sparse is not x:
                    prefetch = (x, self._now().hint_slot, False)
                outputs = _multiply_through(self, linear, x_sparse, kept, prefetch)
            elif not _decode_tokens(x):  # a prompt: the product counts nothing
                outputs = self._decode_weights.multiply_prompt(x_sparse)
                zeros = zeros if counted else None
            else:
                outputs = self._decode_weights.multiply(x_sparse, zeros if not counted else None, kept)
        if counting:
            self.counter.add(x_sparse, already_added=zeros is not None, training=linear.training, checked=True)
        self._remember(x, outputs, compiling)
        if not compiling and x.numel() == x.shape[-1]:  # (a multi-token step leaves the one-token plan be)
            self.plan = None if plan is None else EagerDecodePlan.build(
                self, plan, x, linear.training, counting, zeros, kept)
        return outputs[_linear_settings(linear, compiling).decode_slot]


class DecodeWeights:
    """The weights of one sparsifier's linears stored side by side, input-major, for the sparse decode GEMV.

    One ``[in_features, sum(out_features)]`` row-major block; each member's ``weight`` Parameter becomes a view of
    its columns (``block[:, a:b].t()``: same shape, values and name, no second copy) and its bias a view of one
    concatenated bias (members without a bias get zeros there). Dense matmuls read the views at full speed, and
    `QSparseLinear` saves them as ordinary contiguous tensors. A single linear is simply stored transposed.
    If anything replaces a member's storage later (``model.to(...)``, ``model.half()``), `current` turns False and
    the next eager decode step builds the block again. A compiled step reaches the block through the calling
    member's own Parameters (`_multiply_through`), so it guards nothing held here, and refuses (`ops.block_of`)
    Parameters that are no longer views of a block.

    Example:
        >>> q, k = nn.Linear(8, 4, dtype=torch.bfloat16), nn.Linear(8, 2, dtype=torch.bfloat16)
        >>> sparsifier = InputSparsifier(0.5)
        >>> members = [QSparseLinear.from_linear(m, sparsifier) for m in (q, k)]
        >>> weights = DecodeWeights.build(members)
        >>> weights.weight_t.shape, torch.equal(members[1].weight, k.weight), members[1].weight.data_ptr() > 0
        (torch.Size([8, 6]), True, True)
    """

    __slots__ = ("linears", "weight_t", "bias", "widths", "width", "bias_source", "_watched")  # see InputSparsifier

    def __init__(self, linears, weight_t: torch.Tensor, bias: torch.Tensor | None, widths: list[int]) -> None:
        self.linears = linears
        self.weight_t = weight_t
        self.bias = bias
        self.widths = tuple(widths)  # (a tuple: a compiled forward guards its items, not a list's length and type)
        self.width = weight_t.shape[1]
        #: Where a compiled step finds the bias (`_multiply_through`): None, "members" (every member has one, a view
        #: of `bias`), or "block" (`bias` itself: zeros for the members without).
        self.bias_source = (None if bias is None else
                            "members" if all(m.bias is not None for m in linears) else "block")
        # (each member with its parameter dict and its weight's and bias's addresses: what `current` compares)
        self._watched = tuple((m, m._parameters, _data_ptr(m, "weight"), _data_ptr(m, "bias")) for m in linears)
        self.prepare()

    def prepare(self) -> None:
        """Set up, outside any graph capture, what this layout's decode launches need: the threshold hint of the
        selection feeding it, and on the GPU the GEMV's tuned launches, tickets and scratch (`gemv.prepare_weight`),
        and with `kernels.FUSED_FFN` on those of a gated FFN's gate/up launch (`ffn.prepare_gated`). Run when the
        layout is built, and by `kernels.prepare_for_decode` again (cheap where done)."""
        sparsifier = self.linears[0].sparsifier
        selecting = sparsifier.source if sparsifier.input_within_topk else sparsifier
        if selecting is not None:
            selecting.ensure_hint(self.weight_t.device)
        if self.weight_t.is_cuda:
            from .kernels.gemv import prepare_weight

            keep = None if selecting is None else selecting.keep(self.weight_t.shape[0])
            prepare_weight(self.weight_t, rows=keep)
            if kernels.FUSED_FFN and len(self.widths) == 2 and self.widths[0] == self.widths[1]:
                from .kernels.ffn import prepare_gated  # (two members of one width: a gated FFN's gate and up)

                prepare_gated(self.weight_t, self.widths[0], rows=keep)

    def current(self) -> bool:
        """Whether every member still reads its weight (and bias) from this block."""
        # One flat loop, reading the parameter dicts directly (`nn.Module.__getattr__` costs microseconds): eager
        # decode asks this of every group at every step. A tensor held outside the dict (some offloading hooks do
        # that) is read as an attribute.
        for module, params, weight_pointer, bias_pointer in self._watched:
            weight = params["weight"] if "weight" in params else getattr(module, "weight", None)
            bias = params["bias"] if "bias" in params else getattr(module, "bias", None)
            if (None if weight is None else weight.data_ptr()) != weight_pointer:
                return False
            if (None if bias is None else bias.data_ptr()) != bias_pointer:
                return False
        return True

    @classmethod
    def build(cls, linears: list["QSparseLinear"]) -> "DecodeWeights | None":
        """Store ``linears`` (which read the same input) side by side; None when the GEMV cannot serve them (no
        linears, quantized weights, a dtype or device the kernel does not take, differing widths)."""
        if not linears:
            return None
        first = linears[0].weight
        if any(
            m.weight_bits is not None
            or m.weight.dtype not in _KERNEL_DTYPES
            or m.weight.dtype != first.dtype
            or m.weight.device != first.device
            or m.in_features != linears[0].in_features
            or m.weight.dim() != 2
            for m in linears
        ):
            return None
        widths = [m.out_features for m in linears]
        column = 0
        for slot, m in enumerate(linears):
            m.decode_slot, m.decode_column = slot, column
            column += m.out_features
        with torch.no_grad():
            if len(linears) == 1:
                if not kernels.is_input_major(first):
                    first.data = first.data.t().contiguous().t()
                bias = linears[0].bias
                return cls(linears, first.t(), None if bias is None else bias.data, widths)
            block = torch.empty(first.shape[1], sum(widths), dtype=first.dtype, device=first.device)
            has_bias = any(m.bias is not None for m in linears)
            bias = torch.zeros(sum(widths), dtype=first.dtype, device=first.device) if has_bias else None
            start = 0
            for m, width in zip(linears, widths):
                columns = slice(start, start + width)
                block[:, columns].copy_(m.weight.t())
                m.weight.data = block[:, columns].t()
                if m.bias is not None:
                    bias[columns].copy_(m.bias)
                    m.bias.data = bias[columns]
                start += width
        return cls(linears, block, bias, widths)

    def multiply(self, x_sparse: torch.Tensor, zeros: torch.Tensor | None = None,
                 kept: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """Every member's output for an already sparse input (with ``kept``, the list of its kept features: only
        those weight rows are read): one GEMV, split into per-member views."""
        return self._members(_kernel_ops().sparse_linear(x_sparse, self.weight_t, self.bias, zeros, kept))

    def multiply_prompt(self, x_sparse: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Every member's output for a sparse input of more tokens than the GEMV serves (a prompt, in eager mode):
        one dense product over the whole block, split into per-member views. Measured for a 32-token prompt on
        Qwen2-7B shapes (H200): q/k/v 11.4 µs as one product against 28.1 µs as three, and one call instead of
        three on the host, which an eager prefill waits on."""
        return self._members(F.linear(x_sparse, self.weight_t.t(), self.bias))

    def multiply_selecting(self, x: torch.Tensor, k: int, zeros: torch.Tensor | None = None,
                           hint_slot: int = -1) -> tuple[torch.Tensor, ...]:
        """Every member's output for the top-``k`` of a dense one-token ``x``, selected inside the GEMV launch."""
        return self._members(_kernel_ops().select_linear(x, k, self.weight_t, self.bias, zeros, hint_slot))

    def _members(self, out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return _split_members(out, self.widths)


def _split_members(out: torch.Tensor, widths: tuple) -> tuple[torch.Tensor, ...]:
    # (split_with_sizes directly: Tensor.split's Python wrapper costs 1.7 µs more per call, twice per layer and
    # token of an eager decode)
    return (out,) if len(widths) == 1 else tuple(out.split_with_sizes(widths, dim=-1))


def _multiply_through(sparsifier: InputSparsifier, linear: "QSparseLinear", x_sparse: torch.Tensor,
                      kept: torch.Tensor | None = None, prefetch: tuple | None = None) -> tuple[torch.Tensor, ...]:
    """`DecodeWeights.multiply` as a compiled forward runs it: reaching the block through ``linear``'s own
    ``weight`` and ``bias`` Parameters (views of it) instead of `DecodeWeights.weight_t`, and the block's shape
    through the sparsifier's settings (their ``layout``: width, member widths, bias source). Dynamo then guards
    Parameters of modules, which it skips while a module is unchanged, rather than tensors held elsewhere, which
    it checks before every call (with their aliasing and dynamic-shape markers: the larger part of a compiled
    decode step's guard time). ``prefetch``: ``(the dense input kept was selected from, its selection's hint slot,
    whether the selection was of its SiLU)``, for the GEMV's L2 prefetch (`kernels.GEMV_PREFETCH`)."""
    width, widths, column, bias, bias_column = _block_reach(sparsifier, linear)
    guide, hint_slot, guide_silu = prefetch or (None, -1, False)
    out = _kernel_ops().sparse_linear_block(x_sparse, linear.weight, bias, kept, column, bias_column, width,
                                            guide, hint_slot, guide_silu)
    return _split_members(out, widths)


def _block_reach(sparsifier: InputSparsifier, linear: "QSparseLinear") -> tuple:
    """How a compiled forward reaches ``linear``'s side-by-side block (`_multiply_through`): ``(width, member
    widths, linear's first column, bias, the bias's first column)``, the bias being ``linear``'s own Parameter,
    the block's (some members have none), or None."""
    width, widths, bias_source = sparsifier._now().layout
    column = _linear_settings(linear, True).decode_column
    if bias_source == "members":
        bias, bias_column = linear.bias, column
    elif bias_source == "block":  # some members have no bias: the block's own (zeros for them; guarded, rare)
        bias, bias_column = sparsifier.decode_weights.bias, 0
    else:
        bias, bias_column = None, 0
    return width, widths, column, bias, bias_column


class EagerDecodePlan:
    """An eager one-token inference step of one sparsifier as the general path last ran it, worked out for
    repeating: which launch (``"select_gemv"``: a projection group's GEMV that finds the top-K itself;
    ``"gather_gemv"``: down_proj's GEMV over the kept features its activation listed; ``"gemv"``: a GEMV of the
    input as it is, where the top-K keeps every feature (keep 1.0) or down_proj's activation listed none;
    ``"select"``: that activation's top-K; ``"silu_select"``: the same with SiLU in the launch), on which weights,
    with which threshold hint, and whether the sparsity counter counts.

    Eager decode is bound by host time, and the general path asks some thirty questions per call (grad mode,
    compiling, capturing, kernels, layouts, counters, argument checks, launch configurations) whose answers only
    change with the model, the input's signature or a global switch. `run` re-checks only those (`admits`),
    launches the same kernel with the same constants (`execute`), and keeps the counter as the general path would;
    when anything differs it returns None and the general path runs (and plans again). The results are the same bit
    for bit. `GatedFFNForward` chains three plans (gate/up, activation, down) into one FFN step.

    Example:
        >>> plan = sparsifier.plan  # after an eager one-token decode step on the GPU  # doctest: +SKIP
        >>> plan.kind, plan.shape  # doctest: +SKIP
        ('select_gemv', torch.Size([1, 1, 4096]))
    """

    __slots__ = ("kind", "shape", "dtype", "device", "training", "counting", "select_in_gemv", "weights", "launch",
                 "product_launch", "hint", "hint_slot", "rows", "k")

    def __reduce__(self):
        # A copied or pickled model plans afresh: a plan holds compiled launchers, which neither copy nor pickle.
        return _no_plan, ()

    @classmethod
    def build(cls, sparsifier: InputSparsifier, kind: str, x: torch.Tensor, training: bool, counting: bool,
              zeros: torch.Tensor | None, kept: torch.Tensor | None = None) -> "EagerDecodePlan | None":
        """The plan of the step just run by the general path, or None where it is not one to repeat (a gradient
        could flow, a graph is being captured, padding tokens, an adapter shares the input, a counter without its
        accumulator, an input the kernels' launch cannot repeat)."""
        if (torch.is_grad_enabled() or sparsifier.feeds_adapters or sparsifier.activation_bits is not None
                or not x.is_contiguous()
                or x.numel() != x.shape[-1] or (counting and zeros is None) or _REAL_TOKENS.get() is not None
                or (x.is_cuda and torch.cuda.is_current_stream_capturing())):
            return None
        ops = _kernel_ops()
        plan = cls()
        plan.kind, plan.shape, plan.dtype, plan.device = kind, x.shape, x.dtype, x.device
        plan.training, plan.counting, plan.select_in_gemv = training, counting, kernels.SELECT_IN_GEMV
        plan.weights, plan.rows, plan.hint_slot = sparsifier.decode_weights, None, sparsifier.hint_slot
        plan.k, plan.product_launch = sparsifier.keep(x.shape[-1]), None
        if kind in ("select", "silu_select"):
            plan.weights = None
            silu = kind == "silu_select"
            try:
                plan.launch, plan.hint = ops.repeatable_select(x, plan.k, zeros, sparsifier.hint_slot, silu=silu)
                if silu:  # the same with the product by up (`GatedFFNForward`)
                    plan.product_launch = ops.repeatable_select(x, plan.k, zeros, sparsifier.hint_slot, silu=True,
                                                                multiply=True)[0]
            except (TypeError, ValueError):
                return None
        else:
            weights = plan.weights
            plan.launch, plan.hint = ops.repeatable_linear(
                x, weights.weight_t, weights.bias, zeros, kept, plan.k if kind == "select_gemv" else None,
                sparsifier.hint_slot)
            plan.rows = None if kept is None else kept.shape[-1]
        return plan if plan.launch is not None else None

    def run(self, sparsifier: InputSparsifier, x: torch.Tensor, training: bool):
        """This step's result for ``x`` (the members' outputs, or for the activation kinds the sparse input), or
        None when the plan does not apply to it. Eager only: callers skip plans under ``torch.compile``."""
        zeros = self.admits(sparsifier, x, training)
        return None if zeros is False else self.execute(sparsifier, x, training, zeros)

    def admits(self, sparsifier: InputSparsifier, x: torch.Tensor, training: bool, pending: bool = False):
        """Whether the plan serves ``x`` now: False if not, else the zero count its launch adds to (None: not
        counting). ``pending``: ``x`` stands in for an input this step has yet to produce, of its dtype and device
        (`GatedFFNForward` checks the shapes); neither its shape nor a gather GEMV's list of kept features, which
        the step makes, is checked."""
        if (torch.is_grad_enabled() or (not pending and x.shape != self.shape) or x.dtype != self.dtype
                or x.device != self.device or training != self.training or not x.is_contiguous()
                or sparsifier._state.feeds_adapters or sparsifier._state.hint_slot != self.hint_slot
                or not (x.is_cuda or kernels.kernels_available(x))
                or not kernels._ENABLED or (x.is_cuda and torch.cuda.is_current_stream_capturing())):
            return False
        weights = self.weights
        if weights is not None and (sparsifier._decode_weights is not weights or not weights.current()):
            return False
        if self.kind == "select_gemv" and kernels.SELECT_IN_GEMV != self.select_in_gemv:
            return False
        if self.kind == "gather_gemv" and not pending:
            source = sparsifier.source
            kept = source.kept
            if (kept is None or source._kept_width != x.shape[-1] or kept.device != x.device
                    or kept.shape[-1] != self.rows):
                return False
        elif self.kind == "gemv" and sparsifier.source is not None and sparsifier.source.kept is not None:
            return False  # the general path may gather over the list its source published this step
        counter = sparsifier.counter
        if counter.enabled and torch._C._current_graph_task_id() == -1:
            zeros = counter._zeros[training]
            if not self.counting or zeros is None or zeros.device != x.device or _REAL_TOKENS.get() is not None:
                return False
            return zeros
        return False if self.counting else None

    def execute(self, sparsifier: InputSparsifier, x: torch.Tensor, training: bool, zeros: torch.Tensor | None,
                up: torch.Tensor | None = None):
        """Launch the planned kernel for ``x`` (that `admits` accepted, with the ``zeros`` it returned; ``up``: a
        ``"silu_select"`` that also multiplies by up) and count as the general path does."""
        weights = self.weights
        if self.kind == "select_gemv":
            result = weights._members(self.launch(x, x.shape[-1], weights.weight_t, weights.bias, zeros, None,
                                                  self.hint))
        elif self.kind in ("gather_gemv", "gemv"):
            kept = None
            if self.kind == "gather_gemv":
                source = sparsifier.source
                kept, source.kept = source.kept, None
            result = weights._members(self.launch(x, x.shape[-1], weights.weight_t, weights.bias, zeros, kept,
                                                  None))
        else:
            if up is None:
                result, kept = self.launch(x, 1, x.shape[-1], zeros, self.hint)
            else:
                result, kept = self.product_launch(x, 1, x.shape[-1], zeros, self.hint, up, up.shape[-1])
            sparsifier.kept, sparsifier._kept_width = kept, x.shape[-1]
        if zeros is not None:
            sparsifier.counter._elements[training] += x.numel()
        sparsifier._remember(x, result, False)
        return result


def _no_plan() -> None:
    return None


class ModuleForward:
    """A forward set on one module instance in place of its class's (`GatedFFNForward`,
    `attention.DecodeAttentionForward`): it keeps the class's forward to fall back on, and `uninstall` removes it.

    Example:
        >>> GatedFFNForward.uninstall(model.model.layers[0].mlp)  # doctest: +SKIP
    """

    __slots__ = ("module", "module_forward")

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        # the class's forward, kept: reaching it as ``type(self.module).forward`` made compiled forwards check in
        # Python, before every call, that each layer's module has the type of the first one's
        self.module_forward = type(module).forward

    @classmethod
    def uninstall(cls, module: nn.Module) -> None:
        """Give ``module`` back its own forward (where this kind of forward is set on it)."""
        if isinstance(module.__dict__.get("forward"), cls):
            del module.__dict__["forward"]


class GatedFFNForward(ModuleForward):
    """The forward of a converted gated FFN whose own forward is ``down(act(gate(x)) * up(x))`` with a SiLU ``act``
    (Llama, Mistral, Qwen2, Qwen3, ...: `convert.ArchLayout.gated_ffn`), set as the FFN module's ``forward`` by
    `convert_to_qsparse` (`revert_qsparse` removes it).

    An eager one-token inference step runs in three launches instead of five kernels and five module calls: the
    gate/up GEMV that selects its input's top-K, SiLU with the top-K and the product with up (`kernels.topk.
    silu_topk_rows`), down's GEMV over the kept rows. It repeats the plans (`EagerDecodePlan`) its members made on
    the step before and checks them all before launching anything. With `kernels.FUSED_ACTIVATION` on (the
    default; ``QSPARSE_FUSED_ACTIVATION=0`` turns it off), a compiled one-token step of an FFN wider than
    `kernels.topk.SPLIT_FROM_KEYS` computes SiLU, the top-K and the product with up in one op
    (`InputSparsifier.select_silu_product`: the split selection's two launches, where the compiler would add a SiLU
    kernel and a product kernel around the top-K). With `kernels.FUSED_FFN` on (``QSPARSE_FUSED_FFN=masked`` or
    ``listed``; off by default: not faster on an H200) a compiled one-token step runs the whole FFN in two launches
    (or three) instead (`_two_launch_step`). It steps aside for everything else (prefill, training, other compiled
    steps, hooks on any member, a member replaced, e.g. by a peft adapter), where the module's own forward runs. The
    result and the sparsity counts are those of the module's forward, bit for bit; the two-launch step's GEMVs sum
    in another order, so its values may differ in the last bit (its top-K is exact for the values it computes).

    Example:
        >>> mlp = model.model.layers[0].mlp  # of a converted Mistral  # doctest: +SKIP
        >>> type(mlp.forward).__name__  # doctest: +SKIP
        'GatedFFNForward'
    """

    __slots__ = ("names", "members")

    def __init__(self, module: nn.Module, gate: str, up: str, down: str, act: str) -> None:
        super().__init__(module)
        self.names = (gate, up, down, act)
        self.members = tuple(module._modules[name] for name in self.names)

    @classmethod
    def install(cls, module: nn.Module, gate: str, up: str, down: str, act: str) -> bool:
        """Set the fused forward on ``module`` where its members allow it (gate and up converted and sharing one
        input, a SiLU `QSparseActivation` whose kept features down reads, nothing else replacing the forward);
        returns whether it did."""
        children = module._modules
        gate_m, up_m, down_m, act_m = (children.get(name) for name in (gate, up, down, act))
        if not (isinstance(gate_m, QSparseLinear) and isinstance(up_m, QSparseLinear)
                and isinstance(down_m, QSparseLinear) and isinstance(act_m, QSparseActivation)
                and act_m.silu and gate_m.sparsifier is up_m.sparsifier
                and down_m.sparsifier.source is act_m.sparsifier and "forward" not in module.__dict__):
            return False
        module.forward = cls(module, gate, up, down, act)
        return True

    def __call__(self, *args, **kwargs):
        if len(args) == 1 and not kwargs:
            if torch.compiler.is_compiling():
                out = self._compiled_step(args[0])
            else:
                out = self._planned_step(args[0])
            if out is not None:
                return out
        return self.module_forward(self.module, *args, **kwargs)

    def _compiled_step(self, x: torch.Tensor) -> torch.Tensor | None:
        """A compiled one-token step with the activation's SiLU, top-K and product with up in one op
        (`InputSparsifier.fuses_silu_product`), or with `kernels.FUSED_FFN` on the whole FFN in two launches
        (`_two_launch_step`), else None. The members are reached by name, as the module's own forward reaches
        them: holding them twice would make Dynamo check their identity before every call."""
        if not (kernels.FUSED_ACTIVATION or kernels.FUSED_FFN):  # (first: then the traced step guards nothing else)
            return None
        module = self.module
        gate, up, down, act = (getattr(module, name) for name in self.names)
        if torch.is_grad_enabled() or not isinstance(act, QSparseActivation) or not act.silu:
            return None  # (no op of this step has a backward: inference under no_grad only)
        if kernels.FUSED_FFN and _unhooked(act, act.act):
            out = self._two_launch_step(x, gate, up, down, act.sparsifier)
            if out is not None:
                return out
        # (the cheap test first: hooks are read, and guarded, only where the fused op applies)
        if not (kernels.FUSED_ACTIVATION and act.sparsifier.fuses_silu_product(x, getattr(gate, "out_features", 0))
                and _unhooked(act, act.act)):
            return None
        return down(act.sparsifier.select_silu_product(gate(x), up(x)))

    @staticmethod
    def _two_launch_step(x: torch.Tensor, gate, up, down, act_s: "InputSparsifier") -> torch.Tensor | None:
        """A compiled one-token step in two launches (`kernels.ffn`): the gate/up GEMV over the selected input
        computes SiLU(gate) and SiLU(gate) * up and resolves the activation's top-K; down's GEMV keeps the features
        that pass it as it reads them (with `kernels.FUSED_FFN` ``"listed"``: a second launch writes the sparse
        product and its kept list, and down's GEMV reads those rows). None where that does not apply: members that
        are not converted linears in
        the decode layout (gate and up in one block, without bias), hooks on them, an activation the kernels do not
        select (`InputSparsifier.fuses_silu`'s conditions, a threshold hint), down not reading the activation's
        selection, an input `kernels.ffn.serves` does not take."""
        from .kernels.ffn import serves

        if not (isinstance(gate, QSparseLinear) and isinstance(up, QSparseLinear) and isinstance(down, QSparseLinear)
                and _unhooked(gate, up, down)):
            return None
        gate_l, up_l, down_l = (_linear_settings(m, True) for m in (gate, up, down))
        gate_s, down_s = gate._sparsifier, down._sparsifier
        inter = gate.out_features
        act_settings, down_settings = act_s._now(), down_s._now()
        if (up_l.share_key != gate_l.share_key or up.out_features != inter
                or not (down_settings.input_within_topk and down_settings.source_key == act_settings.key)
                or act_settings.hint_slot < 0 or not serves(x, inter) or not act_s._selects_silu_of(x, inter)
                or not gate_s.decodes(x, gate) or not down_s.decodes(x, down) or down_l.weight_bits is not None):
            return None
        width, widths, bias_source = gate_s._now().layout
        if len(widths) != 2 or bias_source is not None:
            return None
        x_sparse, _, kept = gate_s._sparsify(x, None, select=_listable(x))
        gated = (gate.weight, gate_l.decode_column, up_l.decode_column, width, inter, act_s.keep(inter),
                 act_settings.hint_slot)
        if kernels.FUSED_FFN == "listed":  # three launches: down's GEMV reads the kept rows of the written list
            sparse, listed = _kernel_ops().gated_select_listed(x_sparse, kept, *gated)
            return _multiply_through(down_s, down, sparse, listed)[down_l.decode_slot]
        act, product, state = _kernel_ops().gated_select(x_sparse, kept, *gated)
        down_width, _, column, bias, bias_column = _block_reach(down_s, down)
        return _kernel_ops().masked_linear_block(product, act, state, down.weight, bias, column, bias_column,
                                                 down_width)

    def _as_converted(self) -> bool:
        """The members still in place, sharing as converted, and no hooks that a fused step would skip."""
        gate, up, down, act = self.members
        children = self.module._modules
        for name, member in zip(self.names, self.members):
            if children.get(name) is not member:
                return False
        return (_unhooked(gate, up, down, act, act.act) and up.sparsifier is gate.sparsifier
                and down.sparsifier.source is act.sparsifier)

    def _planned_step(self, x: torch.Tensor) -> torch.Tensor | None:
        gate, up, down, act = self.members
        gate_s, act_s, down_s = gate.sparsifier, act.sparsifier, down.sparsifier
        gate_plan, act_plan, down_plan = gate_s.plan, act_s.plan, down_s.plan
        if (gate_plan is None or act_plan is None or down_plan is None or gate_plan.kind != "select_gemv"
                or act_plan.kind != "silu_select" or down_plan.kind != "gather_gemv"):
            return None
        lead = x.shape[:-1]
        if (act_plan.shape[:-1] != lead or down_plan.shape != act_plan.shape or down_plan.rows != act_plan.k
                or not self._as_converted()):
            return None
        # every check before the first launch: a step that stopped half-way could not be redone by the module
        gate_zeros = gate_plan.admits(gate_s, x, gate.training)
        act_zeros = False if gate_zeros is False else act_plan.admits(act_s, x, act.training, pending=True)
        down_zeros = False if act_zeros is False else down_plan.admits(down_s, x, down.training, pending=True)
        if down_zeros is False:
            return None
        outputs = gate_plan.execute(gate_s, x, gate.training, gate_zeros)
        gate_s._clear()  # up's output is taken here, not from the shared cache
        product = act_plan.execute(act_s, outputs[gate.decode_slot], act.training, act_zeros,
                                   up=outputs[up.decode_slot])
        return down_plan.execute(down_s, product, down.training, down_zeros)[down.decode_slot]


class DecoderLayerForward(ModuleForward):
    """The forward of a converted decoder layer whose own forward is Llama's pre-norm residual block -- ``h + attn(
    norm1(h))``, then ``h + mlp(norm2(h))``, Llama's RMSNorm (`convert.ArchLayout.decoder_layer`) -- set by
    `convert_to_qsparse` (`revert_qsparse` removes it).

    With `kernels.FUSED_NORM` on (the default; ``QSPARSE_FUSED_NORM=0`` turns it off), a compiled one-token
    inference step computes each residual add and RMSNorm in the launch of the selection that reads the norm's
    output (`kernels.ops.norm_select`: the q/k/v input's, the gate/up input's), where the compiler would run an
    add-and-norm kernel before the selection's launch: two launches a layer fewer. The layer's last residual add
    is left to the next layer's first norm (its launch adds it), the model's last layer's to the compiler. The
    attention and the FFN run as their modules do, given the normed rows; their sparsifiers take the selection made
    (`InputSparsifier._sparsify`). Everything else -- eager steps, prefill, training, the switch off, norms with
    hooks or of another kind, sparsifiers the kernels do not select for -- runs the layer's own forward. The sum
    and the normed rows round as the model's code does; the norm's sum of squares may add in another order than
    the compiler's, so a value may differ in the last bit.

    Example:
        >>> layer = model.model.layers[0]  # of a converted Qwen2  # doctest: +SKIP
        >>> type(layer.forward).__name__  # doctest: +SKIP
        'DecoderLayerForward'
    """

    __slots__ = ("names", "query", "gate", "last")

    def __init__(self, module: nn.Module, names: tuple[str, str, str, str], query: str, gate: str) -> None:
        super().__init__(module)
        self.names = names
        self.query, self.gate = query, gate
        #: The model's last decoder layer leaves its residual add to the compiler (`convert_to_qsparse` sets it).
        self.last = False

    @classmethod
    def install(cls, module: nn.Module, names: tuple[str, str, str, str], query: str, gate: str) -> bool:
        """Set the forward on ``module`` when it has the named norms, attention and FFN, a converted ``query``
        projection in the attention and ``gate`` projection in the FFN, and no forward of its own set already;
        returns whether it did."""
        children = module._modules
        if "forward" in module.__dict__ or not all(isinstance(children.get(name), nn.Module) for name in names):
            return False
        attention, mlp = children[names[1]], children[names[3]]
        if not (isinstance(getattr(attention, query, None), QSparseLinear)
                and isinstance(getattr(mlp, gate, None), QSparseLinear)):
            return False
        module.forward = cls(module, names, query, gate)
        return True

    def __call__(self, *args, **kwargs):
        if kernels.FUSED_NORM and torch.compiler.is_compiling():  # (the switch first: off, nothing is guarded)
            # what the layer before left (taken here whether or not this layer folds: nothing outlives the forward)
            before = _TRACED_LAYER_SUM.pop(0, None)
            out = self._folded_step(args, kwargs, before)
            if out is not None:
                return out
        return self.module_forward(self.module, *args, **kwargs)

    def _folded_step(self, args: tuple, kwargs: dict, before: tuple | None) -> torch.Tensor | None:
        """The compiled one-token step with the norms in the selections' launches, or None (nothing computed);
        ``before``: ``(output, residual, delta)`` of the layer before, whose last residual add this one computes
        when its input is that output."""
        if len(args) > 1 or (len(args) == 1) == ("hidden_states" in kwargs):
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        if torch.is_grad_enabled() or not _one_token_inference(hidden):
            return None
        input_norm, attention, post_norm, mlp = (getattr(self.module, name) for name in self.names)
        first = _norm_selection(input_norm, getattr(attention, self.query), hidden)
        second = _norm_selection(post_norm, getattr(mlp, self.gate), hidden)
        if first is None or second is None:
            return None
        # the previous layer's last residual add, left to this launch (the output it returned is then unused)
        residual, delta = (before[1], before[2]) if before is not None and before[0] is hidden else (None, hidden)
        summed, normed = _select_normed(first, delta, residual)
        rest = {name: value for name, value in kwargs.items() if name != "hidden_states"}
        attended = attention(hidden_states=normed, **rest)[0]
        _TRACED_SELECTED.pop(first[-1], None)  # (taken by the query's sparsifier unless it chose not to)
        summed, normed = _select_normed(second, attended, summed)
        delta = mlp(normed)
        _TRACED_SELECTED.pop(second[-1], None)
        out = summed + delta
        if not self.last:  # (the model's last layer leaves its sum to the compiler's final norm)
            _TRACED_LAYER_SUM[0] = (out, summed, delta)
        return out


def _norm_selection(norm: nn.Module, linear: nn.Module, x: torch.Tensor) -> tuple | None:
    """``(weight, eps, k, hint_slot, key)`` of ``norm`` (Llama's RMSNorm: a ``weight`` of ``x``'s dtype and width, a
    float ``variance_epsilon``, no hooks) followed by ``linear``'s one-token selection of ``x``'s shape through the
    kernels (a plain top-K that drops features, a threshold hint, the decode layout), else None."""
    weight, eps = getattr(norm, "weight", None), getattr(norm, "variance_epsilon", None)
    if (not isinstance(linear, QSparseLinear) or not isinstance(weight, torch.Tensor) or not isinstance(eps, float)
            or weight.dtype != x.dtype or weight.shape != x.shape[-1:] or not _unhooked(norm)
            or x.shape[-1] > _MAX_NORM_FEATURES or not _listable(x)):
        return None
    sparsifier = linear._sparsifier
    settings = sparsifier._now()
    k = sparsifier.keep(x.shape[-1])
    if (settings.activation_bits is not None or settings.block_size is not None or settings.input_within_topk
            or settings.hint_slot < 0 or k >= x.shape[-1] or not sparsifier.uses_kernel(x)
            or not sparsifier.decodes(x, linear)):
        return None
    return weight, eps, k, settings.hint_slot, settings.key


def _select_normed(selection: tuple, delta: torch.Tensor, residual: torch.Tensor | None):
    """``(residual + delta, normed)`` from one launch that also makes the selection of the normed rows for the
    sparsifier `_norm_selection` found (``selection``), which its next input then takes."""
    weight, eps, k, hint_slot, key = selection
    summed, normed, sparse, kept = _kernel_ops().norm_select(delta, weight, eps, k, residual, hint_slot)
    _TRACED_SELECTED[key] = (normed, sparse, kept)
    return summed, normed


def _linear_settings(linear: "QSparseLinear", compiling: bool) -> _LinearSettings:
    """A linear's settings as a compiled forward reads them (a constant, guarded by the stamp) or as they are: what
    `InputSparsifier._now` is for a sparsifier. A function, not a method: a compiled forward would also check, for
    every linear, that no instance attribute shadows the method."""
    return _settings_of(linear.stamp) if compiling else linear._state


def _set_bias(linear: nn.Module, bias: torch.Tensor | None) -> None:
    """``linear.bias = bias``, a missing bias registered as a None parameter as ``nn.Linear`` does (assigned, it
    would be a plain attribute, which `DecodeWeights.current` then reads the slow way)."""
    if bias is None:
        linear.register_parameter("bias", None)
    else:
        linear.bias = bias


def _data_ptr(module: nn.Module, name: str) -> int | None:
    """Address of ``module``'s parameter ``name`` (None: no such tensor). Read from ``_parameters`` first: going
    through ``nn.Module.__getattr__`` costs microseconds (`DecodeWeights.current` makes the same reads inline, at
    every eager decode step)."""
    params = module._parameters
    tensor = params[name] if name in params else getattr(module, name, None)
    return None if tensor is None else tensor.data_ptr()


def _owns_storage(tensor: torch.Tensor) -> bool:
    return tensor.is_contiguous() and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()


class QSparseLinear(nn.Linear):
    """An ``nn.Linear`` that multiplies only the top-K entries of ``|x|`` of each token.

    Same parameters and state-dict keys as the ``nn.Linear`` it replaces, so checkpoints, peft, ``device_map``
    and sharded loading see an ordinary linear. Training passes the gradient straight through the top-K
    (``functional.sparsify``). With ``weight_bits=1.58`` the weight is fake-quantized to ``{−α, 0, α}``.

    Attributes:
        sparsifier: the `InputSparsifier`, possibly shared with siblings that read the same input.
        share_key, decode_slot, decode_column, weight_bits: settings (below) held in one `_LinearSettings` tuple
            with a `stamp`, as the sparsifier's are: a compiled forward reads them as constants and guards only the
            stamp.
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

    @property
    def sparsifier(self) -> InputSparsifier:
        """The `InputSparsifier` of this linear's input, possibly shared with siblings that read the same input."""
        return self._sparsifier

    @sparsifier.setter
    def sparsifier(self, value: InputSparsifier) -> None:
        self._sparsifier = value
        self.share_key = value.key  # what a compiled forward looks its siblings' outputs up by

    share_key = _setting("share_key", "The sparsifier's `InputSparsifier.key` (set with it), by which a compiled "
                         "forward finds what a sibling computed without reading the sibling's sparsifier.")
    decode_slot = _setting("decode_slot", "This linear's output's index among its sparsifier's linears in the "
                           "decode layout (`DecodeWeights`).")
    decode_column = _setting("decode_column", "The first column of this linear's weight in the decode layout's "
                             "side-by-side block.")
    weight_bits = _setting("weight_bits", "``None`` (full precision) or ``1.58`` (ternary fake-quantized weights).")

    def _setup(self, sparsifier, weight_bits, role, layer_index) -> None:
        self._state = _LinearSettings(share_key=sparsifier.key, weight_bits=weight_bits)
        self.stamp = _stamp(self._state)
        self.sparsifier = sparsifier
        sparsifier.members += 1
        sparsifier.linears.append(self)
        sparsifier.decode_weights = None
        self.role = role
        self.layer_index = layer_index

    def _update(self, **changes) -> None:
        self._state = self._state._replace(**changes)
        self.stamp = _stamp(self._state)
        if "weight_bits" in changes:  # another product: no decode layout, no eager step planned for the old one
            self._sparsifier.decode_weights = None
            self._sparsifier.plan = None

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        self.stamp = _stamp(self._state)  # (stamps are numbered per process: see InputSparsifier.__setstate__)

    @property
    def counter(self) -> SparsityCounter:
        """The sparsity counter of this linear's input (shared with the linears that read the same tensor)."""
        return self.sparsifier.counter

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
        _set_bias(new, linear.bias)
        new._setup(sparsifier, weight_bits, role, layer_index)
        return new

    def to_linear(self) -> nn.Linear:
        """The plain ``nn.Linear`` with the same Parameters (used to undo a conversion)."""
        linear = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(linear)
        linear.in_features, linear.out_features = self.in_features, self.out_features
        linear.weight = self.weight
        _set_bias(linear, self.bias)
        with torch.no_grad():  # out of a side-by-side decode block: a plain linear owns its storage again
            for param in (linear.weight, linear.bias):
                if param is not None and not _owns_storage(param):
                    param.data = param.data.clone(memory_format=torch.contiguous_format)
        self.sparsifier.decode_weights = None
        return linear

    def effective_weight(self) -> torch.Tensor:
        """The weight actually multiplied: ternary fake-quantized with ``weight_bits=1.58``, else ``weight``.

        A model loaded from a packed ternary export holds ``weight`` in {−1, 0, 1} and its scale α in the
        ``weight_scale`` buffer; the product is the same tensor the fake-quantizer produced before export.
        """
        if _linear_settings(self, torch.compiler.is_compiling()).weight_bits is None:
            return self.weight
        scale = getattr(self, "weight_scale", None)
        if scale is not None:
            return (self.weight.float() * scale).to(self.weight.dtype)
        return QF.ternary_quantize(self.weight, ste=self.sparsifier.ste)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        # Decode layout (input-major, or a view of a side-by-side block): save an ordinary tensor of its own.
        for name in ("weight", "bias"):
            key = prefix + name
            if key in destination and destination[key] is not None and not _owns_storage(destination[key]):
                destination[key] = destination[key].detach().clone(memory_format=torch.contiguous_format)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compiling = torch.compiler.is_compiling()
        settings = _linear_settings(self, compiling)
        if compiling:  # (by key: the sibling's sparsifier is not read, see _take_traced_shared)
            outputs = _take_traced_shared(settings.share_key, x, decoded_only=True)
        else:
            outputs = self._sparsifier.decoded(x)
        if outputs is not None:  # a sibling's decode step already computed this output
            return outputs[settings.decode_slot]
        sparsifier = self._sparsifier
        # An eager one-token step like the last one (compiling first: see InputSparsifier.__call__)
        if not compiling and sparsifier.plan is not None and sparsifier.plan.kind != "select":
            outputs = sparsifier.plan.run(sparsifier, x, self.training)
            if outputs is not None:
                return outputs[settings.decode_slot]
        if sparsifier.decodes(x, self):
            return sparsifier.decode(x, self)
        return F.linear(sparsifier(x, self.training), self.effective_weight(), self.bias)

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
        #: SiLU: eager one-token decode steps run it inside the top-K launch (`InputSparsifier.select_silu`).
        self.silu = not relu2 and _is_silu(act)
        self.sparsifier = sparsifier
        sparsifier.members += 1
        self.role = "act"
        self.layer_index = layer_index
        #: The weights that multiply this output when no converted linear does (fused MoE experts' down
        #: projections), and where the share of them one token touches comes from (its experts' input).
        self.weight_params = 0
        self.share_source: QSparseExpertInput | None = None

    @property
    def counter(self) -> SparsityCounter:
        """The sparsity counter of the activation output."""
        return self.sparsifier.counter

    @property
    def weight_share(self) -> float:
        """Share of `weight_params` one token touches (its routed experts of all experts; 1 otherwise)."""
        return 1.0 if self.share_source is None else self.share_source.weight_share

    def feeds_experts(self, weight_params: int, expert_input: "QSparseExpertInput") -> None:
        """Mark this as fused experts' activation: its output multiplies ``weight_params`` down-projection weights,
        of which a token touches its routed experts' share (read from ``expert_input``)."""
        self.role, self.weight_params = "expert_act", weight_params
        object.__setattr__(self, "share_source", expert_input)  # a reference, not a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (is_compiling first: Dynamo folds it, so compiled graphs keep SiLU for the compiler to fuse)
        if not torch.compiler.is_compiling() and self.silu and _unhooked(self.act):
            out = self.sparsifier.select_silu(x, self.training)
            if out is not None:
                return out
        return self.sparsifier(QF.relu2(x) if self.relu2 else self.act(x), self.training)

    def extra_repr(self) -> str:
        act = "relu2" if self.relu2 else type(self.act).__name__
        return f"activation={act}, keep={self.sparsifier.topk}"


class QSparseExpertInput(nn.Module):
    """Top-K of the routed hidden state read by a fused MoE experts module (transformers 5 stores all experts'
    weights as 3-D parameters: ``MixtralExperts``, ``Qwen3MoeExperts``, ``GptOssExperts``, ...).

    Attached to the experts module as a child without parameters (so the state dict does not change) and applied
    by a forward pre-hook to the experts' input, whichever expert implementation (eager loop, batched or grouped
    matmul) then runs: every expert a token is routed to reads the same K features of it. For activated
    parameters it records how many experts each token was routed to.

    Example:
        >>> experts = model.model.layers[0].mlp.experts      # doctest: +SKIP
        >>> QSparseExpertInput.attach(experts, InputSparsifier(0.5), weight_params=..., num_experts=8)  # doctest: +SKIP
    """

    def __init__(self, sparsifier: InputSparsifier, *, weight_params: int, num_experts: int,
                 layer_index: int | None = None) -> None:
        super().__init__()
        self.sparsifier = sparsifier
        sparsifier.members += 1
        self.role = "expert_in"
        self.layer_index = layer_index
        self.weight_params = weight_params
        self.num_experts = num_experts
        self.experts_per_token: int | None = None
        self._handle = None

    @property
    def counter(self) -> SparsityCounter:
        """The sparsity counter of the experts' input."""
        return self.sparsifier.counter

    @property
    def weight_share(self) -> float:
        """Share of the experts' input-side weights one token touches: its routed experts of all experts."""
        return (self.experts_per_token or 0) / self.num_experts

    @classmethod
    def attach(cls, experts: nn.Module, sparsifier: InputSparsifier, **kwargs) -> "QSparseExpertInput":
        """Add the top-K to ``experts`` (as ``experts.qsparse_input``) and hook it in front of its forward."""
        module = cls(sparsifier, **kwargs)
        experts.qsparse_input = module
        module._handle = experts.register_forward_pre_hook(_sparsify_expert_input, with_kwargs=True)
        return module

    def detach(self, experts: nn.Module) -> None:
        """Undo `attach`."""
        if self._handle is not None:
            self._handle.remove()
        del experts.qsparse_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sparsifier(x, self.training)

    def extra_repr(self) -> str:
        return f"keep={self.sparsifier.topk}, experts={self.num_experts}"


def _sparsify_expert_input(experts: nn.Module, args: tuple, kwargs: dict):
    topk = experts.qsparse_input
    routing = args[1] if len(args) > 1 else kwargs.get("top_k_index", kwargs.get("router_indices"))
    if isinstance(routing, torch.Tensor) and routing.dim() >= 1:
        topk.experts_per_token = routing.shape[-1]
    if args:
        return (topk(args[0]), *args[1:]), kwargs
    if "hidden_states" in kwargs:
        return args, {**kwargs, "hidden_states": topk(kwargs["hidden_states"])}
    return None
