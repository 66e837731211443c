"""The calibration result: its mapping and sensitivity API, the LynxConfig it builds, its file format."""

import os
import stat
import sys

import pytest
import torch

from lynx_compile.compensation import Compensation, LayerCalibration


def make_layer(name, in_features, out_features, rank, error, model_errors=(None, None)):
    g = torch.Generator().manual_seed(in_features * out_features + rank)
    return LayerCalibration(
        name=name, in_features=in_features, out_features=out_features, rank=rank, pattern="2:4", ridge=0.1,
        rows_train=96, rows_heldout=32, error_none=error + 0.1, error_norm=error, error_lora=error - 0.1,
        lora_down=torch.randn(rank, in_features, generator=g), lora_up=torch.randn(out_features, rank, generator=g),
        model_error_norm=model_errors[0], model_error_lora=model_errors[1],
    )


@pytest.fixture
def comp():
    layers = [make_layer("blocks.0.mlp.fc1", 16, 32, 4, 0.4, (0.05, 0.03)),
              make_layer("blocks.0.mlp.fc2", 32, 16, 4, 0.3, (0.02, 0.01))]
    selection = {"pattern": "2:4", "eps": 1e-12, "include": None, "exclude": None,
                 "sparse_roles": ["mlp_up", "mlp_down"], "min_features": 8}
    return Compensation({layer.name: layer for layer in layers}, selection)


def test_mapping_and_sensitivities(comp):
    assert list(comp) == ["blocks.0.mlp.fc1", "blocks.0.mlp.fc2"] and len(comp) == 2 and comp.pattern == "2:4"
    down, up = comp["blocks.0.mlp.fc1"]
    assert down.shape == (4, 16) and up.shape == (32, 4)
    assert comp.layer_sensitivity == {"blocks.0.mlp.fc1": 0.4, "blocks.0.mlp.fc2": 0.3}
    assert comp.sensitivity("lora") == comp.model_sensitivity("lora") == {"blocks.0.mlp.fc1": 0.03, "blocks.0.mlp.fc2": 0.01}
    assert comp.sensitivity("none") == comp.sensitivity("norm") == comp.model_sensitivity("norm")
    assert comp.mean_errors() == pytest.approx({"none": 0.45, "norm": 0.35, "lora": 0.25})
    assert "model error norm+LoRA" in comp.table().splitlines()[0]
    with pytest.raises(ValueError, match="compensation must be 'norm' or 'lora'"):
        comp.model_sensitivity("none")


def test_config_hands_lynx_config_plain_mappings(comp):
    config = comp.config(dense_flop_budget=0.3)
    assert config.compensation == "lora" and config.min_features == 8 and config.sparse_roles == {"mlp_up", "mlp_down"}
    assert type(config.compensation_state) is dict and config.compensation_state.keys() == set(comp)
    assert all(config.compensation_state[name][0] is comp[name][0] for name in comp)
    assert type(config.sensitivity) is dict and config.sensitivity == comp.sensitivity("lora")
    # The sensitivity follows the resulting config's compensation, unless given.
    assert comp.config(compensation="norm").sensitivity == comp.model_sensitivity("norm")
    assert comp.config(sensitivity={"blocks.0.mlp.fc1": 1.0}).sensitivity == {"blocks.0.mlp.fc1": 1.0}
    assert comp.config(pattern=" 2 : 4 ").pattern == "2:4"


def test_config_refuses_another_pattern(comp):
    with pytest.raises(ValueError, match="Compensation.config: calibrated for pattern 2:4, but pattern is 1:4"):
        comp.config(pattern="1:4")


@pytest.mark.parametrize("safetensors", [True, False])
def test_save_load_round_trips(comp, tmp_path, monkeypatch, safetensors):
    if not safetensors:
        monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # import fails: torch.save fallback
    path = tmp_path / "comp.lynx"
    comp.save(path)
    loaded = Compensation.load(path)
    assert (path.read_bytes()[:4] == b"PK\x03\x04") is not safetensors
    assert list(loaded) == list(comp) and loaded.selection == comp.selection
    for name, layer in comp.layers.items():
        assert loaded.layers[name].metadata() == layer.metadata()
        torch.testing.assert_close(loaded[name], comp[name], rtol=0, atol=0)
    assert loaded.config(max_layer_error=0.5).sensitivity == comp.sensitivity("lora")


@pytest.mark.parametrize("safetensors", [True, False])
@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_saved_file_takes_the_process_umask(comp, tmp_path, monkeypatch, safetensors, umask):
    if not safetensors:
        monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    previous = os.umask(umask)
    try:
        comp.save(tmp_path / "comp.lynx")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "comp.lynx").stat().st_mode) == 0o666 & ~umask


def test_load_refuses_a_file_without_lynx_metadata(tmp_path):
    save_file = pytest.importorskip("safetensors.torch").save_file
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="holds no lynx compensation metadata"):
        Compensation.load(tmp_path / "other.safetensors")
