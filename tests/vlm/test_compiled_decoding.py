"""Compiled decoding: `generate(cache_implementation="static", compile_config=...)` compiles the decoding forward
(hooks and attention function included) with torch.compile. VAR and GIFT must trace into one graph without a break
and decode every step (and the next prompt of the same shape) without a recompile; identity settings reproduce plain
compiled decoding and editing settings the same intervention in eager dynamic-cache decoding. Pruning asks for the
dynamic cache. The "eager" dynamo backend traces as inductor would (graph breaks and guards are the backend's
inputs) and keeps the CPU tests fast and the logits comparable."""

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters
from transformers import CompileConfig

from mmattn import vlm
from mmattn.kernels import backend_info

from .tiny_models import MODEL_TYPES, llava_inputs, tiny_inputs, tiny_llava, tiny_model, with_question

NEW_TOKENS = 6


IDENTITY = {
    "VAR": vlm.VAR(p=0.0, tau=1.0, rho=0.0, min_visual_mass=0.0, sink_dims=(0, 1)),
    "GIFT": vlm.GIFT(alpha=0.0, beta=1.0, saliency_layers=(1,), enhance_layers=(2, 3)),
}
EDITING = {
    "VAR": vlm.VAR(p=0.6, tau=1.0, rho=0.0, min_visual_mass=0.0, sink_dims=(0, 1)),
    "GIFT": vlm.GIFT(alpha=3.0, beta=1.5, saliency_layers=(1,), enhance_layers=(2, 3)),
    # the saliency layer follows an enhancement layer: an extra (eager) prefill pass of the decoder
    "GIFT-extra-pass": vlm.GIFT(alpha=3.0, saliency_layers=(2,), enhance_layers=(1, 3)),
}


