"""The diffusers transformers, built small with random weights, under backend="lynx"."""

import re

import pytest
import torch
from conftest import relative_error
from test_backend import reference_forward

import lynx_compile

diffusers = pytest.importorskip("diffusers")

B = 2


def dit():
    model = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=64, in_channels=4, num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10
    )
    return model, lambda b, g: dict(
        hidden_states=torch.randn(b, 4, 8, 8, generator=g),
        timestep=torch.randint(0, 1000, (b,), generator=g),
        class_labels=torch.randint(0, 10, (b,), generator=g),
    )


def pixart():
    model = diffusers.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=64, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=128, sample_size=8, patch_size=2, caption_channels=32,
    )
    return model, lambda b, g: dict(
        hidden_states=torch.randn(b, 4, 8, 8, generator=g),
        encoder_hidden_states=torch.randn(b, 7, 32, generator=g),
        timestep=torch.randint(0, 1000, (b,), generator=g),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    )


def sd3():
    model = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=64, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=128, pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16,
    )
    return model, lambda b, g: dict(
        hidden_states=torch.randn(b, 4, 8, 8, generator=g),
        encoder_hidden_states=torch.randn(b, 7, 32, generator=g),
        pooled_projections=torch.randn(b, 16, generator=g),
        timestep=torch.randint(0, 1000, (b,), generator=g),
    )


def flux():
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=64, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(16, 24, 24),
    )
    return model, lambda b, g: dict(
        hidden_states=torch.randn(b, 16, 16, generator=g),
        encoder_hidden_states=torch.randn(b, 7, 32, generator=g),
        pooled_projections=torch.randn(b, 16, generator=g),
        timestep=torch.rand(b, generator=g),
        img_ids=torch.randn(16, 3, generator=g),
        txt_ids=torch.zeros(7, 3),
        guidance=torch.full((b,), 3.5),
    )


# The layers the paper's roles select: q/k/v projections (incl. the text stream's and
# cross-attention's) and feed-forward up/down, Flux's single-block MLP up and fused output.
SPARSE = {
    dit: r"transformer_blocks\.\d\.(attn1\.to_[qkv]|ff\.net\.(0\.proj|2))",
    pixart: r"transformer_blocks\.\d\.(attn[12]\.to_[qkv]|ff\.net\.(0\.proj|2))",
    sd3: r"transformer_blocks\.\d\.(attn\.(to_[qkv]|add_[qkv]_proj)|ff(_context)?\.net\.(0\.proj|2))",
    flux: r"(transformer_blocks\.0\.(attn\.(to_[qkv]|add_[qkv]_proj)|ff(_context)?\.net\.(0\.proj|2))"
    r"|single_transformer_blocks\.0\.(attn\.to_[qkv]|proj_mlp|proj_out))",
}


class Wrapper(torch.nn.Module):
    """Returns the sample tensor, so every model compares the same way."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, **kwargs):
        return self.model(**kwargs, return_dict=False)[0]


@pytest.fixture(scope="module", params=[dit, pixart, sd3, flux], ids=lambda f: f.__name__)
def case(request):
    torch._dynamo.reset()  # every model compiles Wrapper.forward: keep its cache entries apart
    torch.manual_seed(0)
    model, make_inputs = request.param()
    wrapper = Wrapper(model.eval())
    backend = lynx_compile.backend(min_features=0)
    compiled = torch.compile(wrapper, backend=backend, fullgraph=True, dynamic=True)
    return request.param, wrapper, make_inputs, backend, compiled


def test_selects_the_papers_roles(case):
    factory, wrapper, make_inputs, _, _ = case
    report = lynx_compile.explain(wrapper, **make_inputs(B, torch.Generator().manual_seed(0)), config=lynx_compile.LynxConfig(min_features=0))
    linears = {f"model.{n}" for n, m in wrapper.model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {l.name for l in report.layers} == linears
    expected = {name for name in linears if re.fullmatch(f"model\\.{SPARSE[factory]}", name)}
    assert {l.name for l in report.sparse} == expected
    assert report.graphs == 1


def test_compiled_output_matches_the_reference_and_batch_changes_do_not_recompile(case):
    _, wrapper, make_inputs, backend, compiled = case
    for batch in (2, 3, 4):
        inputs = make_inputs(batch, torch.Generator().manual_seed(batch))
        with torch.no_grad():
            out = compiled(**inputs)
        sparse = [l.name for l in backend.report.sparse]
        expected = reference_forward(wrapper, [], sparse, compiler="inductor" if batch == 2 else None, **inputs)
        # See test_backend: Inductor's fp32 reassociation flips near-tied top-2 choices.
        assert relative_error(out, expected) < (1e-4 if batch == 2 else 2e-3)
    assert backend.report.graphs == 1
