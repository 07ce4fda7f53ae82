"""`character review`: the reviewer's marks (verdicts.yaml, flags.parquet), what the stages do with them, the
pages over a run, the token guard, and the page driven in a real browser (Debian's Chromium via Selenium)."""
from __future__ import annotations

import math
import os
import socket
import threading
import time
from collections import Counter

import pyarrow.parquet as pq
import pytest
import yaml

from character.review import marks as review
from character.core import schemas
from character.core.config import ConfigError, RankConfig, RuleConfig
from character.judging.judge import RuleJudge
from character.review.data import order_inconsistent, page_of
from character.stages.rank import rank_rows
from synthetic_run import synthetic_run


def _client(app, host="127.0.0.1"):
    from starlette.testclient import TestClient

    return TestClient(app, client=(host, 50000), follow_redirects=False, base_url="http://127.0.0.1:8765")


def test_marks_are_written_whole_and_keep_their_history(tmp_path):
    run = str(tmp_path)
    assert review.load_marks(run).verdicts == {} and review.load_marks(run).flags == []
    review.save_verdict(run, "honesty", "rework", "answers hedge", "ana")
    review.save_verdict(run, "curiosity", "drop", "no signal", "ben")
    first = review.add_flag(run, "pair", "p1", "m1", "honesty", "mislabeled", "chosen is evasive", "ana")
    review.add_flag(run, "message", "m2", "m2", "honesty", "off_trait", "about cooking", "ana")
    again = review.add_flag(run, "pair", "p1", "m1", "honesty", "mislabeled", "both are evasive", "ben")
    marks = review.load_marks(run)
    assert marks.dropped == {"curiosity"}
    assert marks.verdicts["honesty"]["verdict"] == "rework" and marks.verdicts["honesty"]["reviewer"] == "ana"
    # Flagging p1 again replaced its flag; the first one stays in the file, cleared by the second reviewer.
    assert marks.active_flags("pair") == {"p1": again} and set(marks.active_flags("message")) == {"m2"}
    old = next(f for f in marks.flags if f["flag_id"] == first["flag_id"])
    assert old["cleared_by"] == "ben" and old["note"] == "chosen is evasive"
    assert review.clear_flag(run, "message", "m2", "ana") == 1 and review.clear_flag(run, "message", "m2", "ana") == 0
    marks = review.load_marks(run)
    assert set(marks.active_flags()) == {"p1"} and len(marks.flags) == 3
    table = pq.read_table(tmp_path / "review" / "flags.parquet")
    assert table.schema.equals(schemas.REVIEW_FLAGS)
    assert yaml.safe_load((tmp_path / "review" / "verdicts.yaml").read_text())["traits"]["curiosity"]["note"] == "no signal"
    assert sorted(os.listdir(tmp_path / "review")) == ["flags.parquet", "verdicts.yaml"]  # no temp files left
    assert marks.set_aside_reason("curiosity", "m9") == review.REVIEW_DROP
    assert marks.set_aside_reason("honesty", "m1", "p1") == review.REVIEW_FLAG
    assert marks.set_aside_reason("honesty", "m2") is None  # cleared
    assert "both are evasive" in marks.detail("honesty", "m1", "p1")


def test_a_bad_verdicts_file_is_an_error_naming_the_file_and_the_trait(tmp_path, make_config, capsys):
    from character.pipeline import cli

    (tmp_path / "review").mkdir()
    (tmp_path / "review" / "verdicts.yaml").write_text("traits:\n  honesty: {verdict: maybe}\n")
    with pytest.raises(ConfigError, match=r"verdicts.yaml: trait 'honesty': verdict 'maybe' is not one of"):
        review.load_marks(str(tmp_path))
    config = make_config(tmp_path)
    assert cli.main(["run", "--config", config.source, f"run.output_dir={tmp_path}", "tracking.backend=none"]) == 2
    assert "verdicts.yaml: trait 'honesty'" in capsys.readouterr().err


