"""The whole pipeline, end to end: submitted with `ray job submit` to a real local Ray cluster with token
authentication (refused without the token; the cluster is shut down at the end, also on failure), writing
every artefact to object storage (a real S3 API: moto's server on 127.0.0.1, reached through pyarrow's
S3FileSystem and the standard AWS environment variables, as a cluster would reach S3), then rerun with
`character run`, which finds nothing to do, and redoes only what follows a deleted stage."""
import base64
import json
import math
import os
import re
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
from processes import kill_tree

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).parent / "ray")

# The tiny pipeline, made smaller still: every stage runs, each on a handful of rows.
SMALL = ["synthesize.messages_per_trait=6", "respond.candidates=3", "ppo.eval_fraction=0.3", "pm.epochs=1", "pm.micro_batch_size=2",
         "train.checkpoint_every=2", "ppo.iterations=2", "ppo.prompts_per_iteration=4", "ppo.minibatch_size=2",
         "ppo.eval_prompts=4", "ppo.eval_every=2", "evaluate.max_messages_per_trait=1",
         "evaluate.adversarial_per_trait=1", "evaluate.samples=1",
         # LoRA end to end on object storage: the PM exported merged + adapter, the policy as its adapter only
         # (export.merged false), which evaluate's engines merge onto the base when they load it.
         "train.lora.rank=4"]


# The same run trained by SFT then DPO (test_character_run_skips_complete_stages_then_trains_the_same_pairs_by_sft_and_dpo).
SFT_DPO = ["policy.sft=true", "sft.epochs=1", "sft.micro_batch_size=2", "sft.lr=1e-3", "policy.method=dpo",
           "dpo.epochs=1", "dpo.micro_batch_size=2", "dpo.lr=1e-3", "dpo.precompute_reference=false"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


BUCKET = "character-ci"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """An S3 endpoint on 127.0.0.1 (moto's server, in its own process: imported here, its Flask proxies
    would break vLLM's scan of loaded modules in later tests) with an empty bucket; the AWS variables that
    point pyarrow at it are set for this process and returned for the cluster's."""
    import pyarrow.fs as pafs

    port = _free_port()
    log = tmp_path_factory.mktemp("s3") / "moto.log"
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=open(log, "w"), stderr=subprocess.STDOUT)
    aws = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in aws}
    os.environ.update(aws)
    try:
        deadline = time.time() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert server.poll() is None and time.time() < deadline, log.read_text()[-2000:]
                time.sleep(0.3)
        pafs.S3FileSystem(endpoint_override=aws["AWS_ENDPOINT_URL"], allow_bucket_creation=True).create_dir(BUCKET)
        yield aws
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def token_cluster(tmp_path_factory, s3):
    tmp_path = tmp_path_factory.mktemp("cluster")
    token = secrets.token_hex(32)
    # The job's `python` is whatever the cluster's PATH finds: put this venv first, as a cluster image would
    # (pytest runs as `.venv/bin/python -m pytest` without an activated venv).
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, **s3, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "PATH": path}
    env.pop("RAY_ADDRESS", None)
    gcs, dash = _free_port(), _free_port()
    short_tmp = tempfile.mkdtemp(prefix="rt-", dir="/tmp")  # Ray's unix sockets need a short path
    head = subprocess.Popen(
        # Every port picked free: the session's in-process Ray (ray_local) already holds the default agent ports.
        [RAY, "start", "--head", "--block", f"--port={gcs}", f"--ray-client-server-port={_free_port()}",
         *(f"--{name}={_free_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                   "runtime-env-agent-port", "metrics-export-port",
                                                   "node-manager-port", "object-manager-port")),
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=4",
         "--object-store-memory=536870912", f"--temp-dir={short_tmp}"],
        env=env, stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            # A trivial job, not just `ray job list`: the head answers that before its dashboard agent can
            # take submissions ("No available agent to submit job"), and this also proves `python` is found.
            probe = subprocess.run([RAY, "job", "submit", "--address", url, "--", "python", "-c", "import pyarrow"],
                                   env=env, capture_output=True, text=True, timeout=120)
            if probe.returncode == 0:
                break
            assert head.poll() is None, (tmp_path / "head.log").read_text()[-2000:]
            time.sleep(2)
        else:
            pytest.fail("the Ray head did not come up within 120 s")
        yield url, env, short_tmp
    finally:
        # Nothing of the cluster is kept: kill it whole at once (Ray's workers and job entrypoints included, which
        # killpg alone misses), rather than a graceful stop (~35 s here) cut short after a grace period.
        kill_tree(head)


