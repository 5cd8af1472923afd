"""Sparse-to-dense bridge on MATH: Qwen3-8B teacher RL'd with GRPO, Qwen3-1.7B student.

    python -m launch.train --config=configs/sparse_to_dense/qwen3_1p7b_math.py --workdir=/ckpt/q3
    python -m launch.train --config=configs/sparse_to_dense/qwen3_1p7b_math.py:no_warmup ...
    python -m launch.train --config=configs/sparse_to_dense/qwen3_1p7b_math.py:toy,direct_grpo ...

arg: comma-separated variants; rows and scales as in `configs/sparse_to_dense_paper.py` (bridge | direct_grpo |
raw_teacher | no_warmup | no_opd; toy | smoke). GRPO lr 1e-6, group 8, token-mean; eval 16
samples per problem at T=0.7, top-p 0.8, top-k 20 (Qwen3's non-thinking sampling, and the chat
template's thinking off: --config.task.options.enable_thinking=True turns it on). One 8-GPU
host or a TPU slice, pure FSDP.
"""

from configs import sparse_to_dense_paper as paper

VARIANTS, ROWS = paper.VARIANTS, paper.ROWS

TEACHER = paper.model("Qwen3-8B", **paper.qwen3(hidden_size=4096, intermediate_size=12288, num_layers=36,
                                                num_heads=32, num_kv_heads=8, tie_word_embeddings=False))
STUDENT = paper.model("Qwen3-1.7B", **paper.qwen3(hidden_size=2048, intermediate_size=6144, num_layers=28,
                                                  num_heads=16, num_kv_heads=8, tie_word_embeddings=True))


def get_config(arg=None):
    return paper.bridge_config(arg, teacher=TEACHER, student=STUDENT, mesh_shape=(1, -1, 1),
                            eval_sampling=dict(n=16, temperature=0.7, top_p=0.8, top_k=20), enable_thinking=False,
                            # launch.fit, 8 x 80 GiB: the 8B teacher's evaluation decode needs 88.6 GiB at
                            # 32 prompts x 16 samples x 8.7k tokens; 16 is the largest power of two that fits
                            # (the largest batch that fits is 28)
                            eval_batch_size=16)
