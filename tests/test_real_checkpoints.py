"""What a run on a real Hugging Face checkpoint reads from its folder: the tokenizer (following
an override of the model's hf_dir) and the stop ids of generation_config.json."""

import json

import pytest

from bridge import models, runtime
from stage_helpers import smoke_config, tiny_decoder


def _checkpoint(path, alphabet, extra_eos=()):
    tokenizer = models.char_tokenizer(alphabet)
    models.save_hf(tiny_decoder(tokenizer), str(path), tokenizer=tokenizer)
    gen = path / "generation_config.json"
    config = json.loads(gen.read_text())
    config["eos_token_id"] = [tokenizer.eos_token_id, *extra_eos]
    gen.write_text(json.dumps(config))
    return tokenizer


def _config(folder):
    cfg = smoke_config(["student_sft"])
    with cfg.unlocked():
        cfg.tokenizer = ""
        cfg.models.student.hf_dir = str(folder)
    return cfg


def test_the_tokenizer_follows_the_models_folder_and_stops_on_generation_config_eos(tmp_path):
    first = _checkpoint(tmp_path / "a", "0123456789+=", extra_eos=(5,))
    second = _checkpoint(tmp_path / "b", "0123456789+=-*")
    ctx = runtime.make_context(_config(tmp_path / "a"), str(tmp_path / "run_a"))
    assert ctx.tokenizer.get_vocab() == first.get_vocab()
    assert set(ctx.eos_ids) == {first.eos_token_id, 5}  # the tokenizer's eos and generation_config's
    ctx = runtime.make_context(_config(tmp_path / "b"), str(tmp_path / "run_b"))
    assert ctx.tokenizer.get_vocab() == second.get_vocab() and ctx.eos_ids == (second.eos_token_id,)


def test_no_tokenizer_and_no_model_folder_is_named():
    cfg = smoke_config(["student_sft"])
    with cfg.unlocked():
        cfg.tokenizer = ""
    with pytest.raises(ValueError, match="config.tokenizer is empty"):
        runtime.tokenizer_spec(cfg)


@pytest.mark.parametrize("param_dtype", ["float32", pytest.param("bfloat16", marks=pytest.mark.slow)])
def test_a_pipeline_computes_in_bfloat16_end_to_end_and_exports_its_parameter_dtype(tmp_path, param_dtype):
    """SFT, OPD with a teacher and GRPO, computing in bfloat16 (float32 master weights, or
    bfloat16 weights as a real checkpoint loads): finite losses, and the exported folder keeps
    the parameter dtype (config.json's torch_dtype and the safetensors)."""
    from safetensors.numpy import load_file

    from bridge import pipelines
    from launch_helpers import stable_records

    cfg = smoke_config(["teacher_sft", "student_sft", "opd", "student_rl"])
    with cfg.unlocked():
        cfg.dtype, cfg.param_dtype = "bfloat16", param_dtype
    pipelines.run(cfg, str(tmp_path))
    losses = [r["loss"] for r in stable_records(tmp_path) if "loss" in r]
    assert len(losses) == 12 and all(abs(x) < 1e6 for x in losses), losses
    folder = tmp_path / "models" / "student_rl"
    assert json.loads((folder / "config.json").read_text())["torch_dtype"] == param_dtype
    dtypes = {str(v.dtype) for v in load_file(str(folder / "model.safetensors")).values()}
    assert dtypes == {param_dtype}
    assert models.load_hf(str(folder)).config.vocab_size == len(runtime.tokenizer_from_spec(cfg.tokenizer))