def test_submission_without_the_token_is_refused(token_cluster, tmp_path):
    url, env, _ = token_cluster
    stranger = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"}
    stranger["HOME"] = str(tmp_path / "nobody")  # no ~/.ray/auth_token either
    refused = subprocess.run([RAY, "job", "submit", "--address", url, "--", "python", "-c", "print('hi')"],
                             env=stranger, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0
    assert "auth" in (refused.stdout + refused.stderr).lower()


def _download(uri: str, local: Path) -> Path:
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(uri)
    if local.exists():
        import shutil

        shutil.rmtree(local)
    pafs.copy_files(root, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return local


@pytest.fixture(scope="module")
def submitted_run(token_cluster, tmp_path_factory, repo):
    """The run's URI in the bucket and a local download of it (for reading)."""
    url, env, cluster_tmp = token_cluster
    run_uri = f"s3://{BUCKET}/runs/tiny"
    submit = subprocess.run(
        [RAY, "job", "submit", "--address", url, "--working-dir", str(repo), "--",
         "python", "-m", "rayjobs.pipeline", "--config", "configs/tiny.yaml", f"run.output_dir={run_uri}", *SMALL],
        env=env, capture_output=True, text=True, timeout=1500)
    log = submit.stdout[-4000:] + submit.stderr[-2000:]
    assert submit.returncode == 0, log
    assert "succeeded" in submit.stdout.lower(), log
    jobs = subprocess.run([RAY, "job", "list", "--address", url], env=env, capture_output=True, text=True)
    assert "SUCCEEDED" in jobs.stdout
    # No stage mistook the URI for a local path (`s3://b/x` read as `b/x` would land under a working dir).
    assert not (repo / BUCKET).exists() and not (Path.cwd() / BUCKET).exists()
    assert not list(Path(cluster_tmp).glob(f"**/{BUCKET}"))  # the job's working dir lies under it
    folder = tmp_path_factory.mktemp("pipeline")
    (folder / "job.log").write_text(submit.stdout + submit.stderr)  # the job's log, as `ray job submit` shows it
    return run_uri, _download(run_uri, folder / "run")


def test_the_job_log_holds_the_lines_for_people_and_not_ray_datas_progress_blocks(submitted_run):
    """The main job's log, read as a Ray job log is (not a terminal): no Ray Data INFO progress blocks, no
    known-harmless core-worker error line; every stage's begin line, result line and the stage table are there
    (character/tracking/quiet.py)."""
    _, run_dir = submitted_run
    log = (run_dir.parent / "job.log").read_text()
    assert "logging_progress" not in log and "Execution plan of Dataset" not in log
    assert "has constructor arguments in the object store" not in log
    for index, stage in enumerate(("synthesize", "respond", "rank", "train-pm", "train-ppo", "evaluate", "report")):
        assert f"[run] stage {index + 1}/7 {stage}" in log
    for output in ("messages", "responses", "preferences"):
        assert re.search(rf"^\[{output}\] rows in \d+, rows out \d+", log, re.M), output
    assert re.search(r"^\[train-pm\] held-out accuracy ", log, re.M) and "stages run: synthesize, respond" in log


def _bucket_files(uri: str) -> set[str]:
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(uri)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    return {i.path[len(root) + 1:] for i in infos if i.type == pafs.FileType.File}


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.cells, self.sections = {}, {}, set()
        self._key = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section" and a.get("id"):
            self.sections.add(a["id"])
        if tag == "img" and a.get("id"):
            self.images[a["id"]] = a.get("src", "")
        if tag == "td" and a.get("data-key"):
            self._key = a["data-key"]

    def handle_data(self, data):
        if self._key:
            self.cells[self._key] = data.strip()
            self._key = None


def test_pipeline_job_writes_every_stage_and_the_report(submitted_run):
    assert "flask" not in sys.modules  # moto's server stays in its own process (see the s3 fixture)
    run_uri, run_dir = submitted_run
    in_bucket = _bucket_files(run_uri)
    for stage in ("messages", "responses", "preferences", "pm", "policy", "eval", "report"):
        assert f"{stage}/_SUCCESS" in in_bucket, stage
    for name in ("report/index.html", "pm/model.safetensors", "pm/config.json", "pm/tokenizer.json",
                 "pm/metrics.json", "pm/adapter/adapter_model.safetensors", "policy/adapter/adapter_config.json",
                 "policy/adapter/adapter_model.safetensors", "policy/metrics.jsonl"):
        assert name in in_bucket, name
    assert "policy/model.safetensors" not in in_bucket  # adapter only
    assert any(name.startswith("_train/policy/checkpoint_") for name in in_bucket)  # Ray Train on S3 too
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    assert set(summary["overall"]) == {"held_out", "adversarial"}
    _check_measures(summary, run_dir)
    page = _Page()
    page.feed((run_dir / "report" / "index.html").read_text())
    figures = {"fig-trait-score", "fig-interference", "fig-score-shift", "fig-win-rate", "fig-length",
               "fig-ppo-curves", "fig-ppo-time", "fig-pm-calibration", "fig-ranking", "fig-funnel"}
    assert figures <= set(page.images)
    for fig in figures:
        assert base64.b64decode(page.images[fig].split(",", 1)[1])[:4] == b"\x89PNG"
    checked = 0
    assert {k.split(".")[0] for k in page.cells if "→" in k} == {"base → final"}  # the headline
    for key, text in ((k, v) for k, v in page.cells.items() if "→" not in k):
        group, field = key.split(".", 1)
        block = summary["overall"][group.split("/")[1]] if group.startswith("overall/") else summary["groups"][group]
        value = block
        for part in field.split("."):
            value = value[part]
        if text not in ("n/a", "nan"):
            assert text == f"{value:.4f}", key
            checked += 1
    assert checked >= 11


def _check_measures(summary: dict, run_dir) -> None:
    """The measures that see a small model change, on a real run: trait scores from the base model for every
    answer, probes where the trait has them, the interference matrix over the run's traits, capability per model."""
    from character.core.store import StageOutput

    rows = StageOutput(str(run_dir), "eval").read().to_pylist()
    traits = sorted({r["trait"] for r in rows})
    # held out: every trait's score (the interference matrix); adversarial: the answer's own trait only
    assert all(len(r["trait_scores"]) == (len(traits) if r["split"] == "held_out" else 1) and r["logprob"] is not None
               for r in rows)
    assert all(r["trait_score"] == next(s["score"] for s in r["trait_scores"] if s["trait"] == r["trait"])
               for r in rows)
    assert {r["trait"] for r in rows if r["probes"]} == {"honesty", "ai_nature"}  # configs/traits/tiny.yaml
    assert sorted(summary["interference"]) == traits
    held = summary["overall"]["held_out"]
    for key in ("trait_score_base", "trait_score_trained", "trait_score_delta", "probe_delta", "kl"):
        assert math.isfinite(held[key]["mean"]), key
    assert summary["identical_share"]["held_out"] == held["identical_share"]["share"]
    capability = summary["capability"]
    assert capability["base"]["n"] == capability["trained"]["n"] >= 60 and set(capability["kept"]) == {"trained"}
    replies = json.loads((run_dir / "eval" / "capability.json").read_text())["replies"]
    assert len(replies["base"]) == capability["base"]["n"]
    # the ruler's numbers are kept (eval/_work/ruler), and they are the ones every row was measured with
    kept = StageOutput(str(run_dir), "eval").read("_work", "ruler").to_pylist()
    plain = {(k["message"], math.fsum(k["logprobs"])) for k in kept if k["system"] == "" and k["logprobs"] is not None}
    assert all((r["prompt"], r["logprob_base"]) in plain for r in rows if r["logprob_base"] is not None)
    assert len(kept) == len({(k["system"], k["message"], tuple(k["token_ids"])) for k in kept})


def _tracked_runs(db) -> tuple:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("character").experiment_id])
    (parent,) = [r for r in runs if r.data.tags["character.stage"] == "run"]
    return client, parent, [r for r in runs if r is not parent]


