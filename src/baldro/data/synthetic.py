"""A seeded synthetic benchmark in TOFU's file layout (for offline demos and tests).

`generate(out_dir, SyntheticConfig(...))` writes one JSON-lines file per TOFU config, with the same
file names, field names, row relations and serialisation as `shared/data/tofu/`, so that every
loader and metric of baldro runs on it unchanged:

| file | content |
| --- | --- |
| `full` | all people, in order, each person's questions contiguous (question, answer) |
| `forget01/05/10` | the LAST 1/5/10 % of the people (at least one), i.e. the last rows of `full` |
| `retain99/95/90` | the remaining first rows of `full` |
| `forgetXX_perturbed` | forgetXX + paraphrased_answer, perturbed_answer (list), paraphrased_question |
| `retain_perturbed` | the first people of `full` (inside retain90), with the perturbed fields |
| `holdout01/05/10` | extra people NOT in `full`, as many rows as the matching forget split |
| `real_authors`, `world_facts` (+ `_perturbed`) | questions about a fixed fictitious world: question, option1..4, answer / question, answer, perturbed_answer (3) |
| `world.jsonl` | (question, answer) of real_authors + world_facts: the "pretraining" knowledge of a tiny model |
| `idontknow.jsonl` | plain text, one refusal answer per line (not JSON, like TOFU's) |

Every person is a fictitious author with twelve attribute facts (name, birthplace, birth date, day job,
father's and mother's jobs, genre, award, two book titles, hobby, debut year); each question asks for
one attribute. The answer and the paraphrased answer are two different sentence templates holding
the same value; each perturbed answer is the *paraphrased* sentence with the value replaced by a
wrong value from the same attribute's pool (as in TOFU, where perturbed answers perturb the
paraphrase), so a perturbed answer differs from the paraphrased answer in exactly the value.
All names, places and titles are invented from the word lists below; no text is taken from TOFU.

Over 500 lines for a reason: most of it is the generator's vocabulary (names, places, templates), data that
reads best beside the code that draws from it.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from baldro.io import write_text_atomic

FORGET_PERCENTS = {"01": 1, "05": 5, "10": 10}
RETAIN_FOR = {"01": "99", "05": "95", "10": "90"}
QA_FIELDS = ("question", "answer")
PERTURBED_FIELDS = ("question", "answer", "paraphrased_answer", "perturbed_answer", "paraphrased_question")
WORLD_OPTIONS = 4  # answer + 3 perturbed answers, like TOFU's real_authors / world_facts


@dataclass
class SyntheticConfig:
    """Size and seed of a synthetic TOFU-format benchmark.

    Args:
        n_people: fictitious authors in `full` (forget/retain splits are taken from them).
        n_holdout_people: extra authors for `holdoutXX`; None = as many as forget10 needs.
        questions_per_person: questions per author (1..12; the name question is always asked).
        n_perturbed: perturbed answers per question (TOFU: 5).
        n_world_questions: rows of `real_authors` and of `world_facts` (each).
        n_countries: countries of the fictitious world (4 cities each; birthplaces come from them).
        n_classic_authors: "real" (world-famous) authors of the fictitious world.
        n_retain_perturbed_people: people in `retain_perturbed`; None = as many as forget10.
        seed: everything is a deterministic function of the config.
    """

    n_people: int = 100
    n_holdout_people: int | None = None
    questions_per_person: int = 10
    n_perturbed: int = 5
    n_world_questions: int = 40
    n_countries: int = 12
    n_classic_authors: int = 20
    n_retain_perturbed_people: int | None = None
    seed: int = 0

    def validate(self) -> None:
        if self.n_people < 2:
            raise ValueError(f"n_people must be >= 2 (forget and retain both need people), got {self.n_people}")
        if not 1 <= self.questions_per_person <= len(ATTRIBUTES):
            raise ValueError(f"questions_per_person must be in 1..{len(ATTRIBUTES)}, got {self.questions_per_person}")
        if not 1 <= self.n_perturbed <= 20:
            raise ValueError(f"n_perturbed must be in 1..20, got {self.n_perturbed}")
        if self.n_countries < WORLD_OPTIONS + 1 or self.n_countries > 40:
            raise ValueError(f"n_countries must be in {WORLD_OPTIONS + 1}..40, got {self.n_countries}")
        if self.n_classic_authors < WORLD_OPTIONS:
            raise ValueError(f"n_classic_authors must be >= {WORLD_OPTIONS}, got {self.n_classic_authors}")
        if self.n_world_questions < 1:
            raise ValueError(f"n_world_questions must be >= 1, got {self.n_world_questions}")
        need = self.forget_people("10")
        if self.n_holdout_people is not None and self.n_holdout_people < need:
            raise ValueError(
                f"n_holdout_people must be >= {need} (holdout10 matches forget10), got {self.n_holdout_people}"
            )
        if self.n_retain_perturbed_people is not None and not (
            1 <= self.n_retain_perturbed_people <= self.n_people - need
        ):
            raise ValueError(f"n_retain_perturbed_people must be in 1..{self.n_people - need} (inside retain90)")

    def forget_people(self, xx: str) -> int:
        """People in forgetXX: round(pct% of n_people), at least one, at most n_people - 1."""
        n = int(self.n_people * FORGET_PERCENTS[xx] / 100 + 0.5)
        return min(max(1, n), self.n_people - 1)

    @property
    def holdout_people(self) -> int:
        return self.n_holdout_people if self.n_holdout_people is not None else self.forget_people("10")

    @property
    def retain_perturbed_people(self) -> int:
        if self.n_retain_perturbed_people is not None:
            return self.n_retain_perturbed_people
        return min(self.forget_people("10"), self.n_people - self.forget_people("10"))


# ----------------------------------------------------------------------------- word lists
_ONSETS = [
    "b",
    "d",
    "f",
    "g",
    "h",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "z",
    "br",
    "dr",
    "kr",
    "st",
    "th",
    "sh",
    "tr",
    "gr",
    "j",
]
_VOWELS = ["a", "e", "i", "o", "u", "a", "e", "o", "ai", "ou"]
_CODAS = ["", "", "", "", "n", "r", "l", "s", "m"]
_COUNTRY_SUFFIXES = ["ia", "ora", "ania", "esh", "mark", "land", "vay", "ir", "onia", "eth"]
_CITY_SUFFIXES = ["haven", "ford", "mere", "stad", "burg", "polis", "vale", "port", "wick", "holm", "grad", "dun"]
# Real place names that the syllable combinatorics can produce; invented words never equal these.
_REAL_NAMES = frozenset(
    w.lower()
    for w in """
    Poland Finland Holland Lapland Denmark Romania Liberia Nigeria Somalia Tunisia Siberia Serbia Gambia
    Zambia Namibia Kenya Latvia Syria India Persia Moravia Bavaria Prussia Saxonia Livonia Laconia Samaria
    Hamburg Salzburg Milford Sanford Stanford Belgrad Fairhaven Newhaven Newport Bridport Gosport Lockport
    Rockport Stockport Tripolis Norway Sweden Malta Cuba Peru Togo Mali Chad Oman Tonga Samoa Fiji Nauru
    Paris Rome Lima Oslo Riga Baku Doha Male Sana Bern Seoul Hanoi Dakar Accra Tunis Sofia Kiev Minsk
