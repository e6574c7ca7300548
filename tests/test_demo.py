"""`jfail demo` and the method commands: data choice, one run directory, a report a browser
opens."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from browser import chromium  # noqa: E402

from jfail import attribution, demo  # noqa: E402
from jfail.config import load_config  # noqa: E402
from jfail.data import datasets  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _tiny(configs: dict) -> dict:
    """The demo's configs cut further, so the whole run takes about a minute on two cores."""
    one_epoch = lambda c, **kw: dataclasses.replace(  # noqa: E731
        c, train=dataclasses.replace(c.train, epochs=1, **kw))
    out = dict(configs)
    for stage in ("classifier", "annotator", "ood_classifier", "robust_l2"):
        out[stage] = one_epoch(configs[stage])
    out["barlow"] = dataclasses.replace(configs["barlow"], depths=(1,), attack_steps=5,
                                        panel_images=2)
    out["defuse"] = dataclasses.replace(
        configs["defuse"], vae=dataclasses.replace(configs["defuse"].vae, epochs=1),
        identify_images=20, num_draws=50, max_components=5, samples_per_scenario=16,
        lambdas=(1.0,))
    out["debugtests"] = dataclasses.replace(
        configs["debugtests"], methods=("gradient", "guided_backprop"), num_inputs=4,
        randomization_inputs=2, spurious_epochs=2, tcav_layers=("dense0",),
        tcav_concept_images=10, tcav_random_sets=2, tcav_inputs=5, influence_train=100,
        influence_test=4, self_influence_train=200)
    out["prime"] = dataclasses.replace(configs["prime"], sweep_min_sizes=(10,),
                                       sweep_min_drops=(0.3,))
    return out


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("demo")
    report = demo.run_demo(run_dir, dataset="digits@28", progress=False, config_hook=_tiny)
    return run_dir, report