def test_a_mark_naming_a_trait_the_run_lacks_is_a_config_error_naming_the_closest(tmp_path, make_config, capsys):
    """A verdict for `honsty` (the tiny constitution has `honesty`) was once accepted and ignored: the reviewer
    believed a trait dropped that was not. Now `character run` and any stage stop before Ray, naming the file, the
    trait and the closest real one; so does a flag not cleared, while a cleared one is history and passes."""
    from character.pipeline import cli

    config = make_config(tmp_path)
    args = ["--config", config.source, f"run.output_dir={tmp_path}", "tracking.backend=none"]
    (tmp_path / "review").mkdir()
    (tmp_path / "review" / "verdicts.yaml").write_text("traits:\n  honsty: {verdict: drop}\n")
    for command in ("run", "respond"):
        assert cli.main([command, *args]) == 2
        err = capsys.readouterr().err
        assert "verdicts.yaml: trait 'honsty' is not a trait of the run (did you mean 'honesty'?" in err, err
    assert not (tmp_path / "messages").exists() and not (tmp_path / "responses").exists()  # nothing ran
    (tmp_path / "review" / "verdicts.yaml").unlink()
    review.add_flag(str(tmp_path), "message", "m1", "m1", "ai-nature", "off_trait", "", "ana")
    assert cli.main(["rank", *args]) == 2
    assert "flags.parquet: trait 'ai-nature' is not a trait of the run (did you mean 'ai_nature'?" in \
        capsys.readouterr().err
    review.clear_flag(str(tmp_path), "message", "m1", "ana")
    marks = review.load_marks(str(tmp_path))
    review.check_marks_traits(marks, ["honesty", "ai_nature"], str(tmp_path))  # a cleared flag is history


HONESTY = {"honesty": "I tell the truth.\n(Even when it is not welcome.)", "curiosity": "I ask.\n(Questions.)"}


def _rows():
    return [
        {"message_id": "m1", "trait": "honesty", "prompt": "Is my plan good?",
         "candidates": ["truth truth truth", "truth maybe", "truth is hard here", "no"]},
        {"message_id": "m2", "trait": "honesty", "prompt": "Be honest?", "candidates": ["truth", "no", "truth truth"]},
        {"message_id": "m3", "trait": "curiosity", "prompt": "Why?", "candidates": ["truth", "no"]},
    ]


def test_rank_sets_aside_flagged_pairs_flagged_messages_and_dropped_traits(tmp_path):
    judge = RuleJudge(RuleConfig(type="keywords", words=["truth"], temperature=0.5))
    rank = RankConfig(tie_margin=0.01)
    before = rank_rows(_rows(), judge, rank, HONESTY, "j")
    flagged = next(p for p in before["pairs"] if p["message_id"] == "m1")
    run = str(tmp_path)
    review.add_flag(run, "pair", flagged["pair_id"], "m1", "honesty", "mislabeled", "both bad", "ana")
    review.add_flag(run, "message", "m2", "m2", "honesty", "off_trait", "not about honesty", "ana")
    review.save_verdict(run, "curiosity", "drop", "", "ana")
    after = rank_rows(_rows(), judge, rank, HONESTY, "j", marks=review.load_marks(run))
    by_id = {r["row_id"]: r for r in after["rejected"]}
    assert by_id[flagged["pair_id"]]["reason"] == review.REVIEW_FLAG and "both bad" in by_id[flagged["pair_id"]]["detail"]
    assert by_id["m2"]["reason"] == review.REVIEW_FLAG and by_id["m3"]["reason"] == review.REVIEW_DROP
    kept = [p for p in before["pairs"] if p["message_id"] == "m1" and p["pair_id"] != flagged["pair_id"]]
    assert after["pairs"] == kept  # every other pair of m1 as before; none of m2 or m3
    assert {c["message_id"] for c in after["comparisons"]} == {"m1"}  # flagged messages are not even judged


