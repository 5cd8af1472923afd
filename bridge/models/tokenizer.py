"""Tokenizers: real ones from a checkpoint folder, and a character-level one for toy tasks.

Both are `transformers.PreTrainedTokenizerFast`, saved as `tokenizer.json`, so toy and real
runs share one loading path (`load_tokenizer`), one chat-template path and one eos lookup.
"""

from __future__ import annotations

import json
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from bridge.models.hf_io import read_json

CHAR_SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")


def char_tokenizer(alphabet: str) -> PreTrainedTokenizerFast:
    """One token per character of `alphabet` after the specials <pad>=0, <bos>=1, <eos>=2, <unk>=3."""
    chars = sorted(set(alphabet))
    vocab = {tok: i for i, tok in enumerate(CHAR_SPECIALS)}
    vocab.update({c: len(CHAR_SPECIALS) + i for i, c in enumerate(chars)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(CHAR_SPECIALS))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", unk_token="<unk>")


def load_tokenizer(path: str) -> PreTrainedTokenizerFast:
    """Loads the tokenizer saved in a model folder (tokenizer.json + tokenizer_config.json). A
    damaged folder raises one ValueError naming the file (and line, for malformed JSON) instead
    of transformers' chain of tracebacks."""
    if not os.path.exists(os.path.join(path, "tokenizer.json")) and not os.path.exists(
            os.path.join(path, "tokenizer_config.json")):
        raise FileNotFoundError(f"No tokenizer in {path} (expected tokenizer.json).")
    for name in ("config.json", "tokenizer_config.json", "tokenizer.json", "special_tokens_map.json"):
        if os.path.exists(os.path.join(path, name)):
            read_json(os.path.join(path, name))
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as error:  # transformers raises many types for a damaged folder
        first = (str(error).strip().splitlines() or [""])[0]
        raise ValueError(f"Cannot load the tokenizer in {path}: {type(error).__name__}: {first}") from error


def eos_ids(tokenizer, model_dir: str | None = None) -> tuple[int, ...]:
    """End-of-sequence ids: generation_config.json's eos_token_id (may be a list) plus the
    tokenizer's own eos token."""
    ids = []
    gen = os.path.join(model_dir, "generation_config.json") if model_dir else None
    if gen and os.path.exists(gen):
        with open(gen) as f:
            eos = json.load(f).get("eos_token_id")
        ids += eos if isinstance(eos, list) else [] if eos is None else [eos]
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return tuple(dict.fromkeys(int(i) for i in ids))


def pad_id(tokenizer) -> int:
    """The pad id, falling back to eos when the tokenizer defines no pad token (as Llama's)."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return int(tokenizer.eos_token_id)


def check_same_vocabulary(student_tokenizer, teacher_tokenizer, what: str = "teacher") -> None:
    """Distillation compares per-token distributions, so both models must share a vocabulary."""
    if student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        raise ValueError(f"The {what} tokenizer differs from the run's tokenizer (vocabularies of "
                         f"{len(teacher_tokenizer)} vs {len(student_tokenizer)} tokens, or different ids); "
                         "token-level distillation needs one shared tokenizer: pick a teacher of the same family.")
