"""Evaluate a model on a task: n samples per prompt, verifier scores, pass@k / maj@k reports.

    python -m launch.eval --hf_dir=/path/model --task=gsm8k \
        --task_options='{"test_path": "gsm8k/test.jsonl"}' --outdir=/tmp/eval
    python -m launch.eval --config=configs/sparse_to_dense/toy.py \
        --checkpoint=/tmp/toy/models/student_rl --outdir=/tmp/eval --n=4 --temperature=1.0

--checkpoint / --hf_dir: a Hugging Face model folder (the trainer exports every finished stage
to <workdir>/models/<stage>). With --config, the config supplies the tokenizer (when the model
folder has none), the task (config.task, unless --task is given), the eval section's
defaults (num_prompts, batch_size, max_new_tokens, n, temperature, top_p, top_k) and the seed;
a flag given on the command line wins. The evaluation runs on the config's mesh (`mesh.shape`,
`mesh.rules`; without a config, every device on the fsdp axis): the models are loaded onto
their shards and each batch's rows are split over the batch axes. --hbm_gib picks the largest
prompts per sampler call (at most the batch size) whose programs (prefill, decode, scoring)
fit that much memory per device, compiled against abstract shapes first (`bridge.abstract`).
Writes results.json, results.md, passk.png and samples.jsonl to --outdir. Without a config,
sampling defaults follow the papers: n=16, T=0.7, top-p 0.8, top-k 20.

Proxy-tuning (Liu et al. 2024, "Tuning Language Models by Proxy"): --proxy_expert and
--proxy_antiexpert name two model folders ("hf:<folder>" also accepted) sharing the model's
vocabulary; every decode step then samples from the model's logits plus --proxy_alpha *
(expert - antiexpert). E.g. a larger base steered by a small RL-trained expert and its
pre-RL self (configs/self_distill/proxy.py):

    python -m launch.eval --config=configs/self_distill/proxy.py --checkpoint=/tmp/proxy/models/base_sft \
        --proxy_expert=/tmp/proxy/models/expert_rl --proxy_antiexpert=/tmp/proxy/models/expert_sft \
        --outdir=/tmp/proxy/eval/proxy
"""

import json
import os

from absl import app, flags
from ml_collections import config_flags

from launch import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config (optional).")
flags.DEFINE_string("checkpoint", None, "Model folder (HF layout) to evaluate.")
flags.DEFINE_string("hf_dir", None, "Model folder (HF layout) to evaluate; same as --checkpoint.")
flags.DEFINE_string("reference", None, "Reference (base) model folder for KL(policy || reference).")
flags.DEFINE_string("tokenizer", None, "Tokenizer folder or char:<alphabet> (default: the model's).")
flags.DEFINE_string("task", None, "Task name (default: config.task.name).")
flags.DEFINE_string("task_options", None, "JSON object of task options (default: config's).")
flags.DEFINE_string("outdir", None, "Where to write the reports.")
flags.DEFINE_string("method", None, "Row label for launch.table (default: the model folder name).")
flags.DEFINE_string("split", "test", "Task split.")
flags.DEFINE_integer("n", None, "Samples per prompt (default: config.eval.n or 16).")
flags.DEFINE_float("temperature", None, "Sampling temperature, 0 = greedy (default: config.eval or 0.7).")
flags.DEFINE_float("top_p", None, "Nucleus sampling mass (default: config.eval or 0.8).")
flags.DEFINE_integer("top_k", None, "Top-k sampling, 0 = off (default: config.eval or 20).")
flags.DEFINE_integer("max_new_tokens", None, "Generation budget (default: config.eval or task hint).")
flags.DEFINE_integer("limit", None, "Evaluate the first N problems (default: config.eval.num_prompts).")
flags.DEFINE_integer("batch_size", None, "Prompts per sampler call (default: config.eval or 64).")
flags.DEFINE_float("hbm_gib", 0.0, "Accelerator memory per device, GiB: lower the batch size to the largest whose "
                   "evaluation programs fit (0: off).")