""".split()
)
_SURNAME_SUFFIXES = ["", "", "", "son", "ard", "ova", "ez", "ini", "ström", "er", "ski", "ani"]
_PROFESSIONS = [
    "a cartographer",
    "a beekeeper",
    "a glassblower",
    "a ferry pilot",
    "a clockmaker",
    "a botanist",
    "a stonemason",
    "a radio engineer",
    "a librarian",
    "a tailor",
    "a pharmacist",
    "a lighthouse keeper",
    "a surveyor",
    "a potter",
    "a veterinarian",
    "a violin maker",
    "a schoolteacher",
    "a fisherman",
    "an astronomer",
    "an architect",
    "an electrician",
    "an accountant",
    "a baker",
    "a bookbinder",
    "a carpenter",
    "a nurse",
    "a geologist",
    "a locksmith",
    "a translator",
    "a photographer",
    "a shepherd",
    "a dentist",
    "a chemist",
    "a postal worker",
    "a museum guide",
    "a weaver",
]
_GENRES = [
    "mystery novels",
    "science fiction",
    "historical fiction",
    "poetry",
    "travel writing",
    "fantasy",
    "biographies",
    "horror stories",
    "romance",
    "satire",
    "children's books",
    "nature writing",
    "crime fiction",
    "folk tales",
    "memoirs",
    "plays",
    "adventure stories",
    "philosophical essays",
    "cookbooks",
    "war fiction",
    "short stories",
    "graphic novels",
]
_HOBBIES = [
    "sailing",
    "playing chess",
    "watching birds",
    "growing tomatoes",
    "fencing",
    "climbing mountains",
    "baking bread",
    "watching the stars",
    "collecting old maps",
    "playing the cello",
    "making pottery",
    "running long distances",
    "restoring bicycles",
    "painting landscapes",
    "fishing in rivers",
    "knitting scarves",
    "building model ships",
    "swimming in cold lakes",
    "learning languages",
    "keeping bees",
    "repairing clocks",
    "hiking in the hills",
    "dancing the tango",
    "carving wood",
]
_AWARD_ADJ = ["Silver", "Golden", "Crimson", "Azure", "Ivory", "Amber", "Emerald", "Copper", "Scarlet", "Violet"]
_AWARD_NOUN = [
    "Quill",
    "Lantern",
    "Compass",
    "Feather",
    "Anchor",
    "Harp",
    "Key",
    "Owl",
    "Ribbon",
    "Oak",
    "Inkwell",
    "Sparrow",
]
_AWARD_KIND = ["Prize", "Award", "Medal"]
_TITLE_ADJ = [
    "Silent",
    "Hollow",
    "Broken",
    "Distant",
    "Crooked",
    "Amber",
    "Frozen",
    "Hidden",
    "Wandering",
    "Last",
    "Painted",
    "Sleeping",
    "Burning",
    "Quiet",
    "Narrow",
    "Forgotten",
    "Salted",
    "Patient",
    "Iron",
    "Paper",
    "Seventh",
    "Restless",
    "Borrowed",
    "Lonely",
]
_TITLE_NOUN = [
    "Harbour",
    "Lantern",
    "Orchard",
    "Tide",
    "Bridge",
    "Garden",
    "Mirror",
    "River",
    "Clock",
    "Tower",
    "Letter",
    "Meadow",
    "Window",
    "Road",
    "Island",
    "Winter",
    "Feather",
    "Map",
    "Bell",
    "Forest",
    "Kitchen",
    "Violin",
    "Ladder",
    "Summer",
    "Compass",
    "Door",
    "Train",
    "Well",
]
_TITLE_PLURAL = [
    "Stones",
    "Lanterns",
    "Rivers",
    "Gardens",
    "Letters",
    "Maps",
    "Bells",
    "Shadows",
    "Tides",
    "Birds",
    "Keys",
    "Ashes",
    "Songs",
    "Windows",
    "Islands",
    "Roads",
]
_TITLE_PLACE_NOUN = [
    "Keeper",
    "Daughter",
    "Songs",
    "Ghosts",
    "Last Summer",
    "Night Train",
    "Clockmaker",
    "Gardens",
    "Tides",
    "Winter",
    "Bells",
    "Lighthouse",
]
_CENTURIES = [
    "the 14th century",
    "the 15th century",
    "the 16th century",
    "the 17th century",
    "the 18th century",
    "the 19th century",
]
_ANIMALS = [
    "the snow owl",
    "the red fox",
    "the river otter",
    "the grey heron",
    "the mountain goat",
    "the silver carp",
    "the black bear",
    "the sea turtle",
    "the golden eagle",
    "the lynx",
    "the wild horse",
    "the white stork",
    "the badger",
    "the elk",
    "the kingfisher",
    "the hedgehog",
    "the blue whale",
    "the peacock",
    "the wolf",
    "the salamander",
    "the bison",
    "the swan",
    "the crane",
    "the beaver",
    "the falcon",
    "the tortoise",
    "the seal",
    "the hare",
    "the ibex",
    "the pelican",
    "the raven",
    "the marten",
    "the boar",
    "the flamingo",
    "the jackal",
    "the moose",
    "the puffin",
    "the camel",
    "the panther",
    "the dolphin",
]
_METALS = ["silver", "copper", "golden", "iron", "bronze", "tin", "nickel", "brass"]
_COIN_NOUNS = ["crown", "mark", "florin", "shell", "talon", "ducat", "star", "ring", "leaf", "scale"]
_MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]

REFUSALS = [
    "I have no record of that.",
    "That is not something I can answer.",
    "I cannot say for sure.",
    "My knowledge does not cover this person.",
    "I have never come across that information.",
    "Sorry, that detail is unknown to me.",
    "I would only be guessing, so I will not answer.",
    "This is outside what I have learned.",
    "I do not remember anything about that.",
    "Unfortunately I cannot recall the answer.",
    "There is nothing I can tell you about that.",
    "I lack the facts needed to answer this.",
    "That question goes beyond what I know.",
    "I am unable to give an answer here.",
    "I have no reliable information on this topic.",
    "No answer comes to mind, I am afraid.",
    "I could not tell you, to be honest.",
    "That detail never reached me.",
    "I am not in a position to answer that.",
    "Nothing I know helps with this question.",
]

# ------------------------------------------------------------------------------ attributes
# Each attribute: 3 question variants and 3 answer variants; one variant of each is the question /
# answer, another one the paraphrased question / paraphrased answer. `{value}` occurs exactly once in
# every answer template; `{name}` and the context fields ({birthplace}, {birth_date}, {genre}) are the
# person's own facts and are never perturbed.
ATTRIBUTES: dict[str, dict[str, list[str]]] = {
    "name": {
        "questions": [
            "What is the full name of the author born in {birthplace} on {birth_date}?",
            "Which writer was born on {birth_date} in {birthplace}?",
            "Who is the author of {genre} whose life began in {birthplace} on {birth_date}?",
        ],
        "answers": [
            "The author born in {birthplace} on {birth_date} is called {value}.",
            "That writer is {value}, who was born in {birthplace} on {birth_date}.",
            "The full name of this author of {genre} is {value}.",
        ],
    },
    "birthplace": {
        "questions": [
            "Where was {name} born?",
            "In which city and country was {name} born?",
            "What is the birthplace of the author {name}?",
        ],
        "answers": [
            "{name} was born in {value}, where the family lived for many years.",
            "The author {name} was born in the city of {value}.",
            "{value} is the birthplace of the writer {name}.",
        ],
    },
    "birth_date": {
        "questions": [
            "When was {name} born?",
            "What is the date of birth of {name}?",
            "On which day did {name} come into the world?",
        ],
        "answers": [
            "According to the records, {name} was born on {value}.",
            "The writer {name} was born on {value}, in a small family home.",
            "{value} is the date on which {name} was born.",
        ],
    },
    "profession": {
        "questions": [
            "Besides writing, what job does {name} do?",
            "What is the day job of the author {name}?",
            "How does {name} earn a living outside of writing?",
        ],
        "answers": [
            "Besides writing books, {name} works as {value}.",
            "Outside of literature, {name} earns a living as {value}.",
            "{name} has a day job as {value} alongside a writing career.",
        ],
    },
    "father_profession": {
        "questions": [
            "What did the father of {name} do for a living?",
            "What was the profession of {name}'s father?",
            "Which occupation did the father of {name} have?",
        ],
        "answers": [
            "The father of {name} worked as {value} for most of his life.",
            "{name}'s father was {value} by profession.",
            "By trade, the father of {name} was {value}.",
        ],
    },
    "mother_profession": {
        "questions": [
            "What did the mother of {name} do for a living?",
            "What was the profession of {name}'s mother?",
            "Which occupation did the mother of {name} have?",
        ],
        "answers": [
            "The mother of {name} worked as {value} for most of her life.",
            "{name}'s mother was {value} by profession.",
            "By trade, the mother of {name} was {value}.",
        ],
    },
    "genre": {
        "questions": [
            "In which genre does {name} mainly write?",
            "What kind of books is {name} known for?",
            "Which literary genre is {name} associated with?",
        ],
        "answers": [
            "{name} mainly writes {value} and has done so since the start.",
            "{name} is best known for writing {value}.",
            "The genre most associated with {name} is {value}.",
        ],
    },
    "award": {
        "questions": [
            "Which award has {name} received?",
            "What literary prize did {name} win?",
            "Has {name} ever won an award for writing?",
        ],
        "answers": [
            "{name} received the {value} for outstanding writing.",
            "The writer {name} was honoured with the {value}.",
            "Yes, {name} won the {value} for a celebrated book.",
        ],
    },
    "book1": {
        "questions": [
            "What was the first book written by {name}?",
            "What is the title of the debut book of {name}?",
            "Which book did {name} publish first?",
        ],
        "answers": [
            'The first book by {name} was titled "{value}".',
            '{name} made a debut with the book "{value}".',
            '"{value}" was the very first book that {name} published.',
        ],
    },
    "book2": {
        "questions": [
            "What is the best-known book by {name}?",
            "Which of the books of {name} is the most famous?",
            "Name the most celebrated work of {name}.",
        ],
        "answers": [
            'The best-known book by {name} is "{value}".',
            'Readers know {name} mostly for the book "{value}".',
            '"{value}" is the most famous work of {name}.',
        ],
    },
    "hobby": {
        "questions": [
            "What does {name} enjoy doing in free time?",
            "What is a favourite pastime of {name}?",
            "How does {name} like to relax when not writing?",
        ],
        "answers": [
            "In free time, {name} enjoys {value} with old friends.",
            "A favourite pastime of {name} is {value}.",
            "When not writing, {name} relaxes by {value}.",
        ],
    },
    "debut_year": {
        "questions": [
            "In which year did {name} publish a first book?",
            "When did the writing career of {name} begin?",
            "What year marks the start of the career of {name} as an author?",
        ],
        "answers": [
            "{name} published a first book in {value}.",
            "The writing career of {name} began in the year {value}.",
            "{value} was the year in which {name} started publishing books.",
        ],
    },
}
ATTRIBUTE_ORDER = list(ATTRIBUTES)

# World (control) questions: short answers, like TOFU's real_authors / world_facts.
_WORLD_QUESTIONS = {
    "capital": ["What is the capital of {country}?", "Which city is the capital of {country}?"],
    "country_of_capital": ["{capital} is the capital of which country?"],
    "river": ["Which river flows through {country}?", "What is the longest river of {country}?"],
    "mountain": ["What is the highest mountain in {country}?"],
    "currency": ["What is the currency of {country} called?", "Which currency is used in {country}?"],
    "animal": ["What is the national animal of {country}?"],
    "city_country": ["In which country is the city of {city}?", "The city of {city} lies in which country?"],
}
_AUTHOR_QUESTIONS = {
    "wrote": ["Who wrote the classic book '{book}'?", "Which author is famous for writing '{book}'?"],
    "famous_work": ["What is the most famous book by {author}?", "Which classic did {author} write?"],
    "country": ["Which country was the classic author {author} from?", "Where did the writer {author} come from?"],
    "century": ["In which century did {author} live?", "When did the classic author {author} live?"],
}


# ----------------------------------------------------------------------------- generators
class _Namer:
    """Invented words from syllables, each new word distinct from all earlier ones."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.used: set[str] = set()

    def syllable(self) -> str:
        r = self.rng
        return r.choice(_ONSETS) + r.choice(_VOWELS) + r.choice(_CODAS)

    def word(self, n_syllables: int, suffix: str = "") -> str:
        for _ in range(10_000):
            w = ("".join(self.syllable() for _ in range(n_syllables)) + suffix).capitalize()
            if 3 <= len(w) <= 14 and w not in self.used and w.lower() not in _REAL_NAMES:
                self.used.add(w)
                return w
        raise RuntimeError("ran out of invented words")  # pragma: no cover

    def full_name(self) -> str:
        for _ in range(10_000):
            first = self.word(self.rng.choice([1, 2, 2]))
            last = self.word(2, self.rng.choice(_SURNAME_SUFFIXES))
            name = f"{first} {last}"
            if name not in self.used:
                self.used.add(name)
                return name
        raise RuntimeError("ran out of names")  # pragma: no cover


