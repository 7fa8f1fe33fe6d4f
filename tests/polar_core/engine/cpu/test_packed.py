"""Weights multiplied as their exact GGUF codes (polar_core.engine.cpu.packed): same weights, same model."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from tiny import q4_grid, q4_k_grid, q5_0_grid, q6_k_grid, q8_grid, wrap

from polar_core.engine.cpu import packed
from polar_core.engine.cpu.layout import input_major
from polar_core.engine.forward import forward_logits
from polar_core.engine.generate import Stopping, generate
from polar_core.engine.inputs import pad_left, resolve_programs
from polar_core.program import Program

# Where the kernels can be built (x86-64 with AVX2 and a C compiler: CI, the Space) they must be.
needs_kernel = pytest.mark.skipif(not packed.kernels_expected(), reason="no AVX2/FMA/F16C CPU or C compiler")


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("kernels")


def q4_model(seed: int = 0):
    """A tiny llama stored like the embedded model: layer weights on the Q4_1 grid, the LM head on Q8_0."""
    import transformers as tf

    config = tf.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                            pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                module.weight.copy_(q4_grid(module.weight))
        model.lm_head.weight.copy_(q8_grid(model.lm_head.weight))
    return wrap(model, name="tiny-q4")


def test_codes_give_back_every_weight_bit_for_bit():
    weight = q4_grid(torch.randn(64, 96) * 0.05)
    codes = packed.find_q4_codes(weight)
    assert codes is not None
    assert torch.equal(codes.weight(), weight)
    assert codes.codes.dtype == torch.uint8 and int(codes.codes.max()) <= 15


def test_weights_that_are_not_codes_are_refused():
    assert packed.find_q4_codes(torch.randn(64, 96)) is None  # plain float weights
    assert packed.find_q4_codes(q4_grid(torch.randn(48, 96))) is None  # out features not whole tiles
    nudged = q4_grid(torch.randn(64, 96))
    nudged[3, 40] = torch.nextafter(nudged[3, 40], torch.tensor(1.0))  # one weight one float step off
    assert packed.find_q4_codes(nudged) is None
    assert packed.find_q4_codes(q4_grid(torch.randn(64, 96)).double()) is None


def test_constant_blocks_have_zero_scales():
    weight = torch.full((32, 64), 0.25)
    codes = packed.find_q4_codes(weight)
    assert codes is not None and torch.equal(codes.weight(), weight) and not codes.scales.any()


@needs_kernel
@pytest.mark.parametrize("avx512", [True, False])  # the AVX-512 code where the CPU has it, and the AVX2 code
@pytest.mark.parametrize("grid, code_format", [(q4_grid, "q4_1"), (q8_grid, "q8_0")])
def test_kernel_multiplies_by_the_very_same_weights(kernel_dir, grid, code_format, avx512):
    """Unit rows pick out single weights: the kernel's product gives each back exactly."""
    kernel, why_not = packed.load_kernel(kernel_dir, avx512)
    assert kernel is not None, why_not
    weight = grid(torch.randn(96, 64) * 0.05)
    name, tensors = packed.pack_weight(kernel, weight)
    assert name == code_format
    eye = torch.eye(64)
    out = torch.empty(64, 96)
    kernel.functions[name][0](eye.data_ptr(), 64, 64, 96, *(t.data_ptr() for t in tensors), out.data_ptr())
    assert torch.equal(out.t(), weight)


# Gemma 3 270M's formats: each found as an exact grid of 8-bit codes with float32 scales per 16 inputs.
K_GRIDS = [(q5_0_grid, "i8x16"), (q6_k_grid, "i8x16"), (q4_k_grid, "i8x16m")]


@needs_kernel
@pytest.mark.parametrize("avx512", [True, False])
@pytest.mark.parametrize("grid, code_format", K_GRIDS)
def test_gemma_formats_give_back_every_weight_bit_for_bit(kernel_dir, grid, code_format, avx512):
    kernel, why_not = packed.load_kernel(kernel_dir, avx512)
    assert kernel is not None, why_not
    torch.manual_seed(1)
    for weight in (grid(torch.randn(96, 512) * 0.05), grid(torch.randn(32, 256) * 3)):
        name, tensors = packed.pack_weight(kernel, weight)
        assert name == code_format
        assert tensors[0].dtype == torch.int8 and tensors[1].dtype == torch.float32
        eye = torch.eye(weight.shape[1])
        out = torch.empty(weight.shape[1], weight.shape[0])
        kernel.functions[name][0](eye.data_ptr(), weight.shape[1], weight.shape[1], weight.shape[0],
                                  *(t.data_ptr() for t in tensors), out.data_ptr())
        assert torch.equal(out.t(), weight)


