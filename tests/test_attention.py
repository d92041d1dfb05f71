"""The one-token decode attention (`kernels.attention`) and the ``"qsparse_sdpa"`` attention implementation that
converted models run: the kernel against torch's SDPA on GQA shapes, masks and split counts; which calls take it;
the switch on conversion and back on revert. On the GPU when there is one, else through Triton's CPU interpreter.

Tolerance: the kernel accumulates in fp32 and rounds the softmax weights to the values' dtype, as SDPA's fused
kernels do, so it differs from a float64 reference by those two roundings (weights and output, < 1e-2 relative).
"""

import json

import pytest
import torch

pytest.importorskip("triton")

from conftest import KERNEL_DEVICE, TINY_CONFIGS, sparse_llama, tiny_model  # noqa: E402

from qsparse_hf import convert_to_qsparse, kernels, revert_qsparse  # noqa: E402
from qsparse_hf.attention import ATTENTION_NAME, DecodeAttentionForward, use_decode_attention  # noqa: E402
from qsparse_hf.kernels import set_kernels_enabled  # noqa: E402
from qsparse_hf.kernels import ops as kernel_ops  # noqa: E402
from qsparse_hf.kernels.attention import decode_attention, decode_attention_append  # noqa: E402

DEV = KERNEL_DEVICE


@pytest.fixture(autouse=True)
def _kernels_on_cpu_too():
    previous = set_kernels_enabled(True, on_cpu=True)
    yield
    set_kernels_enabled(previous, on_cpu=False)


def _reference(query, key, value, mask, scale):
    """SDPA in float64 over the key/value heads repeated per query head, in the kernel's output layout."""
    group = query.shape[1] // key.shape[1]
    key, value = (t.double().repeat_interleave(group, dim=1) for t in (key, value))
    out = torch.nn.functional.scaled_dot_product_attention(query.double(), key, value, attn_mask=mask, scale=scale)
    return out.transpose(1, 2)


