import pytest

from lynx_compile import LynxConfig


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
    with pytest.raises(Exception):
        LynxConfig().pattern = "1:4"


def test_speed_guard_is_a_bool():
    assert LynxConfig().speed_guard is True
    with pytest.raises(ValueError, match="LynxConfig.speed_guard"):
        LynxConfig(speed_guard="yes")