@pytest.fixture
def dynamo():
    """A clean dynamo state (compiled code, counters) before and after the test; dynamo config changes are made with
    `torch._dynamo.config.patch`, which undoes them."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
    counters.clear()


def compile_config(fullgraph: bool = True) -> CompileConfig:
    """What a user passes to compile the decoding steps on any device (transformers compiles on CUDA by itself)."""
    config = CompileConfig(backend="eager", fullgraph=fullgraph)
    config._compile_all_devices = True  # transformers' switch to compile off accelerators (here: the CPU)
    return config


def generate(model, inputs, compiled: bool, **kwargs):
    kwargs = {"max_new_tokens": NEW_TOKENS, "do_sample": False, "return_dict_in_generate": True,
              "output_logits": True, **kwargs}
    if compiled:
        kwargs.update(cache_implementation="static", compile_config=kwargs.pop("compile_config", compile_config()))
    return model.generate(**inputs, **kwargs)


def model_and_prompts(attn_implementation: str = "eager", prompts: int = 1):
    """A 4-layer tiny LLaVA with 16 image tokens and a 10-token question (GIFT's query span); two prompts are
    left-padded."""
    model = tiny_llava(layers=4, attn_implementation=attn_implementation, image_tokens=16)
    pad = (2,) if prompts > 1 else ()
    return model, with_question(llava_inputs(model, prompts=prompts, pad=pad))


def assert_same_decoding(out, expected, exact: bool = False):
    assert torch.equal(out.sequences, expected.sequences)
    for got, want in zip(out.logits, expected.logits, strict=True):
        if exact:
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(IDENTITY))
def test_identity_settings_reproduce_plain_compiled_decoding(name, dynamo):
    model, inputs = model_and_prompts()
    plain = generate(model, inputs, compiled=True)
    torch._dynamo.reset()
    with vlm.apply(model, IDENTITY[name]):
        assert_same_decoding(generate(model, inputs, compiled=True), plain, exact=True)
    # removed: the compiled step's guards see the hooks and attention function gone
    assert_same_decoding(generate(model, inputs, compiled=True), plain, exact=True)


@pytest.mark.parametrize(("name", "attn_implementation", "prompts"), [
    ("VAR", "eager", 2), ("VAR", "sdpa", 1), ("GIFT", "eager", 1), ("GIFT", "sdpa", 2), ("GIFT-extra-pass", "sdpa", 1),
])
def test_compiled_static_decoding_matches_eager_dynamic_decoding(name, attn_implementation, prompts, dynamo):
    """Under the SDPA base the prefill of an empty static cache passes no mask (keys past the prompt are unwritten
    slots, hidden by SDPA's upper-left causal alignment): the explicit rows must hide them too."""
    model, inputs = model_and_prompts(attn_implementation, prompts)
    plain = generate(model, inputs, compiled=False)
    with vlm.apply(model, EDITING[name]):
        eager = generate(model, inputs, compiled=False)
        compiled = generate(model, inputs, compiled=True)
    assert_same_decoding(compiled, eager)
    # the intervention acts in the compiled decoding steps, not only in the prefill
    assert not all(torch.allclose(a, b) for a, b in zip(eager.logits[1:], plain.logits[1:]))


@pytest.mark.parametrize("name", ["VAR", "GIFT"])
def test_decoding_steps_add_no_graph_break_and_no_recompile(name, dynamo):
    """One graph for every decoding step of a call, no graph break, and the next prompt of the same shape reuses it:
    no Python-side per-step state (step counters, host reads of tensors) enters the compiled step."""
    model, inputs = model_and_prompts()
    with vlm.apply(model, EDITING[name]):
        generate(model, inputs, compiled=True, compile_config=compile_config(fullgraph=False), max_new_tokens=8)
        assert dict(counters["graph_break"]) == {}
        assert counters["stats"]["unique_graphs"] == 1  # 7 decoding steps, one graph
        other = with_question(llava_inputs(model, seed=5))
        with torch._dynamo.config.patch(error_on_recompile=True):
            generate(model, other, compiled=True, compile_config=compile_config(fullgraph=False), max_new_tokens=8)
        assert counters["stats"]["unique_graphs"] == 1
        assert dict(counters["graph_break"]) == {}


@pytest.mark.parametrize("family", MODEL_TYPES)
def test_var_and_gift_together_decode_compiled_on_every_family(family, dynamo):
    """Qwen's multi-axis positions, InternVL, Gemma 3's sliding-window layers (a static sliding cache), anyres LLaVA:
    both interventions in one apply, traced with fullgraph=True, as they decode eagerly with the dynamic cache."""
    model = tiny_model(family, layers=4)
    inputs = with_question(tiny_inputs(model))
    with vlm.apply(model, EDITING["VAR"], EDITING["GIFT"]):
        eager = generate(model, inputs, compiled=False, max_new_tokens=4)
        compiled = generate(model, inputs, compiled=True, max_new_tokens=4)
    assert_same_decoding(compiled, eager)
    assert dict(counters["graph_break"]) == {}


@pytest.mark.skipif(not backend_info("cpu")["triton"][0], reason="needs Triton's interpreter (TRITON_INTERPRET=1)")
@pytest.mark.parametrize("name", ["VAR", "GIFT"])
def test_fused_triton_decode_rows_are_custom_ops_of_the_compiled_step(name, dynamo):
    """backend="triton": each decoding step's edited rows run the column-set kernels (custom ops, two prompts,
    left-padded: the static cache's unwritten slots and the padding are invisible keys) in one graph without a
    break or a recompile, as the same kernels decode eagerly with the dynamic cache."""
    model, inputs = model_and_prompts("sdpa", prompts=2)
    with vlm.apply(model, EDITING[name], backend="triton"):
        eager = generate(model, inputs, compiled=False)
        compiled = generate(model, inputs, compiled=True, compile_config=compile_config(fullgraph=False))
        assert dict(counters["graph_break"]) == {}
        assert counters["stats"]["unique_graphs"] == 1
    assert_same_decoding(compiled, eager)
    with vlm.apply(model, EDITING[name], backend="torch"):
        explicit = generate(model, inputs, compiled=False)
    assert_same_decoding(compiled, explicit)


@pytest.mark.skipif(not backend_info("cpu")["triton"][0], reason="needs Triton's interpreter (TRITON_INTERPRET=1)")
def test_fused_triton_rows_take_the_column_sets_as_one_input_of_the_compiled_step(dynamo):
    """CUDA graphs copy each graph input that is not a parameter at every replay: VAR and GIFT hand the fused
    decoding rows their column sets of every edited layer as one tensor, not one per layer."""
    inputs_per_graph = []

    def backend(graph, example_inputs):
        inputs_per_graph.append(len(example_inputs))
        return graph.forward

    config = CompileConfig(backend=backend, fullgraph=True, mode=None)
    config._compile_all_devices = True
    model, inputs = model_and_prompts("sdpa")
    counts = {}
    for name in ("plain", "VAR", "GIFT"):
        torch._dynamo.reset()
        inputs_per_graph.clear()
        handle = None if name == "plain" else vlm.apply(model, EDITING[name], backend="triton")
        generate(model, inputs, compiled=True, compile_config=config)
        counts[name] = list(inputs_per_graph)
        if handle is not None:
            handle.remove()
    assert counts["VAR"] == counts["GIFT"] == [counts["plain"][0] + 1]  # VAR edits layers 2 and 3, GIFT 2 and 3


def test_pruning_with_a_static_cache_asks_for_the_dynamic_cache(dynamo):
    model, inputs = model_and_prompts()
    with vlm.apply(model, vlm.FastV(k=1, ratio=0.5)):
        with pytest.raises(ValueError, match=r"cache_implementation: FastV .* needs the dynamic cache"):
            generate(model, inputs, compiled=True)
        generate(model, inputs, compiled=False)  # the handle still serves the dynamic cache
    model.generation_config.cache_implementation = "static"
    with pytest.raises(ValueError, match=r"cache_implementation: PyramidDrop .*got generation_config"):
        vlm.apply(model, vlm.PyramidDrop(layers=(2,)))