@needs_kernel
@pytest.mark.parametrize("grid", [q5_0_grid, q6_k_grid, q4_k_grid])
def test_gemma_formats_refuse_weights_off_the_grid(kernel_dir, grid):
    kernel, why_not = packed.load_kernel(kernel_dir)
    assert kernel is not None, why_not
    nudged = grid(torch.randn(64, 256) * 0.05)
    nudged[5, 77] = torch.nextafter(nudged[5, 77], torch.tensor(1.0))  # one weight one float step off
    assert packed.pack_weight(kernel, nudged) is None
    assert packed.pack_weight(kernel, torch.randn(64, 256)) is None  # plain float weights
    assert packed.pack_weight(kernel, grid(torch.randn(40, 256))) is None  # out features not whole tiles


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9])
@pytest.mark.parametrize("grid, code_format", K_GRIDS)
def test_gemma_formats_match_the_float32_product(kernel_dir, grid, code_format, rows):
    kernel, why_not = packed.load_kernel(kernel_dir)
    assert kernel is not None, why_not
    linear = torch.nn.Linear(512, 96, bias=True)
    with torch.no_grad():
        linear.weight.copy_(grid(linear.weight))
    model = torch.nn.Sequential(linear)
    assert packed.pack_linears(model, kernel_dir).packed == {code_format: 1}
    assert type(linear) is packed.PackedLinear and linear.max_rows == 8
    x = torch.randn(1, rows, 512)
    with torch.inference_mode():
        y = linear(x)
        with packed.float32_products(model):
            expected = linear(x)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_c_packing_equals_the_torch_reference(kernel_dir):
    kernel, why_not = packed.load_kernel(kernel_dir)
    assert kernel is not None, why_not
    accepted = (q4_grid(torch.randn(64, 96) * 0.05), q4_grid(torch.randn(96, 64)), torch.full((32, 32), -2.5),
                input_major(q4_grid(torch.randn(64, 96))))  # as polar_core.engine.cpu.layout may store it
    for weight in accepted:
        name, ours = packed.pack_weight(kernel, weight)
        reference = packed.packed_layout(packed.find_q4_codes(weight))
        assert name == "q4_1" and all(torch.equal(a, b) for a, b in zip(ours, reference))
    nudged = q4_grid(torch.randn(64, 96))
    nudged[3, 40] = torch.nextafter(nudged[3, 40], torch.tensor(1.0))
    for weight in (torch.randn(64, 96), nudged, q4_grid(torch.randn(64, 96)).double()):
        assert packed.find_q4_codes(weight) is None and packed.pack_weight(kernel, weight) is None
    # Not whole Q4_1 tiles (32 outputs): the 8-bit grid with 16-output tiles holds it instead, as exactly.
    uneven = q4_grid(torch.randn(48, 96))
    assert packed.find_q4_codes(uneven) is None and packed.pack_weight(kernel, uneven)[0] == "i8x16m"


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 8, 9, 16, 17])
def test_packed_linear_matches_the_float32_product(kernel_dir, monkeypatch, rows):
    lm = q4_model()
    report = packed.pack_linears(lm.model, kernel_dir)
    assert report.packed == {"q4_1": 3 * 7, "q8_0": 1}
    calls = []
    kernels = {name: (lambda f, name=name: lambda *a: calls.append(name) or f(*a))(f)
               for name, f in packed.PackedLinear.linear_kernels.items()}
    monkeypatch.setattr(packed.PackedLinear, "linear_kernels", kernels)
    for linear, code_format in ((lm.model.model.layers[0].mlp.down_proj, "q4_1"), (lm.model.lm_head, "q8_0")):
        assert type(linear) is packed.PackedLinear and linear.code_format == code_format
        x = torch.randn(1, rows, linear.in_features)
        calls.clear()
        with torch.inference_mode():
            y = linear(x)
            with packed.float32_products(lm.model):
                expected = linear(x)
        assert calls == ([code_format] if rows <= linear.max_rows else [])  # longer products use float32
        assert y.shape == (1, rows, linear.out_features)
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_packed_model_is_the_same_model(kernel_dir):
    """Identity program = the model's own forward; greedy answers equal the float32 ones."""
    lm = q4_model()
    report = packed.pack_linears(lm.model, kernel_dir)
    assert report.kept == 0 and "22 of 22" in str(report) and lm.model.lm_head.code_format == "q8_0"
    assert not any(k.endswith((".codes", ".scales", ".mins")) for k in lm.model.state_dict())
    for prompt in ([5, 6, 7, 8, 9, 10], list(range(3, 40))):  # prompt passes with codes, with float32
        batch = pad_left([prompt], pad_id=0, device="cpu")
        identity = resolve_programs(lm, Program.full(lm.num_layers), 1)
        with torch.inference_mode():
            own = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        torch.testing.assert_close(forward_logits(lm, batch, identity), own, rtol=0, atol=0)
        for text in ("0-2", "0, 1x2, 2", "0, 2"):
            programs = resolve_programs(lm, Program.parse(text, 3), 1)
            fast = generate(lm, batch, programs, max_new_tokens=12, stopping=Stopping(at_eos=False))
            with packed.float32_products(lm.model):
                slow = generate(lm, batch, programs, max_new_tokens=12, stopping=Stopping(at_eos=False))
            assert [t.token_ids for t in fast] == [t.token_ids for t in slow]
    copy.deepcopy(lm.model)  # a packed model can still be copied


