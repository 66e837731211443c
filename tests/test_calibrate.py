"""Calibration on CPU: LoRA factors, their folding into the compiled graph, sensitivity-driven selection."""

import pytest
import torch
import torch.nn.functional as F
from conftest import masked_reference, relative_error

import lynx_compile
from lynx_compile import LynxConfig
from lynx_compile.models import build, example_inputs

SELECTION = {"min_features": 64}
"""hidden 128 is below the default min_features: lowered so the tiny model has sparse layers."""


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """On a busy 2-core machine two torch threads spin-wait on each other and this module's
    forwards run several times slower than on one (the fits' eigensolvers already use one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dit():
    torch.manual_seed(0)
    return build("dit-s-2", depth=2, hidden=128).eval()


@pytest.fixture(scope="module")
def comp(dit):
    batches = [example_inputs(dit, batch=2, seed=seed) for seed in range(3)]
    return lynx_compile.calibrate(dit, batches, LynxConfig(**SELECTION), rank=16, max_rows=1024, progress=False)


def lora_reference(model, inputs, comp, n=2, m=4):
    """Eager ``model`` whose calibrated layers compute s*S(x)W^T + x A^T B^T + b in hooks, with
    the masking of ``masked_reference`` (no lynx code)."""

    def replace_output(name):
        down, up = comp[name]

        def hook(module, args, output):
            x = args[0]
            return F.linear(masked_reference(x, n, m, True), module.weight, module.bias) + x @ down.t() @ up.t()

        return hook

    modules = dict(model.named_modules())
    handles = [modules[name].register_forward_hook(replace_output(name)) for name in comp]
    try:
        with torch.no_grad():
            return model(*inputs)
    finally:
        for handle in handles:
            handle.remove()


def capture_inputs(model, names, inputs):
    captured, modules = {}, dict(model.named_modules())
    handles = [
        modules[name].register_forward_pre_hook(lambda mod, args, name=name: captured.__setitem__(name, args[0]))
        for name in names
    ]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def test_norm_compensation_restores_each_token_norm_at_layer_level():
    torch.manual_seed(0)
    x = torch.randn(3, 7, 64, dtype=torch.float64)
    layer = torch.nn.Linear(64, 64, bias=False).double()
    q, _ = torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64))
    layer.weight.data.copy_(q)  # orthogonal W: ||x~ W^T|| = ||x~||, so the output carries s * ||x~||
    out = torch.ops.lynx.sparse_linear(x, layer.weight, None, 2, 4, True)
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1), rtol=1e-12, atol=0)
    plain = torch.ops.lynx.sparse_linear(x, layer.weight, None, 2, 4, False)
    assert (plain.norm(dim=-1) < x.norm(dim=-1)).all()


def test_calibration_covers_exactly_the_backends_sparse_layers(dit, comp):
    report = lynx_compile.explain(dit, *example_inputs(dit, batch=2), config=LynxConfig(**SELECTION))
    assert sorted(comp) == sorted(layer.name for layer in report.sparse) and len(comp) == 6
    for name, (down, up) in comp.items():
        layer = comp.layers[name]
        assert down.shape == (16, layer.in_features) and up.shape == (layer.out_features, 16)
        assert layer.rows_train + layer.rows_heldout == 1024 and layer.pattern == "2:4"


def test_lora_lowers_each_layers_error_on_heldout_activations(dit, comp):
    for layer in comp.layers.values():
        assert layer.error_lora < layer.error_norm, layer
    # Independently of calibrate's bookkeeping: activations of a batch calibration never saw.
    captured = capture_inputs(dit, list(comp), example_inputs(dit, batch=2, seed=100))
    modules = dict(dit.named_modules())
    for name, x in captured.items():
        weight, bias = modules[name].weight, modules[name].bias
        dense = F.linear(x, weight, bias)
        norm = F.linear(masked_reference(x, 2, 4, True), weight, bias)
        down, up = comp[name]
        assert relative_error(norm + x @ down.t() @ up.t(), dense) < relative_error(norm, dense), name


def test_folded_graph_matches_the_unfolded_eager_computation(dit, comp):
    graphs = []
    recorder = lynx_compile.LynxBackend(comp.config(), inductor=False)

    def backend(gm, example_inputs):
        compiled = recorder(gm, example_inputs)
        graphs.append(gm)
        return compiled

    torch._dynamo.reset()
    inputs = example_inputs(dit, batch=2, seed=7)
    with torch.no_grad():
        out = torch.compile(dit, backend=backend, fullgraph=True)(*inputs)
    torch._dynamo.reset()
    assert relative_error(out, lora_reference(dit, inputs, comp)) < 1e-5
    # One lynx.sparse_linear_lora per sparse layer, carrying its packed weight and down-projection;
    # nothing else reads them, and no separate LoRA GEMM is left in the graph.
    (gm,) = graphs
    calls = [node for node in gm.graph.nodes if node.target is torch.ops.lynx.sparse_linear_lora.default]
    assert len(calls) == len(recorder.report.sparse) == len(comp)
    factors = {node for node in gm.graph.nodes if node.op == "get_attr" and "lora" in str(node.target)}
    assert len(factors) == 2 * len(comp)
    assert all(node.args[1] in factors and node.args[7] in factors for node in calls)
    assert not [node for node in gm.graph.nodes if node.target in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default,
                                                                   torch.ops.lynx.sparse_linear.default)]
    assert all(set(node.users) <= set(calls) for node in factors)
    assert {layer.compensation for layer in recorder.report.sparse} == {"lora"}


def test_inductor_compiled_lora_model_matches_the_eager_reference(dit, comp):
    torch._dynamo.reset()
    inputs = example_inputs(dit, batch=2, seed=8)
    with torch.no_grad():
        out = torch.compile(dit, backend=lynx_compile.backend(comp.config()))(*inputs)
        norm_only = lynx_compile.LynxBackend(LynxConfig(**SELECTION), inductor=False)
        torch._dynamo.reset()
        without_lora = torch.compile(dit, backend=norm_only)(*inputs)
    torch._dynamo.reset()
    expected = lora_reference(dit, inputs, comp)
    # Inductor reassociates fp32 sums, which can flip near-tied top-2 picks (see test_backend).
    assert relative_error(out, expected) < 2e-3
    assert relative_error(without_lora, expected) > 10 * relative_error(out, expected)


def test_bad_inputs_raise_clear_errors(dit, comp):
    with pytest.raises(ValueError, match="batches is empty"):
        lynx_compile.calibrate(dit, [], progress=False)
    with pytest.raises(ValueError, match="rank must be an int > 0"):
        lynx_compile.calibrate(dit, [example_inputs(dit)], rank=0, progress=False)
    with pytest.raises(ValueError, match="no nn.Linear layer"):  # default min_features: nothing sparse
        lynx_compile.calibrate(dit, [example_inputs(dit)], progress=False)
    with pytest.raises(ValueError, match=r"LynxConfig.compensation_state\['a'\]"):
        LynxConfig(compensation="lora", compensation_state={"a": (torch.zeros(4, 8), torch.zeros(8, 3))})
    with pytest.raises(ValueError, match="calibrated for pattern 2:4, but pattern is 1:4"):
        comp.config(pattern="1:4")
    with pytest.raises(ValueError, match="LynxConfig.sensitivity"):
        LynxConfig(max_layer_error=0.2)
    with pytest.raises(ValueError, match="LynxConfig.dense_flop_budget"):
        LynxConfig(sensitivity=comp.sensitivity(), dense_flop_budget=1.5)


def test_factors_of_another_model_are_refused_naming_the_layer(comp):
    torch.manual_seed(0)
    wider = build("dit-s-2", depth=2, hidden=192).eval()
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"LoRA factors of layer 'blocks\.0\.attn\.qkv' do not fit its weight \(576, 192\)"):
        lynx_compile.explain(wider, *example_inputs(wider), config=comp.config())
    other = torch.nn.Sequential(torch.nn.LayerNorm(128), torch.nn.Linear(128, 512), torch.nn.GELU(), torch.nn.Linear(512, 128))
    with pytest.raises(Exception, match=r"LoRA factors for none of this graph's 1 sparse layer\(s\) \(e.g. '1'"):
        lynx_compile.explain(other, torch.randn(2, 8, 128), config=comp.config())
    torch._dynamo.reset()


def test_max_layer_error_keeps_the_too_sensitive_layers_dense(dit, comp):
    sensitivity = comp.sensitivity("lora")  # what comp.config() ranks by: the whole-model errors
    errors = sorted(sensitivity.values())
    threshold = (errors[2] + errors[3]) / 2
    report = lynx_compile.explain(dit, *example_inputs(dit), config=comp.config(max_layer_error=threshold))
    dense = {layer.name for layer in report.dense if layer.reason.startswith("sensitivity")}
    assert dense == {name for name, error in sensitivity.items() if error > threshold} and len(dense) == 3
    layer = next(layer for layer in report.layers if layer.name in dense)
    assert layer.reason == f"sensitivity: error {layer.error:.3g} > max_layer_error {threshold:g}"
    assert "error" in report.table().splitlines()[0]
    assert {layer.error for layer in report.layers if layer.name in comp} == set(sensitivity.values())


def test_flop_budget_keeps_the_most_sensitive_flops_dense(dit):
    # Hand-made sensitivities: the qkv layers (K=128 -> 384) most, then fc2, then fc1 (128 -> 512).
    sensitivity = {"blocks.0.attn.qkv": 0.5, "blocks.1.attn.qkv": 0.4, "blocks.0.mlp.fc2": 0.3,
                   "blocks.1.mlp.fc2": 0.2, "blocks.0.mlp.fc1": 0.1, "blocks.1.mlp.fc1": 0.05}
    # qkv is 3/11 of a block's sparse FLOPs: both qkv fit 0.3, a third layer would not.
    config = LynxConfig(**SELECTION, sensitivity=sensitivity, dense_flop_budget=0.3)
    report = lynx_compile.explain(dit, *example_inputs(dit), config=config)
    dense = {layer.name: layer.reason for layer in report.dense if layer.reason.startswith("sensitivity")}
    assert set(dense) == {"blocks.0.attn.qkv", "blocks.1.attn.qkv"}
    assert "among the most sensitive 27% of sparse-layer FLOPs" in dense["blocks.1.attn.qkv"]
    # With a threshold too, only layers above it may take the budget.
    config = LynxConfig(**SELECTION, sensitivity=sensitivity, dense_flop_budget=0.3, max_layer_error=0.45)
    report = lynx_compile.explain(dit, *example_inputs(dit), config=config)
    assert {layer.name for layer in report.dense if layer.reason.startswith("sensitivity")} == {"blocks.0.attn.qkv"}


@pytest.mark.parametrize("compensation", ["norm", "lora"])
def test_whole_model_error_is_the_model_with_that_layer_alone_sparse(dit, comp, compensation):
    """calibrate's per-layer whole-model error, recomputed independently: the backend with
    ``include`` set to that one layer, against the dense model, on the same batches."""
    from lynx_compile.backend import LynxBackend

    batches = [example_inputs(dit, batch=2, seed=seed) for seed in range(3)]
    dense = [dit(*batch) for batch in batches]
    measured = comp.model_sensitivity(compensation)
    assert set(measured) == set(comp)
    for name in ("blocks.0.mlp.fc1", "blocks.1.attn.qkv"):
        config = comp.config(include=f"^{name}$", compensation=compensation)
        torch._dynamo.reset()
        alone = torch.compile(dit, backend=LynxBackend(config, inductor=False))
        with torch.no_grad():
            errors = [relative_error(alone(*batch), reference) for batch, reference in zip(batches, dense)]
        assert measured[name] == pytest.approx(sum(errors) / len(errors), rel=1e-3)
    torch._dynamo.reset()


def test_whole_model_sensitivity_drives_the_budget(dit, comp):
    measured = comp.model_sensitivity()
    worst = max(measured, key=measured.get)
    assert worst.endswith("fc1")  # 2/11 of the sparse FLOPs: the only layer that fits 0.2
    for config in (comp.config(sensitivity=measured, dense_flop_budget=0.2), comp.config(dense_flop_budget=0.2)):
        report = lynx_compile.explain(dit, *example_inputs(dit), config=config)
        assert {layer.name for layer in report.dense if layer.reason.startswith("sensitivity")} == {worst}
    assert comp.config(compensation="norm").sensitivity == comp.model_sensitivity("norm")
    assert comp.sensitivity("lora") == measured and comp.layer_sensitivity != measured
    assert "model error" in comp.table().splitlines()[0]
    without = lynx_compile.calibrate(dit, [example_inputs(dit)], LynxConfig(**SELECTION), rank=4, model_batches=0, progress=False)
    with pytest.raises(ValueError, match="not measured; calibrate with model_batches > 0"):
        without.model_sensitivity()
    assert without.sensitivity("lora") == without.layer_sensitivity  # the fallback ranking
    with pytest.raises(ValueError, match="model_batches must be an int >= 0"):
        lynx_compile.calibrate(dit, [example_inputs(dit)], model_batches=-1, progress=False)
