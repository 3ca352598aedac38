"""Decoding defaults shared by every generation path (evaluation, held-out
evaluation during training, search). Kept free of torch so that configs can
import them without loading the model code."""

DEFAULT_NUM_BEAMS = 3  # BLIP's beam count
DEFAULT_NO_REPEAT_NGRAM = 3
SENTENCE_END_TOKENS = (".", "!", "?")  # a unit is one sentence: decoding stops at its end
# Pairs decoded in one beam search by ``GearModel.generate_many``: on CPU a
# decoding step costs about the same for 1 pair as for 16.
GENERATION_BATCH = 16
