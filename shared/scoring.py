"""Word error rate with Whisper's text normalizers on both sides (needs the `bench` extra):
the English one for English (and for `auto`, whose language is not known), the basic one
(lower case, no punctuation or symbols) for any other language."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any


@lru_cache(maxsize=2)
def _normalizer(english: bool) -> Any:
    if english:
        from whisper_normalizer.english import EnglishTextNormalizer

        return EnglishTextNormalizer()
    from whisper_normalizer.basic import BasicTextNormalizer

    return BasicTextNormalizer()


def normalize(text: str, language: str | None = "en") -> str:
    return str(_normalizer(language in (None, "en", "auto"))(text)).strip()


def wer(references: Sequence[str], hypotheses: Sequence[str], language: str | None = "en") -> float:
    """Corpus WER over pairs (errors over all reference words), normalized text."""
    import jiwer

    refs = [normalize(r, language) for r in references]
    hyps = [normalize(h, language) for h in hypotheses]
    pairs = [(r, h) for r, h in zip(refs, hyps, strict=True) if r]
    if not pairs:
        return 0.0
    return float(jiwer.wer([r for r, _ in pairs], [h for _, h in pairs]))


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(word errors, reference words) of one pair, normalized text: what a corpus WER
    adds up, so a clip's share of it can be told."""
    import jiwer

    ref = normalize(reference)
    if not ref:
        return 0, 0
    out = jiwer.process_words(ref, normalize(hypothesis))
    return out.substitutions + out.deletions + out.insertions, len(ref.split())
