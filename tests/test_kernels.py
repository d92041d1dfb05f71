"""Triton kernels against the reference path: on the GPU when there is one, else through Triton's CPU interpreter
(TRITON_INTERPRET=1, set in conftest), on small shapes.

Tolerances: the top-K kernel must match `functional.topk_mask` exactly (same K, same tie-breaking); the GEMV keeps
fp32 accumulation, so its error against a float64 reference is that of rounding the output to bf16/fp16 (< 1e-2
relative, typically ~2e-3).
"""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from conftest import KERNEL_DEVICE, requires_cuda, tiny_model  # noqa: E402

from qsparse_hf import convert_to_qsparse, set_sparsity_tracking  # noqa: E402
from qsparse_hf.functional import keep_count, topk_mask  # noqa: E402
from qsparse_hf.kernels import is_input_major, kernels_available, prepare_for_decode, set_kernels_enabled  # noqa: E402
from qsparse_hf.kernels.gemv import GemvConfig, sparse_gemv  # noqa: E402
from qsparse_hf.kernels.ops import sparse_linear, topk_sparsify  # noqa: E402
from qsparse_hf.kernels.topk import topk_sparsify_rows  # noqa: E402
from qsparse_hf.layers import QSparseLinear  # noqa: E402

DEV = KERNEL_DEVICE
DTYPES = [torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _kernels_on_cpu_too():
    # Model-level tests below take the kernel path; on a CPU-only machine that means Triton's interpreter.
    previous = set_kernels_enabled(True, on_cpu=True)
    yield
    set_kernels_enabled(previous, on_cpu=False)


def _rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim,k", [(37, 5), (64, 32), (300, 210), (1000, 1), (1000, 999), (513, 400)])
def test_topk_kernel_equals_reference_mask(dtype, dim, k):
    x = torch.randn(6, dim, device=DEV).to(dtype)
    x[0] = x[0, 0]  # every magnitude tied: ties must go to the lowest indices
    x[1, ::3] = 0  # many exact zeros
    x[2, : dim // 2] = -x[2, dim // 2 : 2 * (dim // 2)]  # ± pairs have equal magnitude
    out = topk_sparsify_rows(x, k)
    expected = torch.where(topk_mask(x, k), x, torch.zeros((), dtype=dtype, device=DEV))
    assert torch.equal(out, expected)
    assert ((out != 0) | (x == 0)).sum(-1).ge(k).all()


def test_topk_kernel_keeps_leading_shape_and_checks_input():
    x = torch.randn(2, 3, 40, device=DEV, dtype=torch.bfloat16)
    assert topk_sparsify_rows(x, 10).shape == x.shape
    with pytest.raises(TypeError, match="bf16 or fp16"):
        topk_sparsify_rows(x.float(), 10)
    with pytest.raises(ValueError, match="k must be"):
        topk_sparsify_rows(x, 41)


def test_topk_op_passes_gradient_straight_through():
    x = torch.randn(3, 32, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    upstream = torch.randn(3, 32, device=DEV, dtype=torch.bfloat16)
    (topk_sparsify(x, 8) * upstream).sum().backward()
    assert torch.equal(x.grad, upstream)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 3, 8])
@pytest.mark.parametrize("config", [None, GemvConfig(32, 32, 1), GemvConfig(64, 64, 4), GemvConfig(32, 64, 3)])
def test_sparse_gemv_matches_float64(dtype, tokens, config):
    n_in, n_out = 300, 96  # neither a multiple of the blocks
    x = torch.randn(tokens, n_in, device=DEV).to(dtype)
    x *= torch.rand(tokens, n_in, device=DEV) > 0.5
    weight_t = torch.randn(n_in, n_out, device=DEV).to(dtype)
    bias = torch.randn(n_out, device=DEV).to(dtype)
    out = sparse_gemv(x, weight_t, bias, config=config)
    assert out.dtype == dtype and out.shape == (tokens, n_out)
    assert _rel_err(out, x.double() @ weight_t.double() + bias.double()) < 1e-2


def test_sparse_gemv_really_skips_zero_rows():
    # Rows of the weight whose input is zero are never read: poison them with NaN and the result stays finite.
    x = torch.zeros(2, 128, device=DEV, dtype=torch.bfloat16)
    x[0, :20] = 1.0
    x[1, 10:30] = 2.0
    weight_t = torch.randn(128, 64, device=DEV, dtype=torch.bfloat16)
    weight_t[30:] = float("nan")
    out = sparse_gemv(x, weight_t, config=GemvConfig(32, 32, 2))
    assert torch.isfinite(out).all()
    assert _rel_err(out, x[:, :30].double() @ weight_t[:30].double()) < 1e-2


def test_sparse_gemv_rejects_bad_input():
    with pytest.raises(ValueError, match="tokens <= 8"):
        sparse_gemv(torch.zeros(9, 16, device=DEV), torch.zeros(16, 4, device=DEV))
    with pytest.raises(ValueError, match="contiguous"):
        sparse_gemv(torch.zeros(1, 16, device=DEV), torch.zeros(4, 16, device=DEV).t())
    with pytest.raises(ValueError, match="at most 8 tokens"):
        sparse_linear(torch.zeros(2, 5, 16, device=DEV), torch.zeros(16, 4, device=DEV))


def test_input_major_layout_keeps_values_and_checkpoint():
    model = tiny_model("mistral").to(DEV, torch.bfloat16)
    convert_to_qsparse(model, topk=0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert prepare_for_decode(model) == 14  # 7 linears x 2 layers
    linear = model.model.layers[0].mlp.down_proj
    assert is_input_major(linear.weight) and linear.weight.shape == (64, 128)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) and after[k].is_contiguous() for k in before)
    assert prepare_for_decode(model) == 0  # idempotent


