"""Rewrite prompts: the paper's instruction (verbatim, Appendix A) and optional
worked examples given as earlier chat turns.

``PROMPT_VERSION`` names this module's prompt wording; it is part of the stage
cache key together with the full prompt text (``prompt_fingerprint``), so a
changed wording re-runs the rewrite even if someone forgets to bump it.
"""

from __future__ import annotations

import hashlib
import json

PROMPT_VERSION = "gear-paper-v3"

# Verbatim from the GeAR paper, Appendix A ("LLM Rewriting").
PAPER_PROMPT = (
    "You are a helpful assistant, please help the user to complete the following "
    "tasks directly, and answer briefly and fluently. This is a sentence from "
    "Wikipedia. Assuming that users want to search for this sentence on a search "
    "engine, write a phrase that users might use to search (including some "
    "keywords), separated by commas. Retain the key information of the subject, "
    "object, and noun. Unimportant words can be modified, but do not add other "
    "information."
)

# Worked examples for small models. Their answers keep the sentence's
# capitals (proper names stay proper names), which stopped small models from
# mangling rare names; they use only the sentence's own words and about half
# of them (what the quality gate and the local constraint accept); none of the
# sentences or topics comes from the embedded dump. The first two are the
# earlier prompt's (``use_worked_examples=2`` gives that prompt back).
WORKED_EXAMPLES: tuple[tuple[str, str], ...] = (
    (
        "The Eiffel Tower was designed by the engineering company of Gustave Eiffel "
        "and completed in 1889 for the World's Fair in Paris.",
        "Eiffel Tower, designed by Gustave Eiffel, completed 1889, World's Fair Paris",
    ),
    (
        "Photosynthesis in green plants converts light energy into chemical energy "
        "that is stored in glucose.",
        "photosynthesis, green plants, light energy, chemical energy, glucose",
    ),
    (
        "The Danube flows through ten countries before it empties into the Black Sea.",
        "Danube, ten countries, Black Sea",
    ),
    (
        "Marie Curie was the first woman to win a Nobel Prize, which she received in 1903.",
        "Marie Curie, first woman, Nobel Prize, 1903",
    ),
    (
        "Penguins are flightless birds that live almost only in the Southern Hemisphere.",
        "penguins, flightless birds, Southern Hemisphere",
    ),
    (
        "Mount Kilimanjaro is a dormant volcano in Tanzania and the highest mountain in Africa.",
        "Mount Kilimanjaro, dormant volcano, Tanzania, highest mountain Africa",
    ),
)


def _example_count(use_worked_examples: bool | int) -> int:
    if use_worked_examples is True:
        return len(WORKED_EXAMPLES)
    if use_worked_examples is False or use_worked_examples is None:
        return 0
    return max(0, min(int(use_worked_examples), len(WORKED_EXAMPLES)))


def build_messages(sentence: str, use_worked_examples: bool | int = True) -> list[dict[str, str]]:
    """One chat conversation (OpenAI message dicts) asking to rewrite ``sentence``.

    ``use_worked_examples``: True = all worked examples, a number = the first
    N, False/0 = none (the paper's prompt alone).

    The paper's instruction ("You are a helpful assistant, ...") is the system
    message, sent once; each user turn is a bare sentence. Repeating the
    instruction in every example turn tripled the prompt (451 vs ~200 tokens
    for SmolLM2), and prompt length is most of a CPU rewrite's cost.
    """
    messages: list[dict[str, str]] = [{"role": "system", "content": PAPER_PROMPT}]
    for example, answer in WORKED_EXAMPLES[: _example_count(use_worked_examples)]:
        messages.append({"role": "user", "content": example})
        messages.append({"role": "assistant", "content": answer})
    messages.append({"role": "user", "content": sentence.strip()})
    return messages


def prompt_fingerprint(use_worked_examples: bool | int) -> str:
    """Hash of the exact prompt text a run sends (the sentence slot left as a marker)."""
    blob = json.dumps(
        {"version": PROMPT_VERSION, "messages": build_messages("{sentence}", use_worked_examples)},
        sort_keys=True,
    ).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
