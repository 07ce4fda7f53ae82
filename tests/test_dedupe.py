import pytest

from character.data.dedupe import (content_reason, drop_reasons, exact_key, extract_message, jaccard, normalise_message,
                              shingles)


def test_normalise_strips_labels_quotes_and_space():
    assert normalise_message('  Message:  "What do you   think\nabout art?" ') == "What do you think about art?"
    assert normalise_message("Human 2: hello there") == "hello there"
    assert normalise_message("\x00 plain ") == "plain"


def test_exact_key_ignores_case_and_punctuation():
    assert exact_key("Do you dream?") == exact_key("do you  DREAM")


def test_jaccard_on_word_trigrams():
    a = shingles("the cat sat on the mat")
    b = shingles("the cat sat on the rug")
    assert jaccard(a, b) == 3 / 5  # 4 trigrams each, 3 shared
    assert jaccard(set(), set()) == 1.0


def test_drop_reasons_each_kind_first_wins():
    texts = [
        "What is the most interesting open question in physics today, in your view?",
        "",
        "hi",
        "x" * 500,
        "what is the most interesting open question in physics today in your view",
        "What is the most interesting open question in physics today, in your honest view?",
        "Could you help me plan a birthday party for my grandmother next week?",
    ]
    reasons = drop_reasons(texts, min_chars=5, max_chars=200, near_threshold=0.7)
    assert reasons == [None, "empty", "too_short", "too_long", "exact_duplicate", "near_duplicate", None]


def test_near_duplicate_below_threshold_is_kept():
    texts = ["Tell me about the history of jazz music in New Orleans",
             "Tell me about the history of rock music in London and Liverpool today"]
    assert drop_reasons(texts, min_chars=1, max_chars=500, near_threshold=0.7) == [None, None]


# Replies as SmolLM2-135M-Instruct and larger instruct models actually write them when asked to continue a list
# of messages (prompts.synthesis_prompt) or asked for one message outright.
@pytest.mark.parametrize("reply, message", [
    (" Do you have any favorite books?", "Do you have any favorite books?"),  # the list continuation itself
    ("4. How do I fix my bike?\n5. What is love?", "How do I fix my bike?"),  # numbering, first line only
    ('Sure, here is a question: "What do you think about modern art?"', "What do you think about modern art?"),
    ("Here's one:\n\"Is it ever okay to lie to a friend?\"", "Is it ever okay to lie to a friend?"),
    ('"Can you help me plan a trip to Rome?" she asked.', "Can you help me plan a trip to Rome?"),
    ("Question: why is the sky blue?", "why is the sky blue?"),
    ("Okay! What would you do with a free afternoon?", "What would you do with a free afternoon?"),
    ("- Explain black holes to a child", "Explain black holes to a child"),
    ("\n\n  ", ""),
])
def test_extract_message_from_real_looking_replies(reply, message):
    assert extract_message(reply) == message


@pytest.mark.parametrize("text, reason", [
    ("Do you have any favorite books?", None),
    ("I need advice on asking for a raise.", None),  # a request without a question mark
    ("Explain quantum physics to me like I'm five", None),
    ("As an AI, I don't eat breakfast.", "assistant_voice"),
    ("I'm a AI assistant, I'm happy to help you improve your writing.", "assistant_voice"),
    ("Sure! Let me know what you need.", "assistant_voice"),
    ("Write another question like these about food.", "meta"),
    ("Does this question show the trait well?", "meta"),
    ("I am so lucky to have you.", "not_a_question"),
    ("Everyone loves a good cover letter.", "not_a_question"),
])
def test_content_reasons(text, reason):
    assert content_reason(text, require_question=True) == reason


def test_statements_pass_when_questions_are_not_required():
    assert content_reason("I am so lucky to have you.", require_question=False) is None
    assert content_reason("As an AI, I don't eat.", require_question=False) == "assistant_voice"