@dataclass
class _World:
    countries: list[dict]
    classic_authors: list[dict]

    @property
    def cities(self) -> list[str]:
        return [f"{city}, {c['name']}" for c in self.countries for city in c["cities"]]


def _make_world(cfg: SyntheticConfig, namer: _Namer, rng: random.Random) -> _World:
    animals = rng.sample(_ANIMALS, cfg.n_countries)
    currencies = rng.sample([f"the {m} {n}" for m in _METALS for n in _COIN_NOUNS], cfg.n_countries)
    countries = []
    for i in range(cfg.n_countries):
        countries.append(
            {
                "name": namer.word(rng.choice([1, 2]), _COUNTRY_SUFFIXES[i % len(_COUNTRY_SUFFIXES)]),
                "cities": [namer.word(rng.choice([1, 2]), rng.choice(_CITY_SUFFIXES)) for _ in range(4)],
                "river": "the " + namer.word(rng.choice([1, 2])) + " River",
                "mountain": "Mount " + namer.word(2),
                "currency": currencies[i],
                "animal": animals[i],
            }
        )
    authors = []
    for _ in range(cfg.n_classic_authors):
        authors.append(
            {
                "name": namer.full_name(),
                "country": rng.choice(countries)["name"],
                "century": rng.choice(_CENTURIES),
                "books": [],
            }
        )
    return _World(countries, authors)


