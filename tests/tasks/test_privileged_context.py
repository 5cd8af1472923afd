"""Privileged contexts of the synthetic tasks: step checkers against independent column
arithmetic and hand-built countdown cases, each context mode's text, the teacher's prompt,
and the hard split (min_carries)."""

import numpy as np
import pytest

from bridge.models import char_tokenizer
from bridge.tasks import get_task
from bridge.tasks.base import Attempt, Example, MissingContextError, RewardResult, Task, hindsight_hint


def _carry_into(a, b, i):
    """The carry into column i of a + b, from the sums of the lower columns."""
    return (a % 10**i + b % 10**i) // 10**i


@pytest.mark.parametrize("digits", [1, 3, 4])
def test_addition_critique_names_the_first_wrong_column_with_its_carry(digits):
    task = get_task("arithmetic", digits=digits, num_train=min(200, 20 * digits), num_test=4)
    rng = np.random.default_rng(digits)
    for example in task.examples("train"):
        a, b = example.meta["a"], example.meta["b"]
        assert task.step_checker(example.answer, example).step == -1
        attempt = list(example.answer)
        wrong = sorted(rng.choice(digits + 1, size=rng.integers(1, digits + 2), replace=False))
        for pos in wrong:  # positions from the right
            attempt[-1 - pos] = str((int(attempt[-1 - pos]) + rng.integers(1, 10)) % 10)
        check = task.step_checker("".join(attempt), example)
        i = wrong[0]
        assert check.step == i and check.steps == digits + 1
        if i < digits:
            da, db, c = a // 10**i % 10, b // 10**i % 10, _carry_into(a, b, i)
            assert check.expected == f"{da}+{db}+{c}={da + db + c}"
        else:
            c = (a + b) // 10**digits
            assert check.expected == f"0+0+{c}={c}"
        assert f"digit {i + 1} from the right" in check.message


def test_critique_of_malformed_answers_scratchpad_and_multiplication():
    task = get_task("arithmetic", digits=2, num_train=8, num_test=2)
    example = Example("x", "47+85=", "132", "132", {"a": 47, "b": 85})
    assert task.step_checker("13", example).step == 0  # not 3 digits: fails at its first digit
    pad = get_task("arithmetic", digits=2, scratchpad=True, num_train=8, num_test=2)
    assert pad.step_checker("7+5+0=12,4+8+1=13:132", example).step == -1
    check = pad.step_checker("7+5+0=12,4+8+0=12:122", example)
    assert (check.step, check.steps, check.expected) == (1, 5, "4+8+1=13")
    assert pad.step_checker("7+5+0=12,4+8+1=13:133", example).step == 2  # steps right, units digit wrong
    mul = get_task("arithmetic", digits=2, op="*", num_train=8, num_test=2)
    example = Example("y", "47*85=", "3995", "3995", {"a": 47, "b": 85})
    check = mul.step_checker("3095", example)
    assert (check.step, check.expected) == (2, "2=9")


def test_countdown_critique_names_the_first_invalid_intermediate_equation():
    task = get_task("countdown", num_train=4, num_test=2)
    example = Example("z", "3,7,25,50->82:", "82", "(50-25)*3+7", {"numbers": [3, 7, 25, 50], "target": 82})
    assert task.step_checker("(50-25)*3+7", example).step == -1
    assert task.step_checker("(50-25)*3+7", example).steps == 3
    check = task.step_checker("(50-25)*4+7", example)  # 4 is not given
    assert (check.step, check.expected) == (1, "4>")
    check = task.step_checker("(50-25)*3+25", example)  # 25 used twice
    assert (check.step, check.expected) == (2, "25>")
    check = task.step_checker("50*3-7", example)  # valid steps, wrong result: the last step fails
    assert (check.step, check.expected) == (1, "143>82")
    twice = Example("w", "3,3,7,50->82:", "82", "", {"numbers": [3, 3, 7, 50], "target": 82})
    check = task.step_checker("7/(3-3)", twice)
    assert (check.step, check.expected) == (1, "7/0=")
    assert task.step_checker("50+", example).step == 0


def test_hindsight_hint_reveals_the_solution_through_the_first_departure():
    assert hindsight_hint("12399", "12345") == "1234"
    assert hindsight_hint("", "12345") == "1"
    assert hindsight_hint("12", "12345") == "123"
    assert hindsight_hint("123456", "12345") == "12345"


def test_each_context_mode_in_symbols_and_the_teacher_prompt():
    task = get_task("arithmetic", digits=4, num_train=4, num_test=2)
    example = Example("x", "5221+8897=", "14118", "14118", {"a": 5221, "b": 8897})
    wrong = Attempt("14128", task.reward("14128", example), peer="14118")
    right = Attempt("14118", task.reward("14118", example))
    assert task.privileged_context(example, "opsd") == "14118"
    assert task.privileged_context(example, "sdpo", wrong) == "14128=0=14118"
    assert task.privileged_context(example, "sdpo", right) == "14118=1"
    assert task.privileged_context(example, "hint", wrong) == "1411"
    assert task.privileged_context(example, "critique", wrong) == "2+9+0=11"  # column 2: 2 + 9, no carry in
    for mode in ("hint", "critique"):
        assert task.privileged_context(example, mode, right) == ""
    teacher = task.teacher_example(example, "14118")
    tokenizer = char_tokenizer("0123456789+=")  # the toy's: every context character is in it
    assert tokenizer.decode(task.prompt_ids(teacher, tokenizer)) == "14118=5221+8897="
    assert task.teacher_example(example, "") is example


