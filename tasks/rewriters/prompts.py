"""Rewrite prompts: the paper's instruction (verbatim, Appendix A) and optional
worked examples given as earlier chat turns.

``PROMPT_VERSION`` names this module's prompt wording; it is part of the stage
cache key together with the full prompt text (``prompt_fingerprint``), so a
changed wording re-runs the rewrite even if someone forgets to bump it.
"""

from __future__ import annotations

import hashlib
import json

PROMPT_VERSION = "gear-paper-v2"

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

# Two worked examples for small models. Their answers keep the sentence's
# capitals (proper names stay proper names), which stopped small models from
# mangling rare names; neither sentence comes from the embedded dump.
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
)


def build_messages(sentence: str, use_worked_examples: bool = True) -> list[dict[str, str]]:
    """One chat conversation (OpenAI message dicts) asking to rewrite ``sentence``.

    The paper's instruction ("You are a helpful assistant, ...") is the system
    message, sent once; each user turn is a bare sentence. Repeating the
    instruction in every example turn tripled the prompt (451 vs ~200 tokens
    for SmolLM2), and prompt length is most of a CPU rewrite's cost.
    """
    messages: list[dict[str, str]] = [{"role": "system", "content": PAPER_PROMPT}]
    if use_worked_examples:
        for example, answer in WORKED_EXAMPLES:
            messages.append({"role": "user", "content": example})
            messages.append({"role": "assistant", "content": answer})
    messages.append({"role": "user", "content": sentence.strip()})
    return messages


def prompt_fingerprint(use_worked_examples: bool) -> str:
    """Hash of the exact prompt text a run sends (the sentence slot left as a marker)."""
    blob = json.dumps(
        {"version": PROMPT_VERSION, "messages": build_messages("{sentence}", use_worked_examples)},
        sort_keys=True,
    ).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