def test_pair_training_leaves_flagged_pairs_out_with_a_reason(tmp_path):
    import pyarrow as pa

    from character.training.pairs import load_pairs
    from character.core.store import StageOutput

    info = synthetic_run(str(tmp_path), traits=2, messages_per_trait=8)
    pairs = [p for t in info["traits"] for p in info["pairs"][t]]
    StageOutput(str(tmp_path), "preferences").write_part(pa.Table.from_pylist(
        [{**pairs[0], "pair_id": "bad", "p_chosen": float("nan")}], schema=schemas.PREFERENCES))
    train, held, bad = load_pairs(str(tmp_path), 0.2)
    assert len(train) + len(held) == len(pairs) and [r["reason"] for r in bad] == ["bad_p_chosen"]
    t0, t1 = info["traits"]
    review.add_flag(str(tmp_path), "pair", info["pairs"][t0][0]["pair_id"], info["pairs"][t0][0]["message_id"], t0,
                    "mislabeled", "", "ana")
    off = info["pairs"][t0][-1]["message_id"]
    review.add_flag(str(tmp_path), "message", off, off, t0, "off_trait", "", "ana")
    review.save_verdict(str(tmp_path), t1, "drop", "", "ana")
    train, held, bad = load_pairs(str(tmp_path), 0.2)
    from_off = sum(p["message_id"] == off for p in info["pairs"][t0])
    assert Counter(r["reason"] for r in bad) == {"bad_p_chosen": 1, review.REVIEW_FLAG: 1 + from_off,
                                                 review.REVIEW_DROP: len(info["pairs"][t1])}
    assert len(train) + len(held) == len(info["pairs"][t0]) - 1 - from_off
    assert {r["trait"] for r in train + held} == {t0}


def test_a_dropped_trait_is_left_out_of_later_stages(tmp_path, make_config, capsys):
    from character.data.splits import read_messages

    synthetic_run(str(tmp_path), traits=1, messages_per_trait=4)  # messages of trait_0000 (not in tiny.yaml)
    config = make_config(tmp_path)
    assert [t.name for t in review.active_constitution(config, "respond").traits] == ["curiosity", "honesty", "ai_nature"]
    review.save_verdict(str(tmp_path), "honesty", "drop", "", "ana")
    review.save_verdict(str(tmp_path), "trait_0000", "drop", "", "ana")
    assert [t.name for t in review.active_constitution(config, "respond").traits] == ["curiosity", "ai_nature"]
    assert "[respond] review: skipping trait(s) honesty, trait_0000 (marked drop in" in capsys.readouterr().out
    assert read_messages(str(tmp_path), ("train", "held_out")) == []  # PPO and evaluate read through this
    review.save_verdict(str(tmp_path), "trait_0000", "keep", "", "ana")
    held = read_messages(str(tmp_path), ("held_out",))
    review.add_flag(str(tmp_path), "message", held[0]["message_id"], held[0]["message_id"], "trait_0000", "off_trait",
                    "", "ana")
    assert read_messages(str(tmp_path), ("held_out",)) == held[1:]  # a message flagged off-trait is left out too
    for name in ("curiosity", "ai_nature"):
        review.save_verdict(str(tmp_path), name, "drop", "", "ana")
    with pytest.raises(ValueError, match="every trait is marked drop"):
        review.active_constitution(config, "respond")