def test_contexts_in_english_and_in_a_chat_turn():
    task = Task(name="echo", load_split=lambda split: [], chat=True,
                reward_fn=lambda text, e: RewardResult(float(text == e.answer), True, text))
    example = Example("x", [{"role": "user", "content": "What is 2+2?"}], "4", "2+2 is 4.")
    attempt = Attempt("5", RewardResult(0.0, True, "5"), peer="it is 4")
    assert task.privileged_context(example, "opsd") == "Reference solution:\n2+2 is 4."
    sdpo = task.privileged_context(example, "sdpo", attempt)
    assert "the answer 5 is incorrect" in sdpo and "A correct solution from another attempt:\nit is 4" in sdpo
    assert task.privileged_context(example, "hint", attempt) == "Hint: the solution begins '2'."
    with pytest.raises(MissingContextError, match="Task 'echo' has no step_checker"):
        task.privileged_context(example, "critique", attempt)
    teacher = task.teacher_example(example, "Reference solution:\n2+2 is 4.")
    assert teacher.prompt == [{"role": "user", "content": "What is 2+2?\n\nReference solution:\n2+2 is 4."}]


@pytest.mark.parametrize("min_carries", [3, 4])
def test_the_hard_split_has_long_carry_chains_and_disjoint_splits(min_carries):
    task = get_task("arithmetic", digits=4, num_train=300, num_test=100, min_carries=min_carries)
    pairs = {}
    for split in ("train", "test"):
        examples = task.examples(split)
        assert len(examples) == {"train": 300, "test": 100}[split]
        for e in examples:
            a, b = e.meta["a"], e.meta["b"]
            carries = sum((a % 10**(i + 1) + b % 10**(i + 1)) >= 10**(i + 1) for i in range(4))
            assert carries >= min_carries and e.answer == str(a + b).zfill(5)
        pairs[split] = {(min(e.meta["a"], e.meta["b"]), max(e.meta["a"], e.meta["b"])) for e in examples}
    assert not pairs["train"] & pairs["test"]
    with pytest.raises(ValueError, match="min_carries needs op"):
        get_task("arithmetic", digits=2, op="*", min_carries=1)
    with pytest.raises(ValueError, match="could not draw 21 distinct 1-digit additions with at least 1 carries"):
        get_task("arithmetic", digits=1, num_train=21, num_test=5, min_carries=1).examples("train")  # 25 exist


def test_context_prompts_teach_reading_contexts_on_train_prompts_only():
    plain = get_task("arithmetic", digits=4, num_train=400, num_test=20)
    mixed = get_task("arithmetic", digits=4, num_train=400, num_test=20, context_prompts=0.5)
    assert mixed.examples("test") == plain.examples("test")
    with_context = 0
    for p, m in zip(plain.examples("train"), mixed.examples("train")):
        assert (m.id, m.answer, m.solution) == (p.id, p.answer, p.solution)
        if m.prompt != p.prompt:
            context = m.prompt[:-len("=" + p.prompt)]
            assert m.prompt.endswith("=" + p.prompt) and context and set(context) <= set("0123456789+=")
            with_context += 1
    assert 0.4 < with_context / 400 < 0.6


def test_context_prompts_at_another_length_hold_the_answer_and_avoid_its_test_and_rl_prompts():
    """With context_digits=5, about half of the context prompts are 5-digit problems whose
    context holds the whole answer (opsd "answer", or sdpo "attempt=0=answer"); their pairs are
    neither 5-digit test pairs nor the first num_train 5-digit train pairs; the last plain_last
    stay plain."""
    mixed = get_task("arithmetic", digits=4, num_train=400, num_test=20, context_prompts=0.5, context_digits=5,
                     plain_last=50)
    hard = get_task("arithmetic", digits=5, num_train=400, num_test=20)
    key = lambda e: (min(e.meta["a"], e.meta["b"]), max(e.meta["a"], e.meta["b"]))  # noqa: E731
    avoid = {key(e) for e in hard.examples("test")} | {key(e) for e in hard.examples("train")}
    train = mixed.examples("train")
    long = [e for e in train if len(e.answer) == 6]
    assert 0.15 < len(long) / 400 < 0.35
    for e in long:
        context = e.prompt[:-len(f"={e.meta['a']:05d}+{e.meta['b']:05d}=")]
        assert context == e.solution or (context.endswith("=0=" + e.solution) and context != e.solution)
        assert key(e) not in avoid
    assert all(e.prompt == f"{e.meta['a']:04d}+{e.meta['b']:04d}=" for e in train[-50:])
