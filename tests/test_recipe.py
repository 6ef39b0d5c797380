import pytest

from llmpress.recipe import PRESETS, QuantStep, Recipe, RecipeError, recipe


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_roundtrip(name, tmp_path):
    quantizes = any("bits" in d or d["method"] in ("rtn", "gptq") for d in
                    (PRESETS[name] if isinstance(PRESETS[name], list) else [PRESETS[name]]))
    r = recipe(name, group_size=64) if quantizes else recipe(name)
    p = tmp_path / "r.yaml"
    p.write_text(r.to_yaml())
    assert recipe(p).steps == r.steps


def test_group_size_parameter_and_channel():
    assert recipe("w4a16-gptq", group_size=64).steps[0].scheme().group_size == 64
    assert recipe("w4a16-gptq", group_size=-1).steps[0].scheme().strategy == "channel"
    assert recipe("w8a16").steps[0].scheme().strategy == "channel"


def test_overrides_first_match_and_skip():
    s = QuantStep(method="rtn", bits=4, group_size=32, overrides=(
        {"pattern": "re:.*down_proj", "bits": 8, "group_size": -1},
        {"pattern": "re:model\\.layers\\.0\\.", "skip": True},
    ))
    assert s.resolve("model.layers.1.mlp.down_proj").scheme().describe() == "int8 per-channel sym"
    assert s.resolve("model.layers.0.self_attn.q_proj") is None
    assert s.resolve("model.layers.1.self_attn.q_proj").bits == 4
    assert s.resolve("lm_head") is None  # ignored by default


@pytest.mark.parametrize("bad, field", [
    ({"method": "spqr"}, "method"), ({"bits": 9}, "bits"), ({"bitz": 4}, "bitz"),
    ({"group_size": 0}, "group_size"), ({"strategy": "row"}, "strategy"), ({"targets": "Linear"}, "targets"),
    ({"overrides": [{"bits": 8}]}, "pattern"), ({"overrides": [{"pattern": "x", "bogus": 1}]}, "bogus"),
    ({"targets": ["re:("]}, "regex"), ({"damp": 2.0}, "damp"),
])
def test_bad_fields_named(bad, field):
    with pytest.raises(RecipeError, match=field):
        Recipe.from_dict({"steps": [{"method": "rtn", **bad}]})


def test_bad_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="not a preset"):
        recipe("w5-nonsense")
    p = tmp_path / "x.yaml"
    p.write_text("steps: [ {method: rtn, bits: 4, ")
    with pytest.raises(RecipeError, match="YAML"):
        recipe(p)
    p.write_text("{name: x}")
    with pytest.raises(RecipeError, match="steps"):
        recipe(p)