def test_pages_show_one_trait_across_the_pipeline(tmp_path):
    from character.review.app import create_app

    info = synthetic_run(str(tmp_path), traits=60, messages_per_trait=8)
    # A run trained with policy.sft: evaluate's rows have the SFT model's answers too (model "sft").
    import pyarrow as pa

    from character.core.store import StageOutput

    evaluation = StageOutput(str(tmp_path), "eval")
    sft_rows = [{**r, "model": "sft"} for r in evaluation.read(schema=schemas.EVAL).to_pylist()
                if r["model"] == "trained"]
    evaluation.write_part(pa.Table.from_pylist(sft_rows, schema=schemas.EVAL), key="sft")
    app = create_app(str(tmp_path), "ana", token="t0k")
    client = _client(app)
    index = client.get("/").text
    assert "60 of 60 shown" in index and "page 1 of 2" in index and index.count('class="trait-row"') == 50
    assert client.get("/?page=2").text.count('class="trait-row"') == 10
    assert client.get("/?q=trait_0042").text.count('class="trait-row"') == 1
    name = info["traits"][7]
    page = client.get(f"/trait/{name}").text
    held = info["groups"][f"{name}/held_out"]["win_rate"]
    assert f"{held['mean']:.3f} [{held['lo']:.3f}, {held['hi']:.3f}]" in page  # the trait's numbers, with intervals
    assert f'href="/trait/{info["traits"][8]}"' in page and f'href="/trait/{info["traits"][6]}"' in page
    pairs = client.get(f"/trait/{name}?tab=pairs").text
    assert pairs.count('class="pair-row"') == len(info["pairs"][name])
    view = app.state.view
    inconsistent = [p for p in info["pairs"][name] if order_inconsistent(p["p_ab"], p["p_ba"])]
    assert len(view.pairs_of(name, disagree=True)) == len(inconsistent)
    answers = view.answers_of(name, split="", sort="pm_change")
    changes = [abs(a["pm_change"]) for a in answers]
    assert changes == sorted(changes, reverse=True) and len(answers) == 4  # 2 held-out + 2 adversarial messages
    assert client.get(f"/trait/{name}?tab=answers&split=").status_code == 200
    dropped = client.get(f"/trait/{name}?status=dropped").text
    assert "too_short" in dropped
    mid = info["pairs"][name][0]["message_id"]
    message = client.get(f"/message/{mid}").text
    assert message.count('class="comparison-row"') == 6 and message.count('class="pair-row"') == 3
    assert client.get("/trait/nope").status_code == 404


def test_order_inconsistency_and_paging_by_hand():
    assert order_inconsistent(0.7, 0.6) and order_inconsistent(0.2, 0.4)  # same position preferred both times
    assert not order_inconsistent(0.7, 0.3) and not order_inconsistent(0.5, 0.9) and not order_inconsistent(0.7, math.nan)
    assert page_of(list(range(45)), 3, 20) == ([40, 41, 42, 43, 44], 3, 3)
    assert page_of(list(range(45)), 9, 20)[1:] == (3, 3) and page_of([], 1, 20) == ([], 1, 1)


def test_a_non_loopback_client_needs_the_token_and_every_form_carries_it(tmp_path):
    from character.review.app import create_app

    info = synthetic_run(str(tmp_path), traits=2, messages_per_trait=4)
    app = create_app(str(tmp_path), "ana", token="s3cret")
    remote = _client(app, "192.0.2.77")
    assert remote.get("/").status_code == 403 and remote.get("/?token=wrong").status_code == 403
    assert remote.get(f"/trait/{info['traits'][0]}").status_code == 403
    assert remote.get("/?token=s3cret").status_code == 200
    assert remote.get(f"/trait/{info['traits'][0]}").status_code == 200  # the cookie set by the first visit
    local = _client(app)
    assert local.get("/").status_code == 200  # loopback: no token for reading
    # ... when it names a loopback host: not a page from another name resolved to 127.0.0.1 (DNS rebinding)
    assert local.get("/", headers={"host": "rebind.example:8765"}).status_code == 403
    assert local.get("/", headers={"host": "localhost:8765"}).status_code == 200
    assert local.get("/", headers={"host": "[::1]:8765"}).status_code == 200
    assert local.get("/?token=s3cret", headers={"host": "review.example"}).status_code == 200
    form = {"trait": info["traits"][0], "verdict": "keep", "note": "", "next": "/"}
    assert local.post("/verdict", data=form).status_code == 403  # a form without the token is refused
    assert not (tmp_path / "review").exists()
    answer = local.post("/verdict", data={**form, "token": "s3cret", "next": "//evil.example/"})
    assert answer.status_code == 303 and answer.headers["location"] == "/"  # no redirect off the server
    assert review.load_marks(str(tmp_path)).verdicts[info["traits"][0]]["verdict"] == "keep"


def _non_loopback_address() -> str | None:
    """An address of this machine other than loopback (None if it has none)."""
    import psutil

    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                return a.address
    return None


