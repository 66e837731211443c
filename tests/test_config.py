import dataclasses

import pytest
import torch

from lynx_compile import CompensationMode, LynxConfig, Role, ops
from lynx_compile.config import NORM_EPS, check_lora_factors


def test_defaults_follow_the_paper():
    config = LynxConfig()
    assert (config.pattern, config.n, config.m, config.compensation) == ("2:4", 2, 4, "norm")
    assert config.sparse_roles == {"attn_qkv", "mlp_up", "mlp_down"}
    assert config.norm_compensation


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"pattern": "4:2"}, "pattern"),
        ({"pattern": "0:4"}, "pattern"),
        ({"pattern": "2-4"}, "pattern"),
        ({"pattern": 2}, "pattern"),
        ({"compensation": "lowrank"}, "compensation"),
        ({"compensation": "lora"}, "compensation_state"),
        ({"include": "blocks.(["}, "include"),
        ({"exclude": 3}, "exclude"),
        ({"sparse_roles": {"attention"}}, "sparse_roles"),
        ({"sparse_roles": "mlp_up"}, "sparse_roles"),
        ({"min_features": -1}, "min_features"),
        ({"min_features": 1.5}, "min_features"),
        ({"eps": 0}, "eps"),
        ({"precision": "int8"}, "precision"),
    ],
)
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"LynxConfig.{field}"):
        LynxConfig(**kwargs)


def test_pattern_is_normalised_and_any_n_m_accepted():
    assert LynxConfig(pattern=" 4 : 8 ").pattern == "4:8"
    assert (LynxConfig(pattern="1:4").n, LynxConfig(pattern="1:4").m) == (1, 4)


def test_options_map_onto_fields_and_unknown_keys_fail():
    assert LynxConfig.from_options({"pattern": "4:8", "min_features": 0}).pattern == "4:8"
    with pytest.raises(ValueError, match="unknown key.*patern"):
        LynxConfig.from_options({"patern": "2:4"})


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        LynxConfig().pattern = "1:4"


def test_speed_guard_is_a_bool():
    assert LynxConfig().speed_guard is True
    with pytest.raises(ValueError, match="LynxConfig.speed_guard"):
        LynxConfig(speed_guard="yes")


def test_options_apply_over_a_config_in_one_place():
    base = LynxConfig(min_features=0)
    assert base.with_options({"pattern": "4:8"}) == LynxConfig(pattern="4:8", min_features=0)
    assert base.with_options(None) is base
    with pytest.raises(ValueError) as err:
        base.with_options({"patern": "2:4"})
    # The first line leads with the key and the fix.
    assert str(err.value).splitlines()[0].startswith("lynx options: unknown key 'patern' (did you mean 'pattern'?)")


def test_names_become_their_enums():
    config = LynxConfig(compensation="none", sparse_roles={"attn_out", Role.MLP_UP})
    assert config.compensation is CompensationMode.NONE
    assert config.sparse_roles == {Role.ATTN_OUT, Role.MLP_UP} and all(isinstance(r, Role) for r in config.sparse_roles)
    assert not config.norm_compensation


def test_norm_eps_is_one_constant():
    assert LynxConfig().eps == ops.NORM_EPS == NORM_EPS


def test_a_compensation_passed_as_sensitivity_says_what_to_pass():
    factors = {"blocks.0.attn.qkv": (torch.zeros(4, 8), torch.zeros(24, 4))}  # what a Compensation maps names to
    with pytest.raises(ValueError, match=r"^LynxConfig.sensitivity: .*pass sensitivity=comp.sensitivity\('lora'\)"):
        LynxConfig(sensitivity=factors)
    with pytest.raises(ValueError, match=r"LynxConfig.sensitivity: .*got 'a': -0.5"):
        LynxConfig(sensitivity={"a": -0.5})
    assert LynxConfig(sensitivity={"a": 1}, max_layer_error=0.5).sensitivity == {"a": 1.0}


def test_lora_factors_are_checked_as_a_pair_and_against_the_layer():
    down, up = torch.zeros(4, 8), torch.zeros(16, 4)
    LynxConfig(compensation="lora", compensation_state={"a": (down, up)})
    with pytest.raises(ValueError, match=r"LynxConfig.compensation_state\['a'\]: .* got \[\(4, 8\), \(16, 3\)\]"):
        LynxConfig(compensation="lora", compensation_state={"a": (down, torch.zeros(16, 3))})
    check_lora_factors("a", (down, up), (16, 8))
    with pytest.raises(ValueError, match=r"LoRA factors of layer 'a' do not fit its weight \(16, 12\)"):
        check_lora_factors("a", (down, up), (16, 12))


def test_a_step_schedule_is_a_config_field_set_in_code_or_through_options():
    from lynx_compile import StepSchedule

    schedule = StepSchedule(25, {0, 1, 2})
    assert LynxConfig().step_schedule is None
    assert LynxConfig.from_options({"step_schedule": schedule}).step_schedule is schedule
    assert LynxConfig(step_schedule=schedule) == LynxConfig(step_schedule=StepSchedule(25, [2, 1, 0]))
    assert hash(LynxConfig(step_schedule=schedule)) != hash(LynxConfig())
    with pytest.raises(ValueError, match="LynxConfig.step_schedule: expected a lynx_compile.StepSchedule"):
        LynxConfig(step_schedule="25:0,1,2")
