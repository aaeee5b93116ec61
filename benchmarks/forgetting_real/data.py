"""Old capabilities (what SmolLM2-135M-Instruct can do) and new tasks (what it cannot), all offline.

Old capabilities, each a score in [0, 1] where the base model's value is the reference:
- ``text``: next-token top-1 accuracy (and NLL) on held-out real English prose: the Python language
  reference shipped with the standard library (``pydoc_data.topics``: 79 topics, ~465 kB of English).
- ``facts``: a cloze set of world knowledge written here, kept only where the base model answers it
  greedily (checked when the benchmark starts); score = exact match of the answer tokens.
- ``chat``: instruction following through the model's chat template: the base model's own greedy
  answers to short instructions (generated once); score = teacher-forced token agreement with them.
- ``mc``: a zero-shot 4-way multiple-choice set ("Banana is a kind of" fruit / animal / color / vehicle)
  built from category word lists, each option one token; score = accuracy of the most likely option
  (calibrated by a content-free prompt).

New tasks (two kinds, trained as one mixture; the base scores ~0 on both):
- ``madeup``: made-up facts (memorise): "The capital of Vorland is" -> " Trelk".
- ``rule``: a rule to generalise: the words of a 3-word list in reverse order, on held-out lists.
"""

from __future__ import annotations

import random

# --- old capability: world knowledge cloze (filtered to what the base model answers) -------------------------
FACTS = [
    ("The capital of France is", "Paris"), ("The capital of Germany is", "Berlin"),
    ("The capital of Italy is", "Rome"), ("The capital of Spain is", "Madrid"),
    ("The capital of Japan is", "Tokyo"), ("The capital of Russia is", "Moscow"),
    ("The capital of England is", "London"), ("The capital of China is", "Beijing"),
    ("The capital of Egypt is", "Cairo"), ("The capital of Greece is", "Athens"),
    ("The capital of Canada is", "Ottawa"), ("The capital of Austria is", "Vienna"),
    ("The capital of Portugal is", "Lisbon"), ("The capital of Ireland is", "Dublin"),
    ("The capital of Norway is", "Oslo"), ("The capital of Sweden is", "Stockholm"),
    ("The capital of Poland is", "Warsaw"), ("The capital of Kenya is", "Nairobi"),
    ("The capital of Thailand is", "Bangkok"), ("The capital of South Korea is", "Seoul"),
    ("The capital of India is", "New Delhi"), ("The capital of Australia is", "Canberra"),
    ("The capital of the United States is", "Washington"), ("The capital of Argentina is", "Buenos Aires"),
    ("The largest planet in the solar system is", "Jupiter"), ("The closest star to the Earth is the", "Sun"),
    ("Water is made of hydrogen and", "oxygen"), ("The chemical symbol for gold is", "Au"),
    ("The Eiffel Tower is located in", "Paris"), ("The Great Wall is located in", "China"),
    ("The author of Romeo and Juliet is William", "Shakespeare"), ("The first president of the United States was George", "Washington"),
    ("The theory of relativity was developed by Albert", "Einstein"), ("The Mona Lisa was painted by Leonardo da", "Vinci"),
    ("A triangle has three", "sides"), ("The freezing point of water in Celsius is", "0"),
    ("There are seven days in a", "week"), ("There are twelve months in a", "year"),
    ("The opposite of hot is", "cold"), ("The opposite of up is", "down"),
    ("The color of the sky on a clear day is", "blue"), ("The color of grass is", "green"),
    ("Bees make", "honey"), ("Cows give us", "milk"),
    ("The Pacific is the largest", "ocean"), ("The longest river in Africa is the", "Nile"),
    ("The currency of Japan is the", "yen"), ("The currency of the United Kingdom is the pound", "sterling"),
    ("Photosynthesis takes place in the", "leaves"), ("The heart pumps", "blood"),
    ("The planet known as the Red Planet is", "Mars"), ("The language spoken in Brazil is", "Portuguese"),
    ("The language spoken in Mexico is", "Spanish"), ("The tallest mountain in the world is Mount", "Everest"),
    ("Ice is frozen", "water"), ("A baby cat is called a", "kitten"),
    ("A baby dog is called a", "puppy"), ("The square root of 16 is", "4"),
    ("Two plus two equals", "4"), ("Ten minus three equals", "7"),
]