def test_the_real_server_refuses_a_non_loopback_client_without_the_token(tmp_path):
    """Over real sockets: the server bound to all interfaces, reached once through loopback and once through
    this machine's other address (the client is then not loopback)."""
    import urllib.error
    import urllib.request

    import uvicorn

    from character.review.app import create_app

    address = _non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    synthetic_run(str(tmp_path), traits=2, messages_per_trait=4)
    app = create_app(str(tmp_path), "ana", token="s3cret")
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="0.0.0.0", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(100):
            if server.started:
                break
            time.sleep(0.05)
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/").status == 200
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://{address}:{port}/")
        assert refused.value.code == 403
        assert urllib.request.urlopen(f"http://{address}:{port}/?token=s3cret").status == 200
    finally:
        server.should_exit = True
        thread.join(timeout=10)


# ---- the page in a real browser ----

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _browser():
    """Headless Debian Chromium through its ChromeDriver (never a browser a tool downloads). Missing: skipped,
    unless CHARACTER_REQUIRE_BROWSER is set (CI sets it: scripts/setup.sh installs both)."""
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        if os.environ.get("CHARACTER_REQUIRE_BROWSER"):
            pytest.fail(f"{CHROMIUM} / {CHROMEDRIVER} missing: scripts/setup.sh installs Debian's chromium and "
                        f"chromium-driver")
        pytest.skip("Debian's chromium / chromium-driver are not installed (scripts/setup.sh installs them as root)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # The machine's network is closed: without the background-networking flags Chromium keeps trying Google.
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1000"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def _load(driver, element) -> None:
    """Click a link or a submit button and wait for the next page (a click does not wait for navigation).

    Why a mark on the old page's window rather than selenium's `staleness_of` on its <html>: while the page
    navigates, ChromeDriver sometimes answers the stale element's probe with "unknown error: unhandled
    inspector error: Node with given id does not belong to the document" instead of a stale-element error,
    and `staleness_of` fails on it (seen once in CI). A new document starts with a new window object, so the
    mark is gone exactly when the next page is there; errors of the half-navigated page are polled past."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.support.ui import WebDriverWait

    driver.execute_script("window.__characterPreviousPage = true")
    element.click()
    WebDriverWait(driver, 20, ignored_exceptions=(WebDriverException,)).until(lambda d: d.execute_script(
        "return window.__characterPreviousPage === undefined && document.readyState === 'complete'"))


def _flag(driver, row, row_class: str, id_attribute: str, note: str) -> str:
    """Type the note into a row's flag form, submit it, and return the flag the reloaded row shows."""
    from selenium.webdriver.common.by import By

    target = row.get_attribute(id_attribute)
    row.find_element(By.NAME, "note").send_keys(note)
    _load(driver, row.find_element(By.CSS_SELECTOR, "button.flag-button"))
    row = driver.find_element(By.CSS_SELECTOR, f'tr.{row_class}[{id_attribute}="{target}"]')
    return row.find_element(By.CSS_SELECTOR, ".badge.flagged").text.split(" · ")[0]


def _serve(run_dir, reviewer: str):
    """`character review` as a user starts it, on a free port; returns (process, base URL)."""
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "character.pipeline.cli", "review", "--run", str(run_dir), "--port",
                             str(port), "--reviewer", reviewer], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("review: open"):
            break
    assert proc.poll() is None, "".join(lines)
    assert "review: open http://127.0.0.1:" in "".join(lines) and "token" not in lines[-1]  # loopback: no token
    for _ in range(100):  # the URL is printed just before uvicorn binds
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    return proc, f"http://127.0.0.1:{port}"


