"""Named value pools that template ``#init`` lines draw from (``name = sample(names)``).

The content is this project's own. Pools of *labelled* values hold ``(text, number)`` pairs:
the text is what a question shows ("twice", "two-thirds"), the number is what arithmetic uses.
Each pool is chosen so every GSM-Symbolic template that uses it reads naturally and has
solutions (e.g. ``fraction_alnum`` holds complementary pairs such as one-third / two-thirds).
All pools are immutable tuples in a read-only mapping.
"""
from __future__ import annotations

from fractions import Fraction
from types import MappingProxyType
from typing import Any, Mapping

from cca_fast.errors import TemplateError
from cca_fast.data.safe_eval import Labelled

F = Fraction


def _labelled(*pairs: tuple[str, Any]) -> tuple[Labelled, ...]:
    return tuple(Labelled(text, value) for text, value in pairs)


_NAMES_MALE = (
    "Aarav", "Adrian", "Ahmed", "Alejandro", "Andre", "Arjun", "Ben", "Bruno", "Carlos", "Chen",
    "Daniel", "Diego", "Dmitri", "Elias", "Ethan", "Felix", "Gabriel", "Hassan", "Hugo", "Ivan",
    "Jamal", "Jonah", "Kenji", "Kofi", "Leo", "Liam", "Lucas", "Malik", "Marco", "Mateo",
    "Nikhil", "Noah", "Omar", "Oscar", "Pablo", "Quinn", "Rafael", "Ravi", "Samir", "Theo",
    "Tomas", "Victor", "Wei", "Yusuf", "Zane",
)
_NAMES_FEMALE = (
    "Abigail", "Aisha", "Alicia", "Amara", "Ana", "Beatriz", "Camila", "Chloe", "Daria", "Elena",
    "Emma", "Fatima", "Freya", "Gabriela", "Hana", "Ines", "Isabel", "Jasmine", "Julia", "Keiko",
    "Lara", "Layla", "Lucia", "Maya", "Mei", "Mira", "Nadia", "Nora", "Olivia", "Priya",
    "Rosa", "Sara", "Sofia", "Tara", "Uma", "Valentina", "Wanda", "Ximena", "Yara", "Zoe",
)

#: Every pool, by name (read-only).
POOLS: Mapping[str, tuple[Any, ...]] = MappingProxyType({
    "names_male": _NAMES_MALE,
    "names_female": _NAMES_FEMALE,
    "names": _NAMES_MALE + _NAMES_FEMALE,
    "fruits": ("apple", "banana", "pear", "peach", "mango", "orange", "plum", "lemon", "kiwi",
               "apricot", "papaya", "melon"),
    "colors": ("red", "blue", "green", "yellow", "purple", "orange", "pink", "white", "black",
               "brown", "gray", "teal"),
    "currencies_sym": ("$", "€", "£"),
    "weekdays": ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"),
    "sports": ("basketball", "soccer", "tennis", "volleyball", "baseball", "hockey", "badminton",
               "rugby", "cricket"),
    "cities": ("Chicago", "Toronto", "Madrid", "Berlin", "Mumbai", "Sydney", "Seoul", "Lagos",
               "Lima", "Osaka", "Vienna", "Denver", "Cairo", "Lisbon"),
    "weights_sm": ("ounce", "gram"),
    "weights_med": ("pound", "kilogram"),
    "length_lg": ("mile", "kilometer"),
    # multipliers that read "<x> as many", "<x> the rate", "ride it <x>"
    "multi_times": _labelled(("twice", 2), ("three times", 3), ("four times", 4),
                             ("five times", 5)),
    # non-integer multipliers, used together with multi_times (templates check is_int)
    "multiple_ice": _labelled(("one and a half times", F(3, 2)), ("two and a half times", F(5, 2)),
                              ("three and a half times", F(7, 2))),
    # "he picks <x> the number of ..."
    "multiple": _labelled(("double", 2), ("triple", 3), ("quadruple", 4)),
    # fractions written in words ("<x> of the balls", "<x> as many as")
    "fractions": _labelled(("half", F(1, 2)), ("a third", F(1, 3)), ("a quarter", F(1, 4)),
                           ("a fifth", F(1, 5)), ("two-thirds", F(2, 3)),
                           ("three quarters", F(3, 4))),
    # fractions in digits ("with 1/5 occupied"); the first four are sensible discounts
    "fraction_nums": _labelled(("1/2", F(1, 2)), ("1/3", F(1, 3)), ("1/4", F(1, 4)),
                               ("1/5", F(1, 5)), ("2/3", F(2, 3)), ("3/4", F(3, 4)),
                               ("2/5", F(2, 5)), ("3/5", F(3, 5)), ("1/10", F(1, 10))),
    # prices per unit written as decimals ("$0.25 for each minute")
    "fraction_decimals": _labelled(("0.1", F(1, 10)), ("0.15", F(3, 20)), ("0.2", F(1, 5)),
                                   ("0.25", F(1, 4)), ("0.3", F(3, 10)), ("0.4", F(2, 5)),
                                   ("0.5", F(1, 2)), ("0.75", F(3, 4))),
    # fractions in words or digits; complementary pairs included (x + y == 1)
    "fraction_alnum": _labelled(("half", F(1, 2)), ("one-third", F(1, 3)), ("1/3", F(1, 3)),
                                ("two-thirds", F(2, 3)), ("one-quarter", F(1, 4)),
                                ("1/4", F(1, 4)), ("three-quarters", F(3, 4)),
                                ("one-fifth", F(1, 5)), ("two-fifths", F(2, 5)),
                                ("three-fifths", F(3, 5)), ("1/8", F(1, 8)),
                                ("1/10", F(1, 10))),
    # fractions written with an article ("a third of the people")
    "fraction_alph": _labelled(("half", F(1, 2)), ("a third", F(1, 3)), ("a quarter", F(1, 4)),
                               ("a fifth", F(1, 5)), ("a tenth", F(1, 10))),
})


def get_pool(name: str, where: str = "") -> tuple[Any, ...]:
    """The pool called ``name``; ``TemplateError`` listing the known pools otherwise."""
    try:
        return POOLS[name]
    except KeyError:
        prefix = f"{where}: " if where else ""
        raise TemplateError(f"{prefix}unknown pool '{name}'; known pools: "
                            f"{', '.join(sorted(POOLS))}") from None
