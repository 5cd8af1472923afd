"""Tiny random transformers checkpoints, built in the test, saved to a temp folder."""

import torch
import transformers

FAMILY_CONFIGS = {
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
              dict(vocab_size=301, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                   num_attention_heads=6, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                   rope_theta=10000.0, max_position_embeddings=256)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
              dict(vocab_size=263, hidden_size=40, intermediate_size=72, num_hidden_layers=2,
                   num_attention_heads=5, num_key_value_heads=1, tie_word_embeddings=False,
                   rope_theta=10000.0, max_position_embeddings=256)),
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
              dict(vocab_size=259, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                   num_attention_heads=6, num_key_value_heads=3, tie_word_embeddings=False,
                   max_position_embeddings=256,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
                   rope_theta=500000.0)),
}


def tiny_hf_model(path, family="qwen3", seed=0, **overrides):
    """Saves a random tiny model of `family` in `path`; returns the torch model (eval mode, f32)."""
    config_cls, model_cls, kw = FAMILY_CONFIGS[family]
    kw = {**kw, **overrides}
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kw)).eval()
    with torch.no_grad():  # larger than default init so logits are far from uniform
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.15)
    model.save_pretrained(str(path))
    return model


def torch_logits(model, ids, attention_mask=None):
    with torch.no_grad():
        t = torch.tensor(ids)
        m = None if attention_mask is None else torch.tensor(attention_mask)
        return model(input_ids=t, attention_mask=m).logits.float().numpy()