def test_the_job_is_tracked_in_mlflow_inside_the_run_directory(submitted_run):
    """The default tracking: one MLflow run for the run directory with a nested run per stage, in a SQLite store
    that the run directory on S3 carries (mlflow/mlflow.db, copied there after every stage)."""
    run_uri, run_dir = submitted_run
    client, parent, runs = _tracked_runs(run_dir / "mlflow" / "mlflow.db")
    stages = {r.data.tags["character.stage"]: r for r in runs}
    assert sorted(stages) == sorted(["synthesize", "respond", "rank", "train-pm", "train-ppo", "evaluate", "report"])
    assert len(runs) == len(stages)
    for run in (parent, *runs):
        assert run.info.status == "FINISHED" and run.data.tags["character.run_dir"] == run_uri
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parent.info.run_id}
    # the resolved config as params, the stage counts and timings, the exports as tags
    assert parent.data.params["ppo.iterations"] == "2" and parent.data.params["train.lora.rank"] == "4"
    assert parent.data.params["run.output_dir"] == run_uri
    messages = json.loads((run_dir / "messages" / "_SUCCESS").read_text())
    assert stages["synthesize"].data.metrics["stage.rows_out"] == messages["rows_out"]
    assert parent.data.metrics["synthesize.rows_out"] == messages["rows_out"]
    assert all(parent.data.metrics[f"{s}.seconds"] > 0 for s in stages)
    assert parent.data.tags["character.export.pm"] == f"{run_uri}/pm"
    assert parent.data.tags["character.recipe"] == "ppo"
    # rank 0's per-step histories: one point per PM step and per PPO iteration
    pm = json.loads((run_dir / "pm" / "metrics.json").read_text())
    history = client.get_metric_history(stages["train-pm"].info.run_id, "train_loss")
    assert [m.step for m in history] == list(range(1, pm["steps"] + 1))
    ppo = [json.loads(x) for x in (run_dir / "policy" / "metrics.jsonl").read_text().splitlines()]
    assert [m.step for m in client.get_metric_history(stages["train-ppo"].info.run_id, "kl")] == [1, 2]
    assert [m.value for m in client.get_metric_history(stages["train-ppo"].info.run_id, "eval_reward")] == \
        pytest.approx([x["eval_reward"] for x in ppo if "eval_reward" in x])
    # the evaluation's numbers, and the files
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    key = "eval.overall.held_out.win_rate.mean"
    assert stages["evaluate"].data.metrics[key] == parent.data.metrics[key] == pytest.approx(
        summary["overall"]["held_out"]["win_rate"]["mean"])
    assert {a.path for a in client.list_artifacts(stages["evaluate"].info.run_id)} == {"summary.json"}
    assert "index.html" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert "metrics.jsonl" in {a.path for a in client.list_artifacts(stages["train-ppo"].info.run_id)}