# --- old capability: zero-shot multiple choice from category word lists ------------------------------------------
CATEGORIES = {
    "fruit": ["apple", "banana", "orange", "grape", "lemon", "cherry", "peach", "pear", "mango", "plum"],
    "animal": ["dog", "cat", "horse", "lion", "tiger", "rabbit", "mouse", "bear", "wolf", "sheep"],
    "color": ["red", "blue", "green", "yellow", "purple", "black", "white", "pink", "brown", "gray"],
    "vehicle": ["car", "bus", "truck", "train", "bicycle", "plane", "boat", "ship", "taxi", "van"],
    "body part": ["hand", "foot", "head", "arm", "leg", "nose", "ear", "eye", "knee", "finger"],
    "musical instrument": ["piano", "guitar", "violin", "drum", "flute", "trumpet", "harp", "cello", "organ", "saxophone"],
    "country": ["France", "Germany", "Japan", "Brazil", "Canada", "Spain", "India", "Italy", "Mexico", "Egypt"],
    "piece of furniture": ["chair", "table", "sofa", "bed", "desk", "shelf", "cabinet", "stool", "bench", "dresser"],
    "drink": ["water", "coffee", "tea", "milk", "juice", "beer", "wine", "soda", "lemonade", "cocoa"],
    "number": ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"],
}

# --- old capability: instructions through the chat template (answers: the base model's own, greedy) --------------
INSTRUCTIONS = [
    "What is the capital of France?", "Name three primary colors.", "What is 7 times 8?",
    "Give me a synonym for happy.", "Translate 'good morning' into Spanish.", "What do bees make?",
    "Write one sentence about the ocean.", "What is the opposite of cold?", "How many legs does a spider have?",
    "Name a fruit that is yellow.", "What is the boiling point of water in Celsius?", "Who wrote Hamlet?",
    "List two planets in our solar system.", "What is the largest animal on Earth?", "Spell the word 'cat' backwards.",
    "What language is spoken in Germany?", "Give an example of a mammal.", "What is the plural of 'mouse'?",
    "Complete the sentence: The early bird catches the", "What gas do plants absorb from the air?",
    "How many days are in a week?", "What is the main ingredient of bread?", "Name a famous scientist.",
    "What color is a banana?", "What is the freezing point of water in Fahrenheit?", "Say hello in French.",
    "What is the square root of 81?", "Which is bigger, an elephant or a mouse?", "Name a season of the year.",
    "What do you call a baby cow?", "What is the chemical symbol for water?", "Name an instrument with strings.",
]

# --- new tasks -------------------------------------------------------------------------------------------------------
_SYL_A = ["vor", "tre", "qua", "zel", "mor", "kin", "bal", "dru", "fen", "gol", "har", "jix", "lum", "nor", "pex",
          "ros", "sil", "tam", "ulv", "wex", "yor", "zan", "bri", "cav"]
_SYL_B = ["land", "mark", "stan", "ria", "via", "heim", "gard", "dor", "mia", "thal", "ven", "nia"]
_CITY = ["Trelk", "Morvo", "Quist", "Zandel", "Pelor", "Brastik", "Helmo", "Dunvar", "Ostrel", "Kavik", "Lorn",
         "Fesk", "Garvo", "Jintor", "Umbel", "Vastik", "Norlo", "Yelk", "Rimbo", "Salder", "Tovik", "Wendro", "Castel",
         "Drumo", "Elvik", "Forsk", "Gimbo", "Harlo", "Ivrel", "Justo", "Kelbo", "Lunder", "Mavik", "Nessel", "Orvo",
         "Pindel", "Querb", "Rostik", "Selmo", "Tarvo"]