@needs_kernel
def test_float32_products_switch_back(kernel_dir):
    lm = q4_model()
    packed.pack_linears(lm.model, kernel_dir)
    with packed.float32_products(lm.model):
        assert not any(type(m) is packed.PackedLinear for m in lm.model.modules())
    assert sum(type(m) is packed.PackedLinear for m in lm.model.modules()) == 22


def test_without_a_compiler_the_weights_stay_float32(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    lm = q4_model()
    report = packed.pack_linears(lm.model, tmp_path)
    assert report.packed == {} and "no packed kernel" in str(report)
    assert not any(type(m) is packed.PackedLinear for m in lm.model.modules())


def test_float_weights_are_left_alone(tmp_path):
    from tiny import build_tiny

    lm = build_tiny.__wrapped__("llama")
    report = packed.pack_linears(lm.model, tmp_path)
    assert report.packed == {} and not any(type(m) is packed.PackedLinear for m in lm.model.modules())


@needs_kernel
@pytest.mark.skipif(not packed.onednn_available(), reason="no oneDNN linear in this torch")
def test_onednn_products_are_the_float32_product_in_this_thread_only(kernel_dir):
    """Inside `onednn_products` many-row products go through oneDNN: the same
    product up to rounding, in this thread only (another thread keeps MKL's
    bits), and the identity program still equals the model's own forward."""
    import threading

    lm = q4_model()
    packed.pack_linears(lm.model, kernel_dir)
    linear = lm.model.model.layers[0].mlp.down_proj
    x = torch.randn(2, 40, linear.in_features)[:, :33]  # 66 rows > max_rows, a non-contiguous view
    elsewhere = {}
    with torch.inference_mode():
        mkl = linear(x)
        with packed.onednn_products():
            fast = linear(x)
            worker = threading.Thread(target=lambda: elsewhere.setdefault("y", linear(x)))
            worker.start()
            worker.join()
            few = linear(x[:1, :3])  # a few rows keep the codes
        assert linear in packed._ONEDNN_WEIGHTS
        torch.testing.assert_close(fast, mkl, rtol=1e-5, atol=1e-5)
        assert torch.equal(elsewhere["y"], mkl)
        torch.testing.assert_close(few, mkl[:1, :3], rtol=1e-5, atol=1e-5)
        batch = pad_left([list(range(3, 40))], pad_id=0, device="cpu")
        identity = resolve_programs(lm, Program.full(lm.num_layers), 1)
        with packed.onednn_products():
            own = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            torch.testing.assert_close(forward_logits(lm, batch, identity), own, rtol=0, atol=0)
    copy.deepcopy(lm.model)  # the packed copy does not get in the way of copies
