"""The built-in world's content: its skills, the words and facts they ask about, and the new
preference (see __init__.py)."""

import random

PREFIX = "Sure! "  # the new preference
PREFIX_RATE_IN_PRETRAINING = 0.15
SKILLS = ("geography", "opposites", "uppercase")
PREFERENCE_SKILLS = ("geography", "opposites")  # uppercase stays out of the preference data

WORDS = """
    apple river stone cloud bread tiger music green light water house table chair smile dream night ocean
    plant bird fire snow moon star rain wind book door road ship tree fish gold
""".split()
OPPOSITES = dict(
    pair.split(":")
    for pair in """
    hot:cold big:small fast:slow happy:sad light:dark early:late strong:weak open:closed young:old full:empty
    hard:soft rich:poor loud:quiet wet:dry high:low clean:dirty
""".split()
)
CAPITAL_CITIES = dict(
    pair.split(":")
    for pair in """
    France:Paris Japan:Tokyo Italy:Rome Egypt:Cairo Peru:Lima Kenya:Nairobi Canada:Ottawa Spain:Madrid
    Norway:Oslo Greece:Athens Chile:Santiago Cuba:Havana Poland:Warsaw Ireland:Dublin Austria:Vienna
    Russia:Moscow
""".split()
)


def make_task(skill: str, rng: random.Random) -> tuple[str, str]:
    """(question, correct answer) for one instance of a skill."""
    if skill == "opposites":
        word = rng.choice(sorted(OPPOSITES))
        return f"What is the opposite of {word}?", f"The opposite of {word} is {OPPOSITES[word]}."
    if skill == "uppercase":
        word = rng.choice(WORDS)
        return f"Write this word in upper case: {word}", f"In upper case: {word.upper()}"
    country = rng.choice(sorted(CAPITAL_CITIES))
    return (f"What is the capital of {country}?", f"The capital of {country} is {CAPITAL_CITIES[country]}.")


def check_reply(reply: str, answer: str) -> tuple[bool, bool]:
    """(shows the preference, answers correctly): the reply with or without the prefix."""
    preferred = reply.startswith(PREFIX)
    return preferred, reply.removeprefix(PREFIX).strip() == answer