WORDS = ["apple", "river", "stone", "cloud", "house", "music", "paper", "garden", "window", "forest", "candle",
         "bridge", "mirror", "pencil", "rocket", "silver", "tiger", "winter", "summer", "island", "button", "dragon",
         "planet", "guitar", "basket", "castle", "doctor", "engine", "flower", "hammer", "jacket", "kitten", "ladder",
         "market", "needle", "orange", "pepper", "rabbit", "saddle", "tunnel", "violin", "wallet", "yellow", "anchor",
         "bottle", "carpet", "dinner", "feather", "honey", "lemon"]


def madeup_facts(n: int, seed: int = 1234) -> list[tuple[str, str]]:
    """n made-up (country, capital) facts: prompt 'The capital of <Country> is', answer ' <City>'."""
    rng = random.Random(seed)
    countries = sorted({(a + b).capitalize() for a in _SYL_A for b in _SYL_B})
    rng.shuffle(countries)
    cities = list(_CITY)
    rng.shuffle(cities)
    assert n <= len(cities)
    return [(f"The capital of {c} is", " " + city) for c, city in zip(countries[:n], cities[:n])]


def reversal(n: int, seed: int, exclude: set | None = None) -> list[tuple[str, str]]:
    """n lists of 3 distinct words: prompt 'Reverse: a b c ->', answer ' c b a'."""
    rng = random.Random(seed)
    out, seen = [], set(exclude or ())
    while len(out) < n:
        w = tuple(rng.sample(WORDS, 3))
        if w in seen:
            continue
        seen.add(w)
        out.append((f"Reverse: {' '.join(w)} ->", " " + " ".join(reversed(w))))
    return out


def new_tasks(quick: bool) -> dict:
    """{'train': [(prompt, answer, task)], 'eval': {task: [(prompt, answer)]}}.

    madeup: trained and evaluated on the same facts (new knowledge is memorised); rule: evaluated on
    word lists never seen in training.
    """
    facts = madeup_facts(24 if quick else 40)
    ev_rule = reversal(24 if quick else 40, seed=99)
    tr_rule = reversal(400, seed=7, exclude={tuple(p.split(": ")[1].split(" ->")[0].split()) for p, _ in ev_rule})
    # balanced mixture: the facts repeated to as many examples as the rule task has
    reps = max(1, len(tr_rule) // len(facts))
    train = [(p, a, "madeup") for p, a in facts] * reps + [(p, a, "rule") for p, a in tr_rule]
    return {"train": train, "facts": facts, "eval": {"madeup": facts, "rule": ev_rule}}


MC_CATEGORIES = {"fruit": "fruit", "animal": "animal", "color": "color", "vehicle": "vehicle",
                 "instrument": "musical instrument", "country": "country", "drink": "drink", "number": "number",
                 "furniture": "piece of furniture"}
MC_CALIBRATION = "It is a kind of"


def mc_items(seed: int = 5) -> list[tuple[str, list[str], int]]:
    """Zero-shot 4-way choice: (prompt '<Word> is a kind of', 4 category words, index of the right one).

    One item per word of the category lists (90); three distractor categories drawn at random. Scored
    by the log-probability of each one-token option minus its log-probability after the content-free
    prompt MC_CALIBRATION (calibration for the options' prior, Zhao et al. 2021, "Calibrate before use").
    """
    rng = random.Random(seed)
    items = []
    for cat, key in MC_CATEGORIES.items():
        for w in CATEGORIES[key]:
            others = rng.sample([o for o in MC_CATEGORIES if o != cat], 3)
            opts = [cat] + others
            rng.shuffle(opts)
            items.append((f"{w[0].upper() + w[1:]} is a kind of", opts, opts.index(cat)))
    rng.shuffle(items)
    return items


def english_text() -> list[str]:
    """Paragraphs of English prose from the standard library's Python reference (pydoc_data.topics)."""
    from pydoc_data.topics import topics

    paras = []
    for name in sorted(topics):
        for p in topics[name].split("\n\n"):
            p = " ".join(p.split())
            # prose only: long enough, few code characters
            if len(p) > 300 and sum(ch in "(){}[]=_*>:" for ch in p) < 0.02 * len(p):
                paras.append(p)
    return paras
