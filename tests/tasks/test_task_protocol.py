"""Task protocol: registry, prompt ids (raw and chat), stop strings, guidance, overlong marking."""

import pytest
from transformers import PreTrainedTokenizerFast

from bridge.models.tokenizer import char_tokenizer
from bridge.tasks import Example, RewardResult, Task, get_task, register_task, soft_overlong_penalty
from bridge.tasks import task_names

CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def _echo_task(**options):
    examples = {
        "train": [Example("train/0", "12+3=", "15", "15")],
        "test": [Example("test/0", "1+1=", "2", "2")],
    }
    return Task(
        name="echo",
        load_split=examples.__getitem__,
        reward_fn=lambda text, ex: RewardResult(float(text == ex.answer), True, text),
        stop_strings=("\n",),
        **options,
    )


def test_registry_lists_required_tasks_and_names_unknown_ones():
    assert {"arithmetic", "countdown"} <= set(task_names())
    with pytest.raises(ValueError, match="Unknown task 'nope'.*arithmetic"):
        get_task("nope")
    with pytest.raises(TypeError, match="bad options"):
        get_task("arithmetic", digitz=3)


def test_register_task_and_reward_marks_truncation_and_cuts_at_stop():
    register_task("echo", _echo_task)
    task = get_task("echo")
    example = task.examples("test")[0]
    result = task.reward("2\nrest", example, truncated=True)
    assert result.score == 1.0 and result.extracted_answer == "2" and result.info["truncated"] is True
    assert task.reward("3", example).info["truncated"] is False
    with pytest.raises(ValueError, match="unknown split 'valid'"):
        task.examples("valid")


def test_prompt_ids_raw_is_plain_encoding():
    tokenizer = char_tokenizer("0123456789+=")
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    task = _echo_task()
    ids = task.prompt_ids(task.examples("train")[0], tokenizer)
    vocab = tokenizer.get_vocab()
    assert ids == [vocab[c] for c in "12+3="]


def test_prompt_ids_chat_uses_template_with_system_prompt():
    tokenizer = char_tokenizer("abcdefghijklmnopqrstuvwxyz<>\n0123456789+=")
    tokenizer.chat_template = CHAT_TEMPLATE
    task = _echo_task(chat=True, system_prompt="be")
    ids = task.prompt_ids(task.examples("train")[0], tokenizer)
    assert all(isinstance(i, int) for i in ids)
    assert tokenizer.decode(ids) == "<system>be\n<user>12+3=\n<assistant>"


def test_guidance_prefix_and_privileged_context():
    task = _echo_task()
    example = Example("x", "p", "7", "first we add three and four to get 7")
    assert task.guidance(example, 0.0) == ""
    assert task.guidance(example, 1.0) == example.solution
    half = task.guidance(example, 0.5)
    assert example.solution.startswith(half) and 0.3 * 36 < len(half) <= 0.6 * 36
    assert "first we add" in task.privileged_context(example)
    assert task.privileged_context(Example("y", "p", "7")) == "Reference answer: 7"
    assert task.guidance(Example("y", "p", "7"), 0.5) == ""


def test_soft_overlong_penalty_piecewise():
    assert soft_overlong_penalty(10, 100, 20) == 0.0
    assert soft_overlong_penalty(80, 100, 20) == 0.0
    assert soft_overlong_penalty(90, 100, 20) == pytest.approx(-0.5)
    assert soft_overlong_penalty(100, 100, 20) == pytest.approx(-1.0)
    assert soft_overlong_penalty(101, 100, 20) == -1.0


THINKING_TEMPLATE = CHAT_TEMPLATE.replace(
    "<assistant>{% endif %}",
    "<assistant>{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}{% endif %}")


@pytest.mark.parametrize("enable_thinking,suffix", [(None, ""), (True, ""), (False, "<think></think>")])
def test_enable_thinking_reaches_the_chat_template(enable_thinking, suffix):
    """As Qwen3's template does: thinking off renders an empty think block after the turn."""
    tokenizer = char_tokenizer("abcdefghijklmnopqrstuvwxyz<>/\n0123456789+=")
    tokenizer.chat_template = THINKING_TEMPLATE
    task = _echo_task(chat=True, enable_thinking=enable_thinking)
    ids = task.prompt_ids(task.examples("train")[0], tokenizer)
    assert tokenizer.decode(ids) == "<user>12+3=\n<assistant>" + suffix


def test_math_task_options_from_a_config_set_the_system_prompt_and_thinking(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text('{"problem": "1+1?", "answer": "2", "solution": "2"}\n')
    task = get_task("math", train_path=str(path), test_path=str(path), system_prompt="", enable_thinking=False)
    assert task.system_prompt is None and task.enable_thinking is False  # "" (an unset field): none
    assert get_task("math", train_path=str(path), test_path=str(path), system_prompt="Be brief.").system_prompt \
        == "Be brief."