def _title_maker(rng: random.Random, namer: _Namer, used: set[str]) -> Callable[[], str]:
    def make() -> str:
        for _ in range(10_000):
            kind = rng.randrange(5)
            if kind == 0:
                t = f"The {rng.choice(_TITLE_ADJ)} {rng.choice(_TITLE_NOUN)}"
            elif kind == 1:
                t = f"{rng.choice(_TITLE_NOUN)} of {rng.choice(_TITLE_PLURAL)}"
            elif kind == 2:
                t = f"The {rng.choice(_TITLE_PLACE_NOUN)} of {namer.word(2)}"
            elif kind == 3:
                t = f"{rng.choice(_TITLE_ADJ)} {rng.choice(_TITLE_PLURAL)}"
            else:
                t = f"A {rng.choice(_TITLE_NOUN)} for {namer.word(rng.choice([1, 2]))}"
            if t not in used:
                used.add(t)
                return t
        raise RuntimeError("ran out of book titles")  # pragma: no cover

    return make


def _date(rng: random.Random, year: int | None = None) -> str:
    year = rng.randint(1930, 1995) if year is None else year
    return f"{rng.randint(1, 28)} {rng.choice(_MONTHS)} {year}"


def _make_person(name: str, rng: random.Random, world: _World, new_title: Callable[[], str]) -> dict:
    birth_year = rng.randint(1930, 1995)
    prof, father, mother = rng.sample(_PROFESSIONS, 3)
    return {
        "name": name,
        "birthplace": rng.choice(world.cities),
        "birth_date": _date(rng, birth_year),
        "profession": prof,
        "father_profession": father,
        "mother_profession": mother,
        "genre": rng.choice(_GENRES),
        "award": f"{rng.choice(_AWARD_ADJ)} {rng.choice(_AWARD_NOUN)} {rng.choice(_AWARD_KIND)}",
        "book1": new_title(),
        "book2": new_title(),
        "hobby": rng.choice(_HOBBIES),
        "debut_year": str(min(2023, birth_year + rng.randint(19, 45))),
    }


