"""Synthetic tasks: arithmetic (toy bridge setting) and countdown."""

import numpy as np
import pytest

from bridge.tasks import get_task
from bridge.tasks.countdown import parse_expression


def test_arithmetic_default_is_design_toy_setting():
    task = get_task("arithmetic")
    train, test = task.examples("train"), task.examples("test")
    assert len(train) == 512 and len(test) == 1000
    for example in list(train[:50]) + list(test[:50]):
        a, op, b = example.prompt[:4], example.prompt[4], example.prompt[5:9]
        assert op == "+" and example.prompt[9:] == "=" and len(example.prompt) == 10
        assert example.answer == f"{int(a) + int(b):05d}" and example.solution == example.answer
        assert task.reward(example.answer, example).score == 1.0
    keys = lambda xs: {tuple(sorted((x.meta["a"], x.meta["b"]))) for x in xs}
    assert not keys(train) & keys(test)
    assert len(keys(test)) == 1000 and len({x.id for x in train}) == 512
    assert task.max_answer_tokens >= 6


def test_arithmetic_example_from_design():
    task = get_task("arithmetic")
    example = task.examples("test")[0]
    # rebuild one by hand: 1234+5678 -> 06912
    from bridge.tasks.arithmetic import format_answer, worked_steps

    assert format_answer(1234, 5678, 4, "+") == "06912"
    assert worked_steps(1234, 5678, 4, "+") == "4+8+0=12,3+7+1=11,2+6+1=9,1+5+0=6"
    assert format_answer(1234, 5678, 4, "*") == "07006652"
    assert worked_steps(1234, 5678, 4, "*") == "9872+86380+740400+6170000"
    assert task.reward(example.answer + "\n123", example).score == 1.0
    assert task.reward(example.answer + "<garbage", example).score == 0.0


def test_arithmetic_reward_exact_match_and_format():
    task = get_task("arithmetic", digits=2, num_train=10, num_test=10)
    example = task.examples("test")[0]
    wrong = f"{(int(example.answer) + 1) % 1000:03d}"
    assert task.reward(wrong, example).score == 0.0 and task.reward(wrong, example).format_ok
    bad = task.reward("12", example)
    assert bad.score == 0.0 and not bad.format_ok
    assert task.reward(" " + example.answer + " ", example).score == 1.0


@pytest.mark.parametrize("op", ["+", "*"])
def test_arithmetic_scratchpad_solution_scores_and_steps_are_right(op):
    task = get_task("arithmetic", digits=3, op=op, scratchpad=True, num_train=20, num_test=20)
    for example in task.examples("train"):
        steps, answer = example.solution.split(":")
        assert answer == example.answer
        assert task.reward(example.solution, example).score == 1.0
        assert not task.reward(example.answer, example).format_ok  # scratchpad format needs ":"
        a, b = example.meta["a"], example.meta["b"]
        if op == "*":
            assert sum(int(t) for t in steps.split("+")) == a * b
        else:
            assert len(steps.split(",")) == 3
    assert len(task.examples("test")[0].answer) == (4 if op == "+" else 6)


def test_arithmetic_is_deterministic_and_train_sets_are_prefixes():
    small = get_task("arithmetic", num_train=64, seed=3)
    big = get_task("arithmetic", num_train=5000, seed=3)
    other = get_task("arithmetic", num_train=64, seed=4)
    assert [x.prompt for x in small.examples("test")] == [x.prompt for x in big.examples("test")]
    assert [x.prompt for x in big.examples("train")[:64]] == [x.prompt for x in small.examples("train")]
    assert [x.prompt for x in small.examples("test")] != [x.prompt for x in other.examples("test")]
    test_keys = {tuple(sorted((x.meta["a"], x.meta["b"]))) for x in big.examples("test")}
    assert not test_keys & {tuple(sorted((x.meta["a"], x.meta["b"]))) for x in big.examples("train")}


def test_arithmetic_rejects_too_many_examples():
    with pytest.raises(ValueError, match="distinct 1-digit operand pairs"):
        get_task("arithmetic", digits=1, num_train=40, num_test=10).examples("train")


def test_countdown_solutions_verify_and_splits_disjoint():
    task = get_task("countdown", num_numbers=4, num_train=200, num_test=100, seed=1)
    train, test = task.examples("train"), task.examples("test")
    for example in list(train) + list(test):
        numbers, target = example.meta["numbers"], example.meta["target"]
        assert example.prompt == f"{','.join(map(str, numbers))}->{target}:"
        assert 1 <= target <= 100 and len(numbers) == 4
        result = task.reward(example.solution, example)
        assert result.score == 1.0 and result.format_ok, (example, result)
    key = lambda x: (tuple(sorted(x.meta["numbers"])), x.meta["target"])
    assert not {key(x) for x in train} & {key(x) for x in test}
    assert [x.prompt for x in test] == [
        x.prompt for x in get_task("countdown", num_train=5, num_test=100, seed=1).examples("test")
    ]