def test_data_choice_falls_back_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("JFAIL_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(datasets, "FASHION_MNIST_SYSTEM_DIRS", (str(tmp_path / "none"),))
    name, reason = demo.choose_dataset()
    assert name == "mnist5k"
    assert "fashion_mnist is not available" in reason
    assert demo.choose_dataset("digits@28") == ("digits@28", "digits@28 was asked for with --data")
    with pytest.raises(datasets.DatasetNotFoundError, match="no data set"):
        demo.choose_dataset("fashion_mnist")


def test_demo_writes_every_method_configs_and_one_report(demo_run):
    run_dir, report = demo_run
    assert report == run_dir / "report.html"
    summary = json.loads((run_dir / "demo.json").read_text())
    assert summary["dataset"] == "digits@28"
    assert set(summary["seconds"]) == {"barlow", "defuse", "debugtests", "prime"}
    for command, md in (("barlow", "barlow"), ("defuse", "defuse"),
                        ("debugtests", "debug_tests"), ("prime", "prime")):
        text = (run_dir / command / f"{md}.md").read_text()
        pipeline = dict((c, m) for c, _, m in demo.METHODS)[command]
        assert f"python -m {pipeline} --config {run_dir}/configs/{command}.py" in text
        config = load_config(run_dir / "configs" / f"{command}.py")
        assert config.dataset == "digits@28"
    recorded = json.loads((run_dir / "report.json").read_text())
    assert [title for title, _ in recorded["sections"]] == [
        "Overview", "Barlow", "Defuse", "Debugging tests for explanations", "PRIME"]
    html = report.read_text()
    for anchor in ("overview", "barlow", "defuse", "debugging-tests-for-explanations", "prime"):
        assert f'href="#{anchor}"' in html and f'id="{anchor}"' in html
    assert 'src="data:image/png;base64,' in html and "<img src=\"/" not in html
    overview = (run_dir / "demo.md").read_text()
    assert "Data: digits@28" in overview
    assert f"the full run has all {len(attribution.METHODS)}." in overview


def test_demo_report_opens_in_chromium_with_every_image(demo_run, tmp_path):
    _, report = demo_run
    with chromium() as browser:
        page = browser.new_page()
        errors = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(report.as_uri())
        count = page.evaluate("document.images.length")
        loaded = page.evaluate(
            "[...document.images].filter(i => i.complete && i.naturalWidth > 0).length")
        page.click('nav a[href="#prime"]')
        assert page.evaluate("location.hash") == "#prime"
        shot = tmp_path / "demo_report.png"
        page.screenshot(path=str(shot), full_page=True)
    # Barlow panels, Defuse grids and curves, attribution grids, PRIME figures.
    assert count >= 8 and loaded == count and errors == []
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_method_command_rebuild_and_bad_config(demo_run, tmp_path):
    run_dir, _ = demo_run
    command = [sys.executable, "-m", "jfail.cli"]
    prime_dir = tmp_path / "prime_run"
    done = subprocess.run(  # a relative run directory, like the default runs/<command>-<time>
        command + ["prime", "--config", str(run_dir / "configs" / "prime.py"),
                   "--workdir", "prime_run", "--quiet", "--set", "min_drop=0.2"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["report"] == str(prime_dir / "report.html")
    assert "min_drop=0.2" in (prime_dir / "prime.md").read_text()
    assert (prime_dir / "jfail.log").stat().st_size > 0
    (prime_dir / "report.html").unlink()
    rebuilt = subprocess.run(command + ["report", "prime_run"], capture_output=True, text=True,
                             timeout=120, cwd=tmp_path)
    assert rebuilt.returncode == 0 and (prime_dir / "report.html").is_file()
    wrong = subprocess.run(
        command + ["barlow", "--config", str(run_dir / "configs" / "prime.py"), "--workdir",
                   str(tmp_path / "wrong")], capture_output=True, text=True, timeout=120)
    assert wrong.returncode == 2 and "needs a BarlowConfig" in wrong.stderr


def test_annotate_command_serves_the_demo_samples_and_correction_reads_the_votes(
    demo_run, tmp_path
):
    import signal
    import urllib.request

    import numpy as np

    from jfail.defuse import load_votes
    from jfail.pipelines import defuse as defuse_pipeline

    run_dir, _ = demo_run
    work = run_dir / "work" / "defuse"
    with open(work / "annotation" / "labels.csv") as handle:
        rows = handle.read().splitlines()[1:]
    num_scenarios = 1 + max(int(r.split(",")[0]) for r in rows)
    per_scenario = len(rows) // num_scenarios

    process = subprocess.Popen([sys.executable, "-m", "jfail.cli", "annotate", str(run_dir),
                                "--port", "0"], stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        process.stdout.readline()
        url = process.stdout.readline().split()[1]
        # Two people vote: scenario 0 is "9" for both, every other sample "none of the above"
        # for one and its stored prediction's class for the other, so those get no majority.
        for annotator in ("ada", "bob"):
            for k in range(num_scenarios):
                for q in range(per_scenario):
                    label = 9 if k == 0 else (-1 if annotator == "ada" else 0)
                    body = json.dumps({"annotator": annotator, "scenario": k, "sample": q,
                                       "label": label}).encode()
                    request = urllib.request.Request(
                        url.rstrip("/") + "/api/vote", data=body, method="POST",
                        headers={"Content-Type": "application/json"})
                    assert urllib.request.urlopen(request, timeout=10).status == 201
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)
    votes = load_votes(work)
    assert sum(len(v) for row in votes for v in row) == 2 * num_scenarios * per_scenario

    out = tmp_path / "page"
    defuse_pipeline.main(["--config", str(run_dir / "configs" / "defuse.py"), "--set",
                          "annotations=page", "--out-dir", str(out), "--workdir", str(work),
                          "--quiet"])
    summary = json.loads((out / "defuse.json").read_text())
    assert summary["annotations"]["source"] == "page"
    review = summary["review"]
    assert review[0]["label"] == "9" and review[0]["agreement"] == 1.0
    # Split votes give "none" labels: those scenarios have no label and are no failure.
    assert all(r["label"] == "none of the above" and not r["is_failure"] for r in review[1:])
    predicted_nine = np.mean([r.split(",")[3] == "9" for r in rows[:per_scenario]])
    assert (0 in summary["failure_scenarios"]) == (1 - predicted_nine > 0.5)
    assert (out / "defuse" / "agreement.png").stat().st_size > 0


def test_annotate_command_without_a_defuse_run_says_what_to_run(tmp_path):
    done = subprocess.run([sys.executable, "-m", "jfail.cli", "annotate", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "run `jfail defuse`" in done.stderr
