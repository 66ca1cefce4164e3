"""Selectors of the informative query words whose gaze shifts GIFT averages (the paper keeps content words).

A selector maps the query's sub-token strings (as `tokenizer.convert_ids_to_tokens` gives them) to one bool each.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

__all__ = ["CONTENT_POS", "STOPWORDS", "WordSelector", "content_words", "spacy_content_words"]

WordSelector = Callable[[Sequence[str]], list[bool]]

#: spaCy coarse POS tags the official GIFT code keeps.
CONTENT_POS = frozenset({"NOUN", "PROPN", "VERB", "ADJ", "ADV", "NUM"})

#: English function words (determiners, pronouns, auxiliaries, prepositions, conjunctions, question words).
STOPWORDS = frozenset(
    ["a", "an", "the", "this", "that", "these", "those", "there", "here", "it", "its", "it's", "i", "me", "my", "we", "our", "you", "your", "he", "him", "his", "she", "her", "they", "them", "their", "is", "are", "was", "were", "be", "been", "being", "am", "do", "does", "did", "doing", "have", "has", "had", "having", "will", "would", "shall", "should", "can", "could", "may", "might", "must", "of", "in", "on", "at", "to", "for", "from", "by", "with", "about", "as", "into", "onto", "over", "under", "above", "below", "between", "through", "during", "and", "or", "but", "nor", "so", "if", "then", "than", "because", "while", "what", "which", "who", "whom", "whose", "where", "when", "why", "how", "any", "some", "all", "each", "every", "no", "not", "yes", "please", "image", "picture", "photo", "describe", "detail", "details", "tell", "me", "question", "answer"]
)
_WORD_STARTS = ("▁", "Ġ", " ")


def _words(tokens: Sequence[str]) -> list[tuple[str, list[int]]]:
    """Group sub-tokens into words: a word starts at a token with a space marker or after a non-alphanumeric one."""
    words: list[tuple[str, list[int]]] = []
    for index, token in enumerate(tokens):
        text = token.lstrip("".join(_WORD_STARTS))
        starts = token.startswith(_WORD_STARTS) or not words or not words[-1][0][-1:].isalnum() or not text[:1].isalnum()
        if starts:
            words.append((text, [index]))
        else:
            words[-1] = (words[-1][0] + text, words[-1][1] + [index])
    return words


def _spread(words: list[tuple[str, list[int]]], keep: list[bool], count: int) -> list[bool]:
    selected = [False] * count
    for (_, indices), informative in zip(words, keep):
        for index in indices:
            selected[index] = informative
    return selected


def content_words(tokens: Sequence[str]) -> list[bool]:
    """Default selector without spaCy: alphanumeric words that are not English function words."""
    words = _words(tokens)
    keep = [any(c.isalnum() for c in word) and word.lower().strip(".,?!:;'\"") not in STOPWORDS for word, _ in words]
    return _spread(words, keep, len(tokens))


def spacy_content_words(model: str = "en_core_web_sm") -> WordSelector:
    """The official selector: words whose spaCy POS is in CONTENT_POS (needs `pip install spacy` and the model)."""
    try:
        import spacy
    except ImportError as error:
        raise ImportError("spacy_content_words needs spaCy: pip install spacy") from error
    nlp = spacy.load(model)

    def select(tokens: Sequence[str]) -> list[bool]:
        words = _words(tokens)
        doc = nlp(" ".join(word for word, _ in words))
        tags, offset = [], 0
        for word, _ in words:
            covering = [t.pos_ for t in doc if t.idx < offset + len(word) and t.idx + len(t.text) > offset]
            tags.append(any(tag in CONTENT_POS for tag in covering))
            offset += len(word) + 1
        return _spread(words, tags, len(tokens))

    return select
