"""Answer normalisation: the VQA v2 rules LLaVA-Med's scorer used, quirks kept, and a clean strict one.

:func:`vqa_normalize` must give the paper's numbers, so it keeps what the original did even where that is
odd (each quirk is named where it is coded). :func:`strict_normalize` is what a careful scorer would use.
Pure Python.
"""

from __future__ import annotations

import re
import unicodedata

# The marks the VQA v2 normaliser handles one after another, in its order.
PUNCTUATION = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)

NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})

# The VQA v2 contraction table: a word written without its apostrophe(s) -> the standard spelling. Entries
# with capitals ("Im", "Ive", "Id've", "I'dve") are left out: the strings are lower-cased before this
# table is read, so they can never match. "somebody'd" -> "somebodyd" is the table's own (reversed) entry.
_CONTRACTIONS = """
aint:ain't arent:aren't cant:can't couldve:could've couldnt:couldn't couldn'tve:couldn't've
couldnt've:couldn't've didnt:didn't doesnt:doesn't dont:don't hadnt:hadn't hadnt've:hadn't've
hadn'tve:hadn't've hasnt:hasn't havent:haven't hed:he'd hed've:he'd've he'dve:he'd've hes:he's howd:how'd
howll:how'll hows:how's isnt:isn't itd:it'd itd've:it'd've it'dve:it'd've itll:it'll let's:let's
maam:ma'am mightnt:mightn't mightnt've:mightn't've mightn'tve:mightn't've mightve:might've mustnt:mustn't
mustve:must've neednt:needn't notve:not've oclock:o'clock oughtnt:oughtn't ow's'at:'ow's'at
'ows'at:'ow's'at 'ow'sat:'ow's'at shant:shan't shed've:she'd've she'dve:she'd've she's:she's
shouldve:should've shouldnt:shouldn't shouldnt've:shouldn't've shouldn'tve:shouldn't've
somebody'd:somebodyd somebodyd've:somebody'd've somebody'dve:somebody'd've somebodyll:somebody'll
somebodys:somebody's someoned:someone'd someoned've:someone'd've someone'dve:someone'd've
someonell:someone'll someones:someone's somethingd:something'd somethingd've:something'd've
something'dve:something'd've somethingll:something'll thats:that's thered:there'd thered've:there'd've
there'dve:there'd've therere:there're theres:there's theyd:they'd theyd've:they'd've they'dve:they'd've
theyll:they'll theyre:they're theyve:they've twas:'twas wasnt:wasn't wed've:we'd've we'dve:we'd've
weve:we've werent:weren't whatll:what'll whatre:what're whats:what's whatve:what've whens:when's
whered:where'd wheres:where's whereve:where've whod:who'd whod've:who'd've who'dve:who'd've wholl:who'll
whos:who's whove:who've whyll:why'll whyre:why're whys:why's wont:won't wouldve:would've
wouldnt:wouldn't wouldnt've:wouldn't've wouldn'tve:wouldn't've yall:y'all yall'll:y'all'll
y'allll:y'all'll yall'd've:y'all'd've y'alld've:y'all'd've y'all'dve:y'all'd've youd:you'd
youd've:you'd've you'dve:you'd've youll:you'll youre:you're youve:you've
"""
CONTRACTIONS = dict(pair.split(":", 1) for pair in _CONTRACTIONS.split())

_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# Meant as "a period not between digits", but "(?!<=\d)" is a look-AHEAD for the literal text "<=" and a
# digit, which never follows a period: so it removes every period not followed by a digit ("3." -> "3").
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
# The original passed re.UNICODE (32) where re.sub takes its count: at most 32 periods are removed.
_PERIOD_COUNT = int(re.UNICODE)


def vqa_normalize(text: str) -> str:
    """The VQA v2 normalisation as LLaVA-Med's scorer applied it (the caller lower-cases first).

    1. Each mark of :data:`PUNCTUATION` in turn: deleted everywhere if the *original* string has the mark
       next to a space, or has a digit-comma-digit group anywhere; otherwise every occurrence becomes a
       space.
    2. Periods not followed by a digit are deleted (at most 32 of them).
    3. Whitespace-split words: number words become digits, articles are dropped, contractions get their
       apostrophes; joined by single spaces.
    4. Commas are deleted.
    """
    has_number_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        if f"{mark} " in text or f" {mark}" in text or has_number_comma:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    out = _PERIOD.sub("", out, count=_PERIOD_COUNT)
    words = [NUMBER_WORDS.get(word, word) for word in out.lower().split()]
    words = [CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES]
    return " ".join(words).replace(",", "")


_NOT_WORD = re.compile(r"[^\w.]+|(?<!\d)\.|\.(?!\d)")


def strict_normalize(text: str) -> str:
    """Lower-case, Unicode NFKC, every run of characters that is not a letter, digit or decimal point a
    single space, articles dropped, number words as digits: ``"The left-side, 2.5 cm."`` ->
    ``"left side 2.5 cm"``. The same for every mark, whatever else the string holds."""
    text = unicodedata.normalize("NFKC", text).lower().replace("_", " ")
    words = [NUMBER_WORDS.get(word, word) for word in _NOT_WORD.sub(" ", text).split()]
    return " ".join(word for word in words if word not in ARTICLES)
