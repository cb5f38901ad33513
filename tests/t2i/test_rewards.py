"""Rewards: one interface, registry errors, optional-package guards, CLIP-based heads on tiny random CLIPs."""

import pytest
import torch

from t2i.reward_stats import PerPromptStatTracker, diversity
from t2i.rewards import MissingPackageError, available_rewards, make_reward, resolve_reward


def test_jpeg_compressibility_prefers_flat_images_over_noise():
    flat = torch.full((2, 3, 64, 64), 0.5)
    noise = torch.rand((2, 3, 64, 64), generator=torch.Generator().manual_seed(0))
    comp, incomp = make_reward("jpeg_compress"), make_reward("jpeg_incompress")
    assert (comp(flat, ["a", "b"]) > comp(noise, ["a", "b"])).all()
    assert (incomp(noise, ["a", "b"]) > incomp(flat, ["a", "b"])).all()
    assert not comp.differentiable and make_reward("brightness").differentiable


def test_unknown_reward_lists_known_names():
    with pytest.raises(KeyError, match="jpeg_compress") as err:
        make_reward("nope")
    assert "nope" in str(err.value) and all(n in str(err.value) for n in available_rewards())
    with pytest.raises(KeyError, match="no_such_module"):
        make_reward("no_such_module:Reward")


def test_rewards_of_other_packages_come_through_entry_points_and_module_names():
    """``digits`` registers its rewards in pyproject.toml (group sa_t2i.rewards); t2i never imports it."""
    from digits.rewards import BoldReward, DigitProbReward

    assert {"digit_prob", "digit_bold"} <= set(available_rewards())
    assert resolve_reward("digit_prob") is DigitProbReward
    assert resolve_reward("digits.rewards:BoldReward") is BoldReward
    with pytest.raises(ValueError, match="weights_path"):  # the factory receives weights_path by keyword
        make_reward("digit_prob", weights_path=None)


def test_missing_optional_package_names_the_pip_package():
    with pytest.raises(MissingPackageError, match="pip install hpsv2"):
        make_reward("hpsv2")
    with pytest.raises(MissingPackageError, match="pip install image-reward"):
        make_reward("imagereward")


def test_aesthetic_and_clip_need_existing_paths(tmp_path):
    with pytest.raises(ValueError, match="weights_path"):
        make_reward("aesthetic", clip_path=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="weights_path"):
        make_reward("aesthetic", clip_path=str(tmp_path), weights_path=str(tmp_path / "missing.safetensors"))
    with pytest.raises(FileNotFoundError, match="clip_path"):
        make_reward("clip_score", clip_path=str(tmp_path / "nope"))


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    from t2i.models import build_tiny_pipeline

    folder = tmp_path_factory.mktemp("clip")
    tok = build_tiny_pipeline(0).tokenizer
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=77,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        ).to_dict(),
        vision_config=CLIPVisionConfig(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
        ).to_dict(),
        projection_dim=16,
    )
    CLIPModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_aesthetic_head_and_clip_score_on_a_tiny_clip(tiny_clip, tmp_path):
    from safetensors.torch import save_file

    head = tmp_path / "head.safetensors"
    save_file({"weight": torch.randn(1, 16), "bias": torch.zeros(1)}, str(head))
    aes = make_reward("aesthetic", clip_path=str(tiny_clip), weights_path=str(head))
    clip = make_reward("clip_score", clip_path=str(tiny_clip))
    imgs = torch.rand(3, 3, 40, 40, requires_grad=True)
    prompts = ["a cat", "a dog", "a cat"]
    a, c = aes(imgs, prompts), clip(imgs, prompts)
    assert a.shape == c.shape == (3,) and torch.isfinite(a).all() and (c.abs() <= 100 + 1e-4).all()
    (a.sum() + c.sum()).backward()
    assert imgs.grad is not None and imgs.grad.abs().sum() > 0  # differentiable


def test_per_prompt_stat_tracker_standardises_per_prompt_and_round_trips():
    tr = PerPromptStatTracker(buffer_size=16, min_count=2)
    prompts = ["a"] * 4 + ["b"] * 4
    r = torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0, 110.0, 120.0, 130.0])
    z = tr.normalize(prompts, r)
    assert torch.allclose(z[:4], z[4:], atol=1e-4) and abs(float(z[:4].mean())) < 1e-5
    tr2 = PerPromptStatTracker()
    tr2.load_state_dict(tr.state_dict())
    assert tr2.state_dict() == tr.state_dict()


def test_diversity_is_zero_for_identical_images_and_positive_otherwise():
    same = torch.ones(4, 10)
    assert diversity(same, ["a", "a", "b", "b"])[0] == 0
    d, se = diversity(torch.randn(6, 10), ["a"] * 3 + ["b"] * 3)
    assert d > 0 and se >= 0


def test_left_right_contrast_reward():
    r = make_reward("left_right_contrast")
    img = torch.zeros(2, 3, 8, 8)
    img[0, :, :, :4] = 1.0  # left half white
    img[1, :, :, 4:] = 1.0  # right half white
    out = r(img, ["a", "b"])
    assert r.differentiable and torch.allclose(out, torch.tensor([1.0, -1.0]))
