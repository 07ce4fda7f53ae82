"""ChatGenerator's tokenizers under Ray Data's concurrent calls (engine.concurrent_batches threads)."""
import threading

from character.inference.engine import PerThreadTokenizer, chat_token_ids
from character.models.loading import load_tokenizer

TEXTS = [("word " * (50 + 7 * i)).strip() for i in range(32)]


def _hammer(get_tokenizer, threads: int = 8, rounds: int = 150) -> list[int]:
    """Half the threads build chat prompts, half encode with truncation (as a judge or a PM might);
    returns the indices of prompts that came out different from a single-threaded encode."""
    expected = [chat_token_ids(load_tokenizer("tiny-llama"), "be brief", t) for t in TEXTS]
    wrong: list[int] = []
    start = threading.Barrier(threads)

    def work(k: int) -> None:
        start.wait()
        tokenizer = get_tokenizer()
        for i in range(rounds):
            j = (i + k) % len(TEXTS)
            if k % 2:
                tokenizer(TEXTS[j], truncation=True, max_length=16)
            elif chat_token_ids(tokenizer, "be brief", TEXTS[j]) != expected[j]:
                wrong.append(j)

    pool = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return wrong


def test_per_thread_tokenizers_stay_correct_under_8_threads():
    per_thread = PerThreadTokenizer("tiny-llama")
    assert _hammer(per_thread.get) == []
    seen = []
    threads = [threading.Thread(target=lambda: seen.append(id(per_thread.get()))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(seen)) == 3 and per_thread.get() is per_thread.get()


def test_one_shared_tokenizer_corrupts_other_threads_prompts():
    """The defect the per-thread tokenizers remove (what ChatGenerator did before): one tokenizer shared by
    the threads returns prompts truncated by another thread's settings."""
    shared = load_tokenizer("tiny-llama")
    assert _hammer(lambda: shared)
