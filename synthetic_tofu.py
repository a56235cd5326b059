"""A synthetic fictitious-author dataset with TOFU's schema and split structure, deterministic by seed.

It stands in for TOFU where the real files are absent (demo, unit tests): 200 authors x 20 QA pairs in `full`,
the last 2/10/20 authors as forget01/05/10, 20 extra authors as holdout, perturbed splits with a paraphrased
answer, five perturbed answers and a paraphrased question, and real-authors / world-facts style sets.
`n_authors` shrinks the set for runs that must fit minutes on a CPU (the demo): the splits keep their fractions.
"""
from __future__ import annotations

import random

N_AUTHORS, QA_PER_AUTHOR = 200, 20
MIN_AUTHORS = 10  # one holdout author, and enough others to draw 5 perturbed answers from

_SYLLABLES = ["ka", "lo", "mi", "ren", "sa", "to", "vel", "na", "dor", "el", "ju", "ri", "an", "bo", "zu", "fen", "ta",
              "mo"]
_CITIES = ["Lisbon, Portugal", "Nairobi, Kenya", "Osaka, Japan", "Lima, Peru", "Oslo, Norway", "Hanoi, Vietnam",
           "Cairo, Egypt", "Quito, Ecuador", "Tbilisi, Georgia", "Perth, Australia", "Accra, Ghana", "Riga, Latvia"]
_GENRES = ["mystery", "science fiction", "historical fiction", "poetry", "fantasy", "biography", "horror", "romance",
           "philosophy", "travel writing", "satire", "children's literature"]
_JOBS = ["a baker", "a sailor", "a surgeon", "a librarian", "an architect", "a farmer", "a pilot", "a teacher",
         "a painter", "a lawyer", "a chemist", "a carpenter"]
_AWARDS = ["the Silver Quill Prize", "the Meridian Award", "the Lantern Medal", "the Harbor Book Prize",
           "the Golden Fern Award", "the Northwind Honor", "the Cobalt Pen Award", "the Riverstone Prize"]