def test_character_run_skips_complete_stages_then_trains_the_same_pairs_by_sft_and_dpo(submitted_run, repo):
    """A rerun finds nothing to do; the same run with policy.sft and policy.method dpo reuses synthesize, respond
    and rank, fine-tunes sft/ on rank's best candidates, trains dpo/ from the pairs starting there (LoRA, the
    reference log-probs from the adapter-disabled policy per batch: the SFT model) and redoes evaluate and report,
    which now compare the base with dpo/ by the DPO implicit reward, and with sft/."""
    import pyarrow.fs as pafs

    from character.core.store import StageOutput
    from character.training.scoring import ImplicitReward

    run_uri, _ = submitted_run
    fs, root = pafs.FileSystem.from_uri(run_uri)

    def committed(stage):
        return fs.get_file_info(f"{root}/{stage}/_SUCCESS").mtime

    cmd = [sys.executable, "-m", "character.pipeline.cli", "run", "--config", str(repo / "configs/tiny.yaml"),
           f"run.output_dir={run_uri}", *SMALL]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    again = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "nothing to do: every stage is complete" in again.stdout
    assert "Started a local Ray instance" not in again.stdout + again.stderr  # no work, not even a Ray
    before = {s: committed(s) for s in ("messages", "responses", "preferences", "pm", "policy")}
    dpo = subprocess.run(cmd + SFT_DPO, cwd=repo, env=env, capture_output=True, text=True, timeout=1500)
    assert dpo.returncode == 0, dpo.stdout[-3000:] + dpo.stderr[-3000:]
    assert "stages run: train-sft, train-dpo, evaluate, report" in dpo.stdout
    assert {s: committed(s) for s in before} == before
    assert {"sft/_SUCCESS", "sft/metrics.json", "sft/adapter/adapter_model.safetensors", "dpo/_SUCCESS",
            "dpo/metrics.json", "dpo/adapter/adapter_model.safetensors", "eval/_SUCCESS",
            "report/_SUCCESS"} <= _bucket_files(run_uri)
    with fs.open_input_stream(f"{root}/eval/summary.json") as f:
        summary = json.loads(f.read())
    assert summary["trained_model"] == f"{run_uri}/dpo" and summary["score"] == "DPO implicit reward"
    assert summary["sft_model"] == f"{run_uri}/sft" and summary["sft"]["overall"]["held_out"]["n_samples"] > 0
    # the SFT model answers the capability questions too: what SFT alone cost, beside the final model's
    assert summary["capability"]["sft"]["n"] == summary["capability"]["base"]["n"]
    assert set(summary["capability"]["kept"]) == {"sft", "trained"}
    with fs.open_input_stream(f"{root}/dpo/metrics.json") as f:
        metrics = json.loads(f.read())
    assert metrics["reference"] == "online" and metrics["train_pairs"] > 0 and metrics["eval_pairs"] > 0
    assert metrics["reference_model"] == f"{run_uri}/sft"
    with fs.open_input_stream(f"{root}/sft/metrics.json") as f:
        sft = json.loads(f.read())
    # (that it learns: tests/test_train_sft.py; here 17 targets sampled from the random model itself, 5 steps)
    assert sft["source"] == "best" and sft["train_examples"] > 0 and sft["steps"] > 0 and sft["eval_examples"] > 0
    # The reference is the SFT model, not the base: evaluate's scores are beta * (log dpo - log sft), to the digit.
    rows = [r for r in StageOutput(run_uri, "eval").read().to_pylist() if r["model"] == "trained"][:4]
    score = lambda reference: ImplicitReward(f"{run_uri}/dpo", reference, 0.1, 256, 4)(  # noqa: E731
        [r["prompt"] for r in rows], [r["response"] for r in rows]).tolist()
    assert score(f"{run_uri}/sft") == pytest.approx([r["reward"] for r in rows], abs=1e-4)
    assert score("tiny-llama") != pytest.approx([r["reward"] for r in rows], abs=1e-3)
    with fs.open_input_stream(f"{root}/report/index.html") as f:
        page = _Page()
        page.feed(f.read().decode())
    assert {"fig-dpo-calibration", "fig-score-shift", "fig-win-rate"} <= set(page.images)
    assert "sft" in page.sections and page.cells["SFT vs base.held_out.pm_delta.mean"] != "-"
    # Tracking: the same run directory's MLflow run, now with a train-dpo stage and a second evaluation.
    local = Path(tempfile.mkdtemp()) / "mlflow.db"
    with fs.open_input_stream(f"{root}/mlflow/mlflow.db") as f:
        local.write_bytes(f.read())
    client, parent, runs = _tracked_runs(local)
    assert sorted(r.data.tags["character.stage"] for r in runs) == sorted(
        ["synthesize", "respond", "rank", "train-pm", "train-ppo", "evaluate", "report", "train-sft", "train-dpo",
         "evaluate", "report"])
    dpo_run = next(r for r in runs if r.data.tags["character.stage"] == "train-dpo")
    assert [m.step for m in client.get_metric_history(dpo_run.info.run_id, "train_loss")] == list(
        range(1, metrics["steps"] + 1))
    assert re.search(r"^train-dpo\s+\d+\s+\d+\s+[\d.]+\s+done$", dpo.stdout, re.M), dpo.stdout[-2000:]
    assert re.search(r"^synthesize\s+-\s+-\s+-\s+skipped \(complete\)$", dpo.stdout, re.M)
    assert "tracking: mlflow ui --backend-store-uri" in dpo.stdout


