"""Toy proxy-tuning (Liu et al. 2024, "Tuning Language Models by Proxy") on CPU, 4-digit
addition: a larger base is steered at decoding time by a small RL-trained expert and its pre-RL
self, logits_base + alpha * (logits_expert - logits_antiexpert) at every step, with no update of
the base.

    python -m launch.train --config=configs/self_distill/proxy.py --workdir=/tmp/proxy

trains the three models, each exported and evaluated (greedy, 1000 held-out problems):
  expert_sft  the small model (the bridge toy's student) after SFT: the anti-expert;
  expert_rl   the same after GRPO: the expert (alone: the "expert alone" system);
  base_sft    the larger model (the bridge toy's teacher) after SFT to a lower accuracy than the
              bridge toy's teacher (0.6), so RL's gain has room: the "base alone" system.
The fourth system, the proxy-tuned base, is one `launch.eval` command with the same settings:

    python -m launch.eval --config=configs/self_distill/proxy.py --checkpoint=/tmp/proxy/models/base_sft \
        --proxy_expert=/tmp/proxy/models/expert_rl --proxy_antiexpert=/tmp/proxy/models/expert_sft \
        --proxy_alpha=1.0 --outdir=/tmp/proxy/eval/proxy

(drop the proxy flags, or pass --checkpoint=.../expert_rl, for the other three under launch.eval).

arg: comma-separated variants.
  scale:   toy (default) | smoke (seconds, for tests)
  distill: adds base_distill, which trains the base (cross-entropy) on its own proxy-tuned
           greedy samples of the training prompts: proxy-tuning from a stage's `sampling.proxy`
           (its `pool_reward` is the proxy-tuned base's accuracy on those prompts).
"""

from configs import common
from configs.sparse_to_dense import toy

VARIANTS = ("toy", "smoke", "distill")


def get_config(arg=None):
    parts = common.parse_arg(arg, VARIANTS)
    smoke = "smoke" in parts
    bridge = toy.get_config("direct_grpo,smoke" if smoke else "direct_grpo")
    bridge.unlock()
    c = common.base()
    for key in ("tokenizer", "task", "eval", "checkpoint", "metrics"):
        c[key] = bridge[key]
    c.models.expert = bridge.models.student
    c.models.base = bridge.models.teacher
    c.stages.expert_sft = bridge.stages.student_sft
    c.stages.expert_sft.model = "expert"
    c.stages.expert_rl = bridge.stages.student_rl
    c.stages.expert_rl.model = "expert"
    c.stages.base_sft = bridge.stages.teacher_sft
    c.stages.base_sft.model = "base"
    if not smoke:
        c.stages.base_sft.until_accuracy = 0.6
    for stage in c.stages.values():
        if "eval_kl_reference" in stage:  # the KL to each model's own SFT stage, renamed here
            stage.eval_kl_reference = f"stage:{stage.model}_sft"
    stages = ["expert_sft", "expert_rl", "base_sft"]
    if "distill" in parts:
        greedy = common.sampling(1, temperature=0.0, max_new_tokens=8, proxy=common.cd(
            expert="stage:expert_rl", antiexpert="stage:expert_sft", alpha=1.0))
        c.stages.base_distill = common.sft_stage("base", 1e-4, 3 if smoke else 200, source="teacher",
                                                 teacher="base", loss="cross_entropy",
                                                 batch_size=8 if smoke else 128, sampling=greedy,
                                                 pool_prompts=16 if smoke else 512)
        stages.append("base_distill")
    c.pipeline.stages = tuple(stages)
    c.lock()
    return c