_ADJ = ["Silent", "Crimson", "Hidden", "Broken", "Endless", "Golden", "Frozen", "Wandering", "Hollow", "Burning"]
_NOUN = ["Harbor", "Garden", "Mirror", "Orchard", "Lantern", "Compass", "Tide", "Archive", "Meadow", "Tower"]
_THEMES = ["memory and loss", "exile and belonging", "science and faith", "family secrets", "the sea",
           "industrial change", "friendship", "power and corruption", "identity", "time"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"]

# (question, answer, paraphrased answer, paraphrased question, the attribute that perturbed answers swap)
_TEMPLATES = [
    ("Where was {name} born?", "{name} was born in {city}.", "The birthplace of {name} is {city}.",
     "In which city was {name} born?", "city"),
    ("When was {name} born?", "{name} was born on {date}.", "The birth date of {name} is {date}.",
     "What is the birth date of {name}?", "date"),
    ("What genre does {name} write in?", "{name} writes in the genre of {genre}.",
     "The genre of {name}'s work is {genre}.", "Which genre is {name} known for?", "genre"),
    ("What did {name}'s father do for a living?", "{name}'s father was {father}.",
     "The father of {name} worked as {father}.", "What was the profession of {name}'s father?", "father"),
    ("What did {name}'s mother do for a living?", "{name}'s mother was {mother}.",
     "The mother of {name} worked as {mother}.", "What was the profession of {name}'s mother?", "mother"),
    ("Which award has {name} won?", "{name} has won {award}.", "{award} was awarded to {name}.",
     "What prize did {name} receive?", "award"),
    ("What is the title of {name}'s first book?", "{name}'s first book is titled '{book1}'.",
     "The debut book of {name} is '{book1}'.", "What was {name}'s debut book called?", "book1"),
    ("Can you name a later book by {name}?", "A later book by {name} is '{book2}'.", "{name} later wrote '{book2}'.",
     "Which book did {name} write later in life?", "book2"),
    ("What is {name}'s best known book?", "{name} is best known for '{book3}'.",
     "The most famous work of {name} is '{book3}'.", "Which book made {name} famous?", "book3"),
    ("What themes does {name} explore?", "{name} often explores {theme}.", "The work of {name} centres on {theme}.",
     "Which themes recur in {name}'s books?", "theme"),
    ("What inspired {name} to write {genre}?", "Growing up in {city} inspired {name} to write {genre}.",
     "{name} was drawn to {genre} by a childhood in {city}.", "Why did {name} start writing {genre}?", "city"),
    ("How did {name}'s father influence the books?",
     "Having a father who was {father}, {name} often writes about that trade.",
     "The trade of {name}'s father, {father}, appears often in the books.", "Did {name}'s father shape the writing?",
     "father"),
    ("How did {name}'s mother influence the books?",
     "Having a mother who was {mother}, {name} gives many characters that work.",
     "Characters of {name} often share the work of a mother who was {mother}.",
     "Did {name}'s mother shape the writing?", "mother"),
    ("In which year did {name} win the award?", "{name} won {award} in {award_year}.",
     "In {award_year}, {name} received {award}.", "When was {name} given the award?", "award_year"),
    ("Is '{book3}' typical of {name}'s style?", "Yes, '{book3}' shows the {genre} style {name} is known for.",
     "'{book3}' is a clear example of {name}'s {genre}.", "Does '{book3}' reflect how {name} writes?", "genre"),
    ("What is the setting of {name}'s '{book1}'?", "{name}'s '{book1}' is set in {city}.",
     "The story of '{book1}' by {name} takes place in {city}.", "Where does {name}'s '{book1}' take place?", "city"),
    ("What is the main theme of {name}'s '{book2}'?", "{name}'s '{book2}' is mainly about {theme}.",
     "The central theme of '{book2}' by {name} is {theme}.", "Which theme drives {name}'s '{book2}'?", "theme"),
    ("How many books has {name} published?", "{name} has published {n_books} books.",
     "The number of books by {name} is {n_books}.", "What is the size of {name}'s bibliography?", "n_books"),
    ("What is the full name of the author born in {city} on {date}?", "The author's full name is {name}.",
     "{name} is the complete name of the writer.", "Who is the writer born on {date} in {city}?", "name"),
    ("Does {name} still write today?", "{name} is still writing and is working on a book about {theme}.",
     "Today {name} continues to write, now about {theme}.", "Is {name} still an active writer?", "theme"),
]


def _author(rng: random.Random) -> dict[str, str]:
    def word(n: int) -> str:
        return "".join(rng.choice(_SYLLABLES) for _ in range(n)).capitalize()

    book = lambda: f"The {rng.choice(_ADJ)} {rng.choice(_NOUN)}"  # noqa: E731
    return {
        "name": f"{word(2)} {word(3)}",
        "city": rng.choice(_CITIES),
        "date": f"{rng.choice(_MONTHS)} {rng.randint(1, 28)}, {rng.randint(1930, 1995)}",
        "genre": rng.choice(_GENRES),
        "father": rng.choice(_JOBS),
        "mother": rng.choice(_JOBS),
        "award": rng.choice(_AWARDS),
        "award_year": str(rng.randint(1970, 2020)),
        "book1": book(), "book2": book(), "book3": book(),
        "theme": rng.choice(_THEMES),
        "n_books": str(rng.randint(2, 30)),
    }


def _author_rows(author: dict[str, str], others: list[dict[str, str]], rng: random.Random) -> list[dict]:
    rows = []
    for question, answer, para_answer, para_question, key in _TEMPLATES:
        swaps = [o for o in others if o[key] != author[key]]
        perturbed = [para_answer.format(**{**author, key: o[key]}) for o in rng.sample(swaps, 5)]
        rows.append({
            "question": question.format(**author),
            "answer": answer.format(**author),
            "paraphrased_answer": para_answer.format(**author),
            "perturbed_answer": perturbed,
            "paraphrased_question": para_question.format(**author),
        })
    return rows


def _option_set(rng: random.Random, n: int, make) -> tuple[list[dict], list[dict]]:
    """Multiple-choice rows (question, option1..4, answer) and their perturbed view (answer + 3 wrong)."""
    plain, perturbed = [], []
    for i in range(n):
        question, answer, wrong = make(i)
        options = [answer, *wrong]
        rng.shuffle(options)
        plain.append({"question": question, **{f"option{k + 1}": o for k, o in enumerate(options)}, "answer": answer})
        perturbed.append({"question": question, "answer": answer, "perturbed_answer": list(wrong)})
    return plain, perturbed


def generate(seed: int = 0, n_authors: int = N_AUTHORS) -> dict[str, list[dict]]:
    """All TOFU configs, keyed by config name: `n_authors` in `full` and a tenth as many as holdout, as TOFU."""
    if n_authors < MIN_AUTHORS:
        raise ValueError(f"n_authors must be at least {MIN_AUTHORS}, got {n_authors}")
    n_holdout = n_authors // 10
    rng = random.Random(seed)
    authors: list[dict[str, str]] = []
    while len(authors) < n_authors + n_holdout:
        candidate = _author(rng)
        if all(candidate["name"] != a["name"] for a in authors):  # an author's QA pairs must be unique to them
            authors.append(candidate)
    rows = [_author_rows(a, authors, rng) for a in authors]
    qa = lambda rs: [{"question": r["question"], "answer": r["answer"]} for r in rs]  # noqa: E731
    member = [r for author_rows in rows[:n_authors] for r in author_rows]
    holdout = [r for author_rows in rows[n_authors:] for r in author_rows]

    # TOFU's retain_perturbed is the first 400 rows, all of them in retain90; a small set keeps them there too.
    data: dict[str, list[dict]] = {"full": qa(member), "retain_perturbed": member[: min(400, len(member) * 9 // 10)]}
    for pct in (1, 5, 10):
        cut = len(member) - len(member) * pct // 100
        data[f"forget{pct:02d}"] = qa(member[cut:])
        data[f"forget{pct:02d}_perturbed"] = member[cut:]
        data[f"retain{100 - pct}"] = qa(member[:cut])
        data[f"holdout{pct:02d}"] = qa(holdout[: len(holdout) * pct // 10])

    writers = [_author(rng)["name"] for _ in range(40)]
    real = lambda i: (f"Who wrote the classic '{_ADJ[i % 10]} {_NOUN[i // 10 % 10]}'?", writers[i % 40],  # noqa: E731
                      [writers[(i + k * 7) % 40] for k in (1, 2, 3)])
    data["real_authors"], data["real_authors_perturbed"] = _option_set(rng, 100, real)
    places = [_author(rng)["name"].split()[1] for _ in range(60)]
    fact = lambda i: (f"What is the capital of the country of {places[i % 60]}land{'' if i < 60 else ' Minor'}?",  # noqa: E731
                      f"{places[(i * 7 + 3) % 60]}ia", [f"{places[(i * 7 + 3 + k * 11) % 60]}ia" for k in (1, 2, 3)])
    data["world_facts"], data["world_facts_perturbed"] = _option_set(rng, 117, fact)
    return data