@pytest.mark.slow
def test_a_reviewer_flags_a_pair_and_a_message_in_the_browser_and_rank_sets_them_aside(tmp_path, preferences,
                                                                                      make_config):
    import shutil

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from character.stages import rank
    from character.core.store import StageOutput
    from conftest import RULE_PAIRS

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in ("messages", "responses", "preferences", "config.yaml", "constitution.yaml"):
        copy = shutil.copytree if (preferences.parent / name).is_dir() else shutil.copy
        copy(preferences.parent / name, run_dir / name)
    shots = os.environ.get("CHARACTER_SCREENSHOTS") or str(tmp_path / "screenshots")
    os.makedirs(shots, exist_ok=True)
    before = StageOutput(str(run_dir), "preferences").read(schema=schemas.PREFERENCES).to_pylist()
    proc, base = _serve(run_dir, "selenium-test")
    driver = _browser()
    try:
        driver.get(base + "/")
        driver.save_screenshot(f"{shots}/01-traits.png")
        assert len(driver.find_elements(By.CSS_SELECTOR, "tr.trait-row")) == 3
        _load(driver, driver.find_element(By.LINK_TEXT, "curiosity"))
        assert driver.find_element(By.ID, "trait-name").text.startswith("curiosity")
        _load(driver, driver.find_element(By.ID, "next-trait"))  # switch trait
        assert driver.find_element(By.ID, "trait-name").text.startswith("honesty")
        assert "I say what I really think" in driver.find_element(By.ID, "statement").text
        # An off-trait message, among the training messages (those have pairs).
        Select(driver.find_element(By.NAME, "split")).select_by_value("train")
        _load(driver, driver.find_element(By.ID, "apply-filters"))
        row = driver.find_elements(By.CSS_SELECTOR, "tr.message-row")[0]
        off_message = row.get_attribute("data-message-id")
        assert _flag(driver, row, "message-row", "data-message-id", "about the weather, not honesty") == "off_trait"
        driver.save_screenshot(f"{shots}/02-messages-flagged.png")
        # A mislabeled pair, of another message.
        _load(driver, driver.find_element(By.ID, "tab-pairs"))
        row = next(r for r in driver.find_elements(By.CSS_SELECTOR, "tr.pair-row")
                   if r.get_attribute("data-message-id") != off_message)
        bad_pair = row.get_attribute("data-pair-id")
        assert _flag(driver, row, "pair-row", "data-pair-id", "the rejected answer is the honest one") == "mislabeled"
        driver.save_screenshot(f"{shots}/03-pairs-flagged.png")
        driver.find_element(By.ID, "verdict-rework").click()
        driver.find_element(By.ID, "verdict-note").send_keys("pairs prefer the shorter answer, not the honest one")
        _load(driver, driver.find_element(By.ID, "verdict-save"))
        assert "rework" in driver.find_element(By.ID, "trait-name").text
        _load(driver, driver.find_element(By.ID, "next-trait"))
        assert driver.find_element(By.ID, "trait-name").text.startswith("ai_nature")
        driver.find_element(By.ID, "verdict-drop").click()
        _load(driver, driver.find_element(By.ID, "verdict-save"))
        driver.get(base + "/")
        driver.save_screenshot(f"{shots}/04-traits-with-verdicts.png")
        badges = [r.find_element(By.CSS_SELECTOR, ".badge").text for r in driver.find_elements(By.CSS_SELECTOR, "tr.trait-row")]
        assert badges == ["unreviewed", "rework", "drop"]
    finally:
        driver.quit()
        proc.terminate()
        proc.wait(timeout=10)

    verdicts = yaml.safe_load((run_dir / "review" / "verdicts.yaml").read_text())["traits"]
    assert {t: v["verdict"] for t, v in verdicts.items()} == {"honesty": "rework", "ai_nature": "drop"}
    assert verdicts["honesty"]["reviewer"] == "selenium-test" and "shorter answer" in verdicts["honesty"]["note"]
    flags = pq.read_table(run_dir / "review" / "flags.parquet").to_pylist()
    assert {(f["kind"], f["target_id"], f["flag"]) for f in flags} == {("message", off_message, "off_trait"),
                                                                     ("pair", bad_pair, "mislabeled")}
    assert all(f["reviewer"] == "selenium-test" and f["note"] and f["created_at"] for f in flags)

    # The rerun of rank sets the flagged pair, the flagged message and the dropped trait aside, and keeps the rest.
    result = rank.run(make_config(run_dir, *RULE_PAIRS), force=True)
    out = StageOutput(str(run_dir), "preferences")
    after = out.read(schema=schemas.PREFERENCES).to_pylist()
    set_aside = {r["row_id"]: r for r in out.read("rejected", schema=schemas.REJECTED).to_pylist()}
    assert set_aside[bad_pair]["reason"] == review.REVIEW_FLAG and "honest one" in set_aside[bad_pair]["detail"]
    assert set_aside[off_message]["reason"] == review.REVIEW_FLAG
    ai_messages = {r["message_id"] for r in before if r["trait"] == "ai_nature"}
    assert ai_messages and all(set_aside[m]["reason"] == review.REVIEW_DROP for m in ai_messages)
    expected = [p for p in before if p["trait"] != "ai_nature" and p["message_id"] != off_message
                and p["pair_id"] != bad_pair]
    assert sorted(p["pair_id"] for p in after) == sorted(p["pair_id"] for p in expected)
    assert result.drops[review.REVIEW_FLAG] == 2 and result.drops[review.REVIEW_DROP] == len(
        {r["message_id"] for r in StageOutput(str(run_dir), "responses").read(schema=schemas.RESPONSES).to_pylist()
         if r["trait"] == "ai_nature"})


