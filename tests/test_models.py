import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounter

from lynx_compile.models import NAMES, build, example_inputs
from lynx_compile.models.mmdit import pack_latents, square_grid_ids, unpack_latents

# Tiny configs per family, with (resolution, text_tokens) for example_inputs.
TINY = {
    "dit": ("dit-s-2", dict(depth=2, hidden=64, input_size=8), 64, None),
    "pixart": ("pixart-xl-2", dict(depth=2, hidden=64, caption_channels=32, input_size=8), 64, 8),
    "mmdit": ("mmdit-tiny", dict(hidden=64, context_dim=32, vec_dim=24), 64, 8),
}


@pytest.fixture(autouse=True)
def single_thread():
    # The models here are tiny: intra-op threads only add overhead (and thrash on a busy machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(family, seed=0, **extra):
    name, kw, res, txt = TINY[family]
    torch.manual_seed(seed)
    model = build(name, **{**kw, **extra})
    return model, dict(resolution=res, text_tokens=txt)


def expected_shape(model, args):
    if model.lynx_name == "mmdit-tiny":
        return args[0].shape
    x = args[0]
    return (x.shape[0], 2 * x.shape[1], *x.shape[2:])


def test_names():
    assert NAMES == ("dit-s-2", "dit-b-2", "dit-l-2", "dit-xl-2", "pixart-xl-2", "flux-dev", "mmdit-tiny")


@pytest.mark.parametrize("family", TINY)
def test_forward_shape_and_determinism(family):
    model, ex = tiny(family)
    args = example_inputs(model, batch=2, **ex)
    out = model(*args)
    assert out.shape == expected_shape(model, args)
    assert torch.isfinite(out).all() and 0.1 < out.std() < 10

    again, _ = tiny(family)
    assert torch.equal(again(*example_inputs(model, batch=2, **ex)), out)
    other, _ = tiny(family, seed=1)
    assert not torch.allclose(other(*args), out)
    assert not torch.equal(example_inputs(model, batch=2, seed=1, **ex)[0], args[0])


@pytest.mark.parametrize("family", TINY)
def test_every_parameter_matters(family):
    # Non-zero init: a fresh model's output depends on every weight (no adaLN-Zero).
    model, ex = tiny(family)
    model(*example_inputs(model, batch=2, **ex)).square().mean().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead


@pytest.mark.parametrize("family", TINY)
def test_activations_stay_order_one_through_depth(family):
    name, kw, res, txt = TINY[family]
    torch.manual_seed(0)
    model = build(name, **{**kw, "depth": 24})
    with torch.no_grad():
        out = model(*example_inputs(model, batch=1, resolution=res, text_tokens=txt))
    assert 0.2 < out.std() < 5


def test_digits_dit_config():
    torch.manual_seed(0)
    model = build("dit-s-2", depth=2, hidden=48, heads=3, input_size=8, in_channels=1, num_classes=10, learn_sigma=False)
    x, t, y = example_inputs(model, batch=5)
    assert x.shape == (5, 1, 8, 8) and y.max() < 10
    assert model(x, t.float(), y).shape == (5, 1, 8, 8)
    assert model.y_embedder.num_embeddings == 11  # + null class


def test_example_inputs_defaults_and_dtype():
    shapes = lambda name: [tuple(a.shape) for a in example_inputs(name)]
    assert shapes("dit-xl-2") == [(1, 4, 32, 32), (1,), (1,)]
    assert shapes("pixart-xl-2") == [(1, 4, 128, 128), (1,), (1, 120, 4096)]
    assert shapes("flux-dev") == [(1, 4096, 64), (1, 512, 4096), (1,), (1, 768), (1,)]
    img, txt, t, y, g = example_inputs("flux-dev", batch=2, resolution=512, text_tokens=77, dtype=torch.bfloat16)
    assert img.shape == (2, 1024, 64) and txt.shape == (2, 77, 4096)
    assert img.dtype == txt.dtype == y.dtype == torch.bfloat16 and t.dtype == g.dtype == torch.float32
    with pytest.raises(ValueError, match="input_size=64"):
        example_inputs("dit-xl-2", resolution=512)


def test_full_size_parameter_counts():
    with torch.device("meta"):
        counts = {n: sum(p.numel() for p in build(n).parameters()) for n in ("dit-xl-2", "pixart-xl-2", "flux-dev")}
    assert abs(counts["dit-xl-2"] / 675e6 - 1) < 0.01
    assert abs(counts["pixart-xl-2"] / 611e6 - 1) < 0.01
    assert abs(counts["flux-dev"] / 11.9e9 - 1) < 0.01


def test_config_is_remembered_and_heads_follow_hidden():
    model = build("dit-b-2", depth=1, hidden=128)
    assert model.lynx_name == "dit-b-2" and model.config.hidden == 128 and model.config.heads == 2
    flux = build("flux-dev", depth=1, single_depth=1, hidden=64, context_dim=8, vec_dim=8)
    assert flux.config.heads == 1 and flux.config.rope_axes == (8, 28, 28)
    assert build("flux-dev", depth=0, single_depth=0, hidden=256, context_dim=8).config.rope_axes == (16, 56, 56)


def test_bad_name_and_override():
    with pytest.raises(ValueError, match="dit-xl-2"):
        build("dit-xxl-2")
    with pytest.raises(ValueError, match="dpeth"):
        build("dit-s-2", dpeth=2)
    with pytest.raises(ValueError, match="valid names"):
        example_inputs("nope")


def test_flux_position_ids_and_packing():
    ids = square_grid_ids(12 * 12, "cpu")
    assert ids[13].tolist() == [0, 1, 1] and ids[-1].tolist() == [0, 11, 11]
    z = torch.randn(2, 16, 8, 6)
    assert torch.equal(unpack_latents(pack_latents(z), 8, 6), z)
    # Explicit ids (here for a non-square 4x2 token grid) go through the same path.
    model, _ = tiny("mmdit")
    img, txt, t, y, g = example_inputs(model, batch=2, resolution=64, text_tokens=8)
    rect = torch.stack(torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1).reshape(16, 2)
    ids = torch.cat([torch.zeros(16, 1), rect], -1)
    assert torch.equal(model(img, txt, t, y, g, ids), model(img, txt, t, y, g))


@pytest.mark.parametrize("family", TINY)
def test_compile_dynamic_without_recompiles(family):
    # Note: sizes that coincide with a weight dim (e.g. 16 tokens and vec_dim 16) would be
    # duck-shaped onto one symbol and specialised; the tiny configs avoid such clashes.
    model, ex = tiny(family, depth=1, **({"single_depth": 1} if family == "mmdit" else {}))
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for batch in (2, 3):
            args = example_inputs(model, batch=batch, **ex)
            torch.testing.assert_close(compiled(*args), model(*args))
        if family != "dit":  # DiT's position buffer fixes the resolution; the others take any shape
            args = example_inputs(model, batch=2, resolution=2 * ex["resolution"], text_tokens=2 * ex["text_tokens"])
            torch.testing.assert_close(compiled(*args), model(*args))
    assert counter.frame_count == 1
