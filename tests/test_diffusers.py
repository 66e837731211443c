"""The diffusers transformers, built small with random weights, under backend="lynx"."""

import re

import pytest
import torch
from conftest import relative_error
from test_backend import reference_forward

import lynx_compile
from lynx_compile.tools.workloads import diffusers_workload

pytest.importorskip("diffusers")

B = 2


# One block where every block is alike (compile time grows with depth); SD3 keeps two, its last
# block (context_pre_only) being of another kind than the first.
CONFIGS = {
    "dit": ("DiTTransformer2DModel", dict(num_attention_heads=2, attention_head_dim=64, in_channels=4, num_layers=1,
                                          sample_size=8, patch_size=2, num_embeds_ada_norm=10)),
    "pixart": ("PixArtTransformer2DModel", dict(num_attention_heads=2, attention_head_dim=64, in_channels=4, out_channels=8,
                                                num_layers=1, cross_attention_dim=128, sample_size=8, patch_size=2,
                                                caption_channels=32)),
    "sd3": ("SD3Transformer2DModel", dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=64,
                                          num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=128,
                                          pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16)),
    "flux": ("FluxTransformer2DModel", dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                            attention_head_dim=64, num_attention_heads=2, joint_attention_dim=32,
                                            pooled_projection_dim=16,
                                            guidance_embeds=True, axes_dims_rope=(16, 24, 24), sample_size=4)),
}


# The layers the paper's roles select: q/k/v projections (incl. the text stream's and
# cross-attention's) and feed-forward up/down, Flux's single-block MLP up and fused output.
SPARSE = {
    "dit": r"transformer_blocks\.\d\.(attn1\.to_[qkv]|ff\.net\.(0\.proj|2))",
    "pixart": r"transformer_blocks\.\d\.(attn[12]\.to_[qkv]|ff\.net\.(0\.proj|2))",
    "sd3": r"transformer_blocks\.\d\.(attn\.(to_[qkv]|add_[qkv]_proj)|ff(_context)?\.net\.(0\.proj|2))",
    "flux": r"(transformer_blocks\.0\.(attn\.(to_[qkv]|add_[qkv]_proj)|ff(_context)?\.net\.(0\.proj|2))"
    r"|single_transformer_blocks\.0\.(attn\.to_[qkv]|proj_mlp|proj_out))",
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request):
    torch._dynamo.reset()  # every model compiles DiffusersSample.forward: keep its cache entries apart
    torch.manual_seed(0)
    workload = diffusers_workload(*CONFIGS[request.param], batch=B, text_tokens=7)
    backend = lynx_compile.backend(min_features=0)
    compiled = torch.compile(workload.model, backend=backend, fullgraph=True, dynamic=True)
    return request.param, workload, backend, compiled


def test_selects_the_papers_roles(case):
    name, workload, _, _ = case
    report = lynx_compile.explain(workload.model, **workload.kwargs, config=lynx_compile.LynxConfig(min_features=0))
    linears = {n for n, m in workload.model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {l.name for l in report.layers} == linears
    expected = {n for n in linears if re.fullmatch(f"model\\.{SPARSE[name]}", n)}
    assert {l.name for l in report.sparse} == expected
    assert report.graphs == 1


def test_compiled_output_matches_the_reference_and_batch_changes_do_not_recompile(case):
    _, workload, backend, compiled = case
    for batch in (2, 3, 4):
        _, inputs = workload.make_inputs(batch)
        with torch.no_grad():
            out = compiled(**inputs)
        sparse = [l.name for l in backend.report.sparse]
        expected = reference_forward(workload.model, [], sparse, **inputs)
        # Against the eager reference: Inductor's fp32 reassociation flips near-tied top-2 choices (test_backend
        # compares with an Inductor-compiled reference to 1e-4).
        assert relative_error(out, expected) < 2e-3
    assert backend.report.graphs == 1


def test_resolution_and_text_length_changes_do_not_recompile(case):
    name, workload, _, _ = case
    if name == "dit":
        pytest.skip("diffusers' DiT has a fixed position-embedding grid (sample_size)")
    torch._dynamo.reset()
    backend = lynx_compile.LynxBackend(lynx_compile.LynxConfig(min_features=0), inductor=False)
    compiled = torch.compile(workload.model, backend=backend, dynamic=True, fullgraph=True)
    # The first shapes avoid sizes equal to a weight dim (duck shaping: README, limits), and none
    # is the config's own 64 px, for which diffusers' PatchEmbed takes another Python branch.
    shapes = [(2, 48, 7), (3, 80, 7), (2, 96, 11), (3, 112, 13)]
    with torch.no_grad():
        for batch, resolution, text in shapes:
            _, inputs = workload.make_inputs(batch, resolution, text)
            assert compiled(**inputs).shape[0] == batch
    assert backend.report.graphs == 1


def _regional_flux():
    torch._dynamo.reset()
    torch.manual_seed(0)
    return diffusers_workload(*CONFIGS["flux"], batch=B, text_tokens=7)


def test_regional_compilation_sparsifies_every_block_and_matches_the_reference():
    """diffusers' compile_repeated_blocks: one graph per block class, run by every instance.
    The lynx passes without Inductor, which the flux case above runs on the whole model."""
    workload = _regional_flux()
    backend = lynx_compile.LynxBackend(lynx_compile.LynxConfig(min_features=0), inductor=False)
    workload.model.model.compile_repeated_blocks(backend=backend, fullgraph=True, dynamic=True)
    with torch.no_grad():
        out = workload.model(**workload.kwargs)
    linears = [n for n, m in workload.model.named_modules() if isinstance(m, torch.nn.Linear)]
    sparse = [n for n in linears if re.fullmatch(f"model\\.{SPARSE['flux']}", n)]
    # Names run from the block down: the double block's and the single block's graph.
    block_names = {re.sub(r"^model\.(single_)?transformer_blocks\.0\.", "", n) for n in sparse}
    assert {l.name for l in backend.report.sparse} == block_names
    expected = reference_forward(workload.model, [], sparse, **workload.kwargs)
    assert relative_error(out, expected) < 2e-3


@pytest.mark.parametrize("setting", ["sensitivity", "compensation_state"])
def test_regional_compilation_rejects_settings_keyed_by_the_whole_models_names(setting):
    workload = _regional_flux()
    q = workload.model.model.transformer_blocks[0].attn.to_q
    name = "model.transformer_blocks.0.attn.to_q"
    if setting == "sensitivity":
        config = dict(sensitivity={name: 0.5}, dense_flop_budget=0.3)
    else:
        r = 4
        factors = (torch.zeros(r, q.in_features), torch.zeros(q.out_features, r))
        config = dict(compensation="lora", compensation_state={name: factors})
    workload.model.model.compile_repeated_blocks(backend=lynx_compile.backend(min_features=0, **config), fullgraph=True)
    with pytest.raises(Exception, match="regional compilation"), torch.no_grad():
        workload.model(**workload.kwargs)