flags.DEFINE_integer("seed", None, "Sampling seed (default: config.seed or 0).")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
flags.DEFINE_string("proxy_expert", None, "Proxy-tuning: the expert model folder (with --proxy_antiexpert).")
flags.DEFINE_string("proxy_antiexpert", None, "Proxy-tuning: the anti-expert model folder (with --proxy_expert).")
flags.DEFINE_float("proxy_alpha", 1.0, "Proxy-tuning: logits + alpha * (expert - antiexpert).")
FLAGS = flags.FLAGS


def _from_config(path: str, default=None):
    config = _CONFIG.value
    node = config
    for key in path.split("."):
        if node is None or key not in node:
            return default
        node = node[key]
    return node


SAMPLING_DEFAULTS = {"n": 16, "temperature": 0.7, "top_p": 0.8, "top_k": 20}


def _sampling(name: str):
    """The flag when given, else the config's eval.<name>, else the papers' default."""
    value = getattr(FLAGS, name)
    return value if value is not None else _from_config(f"eval.{name}", SAMPLING_DEFAULTS[name])


def _tokenizer(model_dir: str):
    from bridge import models, runtime

    spec = FLAGS.tokenizer or (None if _has_tokenizer(model_dir) else _from_config("tokenizer"))
    if not spec:
        if not _has_tokenizer(model_dir):
            raise FileNotFoundError(f"No tokenizer in {model_dir}; pass --tokenizer or a --config with one.")
        return models.load_tokenizer(model_dir)
    return runtime.tokenizer_from_spec(spec)


def _has_tokenizer(path: str) -> bool:
    return os.path.exists(os.path.join(path, "tokenizer.json"))


def _task():
    from bridge import tasks

    name = FLAGS.task or _from_config("task.name")
    if not name:
        raise ValueError("No task: pass --task=<name> or a --config with task.name.")
    if FLAGS.task_options is not None:
        options = json.loads(FLAGS.task_options)
    elif FLAGS.task is None or FLAGS.task == _from_config("task.name"):
        options = _from_config("task.options")
        options = options.to_dict() if options is not None else {}
    else:
        options = {}
    return tasks.get_task(name, **options)