def test_compare_puts_the_ppo_run_and_the_dpo_run_side_by_side(submitted_run, tmp_path, capsys):
    """`character compare` over the PPO run (its download, taken before the switch) and the run on S3 (SFT then DPO)."""
    from character.pipeline.cli import main

    run_uri, run_dir = submitted_run
    page_file = tmp_path / "compare.html"
    assert main(["compare", str(run_dir), run_uri, "--output", str(page_file)]) == 0
    head, ppo_row, dpo_row = (re.split(r"\s{2,}", line.strip()) for line in capsys.readouterr().out.splitlines()[:3])
    assert head[:5] == ["run", "model", "constitution", "recipe", "held-out pair acc."]
    assert ppo_row[:4] == [str(run_dir), "tiny-llama", "tiny.yaml (3 traits)", "ppo"]
    assert dpo_row[:4] == [run_uri, "tiny-llama", "tiny.yaml (3 traits)", "sft+dpo"]
    assert len(head) == len(ppo_row) == len(dpo_row)
    page = _Page()
    page.feed(page_file.read_text())
    assert {"fig-compare-ppo", "fig-compare-win-rate"} <= set(page.images)
    pm = json.loads((run_dir / "pm" / "metrics.json").read_text())
    ppo = [json.loads(x) for x in (run_dir / "policy" / "metrics.jsonl").read_text().splitlines()]
    assert page.cells["0.pair_accuracy"] == f"{pm['eval_accuracy']:.4f}"
    assert page.cells["0.ppo_kl"] == f"{[x for x in ppo if 'kl' in x][-1]['kl']:.4f}"
    assert page.cells["1.recipe"] == "sft+dpo" and page.cells["1.ppo_kl"] == "-"
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    trait = next(iter(summary["groups"].values()))["trait"]
    assert page.cells[f"0.win:{trait}"] == f"{summary['groups'][trait + '/held_out']['win_rate']['mean']:.4f}"


