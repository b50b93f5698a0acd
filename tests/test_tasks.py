"""The embedded instruction tasks: correct answers score 1, hard negatives 0, splits are disjoint."""

import random

import pytest

from palmrl import tasks
from palmrl.errors import UserError

pytestmark = pytest.mark.unit

SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def examples_by_split():
    return {split: tasks.make_examples(split, 1500, seed=0) for split in SPLITS}


@pytest.mark.parametrize("name", list(tasks.TASKS))
def test_correct_scores_one_and_wrong_scores_zero(name):
    task = tasks.TASKS[name]
    for seed in range(4):
        rng = random.Random(seed)
        for split in SPLITS:
            for ex in tasks.make_examples(split, 40, seed=seed, tasks=[name]):
                assert ex.task == name
                assert tasks.check(ex.prompt, ex.output) == 1.0
                assert tasks.check(ex.prompt, f"  {ex.output}\n") == 1.0  # whitespace is stripped
                assert task.check(ex, ex.output) == 1.0 and task.check(ex.prompt, ex.output) == 1.0
                assert tasks.grade(ex.prompt, ex.output) == 1.0
                wrong = tasks.wrong_response(ex, rng)
                assert wrong.strip() and wrong != ex.output
                assert tasks.check(ex.prompt, wrong) == 0.0, (ex, wrong)
                assert task.check(ex, wrong) == 0.0
                assert 0.0 <= tasks.grade(ex.prompt, wrong) <= 0.5


def test_splits_are_disjoint_and_hash_assigned(examples_by_split):
    prompts = {split: {ex.prompt for ex in exs} for split, exs in examples_by_split.items()}
    assert not prompts["train"] & prompts["val"]
    assert not prompts["train"] & prompts["test"]
    assert not prompts["val"] & prompts["test"]
    for split, exs in examples_by_split.items():
        assert all(tasks.prompt_split(ex.prompt) == split for ex in exs)
    # a different seed draws different examples, but from the same split
    other = tasks.make_examples("val", 300, seed=7)
    assert {ex.prompt for ex in other} & prompts["val"]
    assert not {ex.prompt for ex in other} & (prompts["train"] | prompts["test"])


def test_every_task_appears_in_every_split(examples_by_split):
    for split, exs in examples_by_split.items():
        assert {ex.task for ex in exs} == set(tasks.TASKS), split


def test_deterministic_by_seed():
    assert tasks.make_examples("train", 200, seed=3) == tasks.make_examples("train", 200, seed=3)
    assert tasks.make_examples("train", 200, seed=3) != tasks.make_examples("train", 200, seed=4)
    subset = tasks.make_examples("val", 100, seed=1, tasks=["add", "capital"])
    assert {ex.task for ex in subset} == {"add", "capital"}
    rng_a, rng_b = random.Random(5), random.Random(5)
    assert [tasks.wrong_response(ex, rng_a) for ex in subset] == [tasks.wrong_response(ex, rng_b) for ex in subset]


def test_examples_match_the_plain_draw_loop():
    """make_examples skips solving and re-hashing redrawn prompts; the examples are those of the
    plain loop (draw, solve, keep when in the split and new), so every run's data stays the same."""
    def plain(split, n, seed, names):
        rng, out, seen = random.Random(f"palmrl.tasks:{split}:{seed}"), [], set()
        for _ in range(n):
            task = tasks.TASKS[rng.choice(names)]
            for attempt in range(2000):
                ex = task.generate(rng)
                if tasks.prompt_split(ex.prompt) == split and (ex.prompt not in seen or attempt >= 50):
                    break
            seen.add(ex.prompt)
            out.append(ex)
        return out

    for split, seed, names in (("train", 0, list(tasks.TASKS)), ("val", 3, ["capital", "color", "count_words"])):
        assert tasks.make_examples(split, 600, seed=seed, tasks=names) == plain(split, 600, seed, names)


def test_responses_are_short(examples_by_split):
    assert max(len(ex.output) for exs in examples_by_split.values() for ex in exs) <= 20


def test_checker_on_formatted_prompts():
    prompts = [
        tasks.format_prompt("Reverse the letters of the word.", "stone"),
        tasks.format_prompt("Add the two numbers.", "12 + 30"),
        tasks.format_prompt("Repeat the word 3 times.", "cat"),
        tasks.format_prompt("What is the capital of France?"),
        tasks.format_prompt("What color is the sky?", ""),
        tasks.format_prompt("Which number is larger?", "7 or 70"),
        tasks.format_prompt("Write a poem about the sea."),  # not a task
    ]
    responses = ["enots", "42", "cat cat cat", "paris.", "Blue", "7", "waves"]
    assert tasks.checker(prompts, responses) == [1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    assert [tasks.task_of(p) for p in prompts] == ["reverse", "add", "repeat", "capital", "color", "larger", None]
    assert tasks.check(prompts[1], "43") == 0.0 and tasks.check(prompts[0], "ENOTS") == 0.0
    assert tasks.check(tasks.format_prompt("Uppercase the word.", "stone"), "stone") == 0.0  # case matters here
    assert tasks.check(tasks.format_prompt("Add the two numbers.", "twelve + 30"), "42") == 0.0  # unparsable input
    with pytest.raises(ValueError):
        tasks.checker(prompts, responses[:2])


def test_partial_credit_is_graded():
    prompt = tasks.format_prompt("Add the two numbers.", "40 + 40")
    assert tasks.grade(prompt, "81") > tasks.grade(prompt, "90") > tasks.grade(prompt, "5") >= 0.0
    assert tasks.grade(prompt, "81") < 0.5
    assert tasks.grade(tasks.format_prompt("Write a poem."), "anything") == 0.0


def test_tables_are_consistent():
    pairs = [pair.split() for pair in tasks._OPPOSITE_PAIRS.split(",")]
    words = [word for pair in pairs for word in pair]
    assert len(words) == len(set(words))  # each word has exactly one opposite
    assert all(tasks.OPPOSITES[tasks.OPPOSITES[w]] == w for w in tasks.OPPOSITES)
    assert len(set(tasks.WORDS)) == len(tasks.WORDS) >= 300
    assert all(w.isalpha() and w.islower() for w in tasks.WORDS)


def test_bad_arguments():
    with pytest.raises(UserError, match="data.tasks"):
        tasks.make_examples("train", 5, tasks=["juggle"])
    with pytest.raises(UserError, match="split"):
        tasks.make_examples("holdout", 5)


def test_hard_negatives_cover_what_a_reward_model_would_otherwise_exploit():
    """A reward model learns whatever separates chosen from rejected. If `larger`'s only negative were
    the smaller input, "the biggest number wins" would fit, and PPO would answer 99 (measured); if
    Q&A negatives were only other facts, a misspelt right answer would score like the answer."""
    rng = random.Random(0)
    larger = [(ex, tasks.wrong_response(ex, rng)) for ex in tasks.make_examples("train", 300, tasks=["larger"])]
    not_an_input = [w for ex, w in larger if w not in ex.input.split(" or ")]
    above_answer = [w for ex, w in larger if int(w) > int(ex.output)]
    assert len(not_an_input) > 60 and len(above_answer) > 30, (len(not_an_input), len(above_answer))
    for name, table in (("capital", tasks.CAPITALS), ("color", tasks.COLORS), ("opposite", tasks.OPPOSITES)):
        pairs = [(ex, tasks.wrong_response(ex, rng)) for ex in tasks.make_examples("train", 200, tasks=[name])]
        misspelt = [w for ex, w in pairs if w not in table.values()]
        assert len(misspelt) > 40, (name, len(misspelt))