def test_countdown_verifier_rules():
    task = get_task("countdown", num_train=1, num_test=1)
    example = task.examples("test")[0]
    from bridge.tasks import Example

    ex = Example("x", "3,7,25,50->82:", "82", meta={"numbers": [3, 7, 25, 50], "target": 82})
    assert task.reward("(50-25)*3+7", ex).score == 1.0
    assert task.reward("(50-25)*3+7=82", ex).score == 1.0
    assert task.reward("\\boxed{(50 - 25) * 3 + 7}", ex).score == 1.0
    assert task.reward("(50-25)*3+7+7", ex).format_ok is False  # 7 used twice
    assert task.reward("50+25", ex).score == 0.0 and task.reward("50+25", ex).format_ok
    assert task.reward("50/(7-7)", ex).score == 0.0  # 7 twice: format error, no crash
    assert (
        task.reward("25/(50-50)", Example("z", "", "1", meta={"numbers": [25, 50, 50], "target": 1})).score
        == 0.0
    )
    ex2 = Example("w", "", "5", meta={"numbers": [10, 4, 2], "target": 5})
    assert task.reward("10/(4-2)", ex2).score == 1.0  # exact division
    assert task.reward("10/4*2", ex2).score == 1.0  # rationals: 2.5*2
    for attack in [
        "__import__('os').system('true')",
        "2**50",
        "50 and 3",
        "[3]",
        "3.0+7",
        "-3+7",
        "(" * 300 + "3" + ")" * 300,
        "lambda: 3",
        "",
    ]:
        result = task.reward(attack, ex)
        assert result.score == 0.0 and not result.format_ok, attack
    assert parse_expression("1+2") is not None and parse_expression("1 if 2 else 3") is None
    assert task.reward(example.solution, example).score == 1.0


def test_countdown_difficulty_knob_and_chat_prompt():
    hard = get_task(
        "countdown",
        num_numbers=6,
        max_number=100,
        target_min=100,
        target_max=999,
        num_train=20,
        num_test=20,
        seed=2,
        chat=True,
    )
    for example in hard.examples("train"):
        assert len(example.meta["numbers"]) == 6 and 100 <= example.meta["target"] <= 999
        assert "\\boxed{}" in example.prompt
        assert hard.reward(f"so \\boxed{{{example.solution}}}", example).score == 1.0
    rng_targets = np.array([x.meta["target"] for x in hard.examples("test")])
    assert rng_targets.min() >= 100


def _random_expression(rng: np.random.Generator, numbers: list[int]) -> str:
    """A uniformly random fully parenthesized expression over `numbers` in the given order."""
    if len(numbers) == 1:
        return str(numbers[0])
    split = int(rng.integers(1, len(numbers)))
    op = "+-*/"[rng.integers(4)]
    return f"({_random_expression(rng, numbers[:split])}{op}{_random_expression(rng, numbers[split:])})"


def _random_candidate(rng: np.random.Generator, numbers: list[int]) -> str:
    """What an untrained policy that always writes a well-formed answer would write by chance:
    k ~ Uniform{1..len(numbers)} of the given numbers (no repeats, random order), a random binary
    tree over them (split point uniform at each node) and operators uniform over + - * /."""
    k = int(rng.integers(1, len(numbers) + 1))
    picked = [numbers[i] for i in rng.permutation(len(numbers))[:k]]
    return _random_expression(rng, picked)


def _random_solve_rate(task, num_samples: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    scores = []
    for example in task.examples("test"):
        for _ in range(num_samples):
            result = task.reward(_random_candidate(rng, example.meta["numbers"]), example)
            assert result.format_ok, result  # every candidate is a valid answer; only the value varies
            scores.append(result.score)
    return float(np.mean(scores))


def test_countdown_hardest_setting_is_almost_never_solved_by_random_answers():
    """Sparse-reward regime: random well-formed answers (200 problems x 50 samples per setting)
    solve the easiest setting often and the hardest almost never."""
    problems = dict(num_train=1, num_test=200, seed=0)
    easiest = get_task("countdown", num_numbers=2, max_number=25, target_min=1, target_max=100, **problems)
    default = get_task("countdown", **problems)
    hardest = get_task("countdown", num_numbers=6, max_number=100, target_min=100, target_max=999, **problems)
    tasks = {"easiest": easiest, "default": default, "hardest": hardest}
    rates = {name: _random_solve_rate(task, num_samples=50, seed=0) for name, task in tasks.items()}
    print(f"countdown random-answer solve rates: {rates}")
    assert rates["hardest"] < 0.01
    assert rates["hardest"] < rates["easiest"] / 20
    assert rates["easiest"] > rates["default"] > rates["hardest"]
