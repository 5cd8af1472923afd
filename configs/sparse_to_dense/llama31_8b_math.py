"""Sparse-to-dense bridge on MATH: Llama-3.3-70B-Instruct teacher RL'd with GRPO,
Llama-3.1-8B-Instruct student (one shared 128256-token vocabulary).

    python -m launch.train --config=configs/sparse_to_dense/llama31_8b_math.py --workdir=/ckpt/l3
    python -m launch.train --config=configs/sparse_to_dense/llama31_8b_math.py:raw_teacher ...

arg: comma-separated variants; rows and scales as in `configs/sparse_to_dense_paper.py`. GRPO lr 1e-6, group 8,
token-mean; eval 16 samples per problem at Llama's generation defaults (T=0.6, top-p 0.9).
Mesh: 8-way tensor parallel inside a host, FSDP across hosts (the 70B teacher's float32
params and Adam moments need several 8-GPU hosts or a TPU pod slice).
"""

from configs import sparse_to_dense_paper as paper

VARIANTS, ROWS = paper.VARIANTS, paper.ROWS

TEACHER = paper.model("Llama-3.3-70B-Instruct", **paper.llama3(
    hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64, num_kv_heads=8))
STUDENT = paper.model("Llama-3.1-8B-Instruct", **paper.llama3(
    hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8))


def get_config(arg=None):
    return paper.bridge_config(arg, teacher=TEACHER, student=STUDENT, mesh_shape=(1, -1, 8),
                            eval_sampling=dict(n=16, temperature=0.6, top_p=0.9, top_k=0))
