"""Decoders (Qwen3, Qwen2/2.5, Llama 3), Hugging Face safetensors I/O and tokenizers.

    model = models.load_hf(path, dtype=jnp.float32)   # nnx.Module; family from config.json
    logits = model(input_ids)                         # int32[B, T] -> float32[B, T, V]
    models.save_hf(model, out_dir)                    # safetensors + config.json
"""

from bridge.models.config import ModelConfig
from bridge.models.decoder import Decoder, KVCache
from bridge.models.hf_io import load_hf, read_config, save_hf
from bridge.models.tokenizer import char_tokenizer, check_same_vocabulary, eos_ids, load_tokenizer, pad_id

__all__ = ["Decoder", "KVCache", "ModelConfig", "char_tokenizer", "check_same_vocabulary", "eos_ids",
           "load_hf", "load_tokenizer", "pad_id", "read_config", "save_hf"]
