"""Explicit pyarrow schemas of every dataset the stages write."""
from __future__ import annotations

import pyarrow as pa

MESSAGES = pa.schema([
    pa.field("message_id", pa.string(), nullable=False),  # stable_id(trait, text)
    pa.field("trait", pa.string(), nullable=False),
    pa.field("kind", pa.string(), nullable=False),  # values | situation | self | everyday | adversarial | seed
    pa.field("text", pa.string(), nullable=False),
    pa.field("request_id", pa.string(), nullable=False),  # the generation request it came from
    # train | held_out (a stable hash of message_id, run.held_out_fraction) | adversarial (synthesised for
    # evaluation only): assigned once, here; training stages read `train`, evaluate the other two.
    pa.field("split", pa.string(), nullable=False),
])

# Raw generations of `synthesize`, kept under messages/_work/ so an interrupted run resumes.
RAW_MESSAGES = pa.schema([
    pa.field("request_id", pa.string(), nullable=False),
    pa.field("trait", pa.string(), nullable=False),
    pa.field("kind", pa.string(), nullable=False),
    pa.field("raw_text", pa.string(), nullable=False),
    pa.field("finish_reason", pa.string(), nullable=False),
    pa.field("reject_reason", pa.string()),  # set by the engine, e.g. prompt_too_long
    pa.field("split", pa.string()),  # "adversarial" for evaluation's own requests; None: split by message_id
])

# Rows set aside by any stage, with the reason; nothing is dropped silently.
REJECTED = pa.schema([
    pa.field("row_id", pa.string(), nullable=False),
    pa.field("trait", pa.string(), nullable=False),
    pa.field("reason", pa.string(), nullable=False),
    pa.field("text", pa.string(), nullable=False),
    pa.field("detail", pa.string()),
])

RESPONSES = pa.schema([
    pa.field("message_id", pa.string(), nullable=False),
    pa.field("trait", pa.string(), nullable=False),
    pa.field("kind", pa.string(), nullable=False),
    pa.field("prompt", pa.string(), nullable=False),  # the user message as the policy sees it, no constitution
    pa.field("candidates", pa.list_(pa.string()), nullable=False),
    pa.field("finish_reasons", pa.list_(pa.string()), nullable=False),
    pa.field("system_prompt", pa.string(), nullable=False),  # "trait" or "constitution"
    pa.field("temperature", pa.float32(), nullable=False),
    pa.field("top_p", pa.float32(), nullable=False),
    pa.field("max_tokens", pa.int32(), nullable=False),
    pa.field("seed", pa.int64(), nullable=False),
    # Per candidate: its token ids and log p(candidate | system prompt, message) under the sampling model
    # (raw log-probs; a contrast judge reuses them instead of a second forward pass).
    pa.field("candidate_token_ids", pa.list_(pa.list_(pa.int32())), nullable=False),
    pa.field("candidate_logprobs", pa.list_(pa.float64()), nullable=False),
])

# Preference pairs in TRL's preference format (prompt / chosen / rejected) plus soft labels.
PREFERENCES = pa.schema([
    pa.field("pair_id", pa.string(), nullable=False),  # stable_id(message_id, chosen, rejected)
    pa.field("message_id", pa.string(), nullable=False),
    pa.field("trait", pa.string(), nullable=False),
    pa.field("prompt", pa.string(), nullable=False),
    pa.field("chosen", pa.string(), nullable=False),
    pa.field("rejected", pa.string(), nullable=False),
    pa.field("p_chosen", pa.float64(), nullable=False),  # soft label >= 0.5 (after optional clamping)
    pa.field("p_ab", pa.float64(), nullable=False),  # judge's P(first better) with chosen shown first
    pa.field("p_ba", pa.float64(), nullable=False),  # judge's P(first better) with rejected shown first
    pa.field("judge", pa.string(), nullable=False),
    pa.field("chosen_score", pa.float64(), nullable=False),  # ranking scores (mean win or Bradley-Terry)
    pa.field("rejected_score", pa.float64(), nullable=False),
])

# train-sft with sft.source revised: each message's answer, the model's critiques of it against the trait and its
# revisions, round by round (sft/revisions/; set-aside ones in sft/revisions/rejected/ with their reason).
SFT_REVISIONS = pa.schema([
    pa.field("message_id", pa.string(), nullable=False),
    pa.field("trait", pa.string(), nullable=False),
    pa.field("prompt", pa.string(), nullable=False),  # the message
    pa.field("original", pa.string(), nullable=False),  # the answer revised: the message's best candidate
    pa.field("critiques", pa.list_(pa.string()), nullable=False),  # one per round
    pa.field("revisions", pa.list_(pa.string()), nullable=False),  # one per round; each revises the one before
    pa.field("revision", pa.string(), nullable=False),  # the last: the SFT target
])

