import json
import shutil

import pytest
import torch

from pipeline.models.loading import ModelLoadError, load_diffusion_model


def test_loads_a_diffusers_folder_by_path(tiny_sd, tiny_sd_path):
    assert tiny_sd.image_size == 32 and tiny_sd.latent_size == 16 and tiny_sd.latent_channels == 4
    config = tiny_sd.scheduler.config
    assert (config.beta_schedule, config.beta_start, config.beta_end) == ("scaled_linear", 0.00085, 0.012)
    assert config.clip_sample is False and config.set_alpha_to_one is False
    assert not any(p.requires_grad for p in tiny_sd.unet.parameters())
    again = load_diffusion_model(tiny_sd_path)
    assert again.fingerprint == tiny_sd.fingerprint
    ids = tiny_sd.tokenizer("a red circle").input_ids
    assert ids == [49406, 320, 736, 7117, 49407]  # CLIP's own token ids, as SD tokenizes them


def test_fingerprint_changes_with_the_weights(tiny_sd_path, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_sd_path, copy)
    model = load_diffusion_model(copy)
    with torch.no_grad():
        model.unet.conv_out.bias.add_(1.0)
    model.unet.save_pretrained(copy / "unet")
    assert load_diffusion_model(copy).fingerprint != load_diffusion_model(tiny_sd_path).fingerprint


def test_v_prediction_model_is_refused(tiny_sd_path, tmp_path):
    copy = tmp_path / "vpred"
    shutil.copytree(tiny_sd_path, copy)
    config_file = copy / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config["prediction_type"] = "v_prediction"
    config_file.write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="v_prediction"):
        load_diffusion_model(copy)


def test_folder_errors_name_the_path_and_fix(tmp_path):
    with pytest.raises(ModelLoadError, match="missing"):
        load_diffusion_model(tmp_path)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_diffusion_model("./no/such/model")
