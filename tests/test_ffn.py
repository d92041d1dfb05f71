"""The two-launch gated FFN decode step (`kernels.ffn.gated_select`, `kernels.gemv.masked_gemv`): on the GPU when
there is one, else through Triton's CPU interpreter (small shapes).

Inputs and weights are small multiples of powers of two, so every fp32 sum is exact whatever its order: the
activation the kernel writes can then be compared bit for bit with a reference, and its top-K with
`functional.topk_mask` of that reference (many equal magnitudes: ties must go to the lowest index).
"""

import pytest
import torch

pytest.importorskip("triton")

from conftest import KERNEL_DEVICE, requires_cuda, same_bits, silu_reference  # noqa: E402

from qsparse_hf import convert_to_qsparse  # noqa: E402
from qsparse_hf.functional import topk_mask  # noqa: E402
from qsparse_hf.kernels import set_kernels_enabled  # noqa: E402
from qsparse_hf.kernels.ffn import gated_config, gated_select, gated_select_listed, serves  # noqa: E402
from qsparse_hf.kernels.gemv import GemvConfig, masked_gemv, sparse_gemv  # noqa: E402
from qsparse_hf.kernels.topk import new_hint  # noqa: E402

DEV = KERNEL_DEVICE
BF16 = torch.bfloat16


@pytest.fixture(autouse=True)
def _kernels_on_cpu_too():
    previous = set_kernels_enabled(True, on_cpu=True)
    yield
    set_kernels_enabled(previous, on_cpu=False)


def _exact_values(*shape, scale: float) -> torch.Tensor:
    """Integers in [-3, 3] times ``scale`` (a power of two): sums of products stay exact in fp32."""
    return (torch.randint(-3, 4, shape, device=DEV).float() * scale).to(BF16)


def _keys(t: torch.Tensor) -> torch.Tensor:
    return (t.view(torch.int16).int() & 0x7FFF).clamp(max=0x7F80)