def _folder(ref: str) -> str:
    """A model folder from a flag: a path, or "hf:<path>"."""
    path = ref[3:] if ref.startswith("hf:") else ref
    if not os.path.exists(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{ref} is not a model folder (no config.json).")
    return path


def _mesh():
    """(mesh, rules) of the config (default: every device on the fsdp axis, the default rules)."""
    from bridge import sharding
    from bridge.mesh import make_mesh

    rules = _from_config("mesh.rules")
    return (make_mesh(tuple(_from_config("mesh.shape", (1, -1, 1)))),
            sharding.as_rules(rules) if rules else sharding.DEFAULT_RULES)


def _batch_size(models, reference, task, tokenizer, sampling_kw: dict, limit, batch_size: int, mesh, rules) -> int:
    """`batch_size`, or with --hbm_gib the largest prompts per call up to it whose evaluation
    programs (`bridge.abstract.eval_programs` at the longest prompt) fit --hbm_gib per device."""
    from bridge import abstract, sampling

    if not FLAGS.hbm_gib:
        return batch_size
    examples = list(task.examples(FLAGS.split))[:limit]
    prompt_len = max((len(task.prompt_ids(x, tokenizer)) for x in examples), default=1)
    config = sampling.SamplingConfig(**sampling_kw, proxy_alpha=float(FLAGS.proxy_alpha))
    programs = lambda b: abstract.eval_programs(models, config, mesh, rules, prompts=b, prompt_len=prompt_len,  # noqa: E731
                                                reference=reference)
    chosen = abstract.largest_batch(programs, min(batch_size, max(len(examples), 1)), FLAGS.hbm_gib)
    if not chosen:
        raise ValueError(f"One prompt per call does not fit {FLAGS.hbm_gib:g} GiB per device (n={config.n}, "
                         f"{prompt_len} + {config.max_new_tokens} tokens); shard wider or lower n / max_new_tokens.")
    print(f"batch size {chosen} (the largest up to {batch_size} that fits {FLAGS.hbm_gib:g} GiB per device)")
    return chosen


def _proxy(model, tokenizer, dtype, mesh, rules):
    """(expert, antiexpert, alpha) from the proxy flags, or None; both models or neither, each
    with the model's vocabulary (size, and tokens where the folder has a tokenizer)."""
    from bridge import models

    named = {"expert": FLAGS.proxy_expert, "antiexpert": FLAGS.proxy_antiexpert}
    if not any(named.values()):
        return None
    if not all(named.values()):
        raise ValueError("Proxy-tuning needs both --proxy_expert and --proxy_antiexpert.")
    pair = []
    for role, ref in named.items():
        path = _folder(ref)
        proxy_model = models.load_hf(path, dtype=dtype, mesh=mesh, rules=rules)
        if proxy_model.config.vocab_size != model.config.vocab_size:
            raise ValueError(f"--proxy_{role}={ref} has a vocabulary of {proxy_model.config.vocab_size} tokens, the "
                             f"model {model.config.vocab_size}; proxy-tuning needs one shared vocabulary.")
        if _has_tokenizer(path):
            models.check_same_vocabulary(tokenizer, models.load_tokenizer(path), f"proxy {role}")
        pair.append(proxy_model)
    return pair[0], pair[1], float(FLAGS.proxy_alpha)


def run() -> dict:
    from bridge import distributed, models
    from bridge.evaluation import report, runner

    distributed.set_memory_fraction(_from_config("system.memory_fraction", 0.0))  # before the backend starts

    model_dir = FLAGS.checkpoint or FLAGS.hf_dir
    if not model_dir or not FLAGS.outdir:
        raise ValueError("Pass --checkpoint=<model folder> (or --hf_dir) and --outdir.")
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        raise FileNotFoundError(
            f"{model_dir} is not a model folder (no config.json); pass the HF "
            "folder a stage exported, e.g. <workdir>/models/<stage>."
        )
    dtype = _from_config("dtype", "float32")
    mesh, rules = _mesh()
    model = models.load_hf(model_dir, dtype=dtype, mesh=mesh, rules=rules)
    reference = models.load_hf(FLAGS.reference, dtype=dtype, mesh=mesh, rules=rules) if FLAGS.reference else None
    tokenizer = _tokenizer(model_dir)
    if reference is not None:
        models.check_same_vocabulary(tokenizer, _tokenizer(FLAGS.reference), "reference")
    proxy = _proxy(model, tokenizer, dtype, mesh, rules)
    task = _task()
    seed = FLAGS.seed if FLAGS.seed is not None else int(_from_config("seed", 0))
    sampling_kw = {name: _sampling(name) for name in SAMPLING_DEFAULTS}
    sampling_kw["max_new_tokens"] = int(FLAGS.max_new_tokens or _from_config("eval.max_new_tokens")
                                        or task.max_answer_tokens)
    limit = FLAGS.limit or _from_config("eval.num_prompts")
    batch_size = _batch_size((model, *(proxy or ())[:2]), reference, task, tokenizer, sampling_kw, limit,
                             int(FLAGS.batch_size or _from_config("eval.batch_size", 64)), mesh, rules)
    results = runner.evaluate(
        model,
        tokenizer,
        task,
        **sampling_kw,
        split=FLAGS.split,
        limit=limit,
        seed=seed,
        reference_model=reference,
        batch_size=batch_size,
        mesh=mesh,
        rules=rules,
        progress=FLAGS.progress,
        proxy=proxy,
    )
    method = os.path.basename(os.path.normpath(model_dir))
    if proxy is not None:
        method += f"+proxy({os.path.basename(os.path.normpath(_folder(FLAGS.proxy_expert)))})"
        results["proxy"] = {"expert": os.path.abspath(_folder(FLAGS.proxy_expert)),
                            "antiexpert": os.path.abspath(_folder(FLAGS.proxy_antiexpert)),
                            "alpha": float(FLAGS.proxy_alpha)}
    results.update(
        method=FLAGS.method or method,
        model=os.path.abspath(model_dir),
        reference=os.path.abspath(FLAGS.reference) if FLAGS.reference else None,
    )
    paths = report.write_results(results, FLAGS.outdir)
    print(report.results_markdown(results))
    print("wrote " + ", ".join(paths.values()))
    return results


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}")
    with cli.user_errors():
        run()


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
