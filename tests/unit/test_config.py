from pathlib import Path

import pytest

from anomaly_diffusion.config import Config, load_config
from anomaly_diffusion.errors import ConfigError

CONFIGS = Path(__file__).parents[2] / "configs"


@pytest.mark.parametrize("name", ["default", "demo", "tiny", "brats64", "brats128_gpu"])
def test_shipped_configs_validate(name: str) -> None:
    assert isinstance(load_config(CONFIGS / f"{name}.yaml"), Config)


def test_dotted_overrides_are_typed() -> None:
    cfg = load_config(
        CONFIGS / "default.yaml", ["train.ddpm_steps=7", "unet.channels=[64,64,64]", "data.manifest=x.csv"]
    )
    assert cfg.train.ddpm_steps == 7
    assert cfg.unet.channels == (64, 64, 64)
    assert cfg.data.manifest == Path("x.csv")


@pytest.mark.parametrize(
    "override",
    [
        "train.ddpm_steps=-1",
        "train.nonsense=1",
        "data.image_size=30",
        "unet.channels=[8]",
        "oops",
        "explain.noise_level=1000",
        "explain.guidance=regions",  # default.yaml's classifier pools by mean: no region logits
        "explain.residual=both",
    ],
)
def test_bad_overrides_give_one_line_config_errors(override: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(CONFIGS / "default.yaml", [override])
    assert "\n" not in str(info.value)


def test_manifest_is_relative_to_the_yaml(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("data: {manifest: data/m.csv}\n")
    assert load_config(tmp_path / "c.yaml").data.manifest == tmp_path / "data" / "m.csv"


def test_missing_or_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "none.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