# Every comparison the judge made, both orders: the raw material of the label-quality numbers.
COMPARISONS = pa.schema([
    pa.field("message_id", pa.string(), nullable=False),
    pa.field("trait", pa.string(), nullable=False),
    pa.field("i", pa.int32(), nullable=False),
    pa.field("j", pa.int32(), nullable=False),
    pa.field("q_ij", pa.float64(), nullable=False),  # P(first better), candidate i shown first
    pa.field("q_ji", pa.float64(), nullable=False),  # P(first better), candidate j shown first
    pa.field("label", pa.float64(), nullable=False),  # P(i better) = (q_ij + 1 - q_ji) / 2
])

# Per-batch commit record of a stage whose batch writes several parts (written last).
DONE = pa.schema([pa.field("message_id", pa.string(), nullable=False)])

# Evaluation: one row per message x model x sample.
EVAL = pa.schema([
    pa.field("message_id", pa.string(), nullable=False),
    pa.field("trait", pa.string(), nullable=False),
    pa.field("split", pa.string(), nullable=False),  # held_out | adversarial
    pa.field("model", pa.string(), nullable=False),  # base | trained | sft (policy.sft)
    pa.field("sample", pa.int32(), nullable=False),
    pa.field("prompt", pa.string(), nullable=False),
    pa.field("response", pa.string(), nullable=False),
    pa.field("reward", pa.float64(), nullable=False),  # preference-model score
    pa.field("n_words", pa.int32(), nullable=False),
    pa.field("n_tokens", pa.int32(), nullable=False),
    pa.field("finish_reason", pa.string(), nullable=False),
    # P(this response beats the base's same sample); a base row: P(it beats the trained model's same sample)
    pa.field("win_prob", pa.float64(), nullable=False),
    # The frozen base model's per-token contrast of the answer under its own trait (null: did not fit), and under
    # every trait of the run (the interference matrix); character/reporting/eval_summary.py
    pa.field("trait_score", pa.float64()),
    pa.field("trait_scores", pa.list_(pa.struct([("trait", pa.string()), ("score", pa.float64())]))),
    pa.field("probes", pa.list_(pa.struct([("probe", pa.string()), ("hit", pa.bool_())]))),  # its trait's probes
    pa.field("logprob", pa.float64()),  # log p(answer | message) under the model that wrote it (raw log-probs)
    pa.field("logprob_base", pa.float64()),  # ... under the base model: the KL estimate's other term
])

EVAL_GENERATIONS = pa.schema([
    pa.field("message_id", pa.string(), nullable=False),
    pa.field("trait", pa.string(), nullable=False),
    pa.field("split", pa.string(), nullable=False),
    pa.field("text", pa.string(), nullable=False),
    pa.field("outputs", pa.list_(pa.string()), nullable=False),
    pa.field("finish_reasons", pa.list_(pa.string()), nullable=False),
    pa.field("output_tokens", pa.list_(pa.int64()), nullable=False),
    pa.field("output_token_ids", pa.list_(pa.list_(pa.int32())), nullable=False),
    pa.field("output_logprobs", pa.list_(pa.float64()), nullable=False),
])

# The trained preference model's rewards of every pair (train-pm, pm.score_pairs), for `character review`.
PM_PAIR_SCORES = pa.schema([
    pa.field("pair_id", pa.string(), nullable=False),
    pa.field("message_id", pa.string(), nullable=False),
    pa.field("trait", pa.string(), nullable=False),
    pa.field("role", pa.string(), nullable=False),  # train | validation (the PM's held-out pairs)
    pa.field("chosen_reward", pa.float64(), nullable=False),
    pa.field("rejected_reward", pa.float64(), nullable=False),
])

# A reviewer's flags (`character review`, character/review/marks.py): one row per flag; a cleared flag keeps its row.
REVIEW_FLAGS = pa.schema([
    pa.field("flag_id", pa.string(), nullable=False),
    pa.field("kind", pa.string(), nullable=False),  # pair | message
    pa.field("target_id", pa.string(), nullable=False),  # pair_id or message_id
    pa.field("message_id", pa.string(), nullable=False),
    pa.field("trait", pa.string(), nullable=False),
    pa.field("flag", pa.string(), nullable=False),  # mislabeled (pair) | off_trait (message)
    pa.field("note", pa.string(), nullable=False),
    pa.field("reviewer", pa.string(), nullable=False),
    pa.field("created_at", pa.string(), nullable=False),  # ISO 8601, UTC
    pa.field("cleared_by", pa.string()),
    pa.field("cleared_at", pa.string()),
])
