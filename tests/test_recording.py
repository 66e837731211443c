"""recording.py: a sampling loop's forward calls kept as calibration batches, bounded and spread over the run."""

import pytest
import torch
from torch import nn

import lynx_compile
from lynx_compile import ForwardRecorder, LynxConfig, models
from lynx_compile.diffusion import NoiseSchedule, ddim_sample


class Step(nn.Module):
    def forward(self, x, t, *, scale=1.0):
        return x * scale + t


def test_keeps_a_bounded_uniform_sample_of_the_calls_in_call_order_as_copies():
    step, x = Step(), torch.zeros(2, 3)
    with ForwardRecorder(step, max_batches=5, progress=False) as recorder:
        for t in range(100):
            step(x, torch.tensor(float(t)), scale=2.0)
            x.add_(1)  # a loop updating its latents in place must not change what was kept
    assert recorder.calls == 100 and len(recorder.batches) == 5
    kept_steps = [args[1].item() for args, _ in recorder.batches]
    assert kept_steps == sorted(kept_steps) and kept_steps[-1] > 20, "kept calls come from the whole run"
    for args, kwargs in recorder.batches:
        assert torch.equal(args[0], torch.full((2, 3), args[1].item())) and kwargs == {"scale": 2.0}
    step(x, torch.tensor(0.0))  # the hook is gone once the context closes
    assert recorder.calls == 100


def test_bad_arguments_say_what_to_pass():
    with pytest.raises(ValueError, match="max_batches"):
        ForwardRecorder(Step(), max_batches=0)
    with pytest.raises(ValueError, match="nn.Module"):
        ForwardRecorder(lambda x: x)


def test_records_the_builtin_ddim_sampler_for_calibrate():
    torch.manual_seed(0)
    model = models.build("dit-s-2", depth=1, input_size=8, num_classes=10, learn_sigma=False).eval()
    noise = torch.randn(2, model.config.in_channels, 8, 8)
    with ForwardRecorder(model, max_batches=3, progress=False) as recorder:
        ddim_sample(model, NoiseSchedule.linear(), noise, torch.tensor([1, 2]), steps=5, guidance_scale=2.0, null_class=10)
    assert recorder.calls == 5 and len(recorder.batches) == 3
    timesteps = [args[1][0].item() for args, _ in recorder.batches]
    assert len(set(timesteps)) == 3 and all(args[0].shape[0] == 4 for args, _ in recorder.batches)  # CFG doubles
    comp = lynx_compile.calibrate(model, recorder.on("cpu"), LynxConfig(), rank=8, model_batches=1, progress=False)
    assert {"blocks.0.mlp.fc1", "blocks.0.mlp.fc2"} <= set(comp.layers)


def test_records_a_diffusers_pipelines_transformer():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    transformer = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=64, in_channels=4, out_channels=8, num_layers=1, sample_size=8,
        patch_size=2, num_embeds_ada_norm=1000).eval()
    vae = diffusers.AutoencoderKL(block_out_channels=(32,), down_block_types=("DownEncoderBlock2D",),
                                  up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8,
                                  layers_per_block=1, sample_size=8).eval()
    pipe = diffusers.DiTPipeline(transformer=transformer, vae=vae, scheduler=diffusers.DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    with ForwardRecorder(pipe.transformer, max_batches=3, progress=False) as recorder:
        pipe(class_labels=[1, 2], num_inference_steps=6, output_type="np", generator=torch.Generator().manual_seed(0))
    assert recorder.calls == 6 and len(recorder.batches) == 3
    assert len({kwargs["timestep"].flatten()[0].item() for _, kwargs in recorder.batches}) == 3
    comp = lynx_compile.calibrate(pipe.transformer, recorder.on("cpu"), LynxConfig(min_features=0), rank=8,
                                  model_batches=1, progress=False)
    assert any(name.endswith("attn1.to_q") for name in comp.layers)
