"""What the gateway can tell about the service's model without loading it.

Whether a model is English-only decides whether a session may ask for another `language`
(protocol.md). A name ending in `.en` (the default `tiny.en`) is one. A CTranslate2 model
folder tells by its vocabulary: Whisper's English-only vocabulary has 51,864 tokens, the
multilingual one 51,865 (CTranslate2's own `is_multilingual` test), so an English-only
model given by its path is recognised too. A folder the gateway cannot see (it runs on
another machine) is taken at its name.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

#: The size of Whisper's multilingual vocabulary; English-only models have one token fewer.
MULTILINGUAL_VOCABULARY = 51865


@functools.cache
def english_only(model: str) -> bool:
    """Whether `model` (a name or a CTranslate2 folder) decodes English only."""
    if model.endswith(".en"):
        return True
    size = _vocabulary_size(Path(model).expanduser())
    return size is not None and size < MULTILINGUAL_VOCABULARY


def _vocabulary_size(folder: Path) -> int | None:
    try:
        text = (folder / "vocabulary.txt").read_text(encoding="utf-8")
    except OSError:
        try:
            tokens = json.loads((folder / "vocabulary.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return len(tokens) if isinstance(tokens, list) else None
    # One token a line, split on "\n" alone as CTranslate2 reads it (str.splitlines would
    # also split on the rarer separators that a token may hold).
    return len(text.removesuffix("\n").split("\n")) if text else 0