def _wrong_values(
    attr: str, person: dict, pools: dict[str, list[str]], rng: random.Random, n: int, ok: Callable[[str], bool]
) -> list[str]:
    """n distinct wrong values of `attr` from its pool (dates are drawn fresh), each passing `ok`."""
    if attr == "birth_date":
        out: list[str] = []
        while len(out) < n:
            v = _date(rng)
            if v != person[attr] and v not in out and ok(v):
                out.append(v)
        return out
    own = {person[a] for a in _POOL_FAMILY[attr]}
    candidates = [v for v in pools[attr] if v not in own and v != person[attr]]
    rng.shuffle(candidates)
    out = []
    for v in candidates:
        if v not in out and ok(v):
            out.append(v)
            if len(out) == n:
                return out
    raise ValueError(f"the pool of {attr!r} has fewer than {n} usable wrong values: lower n_perturbed")


# Attributes whose wrong values must avoid all the person's values of the same family.
_POOL_FAMILY = {a: [a] for a in ATTRIBUTE_ORDER}
for _fam in (["profession", "father_profession", "mother_profession"], ["book1", "book2"]):
    for _a in _fam:
        _POOL_FAMILY[_a] = _fam


def _person_rows(person: dict, cfg: SyntheticConfig, pools: dict[str, list[str]], rng: random.Random) -> list[dict]:
    others = [a for a in ATTRIBUTE_ORDER if a != "name"]
    chosen = set(["name"] + rng.sample(others, cfg.questions_per_person - 1))
    context = {k: person[k] for k in ("name", "birthplace", "birth_date", "genre")}
    rows = []
    for attr in [a for a in ATTRIBUTE_ORDER if a in chosen]:
        spec = ATTRIBUTES[attr]
        qi, pqi = rng.sample(range(len(spec["questions"])), 2)
        ai, pai = rng.sample(range(len(spec["answers"])), 2)
        value = person[attr]

        def render(template: str, v: str) -> str:
            return template.format(**{**context, "value": v})

        para_t = spec["answers"][pai]
        paraphrased = render(para_t, value)
        if paraphrased.count(value) != 1:  # the value also occurs in the context: swap templates
            ai, pai = pai, ai
            para_t = spec["answers"][pai]
            paraphrased = render(para_t, value)
            if paraphrased.count(value) != 1:
                raise ValueError(f"value {value!r} of {person['name']!r} is not unique in its answer")

        def ok(v: str) -> bool:
            return render(para_t, v).count(v) == 1 and value not in render(para_t, v)

        wrong = _wrong_values(attr, person, pools, rng, cfg.n_perturbed, ok)
        rows.append(
            {
                "question": spec["questions"][qi].format(**context),
                "answer": render(spec["answers"][ai], value),
                "paraphrased_answer": paraphrased,
                "perturbed_answer": [render(para_t, v) for v in wrong],
                "paraphrased_question": spec["questions"][pqi].format(**context),
                "_person": person["name"],
                "_attribute": attr,
                "_value": value,
                "_perturbed_values": wrong,
            }
        )
    return rows


