import pytest

from lorakit import LoraConfig


def test_defaults_and_scaling():
    cfg = LoraConfig()
    assert (cfg.r, cfg.alpha, cfg.scaling) == (8, 16.0, 2.0)
    assert LoraConfig(r=16, alpha=8, use_rslora=True).scaling == pytest.approx(2.0)


def test_round_trip():
    cfg = LoraConfig(r=4, alpha=8, dropout=0.1, target_modules=["q_proj"], exclude_modules="lm_head",
                     use_rslora=True, init="gaussian", modules_to_save=["score"], bias="lora_only")
    assert LoraConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("kwargs, words", [
    ({"r": 0}, "r=0"),
    ({"r": -3}, "r=-3"),
    ({"r": 2.5}, "r=2.5"),
    ({"r": True}, "r=True"),
    ({"alpha": 0}, "alpha=0"),
    ({"alpha": float("nan")}, "alpha=nan"),
    ({"dropout": 1.0}, "dropout=1.0"),
    ({"dropout": -0.1}, "dropout=-0.1"),
    ({"init": "kaiming"}, "init='kaiming'"),
    ({"init": "pisa"}, "did you mean 'pissa'"),
    ({"bias": "all"}, "bias='all'"),
    ({"target_modules": None}, "target_modules is required"),
    ({"target_modules": ["q_proj", ""]}, "target_modules="),
    ({"target_modules": 3}, "target_modules=3"),
    ({"use_rslora": "yes"}, "use_rslora='yes'"),
])
def test_bad_values_name_the_value(kwargs, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace("[", r"\[")):
        LoraConfig(**kwargs)


def test_unknown_key_suggests_closest():
    with pytest.raises(ValueError, match="unknown LoraConfig key 'lora_alpha': did you mean 'alpha'"):
        LoraConfig.from_dict({"r": 4, "lora_alpha": 8})
    with pytest.raises(ValueError, match="'rank'"):
        LoraConfig.from_dict({"rank": 4})
