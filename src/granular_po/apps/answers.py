"""What a response states as its answer, and whether it matches the expected one (for `granular-po eval`).

The rules, as `granular-po eval --help` states them:
- the expected answer is a record's `answer` (a string or a number), else the answer its correct response
  states (read by the same rules as a model's output) when that response is short (at most
  `SHORT_RESPONSE_WORDS` words) or says "the answer is ..."; a long-form response gives none;
- the stated answer of a text is the last one: after the last "answer is" / "answer:" if the text has one,
  else the last number in the text (numeric answers) or its last line (text answers);
- a number after "answer is" is read in that answer sentence: its first number, or, when that opens a worked
  expression ("The answer is 7 * 8 = 56.", "Answer: 12 times 13, which is 156"), the number after the
  sentence's last "=" / "is" / "equals" (else its last number);
- numbers compare numerically ("1,234" = 1234 = 1234.0; a string `answer` that is a number is one); text
  compares after normalising case, whitespace and punctuation ("Paris." = "paris"), and a stated text
  that ends with the expected answer counts ("The capital of France is Paris." for "Paris").
So an earlier or unrelated number never makes an answer right: only the last stated one counts.
"""

from __future__ import annotations

import math
import re
import unicodedata

Answer = int | float | str

# a correct response longer than this and without "answer is" is long-form: no answer key is read from
# it (the synthetic tasks' one-sentence answers, "The sum of 7 and 7 is 14.", have at most 13 words)
SHORT_RESPONSE_WORDS = 16

# "the answer is 56", "Answer: 56", "final answer is **56**"
_ANSWER_PHRASE = re.compile(r"\banswer\s*(?:is\b|:)", re.IGNORECASE)
# 1,234 is one number (thousands groups), "56, so" is 56, "3.5" is one number, "56." ends a sentence
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\d])")
_WHOLE_NUMBER = re.compile(r"\s*[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?\s*")
# a sentence ends at . ! ? followed by a space or the end, or at a line break
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)|\n")
# after a number, an arithmetic operator: the number opens a worked expression ("7 * 8 = 56", "12 times 13")
_OPERATOR = re.compile(r"\s*(?:[-+*/×÷^]|x\s|times\b|plus\b|minus\b|divided\b|multiplied\b)", re.IGNORECASE)
# what states an expression's result: "= 56", "which is 156", "equals 56"
_RESULT = re.compile(r"=|\bis\b|\bequals\b", re.IGNORECASE)


def to_number(text: str) -> int | float:
    """'1,234' -> 1234, '-3.5' -> -3.5 (an int when it has no fractional part)."""
    value = float(text.replace(",", ""))
    return int(value) if value.is_integer() and "." not in text else value


def _answer_sentence(text: str, start: int) -> tuple[int, int]:
    """(start, end) of the sentence that begins at `start` (leading spaces, colons and ** skipped)."""
    while start < len(text) and (text[start].isspace() or text[start] in ":*"):
        start += 1
    end = _SENTENCE_END.search(text, start)
    return start, end.start() if end else len(text)


def _sentence_number(text: str, start: int, end: int) -> int | float | None:
    """The number an answer sentence states: its first, unless that opens a worked expression ("7 * 8 = 56",
    "12 times 13, which is 156"): then the number after its last "=" / "is", else its last number."""
    numbers = list(_NUMBER.finditer(text, start, end))
    if not numbers:
        return None
    if not _OPERATOR.match(text, numbers[0].end(), end):
        return to_number(numbers[0].group())
    results = list(_RESULT.finditer(text, start, end))
    after = [n for n in numbers if results and n.start() >= results[-1].end()]
    return to_number((after[0] if after else numbers[-1]).group())


def stated_number(text: str) -> int | float | None:
    """The number of the sentence after the last "answer is" / "answer:" (see `_sentence_number`), else the
    first number after that phrase, else the last number of the text; None without one."""
    phrases = list(_ANSWER_PHRASE.finditer(text))
    if phrases:
        found = _sentence_number(text, *_answer_sentence(text, phrases[-1].end()))
        if found is not None:
            return found
        after = _NUMBER.search(text, phrases[-1].end())
        if after:
            return to_number(after.group())
    found = _NUMBER.findall(text)
    return to_number(found[-1]) if found else None


def stated_text(text: str) -> str | None:
    """The sentence after the last "answer is" / "answer:", else the last non-empty line; None when blank."""
    phrases = list(_ANSWER_PHRASE.finditer(text))
    if phrases:
        rest = text[phrases[-1].end():].lstrip(" \t*")
        end = _SENTENCE_END.search(rest)
        candidate = rest[: end.start()] if end else rest
        if candidate.strip():
            return candidate.strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else None


def normalize(text: str) -> str:
    """Case folded, punctuation removed, whitespace collapsed: 'The  Eiffel-Tower!' -> 'the eiffeltower'."""
    kept = "".join(ch for ch in text.casefold() if not unicodedata.category(ch).startswith("P"))
    return " ".join(kept.split())


def is_numeric(answer: Answer) -> bool:
    """A number, or a string that is one ('56', '1,234', '-3.5')."""
    if isinstance(answer, bool):
        return False
    return isinstance(answer, (int, float)) or bool(_WHOLE_NUMBER.fullmatch(answer))


def expected_value(answer: Answer) -> Answer:
    """The expected answer as compared: a number for numeric answers, else the string."""
    if isinstance(answer, str) and is_numeric(answer):
        return to_number(answer.strip().lstrip("+"))
    return answer


def extract_answer(text: str) -> int | float | None:
    """The number a text states as its answer (see the module docstring); None when it states none."""
    return stated_number(text)


def stated_answer(text: str, expected: Answer) -> Answer | None:
    """What `text` states, read as the kind of answer expected (a number or a text)."""
    return stated_number(text) if is_numeric(expected) else stated_text(text)


def is_correct(stated: Answer | None, expected: Answer) -> bool:
    """Numbers numerically; text after `normalize`, equal or ending with the expected answer's words (a
    full sentence that ends with it); nothing stated is wrong."""
    if stated is None:
        return False
    expected = expected_value(expected)
    if isinstance(expected, (int, float)):
        return isinstance(stated, (int, float)) and math.isclose(stated, expected, rel_tol=1e-9, abs_tol=1e-12)
    said, wanted = normalize(str(stated)), normalize(expected)
    return bool(wanted) and (said == wanted or said.endswith(" " + wanted))


def is_long_form(response: str) -> bool:
    """More than `SHORT_RESPONSE_WORDS` words and no "answer is" / "answer:": a text whose numbers are
    no answer key ("Survival after falling more than 20 feet depends on ..." does not answer 20)."""
    return len(response.split()) > SHORT_RESPONSE_WORDS and not _ANSWER_PHRASE.search(response)


def answer_of_response(response: str) -> Answer | None:
    """The answer a correct response states: its number (see `stated_number`), else the text after an
    "answer is" phrase; None when it states neither or is long-form (`is_long_form`): such a record
    cannot be graded without an `answer`."""
    if is_long_form(response):
        return None
    number = stated_number(response)
    if number is not None:
        return number
    if _ANSWER_PHRASE.search(response):
        return stated_text(response)
    return None
