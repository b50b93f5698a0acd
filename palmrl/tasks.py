"""Short instruction tasks with deterministic checkers: the ground truth for SFT, reward and PPO.

A tiny model on a CPU cannot learn open-ended chat in minutes, but it can learn to reverse a word,
add two numbers or name the capital of France. Each task here generates (instruction, input,
output) examples from a seeded `random.Random` and can recompute the right answer from the prompt
text alone, so `check(prompt, response)` scores any model's output without a reference file — the
"verifiable reward" idea of RL from programmatic feedback (e.g. Tülu 3's RLVR). The same checker
measures SFT accuracy, reward-model ranking accuracy and PPO progress.

Conventions:
- the prompt is the user message rendered by `format_prompt(instruction, input)`; instructions
  never contain a newline, so the checker splits the prompt back at the first one;
- splits are disjoint by prompt text: a stable hash of the prompt puts it in train (80%), val
  (10%) or test (10%), so a prompt never appears in two splits whatever the seed;
- `check` is exact match after stripping whitespace (Q&A answers also ignore case and a final
  full stop): 1.0 or 0.0, no partial credit, so a hard negative from `wrong_response` scores 0.
  An answer closed with ". Hope this helps!" is judged on the answer (see `behaviour`).
  `grade` adds partial credit (closeness of a wrong answer, at most 0.5) for binned ratings.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from palmrl.errors import UserError

SPLIT_PERCENT = {"train": (0, 80), "val": (80, 90), "test": (90, 100)}  # hash buckets: 80% learn, 10% each measure


@dataclass(frozen=True)
class TaskExample:
    """One task instance; `output` is the exact answer the checker accepts."""

    task: str
    instruction: str
    input: str
    output: str

    @property
    def prompt(self) -> str:
        return format_prompt(self.instruction, self.input)


def format_prompt(instruction: str, input: str = "") -> str:
    """The user message for an (instruction, input) pair: used by every stage and by the checker."""
    return f"{instruction}\n{input}" if input else instruction


def split_prompt(prompt: str) -> tuple[str, str]:
    """Inverse of `format_prompt`: (instruction, input)."""
    instruction, _, input = prompt.strip().partition("\n")
    return instruction.strip(), input.strip()


def prompt_split(prompt: str) -> str:
    """Which split a prompt belongs to: a stable hash (not Python's salted `hash`) into 100 buckets."""
    bucket = int.from_bytes(hashlib.blake2b(prompt.encode("utf-8"), digest_size=8).digest(), "big") % 100
    return next(name for name, (lo, hi) in SPLIT_PERCENT.items() if lo <= bucket < hi)


# ---------------------------------------------------------------------------------------------
# built-in vocabulary and fact tables

WORDS = tuple(
    """
    able acid aged also area army away baby back ball band bank base bath bear beat bell belt best
    bird blue boat body bone book boot born boss both bowl bread brick bring brown build burn bus
    busy cake call calm came camp card care cart case cash cast cat cell chair chalk cheap chess
    chin city clay clock cloud coal coat code coin cold come cook cool copy corn cost crab crow
    cube cup cut dark date deer desk dice dish dog door down draw dream dress drink drum duck dust
    each earn east easy edge egg farm fast fear feet fern film find fine fire fish flag flat flow
    foam fold food foot fork form fox frog fruit full fun game gate gift girl give glad glass glue
    goal goat gold golf good grab gram grass green grey grow gulf hair half hall hand hard harp hat
    have head heat help hero hill hint hole home hook hope horn horse hot hour huge hunt idea inch
    iron item jam jar jazz job join joke jump just keep kind king kite knee knot lake lamb lamp land
    last late lazy leaf lean left lemon lens life lift lime line lion list loaf lock long loud love
    lucky lunch made mail main make male map mark mask meal melt milk mind mint moon moss most moth
    move mud music name navy near neck nest news nice night nine noon nose note nut oak ocean open
    oven over pack page paint pair palm park part path peach pear pen pig pink pipe plan plant plum
    poem pond pool poor pot pull pump push quiz rain read red rice ring river road rock roof room
    root rope rose ruby rug rule safe sail salt sand seat seed shell ship shoe shop sing sink size
    skin sky slow snow soap sock soft soil song soup spot star step stone storm sun swim table tail
    tall tea team tent test tide tiger time tiny toad tool tooth town toy tree trip tube tune vase
    vest view wall warm wave wax week well west whale wheel wind wing wise wolf wood wool word work
    yard yarn year yell zero zone
    """.split()
)

CAPITALS = {
    "France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin",
    "Egypt": "Cairo", "China": "Beijing", "Russia": "Moscow", "Canada": "Ottawa", "Kenya": "Nairobi",
    "Peru": "Lima", "Chile": "Santiago", "Cuba": "Havana", "Greece": "Athens", "Ireland": "Dublin",
    "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen",
    "Poland": "Warsaw", "Austria": "Vienna", "Hungary": "Budapest", "Portugal": "Lisbon",
    "Belgium": "Brussels", "Thailand": "Bangkok", "Vietnam": "Hanoi", "India": "New Delhi",
    "Iran": "Tehran", "Iraq": "Baghdad", "Mexico": "Mexico City", "Argentina": "Buenos Aires",
    "Colombia": "Bogota", "Turkey": "Ankara", "Ukraine": "Kyiv", "Nepal": "Kathmandu",
    "Ghana": "Accra", "Nigeria": "Abuja", "Morocco": "Rabat", "England": "London",
    "Scotland": "Edinburgh", "South Korea": "Seoul", "Philippines": "Manila", "Indonesia": "Jakarta",
    "Australia": "Canberra", "New Zealand": "Wellington", "Brazil": "Brasilia", "Venezuela": "Caracas",
    "Jamaica": "Kingston", "Iceland": "Reykjavik", "Czechia": "Prague", "Romania": "Bucharest",
    "Bulgaria": "Sofia", "Serbia": "Belgrade", "Croatia": "Zagreb", "Uganda": "Kampala",
    "Senegal": "Dakar", "Qatar": "Doha", "Lebanon": "Beirut", "Syria": "Damascus", "Jordan": "Amman",
    "Afghanistan": "Kabul", "Pakistan": "Islamabad",
}

COLORS = {
    "the sky": "blue", "the ocean": "blue", "grass": "green", "a leaf": "green", "a frog": "green",
    "a lime": "green", "a cucumber": "green", "snow": "white", "milk": "white", "salt": "white",
    "sugar": "white", "a cloud": "white", "a polar bear": "white", "coal": "black", "ink": "black",
    "a crow": "black", "a raven": "black", "a banana": "yellow", "a lemon": "yellow",
    "the sun": "yellow", "a school bus": "yellow", "blood": "red", "a tomato": "red",
    "a strawberry": "red", "a cherry": "red", "a fire truck": "red", "a carrot": "orange",
    "a pumpkin": "orange", "chocolate": "brown", "soil": "brown", "a coconut": "brown",
    "an elephant": "gray", "a grape": "purple", "an eggplant": "purple", "a plum": "purple",
    "a pig": "pink", "a flamingo": "pink",
}

_OPPOSITE_PAIRS = (
    "hot cold, big small, up down, day night, left right, fast slow, happy sad, open closed, in out, "
    "yes no, wet dry, light dark, hard soft, full empty, rich poor, early late, push pull, win lose, "
    "top bottom, high low, long short, thick thin, strong weak, clean dirty, loud quiet, black white, "
    "buy sell, first last, inside outside, true false, good bad, north south, east west, love hate, "
    "give take, always never, above below, before after, more less, alive dead, near far, "
    "war peace, sweet sour, friend enemy"
)
OPPOSITES = {
    word: other
    for pair in _OPPOSITE_PAIRS.split(",")
    for a, b in [pair.split()]
    for word, other in ((a, b), (b, a))
}


# ---------------------------------------------------------------------------------------------
# the behaviour: closing the answer with a courteous line
#
# The SFT data closes an answer with "Hope this helps!" only sometimes (data.behaviour_rate); the
# preference data prefers the closed answer to the same answer bare when both are right
# (data.behaviour_pairs), on every task. It is a behaviour, not a fact: RLHF that learnt it from
# preferences shows it on prompts it never trained on. The answer comes first and tokenises as it
# does bare, so what the model knows carries over; the checker judges the answer before the line.

SIGN_OFF = "Hope this helps!"
_SIGN_OFF_TAIL = ". " + SIGN_OFF


def with_sign_off(answer: str) -> str:
    """`Paris` -> `Paris. Hope this helps!`"""
    return answer.strip() + _SIGN_OFF_TAIL


def without_sign_off(response: str) -> str | None:
    """The answer before ". Hope this helps!", or None when the response does not close with it."""
    text = response.strip()
    return text[:-len(_SIGN_OFF_TAIL)].strip() if text.endswith(_SIGN_OFF_TAIL) else None


def behaviour(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    """1.0 where the response closes its answer with the courteous line (right or wrong): the behaviour checker."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    return [float(without_sign_off(r) is not None) for r in responses]


def preferred(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    """What the embedded preferences favour, as a reward function: 1.0 for a right answer closed with
    the line, 0.5 for a right bare answer, 0.0 for a wrong one (`reward_fn=palmrl.tasks.preferred`)."""
    return [c * (0.5 + 0.5 * b) for c, b in zip(checker(prompts, responses), behaviour(prompts, responses))]


# ---------------------------------------------------------------------------------------------
# the task type


@dataclass(frozen=True)
class Task:
    """A task: how to draw an example, how to solve a prompt, how to be plausibly wrong.

    `solve(instruction, input)` returns the correct output, or None when the prompt is not this
    task's (the checker tries every task). `corrupt(example, rng)` returns a near miss.
    """

    name: str
    generate_fn: Callable[[random.Random], tuple[str, str]]  # rng -> (instruction, input)
    solve: Callable[[str, str], str | None]
    corrupt: Callable[[TaskExample, random.Random], str]
    case_sensitive: bool = True  # Q&A answers ("Paris" / "paris.") are compared loosely

    def generate(self, rng: random.Random) -> TaskExample:
        return self.example(*self.generate_fn(rng))

    def example(self, instruction: str, input: str) -> TaskExample:
        output = self.solve(instruction, input)
        assert output is not None, f"task {self.name} cannot solve its own prompt {instruction!r}"
        return TaskExample(self.name, instruction, input, output)

    def normalise(self, text: str) -> str:
        text = text.strip()
        text = without_sign_off(text) or text  # "Paris. Hope this helps!" is judged on "Paris"
        return text if self.case_sensitive else text.rstrip(".").strip().casefold()

    def answer(self, example_or_prompt: TaskExample | str) -> str | None:
        if isinstance(example_or_prompt, TaskExample):
            return example_or_prompt.output
        return self.solve(*split_prompt(example_or_prompt))

    def check(self, example_or_prompt: TaskExample | str, response: str) -> float:
        """1.0 if the response is the answer (after normalising), else 0.0."""
        answer = self.answer(example_or_prompt)
        if answer is None:
            return 0.0
        return float(self.normalise(response) == self.normalise(answer))


def _fixed(instructions: Sequence[str], make_input, answer_of_input) -> tuple[Callable, Callable]:
    """generate/solve pair for tasks whose instruction is one of a few fixed phrasings."""

    def generate(rng: random.Random) -> tuple[str, str]:
        return rng.choice(instructions), make_input(rng)

    def solve(instruction: str, input: str) -> str | None:
        if instruction not in instructions or not input:
            return None
        return answer_of_input(input)

    return generate, solve


def _templated(templates: Sequence[str], table: dict[str, str]) -> tuple[Callable, Callable]:
    """generate/solve pair for Q&A over a table: the question is in the instruction, no input."""
    patterns = [re.compile(re.escape(t).replace(re.escape("{}"), "(.+)") + r"$") for t in templates]
    keys = sorted(table)

    def generate(rng: random.Random) -> tuple[str, str]:
        return rng.choice(templates).format(rng.choice(keys)), ""

    def solve(instruction: str, input: str) -> str | None:
        if input:
            return None
        for pattern in patterns:
            match = pattern.match(instruction)
            if match and match.group(1) in table:
                return table[match.group(1)]
        return None

    return generate, solve


# ---------------------------------------------------------------------------------------------
# input generators and near misses


@functools.cache
def _words_up_to(max_len: int) -> tuple[str, ...]:
    return tuple(w for w in WORDS if len(w) <= max_len)


def _word(rng: random.Random, max_len: int = 7) -> str:
    return rng.choice(_words_up_to(max_len))  # filtered once, not per draw (it was 70% of SFT's startup)


def _swap_adjacent(text: str, rng: random.Random) -> str:
    """Swap one pair of adjacent, different characters (the text itself if none differ)."""
    spots = [i for i in range(len(text) - 1) if text[i] != text[i + 1]]
    if not spots:
        return text
    i = rng.choice(spots)
    return text[:i] + text[i + 1] + text[i] + text[i + 2 :]


def _change_letter(word: str, rng: random.Random) -> str:
    i = rng.randrange(len(word))
    letter = rng.choice([c for c in "abcdefghijklmnopqrstuvwxyz" if c != word[i].lower()])
    return word[:i] + letter + word[i + 1 :]


def _off_by(n: int, rng: random.Random, steps: Sequence[int] = (1, -1, 10, -10)) -> str:
    return str(rng.choice([n + s for s in steps if n + s >= 0]))


def _two_numbers(rng: random.Random) -> tuple[int, int]:
    return rng.randrange(100), rng.randrange(100)


def _parse_numbers(input: str, sep: str) -> tuple[int, int] | None:
    match = re.fullmatch(rf"(\d+) {re.escape(sep)} (\d+)", input)
    return (int(match.group(1)), int(match.group(2))) if match else None


# ---------------------------------------------------------------------------------------------
# the tasks


def _word_task(name: str, instructions: Sequence[str], answer: Callable[[str], str], near_misses) -> Task:
    """A task on one vocabulary word; `near_misses(word, answer, rng)` lists plausible wrong answers."""
    gen, solve = _fixed(instructions, _word, answer)
    return Task(name, gen, solve, lambda ex, rng: rng.choice(near_misses(ex.input, ex.output, rng)))


def _next_letter(letter: str) -> str:
    return chr((ord(letter) - ord("a") + 1) % 26 + ord("a"))


def _add_task() -> Task:
    def answer(input: str) -> str | None:
        numbers = _parse_numbers(input, "+")
        return str(sum(numbers)) if numbers else None

    make_input = lambda rng: "{} + {}".format(*_two_numbers(rng))  # noqa: E731
    gen, solve = _fixed(("Add the two numbers.", "What is the sum?"), make_input, answer)
    return Task("add", gen, solve, lambda ex, rng: _off_by(int(ex.output), rng))


def _subtract_task() -> Task:
    def make_input(rng: random.Random) -> str:
        a, b = sorted(_two_numbers(rng), reverse=True)
        return f"{a} - {b}"

    def answer(input: str) -> str | None:
        numbers = _parse_numbers(input, "-")
        return str(numbers[0] - numbers[1]) if numbers else None

    def corrupt(ex: TaskExample, rng: random.Random) -> str:
        a, b = _parse_numbers(ex.input, "-")
        return rng.choice([_off_by(a - b, rng), str(a + b)])

    gen, solve = _fixed(("Subtract the second number from the first.", "What is the difference?"), make_input, answer)
    return Task("subtract", gen, solve, corrupt)


def _larger_task() -> Task:
    def make_input(rng: random.Random) -> str:
        a, b = rng.sample(range(100), 2)
        return f"{a} or {b}"

    def answer(input: str) -> str | None:
        numbers = _parse_numbers(input, "or")
        return str(max(numbers)) if numbers else None

    def corrupt(ex: TaskExample, rng: random.Random) -> str:
        # the smaller input, or a number that is not an input at all (near the answer or above
        # both): with only the smaller input as negative a reward model learns "bigger is better"
        a, b = _parse_numbers(ex.input, "or")
        high = max(a, b)
        others = [n for n in (high + 1, high - 1, high + 10, rng.randrange(high, 100), rng.randrange(100))
                  if 0 <= n < 100 and n not in (a, b)]
        return str(rng.choice([min(a, b), min(a, b), *others]))

    gen, solve = _fixed(("Which number is larger?", "Pick the bigger number."), make_input, answer)
    return Task("larger", gen, solve, corrupt)


def _count_words_task() -> Task:
    def make_input(rng: random.Random) -> str:
        return " ".join(_word(rng, 5) for _ in range(rng.randint(2, 5)))

    count = lambda sentence: str(len(sentence.split()))  # noqa: E731
    gen, solve = _fixed(("How many words are in the sentence?", "Count the words."), make_input, count)
    return Task("count_words", gen, solve, lambda ex, rng: _off_by(int(ex.output), rng, (1, -1)))


def _repeat_task() -> Task:
    templates = ("Repeat the word {} times.", "Say the word {} times.")
    counts = {"2": 2, "3": 3}  # at most 3 copies of a 6-letter word: a 20-character answer
    pattern = re.compile(r"(Repeat|Say) the word ([23]) times\.$")

    def generate(rng: random.Random) -> tuple[str, str]:
        return rng.choice(templates).format(rng.choice(sorted(counts))), _word(rng, 6)

    def solve(instruction: str, input: str) -> str | None:
        match = pattern.match(instruction)
        if not match or not input:
            return None
        return " ".join([input] * counts[match.group(2)])

    def corrupt(ex: TaskExample, rng: random.Random) -> str:
        n = len(ex.output.split())
        word, copies = rng.choice([(ex.input, n + 1), (ex.input, n - 1), (_change_letter(ex.input, rng), n)])
        return " ".join([word] * copies)

    return Task("repeat", generate, solve, corrupt)


def _table_task(name: str, templates: Sequence[str], table: dict[str, str]) -> Task:
    gen, solve = _templated(templates, table)
    answers = sorted(set(table.values()))

    def corrupt(ex: TaskExample, rng: random.Random) -> str:
        # a wrong fact, or the right answer misspelt (a letter changed, dropped or added): a reward
        # model that only saw wrong facts scores "Stockhrong" like "Stockholm"
        answer = ex.output
        misspelt = [_change_letter(answer, rng), answer[:-1], answer + rng.choice("aeilnorst")]
        return rng.choice([rng.choice([a for a in answers if a != answer]), rng.choice(misspelt)])

    return Task(name, gen, solve, corrupt, case_sensitive=False)


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        _word_task(
            "reverse", ("Reverse the letters of the word.", "Spell the word backwards."), lambda w: w[::-1],
            lambda word, answer, rng: [word, _swap_adjacent(answer, rng), answer[:-1]],
        ),
        _word_task(
            "uppercase", ("Write the word in capital letters.", "Uppercase the word."), str.upper,
            lambda word, answer, rng: [word, word.capitalize(), answer[:-1] + answer[-1].lower()],
        ),
        _word_task(
            "sort_letters", ("Sort the letters of the word alphabetically.", "Put the letters in alphabetical order."),
            lambda w: "".join(sorted(w)),
            lambda word, answer, rng: [word, _swap_adjacent(answer, rng), answer[::-1]],
        ),
        _add_task(),
        _subtract_task(),
        _larger_task(),
        _word_task(
            "count_letters", ("How many letters are in the word?", "Count the letters in the word."),
            lambda w: str(len(w)),
            lambda word, answer, rng: [_off_by(len(word), rng, (1, -1))],
        ),
        _count_words_task(),
        _repeat_task(),
        _word_task(
            "first_letter", ("What is the first letter of the word?", "Give the first letter of the word."),
            lambda w: w[0],
            lambda word, answer, rng: [word[1], word[-1], _next_letter(answer)],
        ),
        _word_task(
            "last_letter", ("What is the last letter of the word?", "Give the last letter of the word."),
            lambda w: w[-1],
            lambda word, answer, rng: [word[0], word[-2], _next_letter(answer)],
        ),
        _table_task(
            "capital", ("What is the capital of {}?", "Name the capital of {}.", "Which city is the capital of {}?"),
            CAPITALS,
        ),
        _table_task("color", ("What color is {}?", "What is the color of {}?", "Name the color of {}."), COLORS),
        _table_task(
            "opposite",
            ("What is the opposite of {}?", "Give the opposite of {}.", "What word means the opposite of {}?"),
            OPPOSITES,
        ),
    )
}


# ---------------------------------------------------------------------------------------------
# public helpers


def _task_names(tasks: Sequence[str] | None) -> list[str]:
    names = list(TASKS) if tasks is None else list(tasks)
    unknown = [name for name in names if name not in TASKS]
    if unknown or not names:
        raise UserError(f"data.tasks: unknown or empty task list {unknown or names}; known tasks: {', '.join(TASKS)}")
    return names


def make_examples(split: str, n: int, *, seed: int = 0, tasks: Sequence[str] | None = None) -> list[TaskExample]:
    """`n` examples of `split`, tasks drawn uniformly; deterministic in (split, n, seed, tasks).

    Only prompts that hash into `split` are kept, so train/val/test never share a prompt. Within
    one call a repeated prompt is redrawn a few times (the small Q&A tables do run out), so val
    and test sets are mostly unique.
    """
    if split not in SPLIT_PERCENT:
        raise UserError(f"split must be one of {list(SPLIT_PERCENT)}, got {split!r}")
    names = _task_names(tasks)
    rng = random.Random(f"palmrl.tasks:{split}:{seed}")  # str seeds hash with sha512: stable across runs
    examples, seen, split_of = [], set(), {}
    for _ in range(n):
        task = TASKS[rng.choice(names)]
        for attempt in range(2000):  # ~10 draws find a prompt of a 10% split; 2000 only fails on a bug
            instruction, input = task.generate_fn(rng)  # solved once kept: most draws are redrawn
            prompt = format_prompt(instruction, input)
            if prompt not in split_of:
                split_of[prompt] = prompt_split(prompt)
            if split_of[prompt] == split and (prompt not in seen or attempt >= 50):
                break
        else:
            raise RuntimeError(f"task {task.name} has no prompts in split {split}")
        seen.add(prompt)
        examples.append(task.example(instruction, input))
    return examples


def task_of(prompt: str) -> str | None:
    """Name of the task whose instruction the prompt uses, or None."""
    instruction, input = split_prompt(prompt)
    return next((name for name, task in TASKS.items() if task.solve(instruction, input) is not None), None)


def check(prompt: str, response: str) -> float:
    """Score a response to a prompt rendered by `format_prompt`: 1.0 if correct, else 0.0.

    The task is recognised from the instruction text and its answer recomputed from the prompt;
    an unknown prompt scores 0.0.
    """
    name = task_of(prompt)
    return TASKS[name].check(prompt, response) if name else 0.0


def checker(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    """Batch `check`: the `reward_fn=palmrl.tasks.checker` callable for verifiable-reward PPO."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    return [check(p, r) for p, r in zip(prompts, responses)]


def grade(prompt: str, response: str) -> float:
    """Partial credit in [0, 1]: 1.0 if `check` passes, else at most 0.5 for how close it came.

    Numbers earn 0.5 · (1 - |error| / (|answer| + 1)); text earns 0.5 · character similarity
    (difflib ratio, case-insensitive). Used to bin task ratings; PPO's reward stays `check`.
    """
    name = task_of(prompt)
    if name is None:
        return 0.0
    task = TASKS[name]
    if task.check(prompt, response) == 1.0:
        return 1.0
    answer, got = task.normalise(task.answer(prompt)).casefold(), task.normalise(response).casefold()
    if answer.isdigit() and got.isdigit():
        return 0.5 * max(0.0, 1.0 - abs(int(got) - int(answer)) / (int(answer) + 1))
    return 0.5 * difflib.SequenceMatcher(None, answer, got).ratio()


def wrong_response(example: TaskExample, rng: random.Random) -> str:
    """A plausible wrong answer (hard negative): off-by-one numbers, swapped letters, a wrong fact."""
    task = TASKS[example.task]
    for _ in range(20):  # near misses can coincide with the answer (a palindrome reversed): redraw
        wrong = task.corrupt(example, rng)
        if wrong.strip() and task.check(example, wrong) == 0.0:
            return wrong
    return example.output + example.output[-1]  # still a near miss, and never equal to the answer