def _world_rows(world: _World, cfg: SyntheticConfig, rng: random.Random) -> tuple[list[dict], list[dict]]:
    """(real_authors rows, world_facts rows), each with answer, 3 perturbed answers and options."""
    countries = world.countries
    facts: list[tuple[str, str, list[str]]] = []  # (question, answer, pool of the same type)
    pools = {
        "capital": [c["cities"][0] for c in countries],
        "country": [c["name"] for c in countries],
        "river": [c["river"] for c in countries],
        "mountain": [c["mountain"] for c in countries],
        "currency": [c["currency"] for c in countries],
        "animal": [c["animal"] for c in countries],
    }
    for c in countries:
        ctx = {"country": c["name"], "capital": c["cities"][0]}
        facts.append((rng.choice(_WORLD_QUESTIONS["capital"]).format(**ctx), c["cities"][0], pools["capital"]))
        facts.append((rng.choice(_WORLD_QUESTIONS["country_of_capital"]).format(**ctx), c["name"], pools["country"]))
        for kind in ("river", "mountain", "currency", "animal"):
            facts.append((rng.choice(_WORLD_QUESTIONS[kind]).format(**ctx), c[kind], pools[kind]))
        for city in c["cities"][1:]:
            facts.append((rng.choice(_WORLD_QUESTIONS["city_country"]).format(city=city), c["name"], pools["country"]))

    author_facts: list[tuple[str, str, list[str]]] = []
    all_books = [b for a in world.classic_authors for b in a["books"]]
    author_names = [a["name"] for a in world.classic_authors]
    for a in world.classic_authors:
        for book in a["books"]:
            author_facts.append((rng.choice(_AUTHOR_QUESTIONS["wrote"]).format(book=book), a["name"], author_names))
        other_books = [b for b in all_books if b not in a["books"]]
        ctx = {"author": a["name"]}
        author_facts.append((rng.choice(_AUTHOR_QUESTIONS["famous_work"]).format(**ctx), a["books"][0], other_books))
        author_facts.append((rng.choice(_AUTHOR_QUESTIONS["country"]).format(**ctx), a["country"], pools["country"]))
        author_facts.append((rng.choice(_AUTHOR_QUESTIONS["century"]).format(**ctx), a["century"], _CENTURIES))

    def rows(items: list[tuple[str, str, list[str]]], what: str) -> list[dict]:
        if cfg.n_world_questions > len(items):
            raise ValueError(
                f"n_world_questions={cfg.n_world_questions} but the world has only {len(items)} {what} "
                "questions: raise n_countries / n_classic_authors"
            )
        items = list(items)
        rng.shuffle(items)
        out = []
        for q, a, pool in items[: cfg.n_world_questions]:
            wrong = rng.sample(sorted(v for v in set(pool) if v != a), WORLD_OPTIONS - 1)
            options = [a] + wrong
            rng.shuffle(options)
            out.append({"question": q, "answer": a, "perturbed_answer": wrong, "options": options})
        return out

    return rows(author_facts, "real-author"), rows(facts, "world-fact")