def test_the_evaluation_is_held_out_from_every_training_input(submitted_run, make_config):
    """eval/ holds held-out and adversarial messages only; none of them, nor a near-copy of one, is in any
    training stage's input (responses, comparisons, pairs the PM saw, PPO's prompts and validation)."""
    from character.data.dedupe import near_duplicates_of
    from character.data.splits import ppo_messages
    from character.core.store import StageOutput

    _, run_dir = submitted_run
    config = make_config(run_dir, *SMALL)
    messages = StageOutput(str(run_dir), "messages").read().to_pylist()
    split = {m["message_id"]: m["split"] for m in messages}
    text = {m["message_id"]: m["text"] for m in messages}
    evaluated = set(StageOutput(str(run_dir), "eval").read(columns=["message_id"]).column("message_id").to_pylist())
    assert {split[m] for m in evaluated} == {"held_out", "adversarial"}

    def ids(stage, *sub):
        return set(StageOutput(str(run_dir), stage).read(*sub, columns=["message_id"]).column("message_id").to_pylist())

    pairs = StageOutput(str(run_dir), "preferences").read().num_rows
    pm = json.loads((run_dir / "pm" / "metrics.json").read_text())
    assert pm["train_pairs"] + pm["eval_pairs_total"] == pairs  # the PM saw exactly rank's pairs
    ppo_train, ppo_validation = ppo_messages(config)
    trained_on = (ids("responses") | ids("preferences") | ids("preferences", "comparisons")
                  | {r["message_id"] for r in ppo_train + ppo_validation})
    assert ids("preferences") and ppo_train and ppo_validation
    assert {split[m] for m in trained_on} == {"train"}
    assert not trained_on & evaluated
    evaluated = sorted(evaluated)
    assert near_duplicates_of([text[m] for m in sorted(trained_on)], [text[m] for m in evaluated],
                              near_threshold=config.synthesize.near_duplicate_threshold) == [None] * len(evaluated)
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    assert sum(g["n_messages"] for g in summary["overall"].values()) == len(evaluated)
    assert "clustered by message" in summary["interval"]