def _qkv(batch, heads, kv_heads, length, head_dim, dtype=torch.bfloat16):
    query = torch.randn(batch, heads, 1, head_dim, device=DEV).to(dtype)
    key = torch.randn(batch, kv_heads, length, head_dim, device=DEV).to(dtype)
    return query, key, torch.randn_like(key)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch,heads,kv_heads,length,head_dim", [
    (1, 4, 2, 1, 16),  # one cached position
    (1, 28, 4, 304, 128),  # Qwen2-7B's grouping, a benchmark's cache: five splits
    (1, 32, 8, 65, 128),  # Mistral-7B's grouping, a split of one position
    (2, 8, 8, 1100, 80),  # no grouping, a head size that is not a power of two, several blocks per split
])
@pytest.mark.parametrize("masked", [False, True])
def test_decode_attention_matches_sdpa(dtype, batch, heads, kv_heads, length, head_dim, masked):
    torch.manual_seed(0)
    query, key, value = _qkv(batch, heads, kv_heads, length, head_dim, dtype)
    mask = None
    if masked:  # a static cache's mask: the filled positions, here a different count per sequence
        mask = torch.zeros(batch, 1, 1, length, dtype=torch.bool, device=DEV)
        for row in range(batch):
            mask[row, ..., : max(1, (length * (2 + row)) // 4)] = True
        if length > 8:
            mask[0, ..., 3] = False  # a hole (padding) in the middle
    out = decode_attention(query, key, value, mask, 0.1)
    expected = _reference(query, key, value, mask, 0.1)
    assert out.shape == (batch, 1, heads, head_dim) and out.dtype == dtype
    assert torch.allclose(out.double(), expected, atol=1e-2, rtol=1e-2)
    assert ((out.double() - expected).norm() / expected.norm()).item() < 1e-2
    # The partials merge in split order and the tickets re-arm: a second call gives the same bits.
    assert torch.equal(decode_attention(query, key, value, mask, 0.1), out)


def test_decode_attention_reads_strided_caches_and_broadcast_masks():
    torch.manual_seed(0)
    # A query laid out [batch, tokens, heads, dim] and transposed (as transformers' projections give it), a key and
    # value that are slices of wider buffers, a mask shared by the two sequences.
    query = torch.randn(2, 1, 8, 64, device=DEV).to(torch.bfloat16).transpose(1, 2)
    buffer = torch.randn(2, 2, 2, 200, 64, device=DEV).to(torch.bfloat16)
    key, value = buffer[:, 0], buffer[:, 1]
    mask = torch.arange(200, device=DEV).lt(150).reshape(1, 1, 1, 200)
    out = decode_attention(query, key, value, mask)
    assert torch.allclose(out.double(), _reference(query, key, value, mask, 64 ** -0.5), atol=1e-2, rtol=1e-2)


def test_decode_attention_keeps_nan():
    query, key, value = _qkv(1, 4, 2, 70, 32)
    value[0, 1, 5, 0] = float("nan")  # heads 2 and 3 read it; 0 and 1 do not
    out = decode_attention(query, key, value, None)
    assert out[0, 0, 2:, 0].isnan().all() and not out[0, 0, :2].isnan().any()


@pytest.mark.parametrize("change,message", [
    (lambda q, k, v, m: (q.expand(1, 4, 2, 32), k, v, m), "one query token"),
    (lambda q, k, v, m: (q.float(), k, v, m), "bf16 or fp16"),
    (lambda q, k, v, m: (q, k, v, m.float()), "boolean"),
    (lambda q, k, v, m: (q[:, :3], k, v, m), "multiple"),
    (lambda q, k, v, m: (q, k, v, m[..., :5]), "boolean"),
])
def test_decode_attention_rejects_what_it_does_not_compute(change, message):
    query, key, value = _qkv(1, 4, 2, 9, 32)
    mask = torch.ones(1, 1, 1, 9, dtype=torch.bool, device=DEV)
    with pytest.raises(ValueError, match=message):
        decode_attention(*change(query, key, value, mask))


def _rotary(batch, head_dim, dtype=torch.bfloat16):
    """cos and sin as transformers' rotary embedding gives them for one position per sequence."""
    angles = torch.rand(batch, 1, head_dim // 2, device=DEV) * 100
    return (torch.cat([f(angles)] * 2, dim=-1).to(dtype) for f in (torch.cos, torch.sin))


def _rotated(x, cos, sin):
    """transformers' ``apply_rotary_pos_emb`` of one tensor, in eager bf16 (each product and the sum rounded)."""
    first, second = x.chunk(2, dim=-1)
    return x * cos.unsqueeze(1) + torch.cat((-second, first), dim=-1) * sin.unsqueeze(1)


@pytest.mark.parametrize("batch,heads,kv_heads,length,head_dim,position,rotary_batch,dtype", [
    (1, 28, 4, 304, 128, 200, 1, torch.bfloat16),  # Qwen2-7B's grouping; the position inside the 4th of 5 splits
    (1, 32, 8, 65, 128, 64, 1, torch.float16),  # the last position, a split of its own
    (2, 8, 8, 1100, 80, 0, 2, torch.bfloat16),  # the first position; a head that is not a power of two; rotary
    # per sequence
    (2, 4, 2, 9, 16, 5, 1, torch.bfloat16),  # one rotary shared by both sequences
])
@pytest.mark.parametrize("variant", ["shipped", "prefetch", "stored last", "hidden skipped, fewer splits"])
def test_decode_attention_append_is_rotary_then_update_then_attention(batch, heads, kv_heads, length, head_dim,
                                                                       position, rotary_batch, dtype, variant,
                                                                       monkeypatch):
    # The launch's variants compute the same: prefetch, it asks L2 for its cached keys and values before its wait
    # (`kernels.ATTENTION_PREFETCH`; only a GPU with programmatic dependent launch runs it); stored last, the new
    # key and value are stored after the loop over the cache; hidden skipped, blocks no row sees read nothing,
    # with splits of at least four blocks.
    from qsparse_hf.kernels import attention as attention_kernels
    from qsparse_hf.kernels.launch import pdl_enabled

    prefetch = variant == "prefetch"
    monkeypatch.setattr(kernels, "ATTENTION_PREFETCH", prefetch)
    assert attention_kernels._prefetches() == (prefetch and pdl_enabled())
    monkeypatch.setattr(attention_kernels, "_STORE_LAST", variant == "stored last")
    monkeypatch.setattr(attention_kernels, "_SKIP_HIDDEN", variant.startswith("hidden"))
    monkeypatch.setattr(attention_kernels, "_MIN_BLOCKS_PER_SPLIT", 4 if variant.startswith("hidden") else 1)
    torch.manual_seed(0)
    query, key_cache, value_cache = _qkv(batch, heads, kv_heads, length, head_dim, dtype)
    new_key, new_value = (torch.randn(batch, kv_heads, 1, head_dim, device=DEV).to(dtype) for _ in "kv")
    cos, sin = _rotary(rotary_batch, head_dim, dtype)
    mask = torch.arange(length, device=DEV).le(position).reshape(1, 1, 1, length)
    # what the model's code does: rotary, StaticLayer.update, the attention
    expected_keys, expected_values = key_cache.clone(), value_cache.clone()
    expected_keys[:, :, position] = _rotated(new_key, cos, sin)[:, :, 0]
    expected_values[:, :, position] = new_value[:, :, 0]
    expected = decode_attention(_rotated(query, cos, sin), expected_keys, expected_values, mask, 0.1)
    count = torch.tensor(position, device=DEV)
    out = decode_attention_append(query, new_key, new_value, cos, sin, key_cache, value_cache, count, mask, 0.1)
    assert torch.equal(key_cache, expected_keys) and torch.equal(value_cache, expected_values)
    assert count.item() == position  # the launch only reads it
    assert torch.equal(out, expected)  # the split holding the position reads the new key and value from registers
    # its tickets re-armed: the next launch appends the same way; the op's wrapper advances the count after it
    assert torch.equal(kernel_ops.decode_attention_append(query, new_key, new_value, cos, sin, key_cache,
                                                          value_cache, count, mask, 0.1), expected)
    assert count.item() == position + 1


def test_decode_attention_append_past_the_cache_end_is_nan_and_stores_nothing():
    query, key_cache, value_cache = _qkv(1, 4, 2, 70, 32)
    new_key = new_value = torch.ones(1, 2, 1, 32, dtype=torch.bfloat16, device=DEV)
    cos, sin = _rotary(1, 32)
    before = key_cache.clone(), value_cache.clone()
    count = torch.tensor(70, device=DEV)
    out = decode_attention_append(query, new_key, new_value, cos, sin, key_cache, value_cache, count, None)
    assert out.isnan().all()
    assert torch.equal(key_cache, before[0]) and torch.equal(value_cache, before[1])


@pytest.mark.parametrize("change,message", [
    (lambda k, c, n: (k[..., :31], c, n), "new key"),
    (lambda k, c, n: (k, c[..., :16], n), "cos and sin"),
    (lambda k, c, n: (k, c.float(), n), "cos and sin"),
    (lambda k, c, n: (k, c, n.float()), "count"),
])
def test_decode_attention_append_rejects_what_it_does_not_compute(change, message):
    query, key_cache, value_cache = _qkv(1, 4, 2, 9, 32)
    new_key = torch.zeros(1, 2, 1, 32, dtype=torch.bfloat16, device=DEV)
    cos, sin = _rotary(1, 32)
    new_key, cos, count = change(new_key, cos, torch.tensor(3, device=DEV))
    with pytest.raises(ValueError, match=message):
        decode_attention_append(query, new_key, new_key, cos, sin if cos.shape == sin.shape else cos, key_cache,
                                value_cache, count, None)


def _count_launches(monkeypatch) -> list:
    """The decode attention launches from now on (the custom op's body looks the launch up at each call)."""
    calls = []
    real = kernel_ops._decode_attention_launch
    monkeypatch.setattr(kernel_ops, "_decode_attention_launch", lambda *args: (calls.append(1), real(*args))[1])
    return calls


def _compiled_decode(model, tokens, prompt_length, backend="eager"):
    """Logits of every step of decoding ``tokens`` (teacher-forced, so every run sees the same context) through a
    static cache: the first ``prompt_length`` as an eager prefill, then one compiled step per token (by default
    Dynamo's eager backend: what Inductor would run, without its code generation)."""
    from transformers import StaticCache

    torch._dynamo.reset()
    cache = StaticCache(config=model.config, max_cache_len=tokens.shape[1])
    positions = torch.arange(tokens.shape[1], device=DEV)
    step = torch.compile(model.forward, fullgraph=True, backend=backend)
    with torch.no_grad():
        logits = [model(tokens[:, :prompt_length], past_key_values=cache,
                        cache_position=positions[:prompt_length]).logits[:, -1]]
        for position in range(prompt_length, tokens.shape[1]):
            logits.append(step(tokens[:, position:position + 1], past_key_values=cache,
                               cache_position=positions[position:position + 1]).logits[:, -1])
    return torch.stack(logits)


#: Every tiny family whose attention is SDPA (Gemma2 runs eager attention: its softcapping is not SDPA's).
SDPA_ARCHS = [arch for arch in TINY_CONFIGS if arch != "gemma2"]


@pytest.mark.parametrize("arch", SDPA_ARCHS)
def test_compiled_decode_steps_run_the_kernel_and_match_sdpa(arch, monkeypatch):
    # topk=1.0: the decode path without selections, so the two runs differ by the attention's rounding alone (at
    # 0.5 a bf16 bit can also move a feature across a top-K cut-off, and a tiny random model's logits by percents)
    model = convert_to_qsparse(tiny_model(arch).to(DEV, torch.bfloat16), topk=1.0)
    assert model.config._attn_implementation == ATTENTION_NAME
    tokens = torch.randint(3, 128, (1, 10), device=DEV)
    calls = _count_launches(monkeypatch)
    appends = _count_appends(monkeypatch)  # (where the rotary and cache append join the launch)
    logits = _compiled_decode(model, tokens, 6)
    # four one-token steps; the prefill is SDPA's
    assert len(calls) + len(appends) == 4 * model.config.num_hidden_layers
    monkeypatch.setattr(kernels, "DECODE_ATTENTION", False)
    expected = _compiled_decode(model, tokens, 6)
    assert len(calls) + len(appends) == 4 * model.config.num_hidden_layers  # switched off: SDPA throughout
    assert torch.equal(logits[0], expected[0])  # the prefill
    # (measured 2e-3 to 6e-3 on CPU: one bf16 rounding of each attention output, carried through two layers)
    assert ((logits.double() - expected.double()).norm() / expected.double().norm()).item() < 1e-2


def _count_appends(monkeypatch) -> list:
    """The rotary-and-append attention launches from now on."""
    calls = []
    real = kernel_ops._decode_attention_append_launch
    monkeypatch.setattr(kernel_ops, "_decode_attention_append_launch", lambda *args: (calls.append(1), real(*args))[1])
    return calls


#: The tiny families whose attention module follows Llama's code (`convert.ArchLayout.attention`), and those of
#: them whose static cache layers append in the attention launch: Mistral's tiny config has a sliding window, so
#: its static cache slides (its layers' own update runs).
LLAMA_ATTENTION_ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma", "granite"]
APPEND_ARCHS = [arch for arch in LLAMA_ATTENTION_ARCHS if arch != "mistral"]


@pytest.mark.parametrize("arch", SDPA_ARCHS)
def test_compiled_static_steps_append_in_the_attention_launch(arch, monkeypatch):
    model = convert_to_qsparse(tiny_model(arch).to(DEV, torch.bfloat16), topk=1.0)
    layers = model.config.num_hidden_layers
    fused = [isinstance(m.__dict__.get("forward"), DecodeAttentionForward) for m in model.modules()]
    assert sum(fused) == layers * (arch in LLAMA_ATTENTION_ARCHS)
    tokens = torch.randint(3, 128, (1, 10), device=DEV)
    appends, attentions = _count_appends(monkeypatch), _count_launches(monkeypatch)
    logits = _compiled_decode(model, tokens, 6)
    assert (len(appends), len(attentions)) == ((4 * layers, 0) if arch in APPEND_ARCHS else (0, 4 * layers))
    monkeypatch.setattr(kernels, "DECODE_APPEND", False)  # the model's own rotary and cache update
    expected = _compiled_decode(model, tokens, 6)
    assert len(appends) == 4 * layers * (arch in APPEND_ARCHS)
    # The same attention kernel on the same rotated bits (the kernel's rotary rounds as the model's eager code):
    # every step's logits equal, bit for bit.
    assert torch.equal(logits, expected)


def test_inductor_steps_with_the_append_equal_the_models_own_update(monkeypatch):
    # Inductor, not just Dynamo's graph: the launch writes the caches, and the count (from which transformers'
    # static cache derives the step's positions, rotary and mask) is advanced by an add_ the compiler orders against
    # every read of it. (Advanced inside the custom op, Inductor recomputed the second layer's rotary and mask
    # after the first layer's launch had moved the count on: positions off by one, logits 6 % off.) With eager's
    # rounding emulated, every step's logits equal the eager-backend steps' bit for bit, appended or not.
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config, "emulate_precision_casts", True)
    model = convert_to_qsparse(tiny_model("qwen2").to(DEV, torch.bfloat16), topk=0.5)
    tokens = torch.randint(3, 128, (1, 9), device=DEV)
    appends = _count_appends(monkeypatch)
    expected = _compiled_decode(model, tokens, 6)
    assert torch.equal(_compiled_decode(model, tokens, 6, backend="inductor"), expected)
    assert len(appends) == 2 * 3 * model.config.num_hidden_layers
    monkeypatch.setattr(kernels, "DECODE_APPEND", False)
    assert torch.equal(_compiled_decode(model, tokens, 6, backend="inductor"), expected)
    assert len(appends) == 2 * 3 * model.config.num_hidden_layers  # the model's own update this time


def test_compiled_steps_advance_every_layers_count_in_one_op_after_the_last_layer(monkeypatch):
    # One `_foreach_add_` at the end of the step advances the counts the appends read (one kernel a step on the
    # GPU, where an add_ after each launch was one kernel a layer), after every layer's launch; the logits equal
    # those of the model's own cache update step after step, so every layer's positions stay right.
    graphs = []

    def recording(graph, inputs):
        graphs.append(graph)
        return graph.forward

    model = convert_to_qsparse(tiny_model("qwen2").to(DEV, torch.bfloat16), topk=0.5)
    layers = model.config.num_hidden_layers
    tokens = torch.randint(3, 128, (1, 9), device=DEV)
    appends = _count_appends(monkeypatch)
    logits = _compiled_decode(model, tokens, 6, backend=recording)
    assert len(appends) == 3 * layers >= 6
    calls = [node for node in graphs[-1].graph.nodes if node.op in ("call_function", "call_method")]
    foreach = [node for node in calls if node.target is torch._foreach_add_]
    adds = [node for node in calls if node.target in ("add_", torch.Tensor.add_)]
    assert len(foreach) == 1 and len(foreach[0].args[0]) == layers and adds == []
    order = {node: index for index, node in enumerate(calls)}
    launches = [node for node in calls if "decode_attention_append" in str(node.target)]
    assert len(launches) == layers and max(map(order.get, launches)) < order[foreach[0]]
    monkeypatch.setattr(kernels, "DECODE_APPEND", False)  # the model's own update: the same logits, bit for bit
    assert torch.equal(logits, _compiled_decode(model, tokens, 6))


def test_inductor_steps_compute_the_attention_mask_once_for_every_layer():
    # Every layer's decode attention reads the same mask; as the output of a fused pointwise kernel Inductor gave
    # each layer's custom op a copy of its own, computed before it (one kernel a layer on the GPU). Made by
    # `qsparse::step_input`, it is one buffer that every layer's launch reads.
    import re

    from torch._inductor.utils import run_and_get_code
    from transformers import StaticCache

    torch._dynamo.reset()
    model = convert_to_qsparse(tiny_model("qwen2").to(DEV, torch.bfloat16), topk=0.5)
    cache = StaticCache(config=model.config, max_cache_len=12)
    positions = torch.arange(12, device=DEV)
    tokens = torch.randint(3, 128, (1, 9), device=DEV)
    with torch.no_grad():
        model(tokens[:, :8], past_key_values=cache, cache_position=positions[:8])
        step = torch.compile(model.forward, fullgraph=True)
        _, codes = run_and_get_code(step, tokens[:, 8:], past_key_values=cache, cache_position=positions[8:9])
    code = codes[-1]
    # (the mask is the launch's argument before the scale)
    masks = re.findall(r"qsparse\.decode_attention_append\.default\(.*, (\w+), [0-9.e-]+\)$", code, re.M)
    assert len(masks) == model.config.num_hidden_layers >= 2
    assert len(set(masks)) == 1 and code.count("torch.ops.qsparse.step_input.default(") == 1


@pytest.mark.parametrize("head_dim,dtype", [(8, torch.bfloat16), (16, torch.float32)])
def test_the_append_leaves_what_the_kernel_does_not_take_to_the_models_code(head_dim, dtype, monkeypatch):
    # A head of 8 is found too small once the projections are done (the step finishes as the module's code would:
    # rotary, the layer's update, the attention function); float32 is turned away before them.
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=head_dim, vocab_size=128)
    model = convert_to_qsparse(LlamaForCausalLM(config).eval().to(DEV, dtype), topk=0.5)
    appends = _count_appends(monkeypatch)
    tokens = torch.randint(3, 128, (1, 9), device=DEV)
    logits = _compiled_decode(model, tokens, 6)
    monkeypatch.setattr(kernels, "DECODE_APPEND", False)
    assert appends == [] and torch.equal(logits, _compiled_decode(model, tokens, 6))


def test_the_append_steps_aside_for_other_caches_and_attentions(monkeypatch):
    from transformers import DynamicCache

    model = convert_to_qsparse(tiny_model("qwen2").to(DEV, torch.bfloat16), topk=0.5)
    appends = _count_appends(monkeypatch)
    tokens = torch.randint(3, 128, (1, 6), device=DEV)
    torch._dynamo.reset()
    step = torch.compile(model.forward, fullgraph=True, backend="eager")
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(tokens[:, :5], past_key_values=cache)
        step(tokens[:, 5:], past_key_values=cache)  # a dynamic cache: the module's own update
        assert cache.get_seq_length() == 6
        model.generate(tokens, max_new_tokens=2, do_sample=False, disable_compile=True,
                       cache_implementation="static")  # eager steps
    assert appends == []
    model.set_attn_implementation("eager")  # a user's later choice of attention is respected
    assert len(_compiled_decode(model, torch.randint(3, 128, (1, 8), device=DEV), 6)) == 3
    assert appends == []
    revert_qsparse(model)
    assert not any(isinstance(m.__dict__.get("forward"), DecodeAttentionForward) for m in model.modules())


def test_eager_steps_training_and_prefill_stay_on_sdpa(monkeypatch):
    model = sparse_llama()
    calls = _count_launches(monkeypatch)
    with torch.no_grad():
        model.generate(torch.randint(3, 128, (1, 5), device=DEV), max_new_tokens=3, do_sample=False,
                       disable_compile=True, cache_implementation="static")  # eager steps: host-bound
    model.train()
    step = torch.compile(model, fullgraph=True, backend="eager")
    step(torch.randint(3, 128, (1, 1), device=DEV)).logits.float().sum().backward()  # compiled, with gradients
    assert calls == []


def test_conversion_switches_sdpa_models_only_and_revert_restores(tmp_path):
    model = convert_to_qsparse(tiny_model("mistral"), topk=0.5)
    assert model.config._attn_implementation == ATTENTION_NAME
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert ATTENTION_NAME not in json.dumps(saved)  # a checkpoint never asks for the plugin's attention
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path).config._attn_implementation == ATTENTION_NAME
    revert_qsparse(model)
    assert model.config._attn_implementation == "sdpa"

    eager = tiny_model("mistral")
    eager.set_attn_implementation("eager")
    assert not use_decode_attention(eager)
    assert convert_to_qsparse(eager, topk=0.5).config._attn_implementation == "eager"  # a user's choice stays
