"""The command-line setup shared by lynx-bench and lynx-dump: every LynxConfig field reachable, help complete."""

import argparse
import dataclasses

import pytest
import torch

from lynx_compile import LynxConfig, calibrate
from lynx_compile.tools import bench, cli, dump
from lynx_compile.tools.workloads import QUICK_OVERRIDES, QUICK_SHAPES

TOOLS = {"lynx-bench": (bench.build_parser, bench.BENCH_EXCLUDED_FIELDS), "lynx-dump": (dump.build_parser, {})}


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_every_config_field_has_an_option_or_a_reason(tool):
    build_parser, excluded = TOOLS[tool]
    options = build_parser()._option_string_actions
    names = cli.config_option_names(excluded)
    assert set(names) == {f.name for f in dataclasses.fields(LynxConfig)}
    for field, option in names.items():
        if option.startswith("not settable: "):
            reasons = {**cli.NO_OPTION_FIELDS, **excluded}
            assert field in reasons and len(option) > len("not settable: ") and "--" + field.replace("_", "-") not in options
        else:
            assert option in options, f"{tool}: LynxConfig.{field} has no option {option}"


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_help_is_complete_and_plain(tool):
    parser = TOOLS[tool][0]()
    for action in parser._actions:
        assert action.help, f"{tool}: {action.option_strings or action.dest} has no help"
    text = parser.format_help()
    assert "``" not in text
    for sizes in QUICK_OVERRIDES.values():
        assert all(f"{key.replace('_', ' ')} {value}" in " ".join(text.split()) for key, value in sizes.items())
    assert f"batch {QUICK_SHAPES['dit'][0]} at {QUICK_SHAPES['dit'][1]}px" in " ".join(text.split())
    assert "(default: 2:4)" in text and "(default: 256)" in text  # LynxConfig's own defaults
    if tool == "lynx-bench":
        flat = " ".join(text.split())
        assert f"(default: {bench.DEFAULT_MODEL})" in flat and f"(default: {','.join(bench.DEFAULT_BACKENDS)})" in flat


def _config(argv, excluded=None):
    parser = argparse.ArgumentParser()
    cli.add_config_arguments(parser, excluded)
    return cli.config_from_args(parser.parse_args(argv))


def test_options_not_given_keep_the_config_defaults():
    assert _config([]) == LynxConfig()


def test_every_field_of_the_config_reads_from_the_command_line():
    config = _config(["--pattern", "1:4", "--compensation", "none", "--include", "blocks", "--exclude", "fc2",
                      "--sparse-roles", "attn_qkv, mlp_up", "--min-features", "0", "--no-speed-guard", "--eps", "1e-6"])
    assert config == LynxConfig(pattern="1:4", compensation="none", include="blocks", exclude="fc2",
                                sparse_roles=frozenset({"attn_qkv", "mlp_up"}), min_features=0, speed_guard=False, eps=1e-6)


def test_bad_values_are_refused_by_the_config_itself():
    with pytest.raises(ValueError, match="LynxConfig.sparse_roles"):
        _config(["--sparse-roles", "attn_qkv,nope"])
    with pytest.raises(ValueError, match="LynxConfig.sensitivity"):
        _config(["--max-layer-error", "0.1"])  # thresholds need measured errors: --compensation-file


@pytest.fixture(scope="module")
def compensation_file(tmp_path_factory):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64))
    selection = LynxConfig(include="0", min_features=0)
    comp = calibrate(model, [torch.randn(64, 64)], selection, rank=4, model_batches=0, progress=False)
    path = tmp_path_factory.mktemp("comp") / "comp.safetensors"
    comp.save(path)
    return path


def test_compensation_file_sets_the_factors_the_errors_and_the_selection_it_was_calibrated_with(compensation_file):
    config = _config(["--compensation-file", str(compensation_file), "--max-layer-error", "0.5"])
    assert config.compensation == "lora" and set(config.compensation_state) == {"0"}
    assert set(config.sensitivity) == {"0"} and config.max_layer_error == 0.5
    assert config.include == "0" and config.min_features == 0  # from the file's selection
    overridden = _config(["--compensation-file", str(compensation_file), "--compensation", "norm", "--min-features", "8"])
    assert overridden.compensation == "norm" and overridden.min_features == 8


def test_unreadable_compensation_file_is_a_value_error(tmp_path):
    path = tmp_path / "not-a-compensation.safetensors"
    path.write_text("hello")
    with pytest.raises(ValueError, match="cannot load --compensation-file"):
        _config(["--compensation-file", str(path)])


def test_bench_takes_its_lora_factors_from_a_compensation_file(compensation_file):
    config = _config(["--compensation-file", str(compensation_file)], bench.BENCH_EXCLUDED_FIELDS)
    assert bench._lora_state(workload=None, config=config) is config.compensation_state


def test_an_unsupported_field_type_is_a_loud_error(monkeypatch):
    @dataclasses.dataclass(frozen=True)
    class Extended(LynxConfig):
        callback: object = None
        """A Python object with no command-line form."""

    monkeypatch.setattr(cli, "LynxConfig", Extended)
    with pytest.raises(TypeError, match="LynxConfig.callback: no command-line form"):
        cli.add_config_arguments(argparse.ArgumentParser())


def test_field_docs_are_the_help_texts():
    docs = cli.field_docs(LynxConfig)
    assert set(docs) == {f.name for f in dataclasses.fields(LynxConfig)}
    assert docs["exclude"] == "Regex over module qualified names that always stay dense; applied after include."


def test_the_step_schedule_is_set_in_code_and_by_lynx_bench_own_options():
    assert cli.config_option_names()["step_schedule"].startswith("not settable: a lynx_compile.StepSchedule")
    assert "--sparse-fraction" in cli.config_option_names(bench.BENCH_EXCLUDED_FIELDS)["step_schedule"]
    assert "--step-schedule" not in dump.build_parser()._option_string_actions
