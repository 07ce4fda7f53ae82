from character.dedupe import drop_reasons, exact_key, jaccard, normalise_message, shingles


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