def test_run_from_a_stage_redoes_it_and_every_later_one(tmp_path, make_config, monkeypatch, capsys):
    """`character run --from rank` (after a review): the stages before rank are skipped as complete, rank and
    every later stage are forced; the run announces the traits marked drop."""
    import dataclasses
    import sys
    import types

    from character.pipeline import cli
    from character.execution.runtime import StageResult

    calls = []
    for name in cli.STAGES:
        module = types.ModuleType(f"fake_{name}")
        module.run = lambda config, force, name=name: calls.append((name, force)) or StageResult(
            name, "x", skipped=not force)
        monkeypatch.setitem(sys.modules, f"fake_{name}", module)
        monkeypatch.setitem(cli.STAGES, name, dataclasses.replace(cli.STAGES[name], module=f"fake_{name}"))
    review.save_verdict(str(tmp_path), "honesty", "drop", "", "ana")
    config = make_config(tmp_path)
    args = ["run", "--config", config.source, f"run.output_dir={tmp_path}", "tracking.backend=none"]
    assert cli.main(args + ["--from", "rank"]) == 0
    assert calls == [("synthesize", False), ("respond", False), ("rank", True), ("train-pm", True),
                     ("train-ppo", True), ("evaluate", True), ("report", True)]
    assert f"[run] review: skipping trait(s) honesty (marked drop in {tmp_path}/review/verdicts.yaml)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(args + ["--from", "nope"])
    assert cli.main(args + ["policy.method=dpo", "--from", "train-pm"]) == 2  # not a stage of a DPO run


def test_a_training_checkpoint_does_not_resume_on_pairs_a_review_changed(tmp_path, make_config):
    """A stopped train-pm / train-dpo resumes only on the pairs it started with: flags added meanwhile need --force."""
    import json

    from character.training.checkpoints import SETTINGS_FILE, check_resume_settings

    config = make_config(tmp_path)
    set_aside = review.review_fingerprint([{"pair_id": "p1", "reason": review.REVIEW_FLAG},
                                           {"pair_id": "p0", "reason": "bad_p_chosen"}])
    assert set_aside.startswith("1:") and review.review_fingerprint([]) == "none"
    check_resume_settings(config, "pm", {"review_set_aside": "none"})  # no checkpoint yet: recorded
    (tmp_path / "_train" / "pm" / "checkpoint_000001").mkdir(parents=True)
    check_resume_settings(config, "pm", {"review_set_aside": "none"})
    with pytest.raises(ConfigError, match=rf"review_set_aside: 'none' in the checkpoint, '{set_aside}' in the config"):
        check_resume_settings(config, "pm", {"review_set_aside": set_aside})
    settings = tmp_path / "_train" / "pm" / SETTINGS_FILE
    settings.write_text(json.dumps({k: v for k, v in json.loads(settings.read_text()).items() if k != "review_set_aside"}))
    check_resume_settings(config, "pm", {"review_set_aside": "none"})  # a checkpoint from before reviews resumes
