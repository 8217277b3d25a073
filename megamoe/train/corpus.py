"""The embedded default corpus: documents generated locally and deterministically.

Seven domains with disjoint vocabularies and structure (arithmetic, Python code, recipes,
weather reports, DNA, chess games, children's stories), so a router that sends each domain
to its own experts is rewarded and expert specialisation shows up in the held-out expert
load per domain. Everything derives from ``random.Random(seed)``: the same seed gives the
same corpus on every machine, with no download.
"""
from __future__ import annotations

import random
from typing import Callable

DOMAINS = ("arithmetic", "code", "recipes", "weather", "dna", "chess", "stories")


def _arithmetic(r: random.Random) -> str:
    parts = []
    for _ in range(r.randint(6, 14)):
        a, b = r.randint(0, 99), r.randint(0, 99)
        op = r.choice("+-*")
        val = a + b if op == "+" else a - b if op == "-" else a * b
        parts.append(f"{a} {op} {b} = {val} ;")
    return "calc: " + " ".join(parts)


_NOUNS = ["items", "values", "scores", "names", "rows", "counts", "words", "prices", "nodes", "keys"]
_VERBS = ["scale", "filter", "count", "merge", "sort", "clean", "sum", "index", "parse", "group"]


def _code(r: random.Random) -> str:
    lines = []
    for _ in range(r.randint(1, 3)):
        verb, noun = r.choice(_VERBS), r.choice(_NOUNS)
        arg = r.choice(["factor", "limit", "key", "offset", "size"])
        lines.append(f"def {verb}_{noun}({noun}, {arg}):")
        lines.append("    result = []")
        lines.append(f"    for item in {noun}:")
        cond = r.choice([f"if item > {arg}:", f"if item is not None:", f"if len(result) < {arg}:"])
        lines.append(f"        {cond}")
        lines.append(f"            result.append(item {r.choice('+*-')} {arg})")
        lines.append("    return result")
    return " ".join(lines)


_DISHES = ["pancakes", "tomato soup", "bread", "risotto", "apple pie", "curry", "omelette", "dumplings"]
_INGREDIENTS = ["flour", "butter", "sugar", "milk", "rice", "onions", "garlic", "carrots", "cream", "salt"]


def _recipes(r: random.Random) -> str:
    dish = r.choice(_DISHES)
    steps = [f"Recipe for {dish}."]
    for _ in range(r.randint(3, 7)):
        steps.append(r.choice([
            f"Whisk {r.randint(1, 6)} eggs with {r.randint(50, 500)} grams of {r.choice(_INGREDIENTS)}.",
            f"Chop the {r.choice(_INGREDIENTS)} and fry it gently for {r.randint(2, 15)} minutes.",
            f"Add a pinch of {r.choice(_INGREDIENTS)} and stir until smooth.",
            f"Bake at {r.choice([160, 180, 200, 220])} degrees for {r.randint(10, 60)} minutes.",
            f"Simmer with {r.randint(1, 4)} cups of {r.choice(['water', 'stock', 'milk'])}.",
        ]))
    steps.append(f"Serve the {dish} warm.")
    return " ".join(steps)


_CITIES = ["Oslo", "Lima", "Nairobi", "Osaka", "Lyon", "Denver", "Perth", "Quito", "Tallinn", "Dakar"]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_SKY = ["sunny", "cloudy", "light rain", "heavy rain", "snow", "fog", "thunderstorms", "clear skies"]
_WIND = ["north", "south", "east", "west", "northwest", "southeast"]


def _weather(r: random.Random) -> str:
    city = r.choice(_CITIES)
    out = [f"Weather report for {city}."]
    for day in r.sample(_DAYS, r.randint(2, 5)):
        lo = r.randint(-10, 20)
        out.append(f"{day}: {r.choice(_SKY)}, low {lo} C, high {lo + r.randint(2, 12)} C, "
                   f"wind {r.randint(0, 60)} km/h from the {r.choice(_WIND)}.")
    return " ".join(out)


_CODONS = [a + b + c for a in "ACGT" for b in "ACGT" for c in "ACGT"]
_STOPS = ["TAA", "TAG", "TGA"]


def _dna(r: random.Random) -> str:
    genes = []
    for _ in range(r.randint(1, 3)):
        body = "".join(r.choice([c for c in _CODONS if c not in _STOPS]) for _ in range(r.randint(8, 30)))
        genes.append(f"gene {r.choice('ABCDEFGH')}{r.randint(1, 99)} : ATG{body}{r.choice(_STOPS)}")
    return "dna " + " | ".join(genes)


_PIECES = ["", "N", "B", "R", "Q", "K"]


def _chess(r: random.Random) -> str:
    moves = []
    for i in range(1, r.randint(8, 25)):
        white = f"{r.choice(_PIECES)}{r.choice('abcdefgh')}{r.randint(1, 8)}"
        black = f"{r.choice(_PIECES)}{r.choice('abcdefgh')}{r.randint(1, 8)}"
        moves.append(f"{i}. {white} {black}")
    return "[Game] " + " ".join(moves) + " " + r.choice(["1-0", "0-1", "1/2-1/2"])


_NAMES = ["Mira", "Tom", "Lena", "Omar", "Rosa", "Finn", "Ada", "Kofi"]
_ANIMALS = ["fox", "rabbit", "owl", "bear", "duck", "cat", "frog", "mouse"]
_PLACES = ["river", "forest", "old mill", "hill", "garden", "lake", "village"]


def _stories(r: random.Random) -> str:
    name, animal, place = r.choice(_NAMES), r.choice(_ANIMALS), r.choice(_PLACES)
    friend = r.choice([a for a in _ANIMALS if a != animal])
    out = [f"Once upon a time, {name} the {animal} lived near the {place}."]
    for _ in range(r.randint(2, 6)):
        out.append(r.choice([
            f"One morning {name} met a {friend} who was looking for food.",
            f"They walked together to the {r.choice(_PLACES)} and sang a song.",
            f"The {friend} was sad, so {name} shared some berries.",
            f"When night came, {name} told the {friend} a story about the stars.",
            f"It started to rain, and they hid under a big tree.",
        ]))
    out.append(f"And {name} the {animal} was happy ever after.")
    return " ".join(out)


_GENERATORS: dict[str, Callable[[random.Random], str]] = {
    "arithmetic": _arithmetic, "code": _code, "recipes": _recipes, "weather": _weather,
    "dna": _dna, "chess": _chess, "stories": _stories,
}


def generate_corpus(num_docs: int, *, seed: int) -> list[tuple[str, str]]:
    """``num_docs`` (domain, text) pairs; domains take turns so every domain is equally present."""
    if num_docs <= 0:
        raise ValueError(f"num_docs={num_docs} must be positive")
    r = random.Random(seed)
    return [(DOMAINS[i % len(DOMAINS)], _GENERATORS[DOMAINS[i % len(DOMAINS)]](r)) for i in range(num_docs)]
