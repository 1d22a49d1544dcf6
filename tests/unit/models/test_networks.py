import pickle
from pathlib import Path

import pytest
import torch

from anomaly_diffusion.config import ClassifierConfig, Config, load_config
from anomaly_diffusion.diffusion.schedule import make_schedule
from anomaly_diffusion.errors import CheckpointError, ConfigError
from anomaly_diffusion.models.bundle import load_bundle, save_bundle
from anomaly_diffusion.models.networks import build_classifier, build_unet

TINY = ClassifierConfig(channels=(8, 16), attention_levels=(False, True), num_head_channels=8, norm_num_groups=8)


@pytest.mark.parametrize("size", [32, 64, 128])
@pytest.mark.parametrize("pooling", ["mean", "attention"])
def test_classifier_runs_at_any_size(size: int, pooling: str) -> None:
    classifier = build_classifier(TINY.model_copy(update={"pooling": pooling}), image_channels=2).eval()
    logits = classifier(torch.randn(3, 2, size, size), torch.tensor([0, 500, 999]))
    assert logits.shape == (3, 2)
    assert torch.isfinite(logits).all()


def test_classifier_samples_are_independent() -> None:
    """GroupNorm, no BatchNorm: a sample's logits do not depend on the rest of the batch (guidance relies on it)."""
    classifier = build_classifier(TINY, 1).eval()
    x, t = torch.randn(4, 1, 32, 32), torch.tensor([1, 2, 3, 4])
    assert torch.allclose(classifier(x, t)[:1], classifier(x[:1], t[:1]), atol=1e-5)


def _tiny_config() -> Config:
    return load_config(Path(__file__).parents[3] / "configs" / "tiny.yaml")


def test_bundle_round_trip_gives_identical_outputs(tmp_path: Path) -> None:
    cfg = _tiny_config()
    unet = build_unet(cfg.unet, 1)
    torch.nn.init.normal_(unet.out[-1].conv.weight)  # MONAI zero-initialises the output conv
    classifier = build_classifier(cfg.classifier, 1)
    schedule = make_schedule("linear", cfg.schedule.num_timesteps)
    path = save_bundle(tmp_path / "b.pt", config=cfg, schedule=schedule, unet=unet, classifier=classifier)
    raw = torch.load(path, weights_only=True)  # plain data: loads without pickled code
    assert raw["config"]["data"]["image_size"] == 16
    bundle = load_bundle(path)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 50])
    unet.eval(), classifier.eval()
    assert torch.equal(bundle.unet(x, t), unet(x, t))
    assert torch.equal(bundle.classifier(x, t), classifier(x, t))
    assert bundle.config == cfg
    assert torch.equal(bundle.schedule.alpha_bar, schedule.alpha_bar)


class Evil:
    def __reduce__(self):  # pragma: no cover - must never run
        return (print, ("pwned",))


def test_bundle_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_bundle(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_bundle(tmp_path / "junk.pt")
    with (tmp_path / "evil.pt").open("wb") as handle:
        pickle.dump({"x": Evil()}, handle)
    torch.save({"x": Evil()}, tmp_path / "evil2.pt")
    for name in ("evil.pt", "evil2.pt"):
        with pytest.raises(CheckpointError):
            load_bundle(tmp_path / name)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not an adiff model bundle"):
        load_bundle(tmp_path / "plain.pt")


def test_bundle_from_another_config_is_refused(tmp_path: Path) -> None:
    cfg = _tiny_config()
    other = cfg.model_copy(update={"unet": cfg.unet.model_copy(update={"channels": (16, 16)})})
    path = save_bundle(
        tmp_path / "b.pt",
        config=cfg,
        schedule=make_schedule("linear", cfg.schedule.num_timesteps),
        unet=build_unet(other.unet, 1),
        classifier=build_classifier(cfg.classifier, 1),
    )
    with pytest.raises(CheckpointError, match="unet weights do not match"):
        load_bundle(path)


def test_lse_classifier_pools_its_region_logits_and_others_have_none() -> None:
    torch.manual_seed(0)
    cfg = ClassifierConfig(channels=[8, 16], attention_levels=[False, False], num_head_channels=8, norm_num_groups=8)
    lse = build_classifier(cfg.model_copy(update={"pooling": "lse"}), image_channels=1).eval()
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([0, 50])
    regions = lse.region_logits(x, t)
    assert regions.shape == (2, 16)  # a 4x4 grid of regions after two downsamplings
    pathological = torch.logsumexp(regions, dim=1) - torch.log(torch.tensor(16.0))
    assert torch.allclose(lse(x, t), torch.stack([torch.zeros(2), pathological], dim=1), atol=1e-6)
    with pytest.raises(ConfigError, match="pooling=lse"):
        build_classifier(cfg, image_channels=1).region_logits(x, t)
