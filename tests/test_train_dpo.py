"""train-dpo on real Ray Train + DeepSpeed (gloo, 2 CPU workers) on rule-labelled pairs ("fewer words is
better"): learning, a killed worker resumed from its checkpoint with the reference log-probs it carries,
the held-out numbers recomputed from the export, and the policy's answers moving the labelled way."""
import json
import shutil

import pytest
import torch

from character.core.store import StageOutput
from conftest import RULE_PAIRS

pytestmark = pytest.mark.slow

LEARN = ["dpo.micro_batch_size=16", "dpo.lr=2e-3", "dpo.epochs=1", "dpo.beta=0.1", "dpo.nll_coef=0.1",
         "train.checkpoint_every=10"]


def _sampled_words(model_dir, prompts: list[str], seed: int = 0) -> float:
    """Mean rule reward (-words) of sampled answers (HF generate, fixed seed, 32 new tokens, no top-k: as
    vLLM samples)."""
    from transformers import AutoModelForCausalLM

    from character.core.config import RuleConfig
    from character.judging.judge import RuleJudge
    from character.models.loading import load_tokenizer, resolve_model
    from character.data.pm_data import chat_prefix

    path = resolve_model(str(model_dir))
    model, tok = AutoModelForCausalLM.from_pretrained(path).eval(), load_tokenizer(path)
    rule = RuleJudge(RuleConfig(type="length", target_words=0))
    torch.manual_seed(seed)
    scores = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([chat_prefix(tok, prompt)])
            out = model.generate(ids, do_sample=True, top_k=0, top_p=1.0, max_new_tokens=32, num_return_sequences=4,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            scores += [rule.score(tok.decode(o[ids.shape[1]:], skip_special_tokens=True)) for o in out]
    return sum(scores) / len(scores)


def test_dpo_learns_the_pairs_resumes_a_killed_worker_and_moves_answers_the_labelled_way(tmp_path, preferences,
                                                                                         make_config):
    from transformers import AutoModelForCausalLM

    from character.core import schemas
    from character.models.loading import load_tokenizer, resolve_model
    from character.training.pairs import load_pairs
    from character.training.scoring import response_logprobs
    from character.stages import train_dpo

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for folder in ("preferences", "messages"):
        shutil.copytree(preferences.parent / folder, run_dir / folder)
    # A worker dies at step 15: FailureConfig restarts the group from the step-10 checkpoint, which carries the
    # reference log-probs (recomputing them from the restored policy would make it its own reference).
    (run_dir / "_train").mkdir()
    (run_dir / "_train" / "inject_fault.json").write_text(json.dumps({"step": 15}))
    result = train_dpo.run(make_config(run_dir, *RULE_PAIRS, *LEARN, "train.max_failures=1"))
    metrics = json.loads((run_dir / "dpo" / "metrics.json").read_text())
    assert not (run_dir / "_train" / "inject_fault.json").exists()  # the fault fired
    assert metrics["resumed_from_step"] == 10 and metrics["reference"] == "precomputed"
    assert metrics["eval_accuracy"] >= 0.9, metrics
    assert metrics["eval_mean_margin"] > 0 and result.extra["eval_accuracy"] == metrics["eval_accuracy"]
    assert set(metrics["per_trait_accuracy"]) == {"curiosity", "honesty", "ai_nature"}
    assert StageOutput(str(run_dir), "dpo").complete()
    assert list((run_dir / "tensorboard" / "dpo").glob("events.out.tfevents.*"))

    # The held-out implicit rewards again, from the export and the base model: beta * (log pi - log ref).
    _, held, _ = load_pairs(str(run_dir), 0.2)
    policy = AutoModelForCausalLM.from_pretrained(run_dir / "dpo").eval()
    base = AutoModelForCausalLM.from_pretrained(resolve_model("tiny-llama")).eval()
    tok = load_tokenizer(str(run_dir / "dpo"))
    rewards = {}
    with torch.no_grad():
        for side in ("chosen", "rejected"):
            args = (tok, [r["prompt"] for r in held], [r[side] for r in held], 128)
            rewards[side] = 0.1 * (response_logprobs(policy, *args)[0] - response_logprobs(base, *args)[0])
    assert float(rewards["chosen"].mean()) == pytest.approx(metrics["eval_reward_chosen"], abs=2e-3)
    assert float(rewards["rejected"].mean()) == pytest.approx(metrics["eval_reward_rejected"], abs=2e-3)
    assert float((rewards["chosen"] > rewards["rejected"]).float().mean()) == pytest.approx(
        metrics["eval_accuracy"], abs=0.01)

    # The policy's own answers to held-out messages get shorter, as the pairs prefer.
    messages = StageOutput(str(run_dir), "messages").read(schema=schemas.MESSAGES).to_pylist()
    prompts = [m["text"] for m in messages if m["split"] == "held_out"][:12]
    before, after = _sampled_words(resolve_model("tiny-llama"), prompts), _sampled_words(run_dir / "dpo", prompts)
    print(f"held-out rule reward {before:.3f} -> {after:.3f}; metrics {json.dumps(metrics)}")
    assert after - before >= 2.0, (before, after)