def _mask_of(act: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    threshold, cut = state.tolist()
    keys = _keys(act)
    return (keys > threshold) | ((keys == threshold) & (torch.arange(act.shape[-1], device=act.device) <= cut))


def _gated_case(n_in=64, inter=300, kept_count=None, columns=(5, 317), width=640):
    """A sparse token, its kept list (or None), a side-by-side block holding gate and up at ``columns``, and the
    exact SiLU(gate) and up that the kernel must compute."""
    x = _exact_values(1, n_in, scale=0.25)
    x[0, 0] = 2.0  # at least one non-zero input
    kept = None
    if kept_count is not None:
        rows = torch.randperm(n_in, device=DEV)[:kept_count].sort().values
        sparse = torch.zeros_like(x)
        sparse[0, rows] = x[0, rows]
        x, kept = sparse, rows.to(torch.int32).reshape(1, -1)
    block = _exact_values(n_in, width, scale=0.0625)
    gate, up = (block[:, c:c + inter] for c in columns)
    exact_gate = (x.double() @ gate.double()).to(BF16)  # exact sums, rounded once as the kernel rounds
    exact_up = (x.double() @ up.double()).to(BF16)
    return x, kept, block, silu_reference(exact_gate), exact_up


@pytest.mark.parametrize("kept_count", [None, 24])
@pytest.mark.parametrize("config", [GemvConfig(128, 8, 1, 4), GemvConfig(128, 4, 4, 4), GemvConfig(256, 16, 2, 4)])
@pytest.mark.parametrize("hint_key", [None, 0, 0x3F00, 0x7F00])  # none, missing low / near / missing high
@pytest.mark.parametrize("k", [1, 97, 150, 300])
def test_gated_select_writes_the_activation_and_resolves_its_exact_top_k(kept_count, config, hint_key, k):
    inter = 300
    x, kept, block, act_ref, up_ref = _gated_case(inter=inter, kept_count=kept_count)
    product_ref = (act_ref.float() * up_ref.float()).to(BF16)
    hint = None if hint_key is None else torch.full((1,), hint_key, dtype=torch.int32, device=DEV)
    act, product, state = gated_select(x, kept, block, 5, 317, inter, k, hint, config=config)
    assert same_bits(act, act_ref) and same_bits(product, product_ref)
    assert _keys(act_ref).unique().numel() < inter // 2  # tie-heavy, as meant
    mask = _mask_of(act, state)
    assert torch.equal(mask, topk_mask(act_ref, k)) and int(mask.sum()) == k
    if hint is not None:
        assert hint.item() == state[0].item()  # the next token's search starts here
    # The listed form: what the split selection writes (the sparse activation times up, the kept features)
    sparse, listed = gated_select_listed(x, kept, block, 5, 317, inter, k, hint, config=config)
    zero = torch.zeros((), dtype=BF16, device=DEV)
    assert same_bits(sparse, (torch.where(mask, act_ref, zero).float() * up_ref.float()).to(BF16))
    assert listed.dtype == torch.int32 and torch.equal(listed[0].long(), mask[0].nonzero().flatten())


def test_gated_select_ranks_nan_as_infinity_and_keeps_ties_by_index():
    inter = 200
    x, kept, block, _, _ = _gated_case(inter=inter, columns=(0, inter), width=2 * inter)
    block[0, 3] = float("inf")  # gate column 3: +inf (x[0, 0] > 0), SiLU inf
    block[0, 7] = float("-inf")  # gate column 7: -inf, SiLU NaN
    block[0, 11] = float("nan")
    act, product, state = gated_select(x, kept, block, 0, inter, inter, 3, new_hint(DEV, 1))
    assert act[0, 3].isinf() and act[0, 7].isnan() and act[0, 11].isnan()
    assert _mask_of(act, state).nonzero()[:, 1].tolist() == [3, 7, 11]  # inf and NaN tie at the top key


def test_masked_gemv_is_the_gemv_of_the_masked_values():
    inter, n_out = 300, 48
    values = torch.randn(1, inter, device=DEV).to(BF16)
    keys = _exact_values(1, inter, scale=0.5)  # few distinct magnitudes: ties at the threshold
    weight_t = torch.randn(inter, n_out, device=DEV).to(BF16)
    reference_mask = topk_mask(keys, 120)
    key_values = _keys(keys)
    threshold = int(key_values[reference_mask].min())
    cut = int(((key_values == threshold) & reference_mask).nonzero()[:, 1].max())
    state = torch.tensor([threshold, cut], dtype=torch.int32, device=DEV)
    masked = torch.where(reference_mask, values, torch.zeros((), dtype=BF16, device=DEV))
    bias = torch.randn(n_out, device=DEV).to(BF16)
    for config in (GemvConfig(32, 16, 1), GemvConfig(32, 16, 4), GemvConfig(64, 32, 2, 8)):
        out = masked_gemv(values, keys, state, weight_t, bias, config=config)
        # the same loads and sums as the plain GEMV of the masked input
        assert torch.equal(out, sparse_gemv(masked, weight_t, bias, config=config))
    reference = masked.double() @ weight_t.double() + bias.double()
    assert ((out.double() - reference).norm() / reference.norm()).item() < 1e-2


def test_masked_gemv_keeps_exactly_the_top_k_wherever_it_falls():
    # Kept rows crowded into the first split or two and none in the others, ties cut mid-split, NaN ranked as inf.
    inter, n_out, k = 700, 40, 150
    values = _exact_values(1, inter, scale=0.5)
    keys = torch.full((1, inter), 0.25, device=DEV).to(BF16)  # ties everywhere below the crowd
    keys[0, 100:230] = 4.0  # 130 keys at the top
    keys[0, 5] = float("nan")
    weight_t = _exact_values(inter, n_out, scale=0.125)
    reference_mask = topk_mask(keys, k)
    key_values = _keys(keys)
    threshold = int(key_values[reference_mask].min())
    cut = int(((key_values == threshold) & reference_mask).nonzero()[:, 1].max())
    state = torch.tensor([threshold, cut], dtype=torch.int32, device=DEV)
    assert reference_mask[0, 5] and reference_mask.sum() == k  # (the NaN and 19 ties from index 0 kept)
    expected = (torch.where(reference_mask, values, torch.zeros((), dtype=BF16, device=DEV)).double()
                @ weight_t.double()).to(BF16)  # exact sums: any order gives these bits
    for config in (GemvConfig(32, 16, 1), GemvConfig(16, 32, 4), GemvConfig(64, 64, 8, 4, 1)):
        assert torch.equal(masked_gemv(values, keys, state, weight_t, config=config), expected)


def test_gated_select_and_masked_gemv_refuse_what_they_do_not_serve():
    x, kept, block, _, _ = _gated_case()
    with pytest.raises(ValueError, match="one bf16 token"):
        gated_select(x.half(), kept, block.half(), 5, 317, 300, 10)
    with pytest.raises(ValueError, match="one bf16 token"):
        gated_select(torch.cat([x, x]), kept, block, 5, 317, 300, 10)
    with pytest.raises(ValueError, match="1 <= k"):
        gated_select(x, kept, block, 5, 317, 300, 301)
    with pytest.raises(ValueError, match="holding gate and up"):
        gated_select(x, kept, block, 5, 400, 300, 10)
    with pytest.raises(ValueError, match="histogram limit"):
        gated_select(x, kept, torch.zeros(64, 40000, dtype=BF16, device=DEV), 0, 20000, 20000, 10,
                     config=GemvConfig(128, 8, 1))
    values = torch.zeros(1, 300, dtype=BF16, device=DEV)
    with pytest.raises(ValueError, match="int32 \\[threshold, cut\\]"):
        masked_gemv(values, values, torch.zeros(2, device=DEV), torch.zeros(300, 8, dtype=BF16, device=DEV))
    with pytest.raises(ValueError, match="values and keys of one shape"):
        masked_gemv(values, values[:, :10], torch.zeros(2, dtype=torch.int32, device=DEV),
                    torch.zeros(300, 8, dtype=BF16, device=DEV))


def test_gated_config_defaults_stay_within_the_histogram_limit():
    for inter in (300, 11008, 14336, 18944, 65536):
        x = torch.zeros(1, 4096, dtype=BF16)
        block_n, block_k, split, _, _ = gated_config(x, torch.zeros(4096, 2 * inter), inter, tune=False)
        assert -(-inter // block_n) <= 64 and serves(x, inter)
    assert not serves(torch.zeros(1, 4096, dtype=BF16), 65537)


def _tiny_converted(arch: str, inter: int = 300):
    from transformers import AutoModelForCausalLM, MistralConfig, Qwen2Config

    config_class = {"mistral": MistralConfig, "qwen2": Qwen2Config}[arch]
    config = config_class(hidden_size=64, intermediate_size=inter, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=128, max_position_embeddings=32)
    torch.manual_seed(0)
    return convert_to_qsparse(AutoModelForCausalLM.from_config(config).eval().to(DEV, BF16), topk=0.5)


@pytest.fixture(params=["masked", "listed"])
def counted_launches(request, monkeypatch):
    """`kernels.FUSED_FFN` on (each mode), and the activation width of every `gated_select` launch, in order."""
    from qsparse_hf import kernels
    from qsparse_hf.kernels import ffn

    monkeypatch.setattr(kernels, "FUSED_FFN", request.param)
    widths = []
    launch = ffn._launch
    monkeypatch.setattr(ffn, "_launch", lambda *args, **kwargs: widths.append(args[5]) or launch(*args, **kwargs))
    yield widths
    torch._dynamo.reset()


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_compiled_ffn_step_in_two_launches_is_the_reference_ffn(arch, counted_launches):
    # One FFN compiled as a decode step takes the two launches, and its output is that of the reference FFN
    # (top-K of the input, SiLU, top-K of the activation, product with up, down) on exact values: the same
    # selections, the products up to the rounding of fp32 sums.
    from qsparse_hf.functional import keep_count
    from qsparse_hf.kernels import prepare_for_decode

    model = _tiny_converted(arch)
    mlp = model.model.layers[0].mlp
    with torch.no_grad():
        for linear, scale in ((mlp.gate_proj, 0.0625), (mlp.up_proj, 0.0625), (mlp.down_proj, 0.125)):
            linear.weight.copy_(_exact_values(*linear.weight.shape, scale=scale))
    prepare_for_decode(model)
    step = torch.compile(mlp, fullgraph=True, backend="eager")
    torch._dynamo.reset()
    with torch.no_grad():
        for token in range(3):
            x = _exact_values(1, 1, 64, scale=0.25)
            out = step(x)
            x_sparse = torch.where(topk_mask(x, keep_count(0.5, 64)), x, torch.zeros((), dtype=BF16, device=DEV))
            gate, up = ((x_sparse.double() @ m.weight.double().t()).to(BF16) for m in (mlp.gate_proj, mlp.up_proj))
            act = silu_reference(gate)
            kept = topk_mask(act, keep_count(0.5, 300))
            product = torch.where(kept, (act.float() * up.float()).to(BF16), torch.zeros((), dtype=BF16, device=DEV))
            reference = product.double() @ mlp.down_proj.weight.double().t()
            assert ((out.double() - reference).norm() / reference.norm()).item() < 1e-2, token
            assert counted_launches == [300] * (token + 1)


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_compiled_model_step_runs_each_ffn_in_two_launches(arch, counted_launches):
    # A whole compiled model (fullgraph: no graph break) takes them in every layer, token after token, the hint
    # carried and updated: the same token again gives the same logits bit for bit. Where a member has a hook the
    # step steps aside (the module's own forward runs it). (The FFN's values against the reference are the test
    # above: between differently rounded paths a model's selections part ways, the eager kernel path's too.)
    model = _tiny_converted(arch)
    step = torch.compile(model, fullgraph=True, backend="eager")
    torch._dynamo.reset()
    with torch.no_grad():
        model(torch.tensor([[1]], device=DEV))  # the first eager forward lays the decode weights out
        for count, token in enumerate((3, 17, 40), 1):
            ids = torch.tensor([[token]], device=DEV)
            logits = step(ids).logits
            assert logits.isfinite().all() and torch.equal(step(ids).logits, logits)
            assert counted_launches == [300] * 4 * count  # one launch per layer and call
        seen = []
        handle = model.model.layers[0].mlp.down_proj.register_forward_hook(lambda *args: seen.append(1))
        torch._dynamo.reset()  # (Dynamo does not guard on hooks added later: compile afresh)
        step(torch.tensor([[5]], device=DEV))
        handle.remove()
    assert seen == [1] and len(counted_launches) == 4 * 3 + 1


@requires_cuda
def test_two_launch_ffn_replays_from_cuda_graphs_bit_for_bit(counted_launches):
    # As transformers' compiled generate() runs it: Inductor, reduce-overhead (CUDA graphs recorded and replayed).
    # Replays of one token give the same logits bit for bit, whatever the hint and tickets were left at.
    model = _tiny_converted("qwen2", inter=9000)
    with torch.no_grad():
        model(torch.tensor([[1]], device=DEV))
        step = torch.compile(model, mode="reduce-overhead", fullgraph=True)
        ids = torch.tensor([[7]], device=DEV)
        first = step(ids).logits.clone()
        for token in (3, 7, 40, 7):
            logits = step(torch.tensor([[token]], device=DEV)).logits
            if token == 7:
                assert torch.equal(logits, first)
    assert counted_launches and set(counted_launches) == {9000}


def test_inductor_compiles_the_two_launch_step_once_over_a_static_cache(counted_launches):
    # As transformers' compiled generate() runs it: Inductor, a static cache, advancing positions; one compiled
    # frame for every position (no recompiles), the FFN's launches in each layer.
    from torch._dynamo.testing import CompileCounter
    from transformers import StaticCache

    model = _tiny_converted("mistral")
    prompt = torch.randint(3, 128, (1, 6), device=DEV)
    cache = StaticCache(config=model.config, max_cache_len=12)
    counter = CompileCounter()
    with torch.no_grad():
        model(prompt, past_key_values=cache, cache_position=torch.arange(6, device=DEV))
        token = prompt[:, -1:].clone()
        inductor = torch.compile(model.forward, fullgraph=True)
        counted = torch.compile(model.forward, fullgraph=True, backend=counter)
        for position, step in ((6, inductor), (7, counted), (8, counted), (9, counted)):
            logits = step(token, past_key_values=cache, cache_position=torch.tensor([position], device=DEV)).logits
            assert logits.isfinite().all()
            token = logits[:, -1:].argmax(-1)
    assert counter.frame_count == 1 and len(counted_launches) == 2 * 4


@requires_cuda
def test_greedy_compiled_static_cache_decode_with_the_two_launch_ffn_equals_the_reference_path(counted_launches):
    # What a form must pass before it can be on by default: transformers' compiled generate(static) of the
    # embedded trained model gives the eager reference path's 256 greedy tokens (Inductor's own rounding emulated,
    # as for the shipped decode path in test_kernels).
    import torch._inductor.config as inductor_config
    from conftest import embedded_sparse_model_and_prompt

    model, prompt = embedded_sparse_model_and_prompt("cuda")
    kwargs = dict(max_new_tokens=256, min_new_tokens=256, do_sample=False, cache_implementation="static")
    previous = set_kernels_enabled(False)
    try:
        torch._dynamo.reset()
        reference = model.generate(prompt, **kwargs, disable_compile=True)
    finally:
        set_kernels_enabled(previous)
    torch._dynamo.reset()
    with inductor_config.patch(emulate_precision_casts=True):
        tokens = model.generate(prompt, **kwargs)
    assert counted_launches and torch.equal(tokens, reference)
