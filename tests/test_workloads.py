"""Model specs as the tools load them: labels that name the model that runs, diffusers configs only where they apply."""

import json
import textwrap

import pytest

from lynx_compile.tools.workloads import WorkloadError, load_workload


def test_quick_builtin_is_labelled_with_its_overrides():
    workload = load_workload("dit-xl-2", quick=True)
    assert workload.model.config.depth == 2 and workload.model.config.hidden == 256
    assert workload.label == "dit-xl-2 (quick: depth 2, hidden 256)"
    assert workload.model_overrides == {"depth": 2, "hidden": 256}
    published = load_workload("dit-s-2", batch=1, cfg=False)
    assert published.label == "dit-s-2" and published.model_overrides == {}


@pytest.fixture
def factories(tmp_path, monkeypatch):
    (tmp_path / "lynx_test_factories.py").write_text(textwrap.dedent("""
        import torch

        def with_config(config):
            return torch.nn.Linear(config["width"], 8), (torch.randn(2, config["width"]),)

        def without_config():
            return torch.nn.Linear(4, 8), (torch.randn(2, 4),)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"width": 12}))
    return config


def test_diffusers_config_goes_to_a_factory_that_takes_it(factories):
    workload = load_workload("lynx_test_factories:with_config", diffusers_config=factories)
    assert workload.model.in_features == 12 and workload.args[0].shape == (2, 12)


def test_diffusers_config_is_refused_by_a_factory_without_a_config_argument(factories):
    with pytest.raises(WorkloadError, match="takes no 'config' argument"):
        load_workload("lynx_test_factories:without_config", diffusers_config=factories)
    assert load_workload("lynx_test_factories:without_config").model.in_features == 4


def test_diffusers_config_does_not_apply_to_a_builtin_model(tmp_path):
    config = tmp_path / "config.json"
    config.write_text("{}")
    with pytest.raises(WorkloadError, match="does not apply to the built-in model 'dit-s-2'"):
        load_workload("dit-s-2", diffusers_config=config)


@pytest.mark.parametrize("content,message", [(None, "No such file"), ("{not json", "cannot read diffusers config"),
                                             ("[1, 2]", "expected a JSON object, got list")])
def test_unreadable_diffusers_config_is_a_workload_error(tmp_path, content, message):
    path = tmp_path / "config.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(WorkloadError, match=message):
        load_workload("DiTTransformer2DModel", diffusers_config=path)