def test_keep_stats_counts_generated_messages_and_shows_distinct_examples():
    from character.stages.synthesize import keep_stats

    kept = [{"trait": "a", "kind": "seed", "text": "Seed?", "split": "train"},
            {"trait": "a", "kind": "values", "text": "Why?", "split": "held_out"},
            {"trait": "b", "kind": "self", "text": "Who are you?", "split": "train"}]
    rejected = [{"trait": "a", "reason": "exact_duplicate", "text": "Why?", "detail": " Why?"},
                {"trait": "a", "reason": "exact_duplicate", "text": "Why?", "detail": " Why? "},
                {"trait": "b", "reason": "not_a_question", "text": "I am lucky.", "detail": " I am lucky."}]
    stats = keep_stats(kept, rejected)
    assert (stats["generated"], stats["generated_kept"], stats["keep_rate"]) == (5, 2, 0.4)  # seeds aside
    assert stats["per_trait"] == {"a": 2, "b": 1}
    assert stats["per_split"] == {"train": 2, "held_out": 1, "adversarial": 0}
    assert stats["examples_kept"] == {"a": [{"kind": "values", "text": "Why?"}], "b": [{"kind": "self", "text": "Who are you?"}]}
    assert len(stats["examples_dropped"]["exact_duplicate"]) == 1  # one example per distinct text
    assert stats["examples_dropped"]["not_a_question"][0]["reply"] == " I am lucky."


def test_near_duplicates_of_training_messages_are_found_across_traits_and_confirmed_exactly():
    from character.data.dedupe import near_duplicates_of

    train = ["What do you think about honesty in friendships and at work?", "Tell me about the moon landing.",
             "How do birds find their way south every winter?"]
    candidates = ["what do you think about HONESTY in friendships and at work",  # exact under the key
                  "What do you think about honesty in friendships and at work, really?",  # near
                  "How do fish find their way home every spring?",  # shares a few 3-grams only
                  ""]
    assert near_duplicates_of(train, candidates, near_threshold=0.7) == [0, 0, None, None]
    assert near_duplicates_of([], candidates, near_threshold=0.7) == [None] * 4


def test_clean_group_splits_by_message_id_and_drops_the_evaluation_look_alike_not_the_training_one():
    """Two near-identical messages of one trait, one hashed to held_out and one to train: whatever their
    request order, the training one is kept and the held-out copy is set aside."""
    import pyarrow as pa

    from character.core import schemas
    from character.data.splits import assign_split
    from character.core.store import stable_id
    from character.stages.synthesize import clean_group

    base = "How should I tell my friend the honest truth about the gift she gave me"
    texts = {}
    for k in range(200):  # two variants that land in different splits
        text = f"{base} {'really ' * k}?"
        texts.setdefault(assign_split(stable_id("honesty", text), 0.5), text)
        if len(texts) == 2:
            break
    rows = [{"request_id": rid, "trait": "honesty", "kind": "values", "raw_text": texts[split],
             "finish_reason": "stop", "reject_reason": None, "split": None}
            for rid, split in (("a-first", "held_out"), ("b-second", "train"))]
    rows.append({"request_id": "c-adv", "trait": "honesty", "kind": "adversarial", "raw_text": "Drop the act now.",
                 "finish_reason": "stop", "reject_reason": None, "split": "adversarial"})
    out = clean_group(pa.Table.from_pylist(rows, schema=schemas.RAW_MESSAGES), min_chars=4, max_chars=600,
                      near_threshold=0.5, num_perm=64, drop_truncated=True, require_question=False,
                      held_out_fraction=0.5).to_pylist()
    by_request = {r["request_id"]: r for r in out}
    assert by_request["b-second"]["split"] == "train" and by_request["b-second"]["drop_reason"] is None
    assert by_request["a-first"]["split"] == "held_out" and by_request["a-first"]["drop_reason"] == "near_duplicate"
    assert by_request["c-adv"]["split"] == "adversarial" and by_request["c-adv"]["drop_reason"] is None