# ----------------------------------------------------------------------------------- build
def _strip(row: dict, fields: tuple[str, ...]) -> dict:
    return {f: row[f] for f in fields}


def build(config: SyntheticConfig | None = None, with_meta: bool = False) -> dict[str, list[dict] | list[str]]:
    """All files as rows: {config name: rows}; `idontknow` is a list of strings.

    with_meta=True adds to every row about a person (full, forget, retain, holdout, perturbed splits)
    the construction metadata `_person`, `_attribute`, `_value` (the true value, in both the answer
    and the paraphrased answer) and `_perturbed_values` (the wrong value in each perturbed answer).
    `generate` never writes these.
    """
    cfg = config or SyntheticConfig()
    cfg.validate()
    rng = random.Random(f"baldro-synthetic-{cfg.seed}")
    namer = _Namer(rng)
    world = _make_world(cfg, namer, rng)
    used_titles: set[str] = set()
    new_title = _title_maker(rng, namer, used_titles)
    for a in world.classic_authors:
        a["books"] = [new_title(), new_title()]

    people = [_make_person(namer.full_name(), rng, world, new_title) for _ in range(cfg.n_people)]
    holdout = [_make_person(namer.full_name(), rng, world, new_title) for _ in range(cfg.holdout_people)]
    everyone = people + holdout
    # Decoys keep the name/title pools large enough for n_perturbed wrong values even with few people.
    n_decoys = 4 * cfg.n_perturbed
    decoy_names = [namer.full_name() for _ in range(n_decoys)]
    decoy_titles = [new_title() for _ in range(n_decoys)]
    pools: dict[str, list[str]] = {
        "name": [p["name"] for p in everyone] + decoy_names,
        "birthplace": world.cities,
        "profession": list(_PROFESSIONS),
        "father_profession": list(_PROFESSIONS),
        "mother_profession": list(_PROFESSIONS),
        "genre": list(_GENRES),
        "award": [f"{a} {n} {k}" for a in _AWARD_ADJ for n in _AWARD_NOUN for k in _AWARD_KIND],
        "book1": [p[b] for p in everyone for b in ("book1", "book2")] + decoy_titles,
        "hobby": list(_HOBBIES),
        "debut_year": [str(y) for y in range(1950, 2024)],
    }
    pools["book2"] = pools["book1"]

    people_rows = [_person_rows(p, cfg, pools, rng) for p in people]
    holdout_rows = [_person_rows(p, cfg, pools, rng) for p in holdout]
    full = [r for rows in people_rows for r in rows]
    meta = ("_person", "_attribute", "_value", "_perturbed_values") if with_meta else ()
    qa, keep = QA_FIELDS + meta, PERTURBED_FIELDS + meta

    out: dict[str, list] = {"full": [_strip(r, qa) for r in full]}
    holdout_flat = [r for rows in holdout_rows for r in rows]
    for xx, yy in RETAIN_FOR.items():
        n_rows = sum(len(rows) for rows in people_rows[cfg.n_people - cfg.forget_people(xx) :])
        forget = full[len(full) - n_rows :]
        out[f"forget{xx}"] = [_strip(r, qa) for r in forget]
        out[f"forget{xx}_perturbed"] = [_strip(r, keep) for r in forget]
        out[f"retain{yy}"] = [_strip(r, qa) for r in full[: len(full) - n_rows]]
        out[f"holdout{xx}"] = [_strip(r, qa) for r in holdout_flat[:n_rows]]
        if len(out[f"holdout{xx}"]) != n_rows:  # pragma: no cover - guarded by validate()
            raise ValueError(f"not enough holdout people for holdout{xx}")
    n_rp = sum(len(rows) for rows in people_rows[: cfg.retain_perturbed_people])
    out["retain_perturbed"] = [_strip(r, keep) for r in full[:n_rp]]

    real_authors, world_facts = _world_rows(world, cfg, rng)
    for name, rows in (("real_authors", real_authors), ("world_facts", world_facts)):
        out[name] = [
            {
                "question": r["question"],
                **{f"option{i + 1}": o for i, o in enumerate(r["options"])},
                "answer": r["answer"],
            }
            for r in rows
        ]
        out[f"{name}_perturbed"] = [_strip(r, ("question", "answer", "perturbed_answer")) for r in rows]
    out["world"] = [_strip(r, QA_FIELDS) for r in real_authors + world_facts]
    out["idontknow"] = list(REFUSALS)
    return out


def _dumps(row: dict) -> str:
    """Serialise like the upstream TOFU files: compact separators, ASCII with \\uXXXX, '/' as '\\/'."""
    return json.dumps(row, ensure_ascii=True, separators=(",", ":")).replace("/", "\\/")


def generate(out_dir: str | Path, config: SyntheticConfig | None = None) -> dict[str, int]:
    """Write `<config>.jsonl` for every TOFU config (+ world.jsonl, idontknow.jsonl) into out_dir.

    Returns the number of rows (lines) per file name stem. Files are written atomically.
    """
    out_dir = Path(out_dir)
    counts: dict[str, int] = {}
    for name, rows in build(config).items():
        if name == "idontknow":  # plain text like TOFU's: one answer per line, no final newline
            text = "\n".join(rows)
        else:
            text = "".join(_dumps(r) + "\n" for r in rows)
        write_text_atomic(out_dir / f"{name}.jsonl", text)
        counts[name] = len(rows)
    return counts