def test_review_reads_the_run_on_object_storage_and_a_dropped_trait_reaches_character_run(submitted_run, repo,
                                                                                         capsys):
    """`character review` over the S3 run: the PM's score of every pair (pm/pair_scores.parquet, written by
    train-pm), the trait's numbers, a verdict written back to the bucket, which `character run` then reads."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq
    from starlette.testclient import TestClient

    from character.pipeline.cli import main
    from character.review.app import create_app
    from character.core.store import StageOutput

    run_uri, run_dir = submitted_run
    scores = pq.read_table(run_dir / "pm" / "pair_scores.parquet").to_pylist()
    pairs = StageOutput(str(run_dir), "preferences").read(columns=["pair_id"]).column("pair_id").to_pylist()
    assert sorted(s["pair_id"] for s in scores) == sorted(pairs)
    pm = json.loads((run_dir / "pm" / "metrics.json").read_text())
    validation = [s for s in scores if s["role"] == "validation"]
    assert len(validation) == pm["eval_pairs"]
    accuracy = sum(s["chosen_reward"] > s["rejected_reward"] for s in validation) / len(validation)
    assert accuracy == pytest.approx(pm["eval_accuracy"], abs=1.01 / len(validation))  # the same final PM

    app = create_app(run_uri, "pipeline-test", token="t")
    client = TestClient(app, client=("127.0.0.1", 50000), follow_redirects=False, base_url="http://127.0.0.1")
    assert client.get("/").text.count('class="trait-row"') == 3
    fs, root = pafs.FileSystem.from_uri(run_uri)
    with fs.open_input_stream(f"{root}/eval/summary.json") as f:
        summary = json.loads(f.read())
    trait = scores[0]["trait"]
    held = summary["groups"][f"{trait}/held_out"]["win_rate"]
    assert f"{held['mean']:.3f}" in client.get(f"/trait/{trait}").text
    shown = client.get(f"/message/{scores[0]['message_id']}").text
    assert f"{scores[0]['chosen_reward']:.3f} / {scores[0]['rejected_reward']:.3f}" in shown
    answer = client.post("/verdict", data={"trait": "ai_nature", "verdict": "drop", "note": "no signal", "token": "t",
                                           "next": "/trait/ai_nature"})
    assert answer.status_code == 303
    assert [i.base_name for i in fs.get_file_info(pafs.FileSelector(f"{root}/review"))] == ["verdicts.yaml"]
    capsys.readouterr()
    assert main(["run", "--config", str(repo / "configs/tiny.yaml"), f"run.output_dir={run_uri}", *SMALL,
                 *SFT_DPO, "tracking.backend=none"]) == 0
    out = capsys.readouterr().out
    assert f"[run] review: skipping trait(s) ai_nature (marked drop in {run_uri}/review/verdicts.yaml)" in out
    assert "nothing to do: every stage is complete" in out
