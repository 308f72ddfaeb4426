"""Offline stand-ins: generated tasks in the formats of GSM8K, ARC/MMLU and SmolTalk.

They let the whole pipeline run with no network (the embedded default): they exercise the same
formats and skills as the public datasets, but they are NOT those datasets. Their names say
"(stand-in)", and their scores must never be reported as GSM8K, ARC or MMLU scores.

Example i of a split is generated from a seed of (task, split, i, attempt), so any example can be
built on its own, the same every time. Train and test never share a question: a question
belongs to the test split exactly when a hash of its text is 0 mod 5, and generation retries
until it draws a question of the split asked for.
"""

import itertools
import random
import zlib

from tasks.arc import arc_conversation
from tasks.common import LETTERS, MultipleChoiceTask, Task, answer_letter, check_choice
from tasks.gsm8k import FinalNumberTask, gsm8k_conversation
from tasks.spellingbee import load_words

SPLITS = ("train", "test")
DEFAULT_SIZES = {"train": 5000, "test": 500}

NAMES = ["Ava", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hugo", "Iris", "Jamal",
         "Kai", "Lena", "Mia", "Noah", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tara"]
THINGS = ["apples", "marbles", "stickers", "pencils", "cookies", "books", "stamps", "shells", "cards", "balloons"]
ITEMS = ["notebook", "ticket", "toy car", "plant", "mug", "pen", "kite", "puzzle"]
CATEGORIES = {
    "a color": ["red", "blue", "green", "yellow", "purple", "orange", "pink", "brown", "black", "white"],
    "an animal": ["dog", "cat", "horse", "rabbit", "tiger", "lion", "sheep", "eagle", "frog", "whale"],
    "a fruit": ["apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "pear", "plum", "melon"],
    "a tool": ["hammer", "saw", "wrench", "drill", "shovel", "rake", "chisel", "pliers", "ladder", "axe"],
}
OPPOSITES = [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"),
             ("up", "down"), ("open", "closed"), ("early", "late"), ("full", "empty"), ("hard", "soft"),
             ("wet", "dry"), ("old", "new"), ("strong", "weak"), ("loud", "quiet"), ("near", "far")]
PLURALS = [("mouse", "mice"), ("child", "children"), ("box", "boxes"), ("leaf", "leaves"), ("city", "cities"),
           ("foot", "feet"), ("tooth", "teeth"), ("goose", "geese"), ("knife", "knives"), ("baby", "babies"),
           ("bus", "buses"), ("man", "men"), ("woman", "women"), ("person", "people"), ("sheep", "sheep")]
CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Germany", "Berlin"),
            ("Spain", "Madrid"), ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Kenya", "Nairobi"),
            ("Peru", "Lima"), ("Norway", "Oslo"), ("Greece", "Athens"), ("Portugal", "Lisbon"),
            ("Ireland", "Dublin"), ("Poland", "Warsaw"), ("Australia", "Canberra"), ("India", "New Delhi")]


def in_split(text: str, split: str) -> bool:
    return (zlib.crc32(text.encode("utf-8")) % 5 == 0) == (split == "test")


def generate(kind: str, split: str, index: int, make):
    """make(rng) -> (key, item); retried with fresh seeds until the key's hash falls in `split`."""
    for attempt in itertools.count():
        key, item = make(random.Random(f"{kind}/{split}/{index}/{attempt}"))
        if in_split(key, split):
            return item


class StandinTask(Task):
    """A generated task with a train and a test split of a chosen size."""

    def __init__(self, split: str = "train", size: int | None = None, **kwargs):
        super().__init__(**kwargs)
        check_choice(f"{type(self).__name__} split", split, SPLITS)
        self.split = split
        self.size = DEFAULT_SIZES[split] if size is None else size

    def num_examples(self) -> int:
        return self.size


# ---------------------------------------------------------------------------------------------
# arithmetic word problems in GSM8K's format: <<expression=result>> calculations, '#### answer'

def gets_and_gives(rng):
    name, friend = rng.sample(NAMES, 2)
    thing = rng.choice(THINGS)
    a, b = rng.randint(3, 60), rng.randint(2, 40)
    total = a + b
    c = rng.randint(1, total)
    question = (f"{name} has {a} {thing}. {name} gets {b} more and then gives {c} to {friend}. "
                f"How many {thing} does {name} have now?")
    solution = (f"After getting more, {name} has {a}+{b} = <<{a}+{b}={total}>>{total} {thing}.\n"
                f"After giving {c} away, {name} has {total}-{c} = <<{total}-{c}={total - c}>>{total - c} {thing}.\n"
                f"#### {total - c}")
    return question, solution


def change(rng):
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    price, n = rng.randint(2, 15), rng.randint(2, 9)
    cost = price * n
    bill = next(b for b in (20, 50, 100, 200) if b > cost)
    question = (f"A {item} costs ${price}. {name} buys {n} of them and pays with a ${bill} bill. "
                f"How much change does {name} get, in dollars?")
    solution = (f"{n} {item}s cost {n}*{price} = <<{n}*{price}={cost}>>{cost} dollars.\n"
                f"The change is {bill}-{cost} = <<{bill}-{cost}={bill - cost}>>{bill - cost} dollars.\n"
                f"#### {bill - cost}")
    return question, solution


def reading(rng):
    name = rng.choice(NAMES)
    pages, weeks = rng.randint(3, 40), rng.randint(2, 9)
    days = 7 * weeks
    question = f"{name} reads {pages} pages every day. How many pages does {name} read in {weeks} weeks?"
    solution = (f"{weeks} weeks have {weeks}*7 = <<{weeks}*7={days}>>{days} days.\n"
                f"In {days} days {name} reads {days}*{pages} = <<{days}*{pages}={days * pages}>>{days * pages} pages.\n"
                f"#### {days * pages}")
    return question, solution


def sharing(rng):
    name = rng.choice(NAMES)
    friends, each = rng.randint(2, 9), rng.randint(2, 12)
    total = friends * each
    question = (f"{name} bakes {total} cookies and shares them equally among {friends} friends. "
                "How many cookies does each friend get?")
    solution = f"Each friend gets {total}/{friends} = <<{total}/{friends}={each}>>{each} cookies.\n#### {each}"
    return question, solution


def boxes(rng):
    count, per_box = rng.randint(2, 12), rng.randint(5, 24)
    total = count * per_box
    broken = rng.randint(1, total - 1)
    question = (f"There are {count} boxes with {per_box} pencils in each box. {broken} of the pencils are broken. "
                "How many pencils are not broken?")
    solution = (f"There are {count}*{per_box} = <<{count}*{per_box}={total}>>{total} pencils in all.\n"
                f"Of these, {total}-{broken} = <<{total}-{broken}={total - broken}>>{total - broken} are not broken.\n"
                f"#### {total - broken}")
    return question, solution


def temperature(rng):
    start, drop = rng.randint(-5, 20), rng.randint(3, 25)
    question = (f"In the morning it was {start} degrees. By midnight the temperature had dropped by {drop} degrees. "
                "What was the temperature at midnight, in degrees?")
    end = start - drop
    solution = f"At midnight it was {start}-{drop} = <<{start}-{drop}={end}>>{end} degrees.\n#### {end}"
    return question, solution


def half_price(rng):
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    price = rng.randint(3, 40)
    half = f"{price / 2:g}"
    question = f"A {item} normally costs ${price}. Today it is half price. How many dollars does {name} pay for it?"
    solution = f"Half of {price} is {price}/2 = <<{price}/2={half}>>{half} dollars.\n#### {half}"
    return question, solution


WORD_PROBLEMS = [gets_and_gives, change, reading, sharing, boxes, temperature, half_price]


class StandinArithmetic(StandinTask, FinalNumberTask):
    """Arithmetic word problems in GSM8K's format, graded like GSM8K. Not GSM8K."""

    @property
    def name(self) -> str:
        return "Arithmetic (stand-in)"

    def get_example(self, index: int) -> dict:
        def make(rng):
            question, solution = rng.choice(WORD_PROBLEMS)(rng)
            return question, (question, solution)
        return gsm8k_conversation(*generate("arithmetic", self.split, index, make))


# ---------------------------------------------------------------------------------------------
# multiple-choice questions in ARC's row format: (question, choices, correct choice)

def distinct_numbers(rng, correct: int, candidates: list[int]) -> list[int]:
    wrong = [c for c in dict.fromkeys(candidates) if c != correct]
    return [correct] + rng.sample(wrong, 3)


def largest(rng):
    numbers = rng.sample(range(1, 1000), 4)
    return "Which number is the largest?", numbers, max(numbers)


def addition(rng):
    a, b = rng.randint(1, 99), rng.randint(1, 99)
    s = a + b
    return f"What is {a} + {b}?", distinct_numbers(rng, s, [s - 1, s + 1, s + 10, s - 10, abs(a - b), s + 2]), s


def category(rng):
    kind = rng.choice(list(CATEGORIES))
    correct = rng.choice(CATEGORIES[kind])
    others = [w for k, words in CATEGORIES.items() if k != kind for w in words]
    return f"Which of these is {kind}?", [correct] + rng.sample(others, 3), correct


def letter_count(rng):
    word = rng.choice(load_words())
    letter = rng.choice(word)
    count = word.count(letter)
    choices = distinct_numbers(rng, count, [0, 1, 2, 3, 4, 5])
    return f"How many times does the letter '{letter}' appear in the word '{word}'?", choices, count


def alphabetical(rng):
    words = rng.sample(load_words(), 4)
    return "Which word comes first in alphabetical order?", words, min(words)


def opposite(rng):
    pairs = rng.sample(OPPOSITES, 4)
    word, correct = pairs[0] if rng.random() < 0.5 else pairs[0][::-1]
    return f"What is the opposite of '{word}'?", [correct] + [rng.choice(p) for p in pairs[1:]], correct


def even(rng):
    numbers = [2 * rng.randint(1, 499)] + [2 * k + 1 for k in rng.sample(range(500), 3)]
    return "Which of these numbers is even?", numbers, numbers[0]


MULTIPLE_CHOICE = [largest, addition, category, letter_count, alphabetical, opposite, even]


class StandinMultipleChoice(StandinTask, MultipleChoiceTask):
    """Simple four-choice questions in ARC's format, graded like ARC/MMLU. Not ARC or MMLU."""

    @property
    def name(self) -> str:
        return "MultipleChoice (stand-in)"

    def get_example(self, index: int) -> dict:
        def make(rng):
            question, choices, correct = rng.choice(MULTIPLE_CHOICE)(rng)
            choices = [str(c) for c in choices]
            key = question + "|" + "|".join(sorted(choices))  # the same question in any order: same split
            rng.shuffle(choices)
            labels = list(LETTERS[: len(choices)])
            row = {
                "id": f"standin-{self.split}-{index}",
                "question": question,
                "choices": {"text": choices, "label": labels},
                "answerKey": labels[choices.index(str(correct))],
            }
            return key, row
        return arc_conversation(generate("multiple-choice", self.split, index, make))


class StandinMultipleChoiceGenerative(StandinMultipleChoice):
    """The same questions answered in writing: the reply is generated and the letter it starts with graded. How a
    model is scored where no logits come back, as through a chat completions API (tasks/lm_eval/)."""

    @property
    def name(self) -> str:
        return "MultipleChoice (stand-in, generative)"

    @property
    def eval_type(self) -> str:
        return "generative"

    def evaluate(self, conversation: dict, assistant_response: str) -> int:
        return int(answer_letter(assistant_response, conversation["letters"]) == conversation["answer"])


# ---------------------------------------------------------------------------------------------
# short chit-chat conversations in SmolTalk's format: a list of {role, content} messages

def greeting(rng):
    user = rng.choice(["Hi!", "Hello", "Hey there", "Good morning!", "hi, how are you?"])
    reply = rng.choice(["Hello! How can I help you today?", "Hi! What can I do for you?",
                        "Hey! I'm happy to help. What would you like to know?"])
    return user, reply


def times(rng):
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    question = rng.choice([f"What is {a} times {b}?", f"what's {a}*{b}", f"Multiply {a} by {b}."])
    return question, f"{a} times {b} is {a * b}."


def opposite_chat(rng):
    word, other = rng.choice(OPPOSITES)
    return f"What is the opposite of {word}?", f"The opposite of \"{word}\" is \"{other}\"."


def plural(rng):
    one, many = rng.choice(PLURALS)
    return f"What is the plural of {one}?", f"The plural of \"{one}\" is \"{many}\"."


def sort_words(rng):
    words = rng.sample(load_words(), rng.randint(3, 5))
    return f"Sort these words alphabetically: {', '.join(words)}", f"In alphabetical order: {', '.join(sorted(words))}."


def backwards(rng):
    word = rng.choice(load_words())
    return f"Write the word {word} backwards.", f"\"{word}\" backwards is \"{word[::-1]}\"."


def evens(rng):
    n = rng.randint(3, 10)
    return f"List the first {n} even numbers.", "Here they are: " + ", ".join(str(2 * i) for i in range(1, n + 1)) + "."


def capital(rng):
    country, city = rng.choice(CAPITALS)
    return f"What is the capital of {country}?", f"The capital of {country} is {city}."


def name_three(rng):
    kind = rng.choice(list(CATEGORIES))
    a, b, c = rng.sample(CATEGORIES[kind], 3)
    plural_kind = {"a color": "colors", "an animal": "animals", "a fruit": "fruits", "a tool": "tools"}[kind]
    return f"Name three {plural_kind}.", f"Sure: {a}, {b} and {c}."


CHAT_TOPICS = [times, opposite_chat, plural, sort_words, backwards, evens, capital, name_three]
SYSTEM_PROMPTS = ["You are a helpful assistant.", "You are a friendly assistant. Keep your answers short."]


class StandinConversations(StandinTask):
    """Short generated chats in SmolTalk's format, for training. Not SmolTalk."""

    @property
    def name(self) -> str:
        return "Conversations (stand-in)"

    def get_example(self, index: int) -> dict:
        def make(rng):
            messages = []
            if rng.random() < 0.2:
                messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
            exchanges = [greeting(rng)] if rng.random() < 0.3 else []
            exchanges += [rng.choice(CHAT_TOPICS)(rng) for _ in range(rng.randint(1, 3))]
            if rng.random() < 0.3:
                exchanges.append((rng.choice(["Thanks!", "Thank you.", "great, thanks"]),
                                  rng.choice(["You're welcome!", "Glad I could help!"])))
            for user, assistant in exchanges:
                messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
            return "\n".join(m["content"] for m in messages), {"messages": messages}
        return generate("conversations", self.split, index, make)