def test_model_decode_with_kernels_matches_reference_path():
    model = tiny_model("mistral").to(DEV, torch.bfloat16)
    convert_to_qsparse(model, topk=0.5)
    set_sparsity_tracking(model, False)
    prompt = torch.randint(3, 128, (1, 6), device=DEV)
    previous = set_kernels_enabled(False)
    try:
        reference = model.generate(prompt, max_new_tokens=5, do_sample=False)
        with torch.no_grad():
            ref_logits = model(reference).logits
    finally:
        set_kernels_enabled(previous)
    assert kernels_available(prompt)
    fast = model.generate(prompt, max_new_tokens=5, do_sample=False)
    assert is_input_major(model.model.layers[0].self_attn.q_proj.weight)  # re-laid lazily at the first decode step
    with torch.no_grad():
        fast_logits = model(reference).logits
    assert torch.equal(fast, reference)
    assert _rel_err(fast_logits, ref_logits) < 2e-2


def test_kernel_training_step_matches_reference_gradients():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32, device=DEV, dtype=torch.bfloat16)
    from qsparse_hf.layers import InputSparsifier

    layer = QSparseLinear.from_linear(linear, InputSparsifier(0.5))
    x = torch.randn(4, 64, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    grads = []
    for enabled in (False, True):
        set_kernels_enabled(enabled)
        x.grad = None
        layer(x).float().square().sum().backward()
        grads.append(x.grad.clone())
    set_kernels_enabled(True)
    assert torch.equal(grads[0], grads[1])


@requires_cuda
def test_compiled_decode_uses_custom_ops_without_graph_breaks():
    model = tiny_model("llama").to("cuda", torch.bfloat16)
    convert_to_qsparse(model, topk=0.5)
    set_sparsity_tracking(model, False)
    prepare_for_decode(model)
    ids = torch.randint(3, 128, (1, 1), device="cuda")
    with torch.no_grad():
        eager = model(ids).logits
        compiled = torch.compile(model, fullgraph=True)
        assert _rel_err(compiled(ids).logits, eager) < 1e-2
