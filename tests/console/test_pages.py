"""graft-console's pages and actions through Flask's test client, over a real trained repository."""

from __future__ import annotations

import json
import re
import time

import pytest

from console.app import CONTENT_SECURITY_POLICY
from console.live import Servers, rates
from graft import contract
from tests.console.conftest import MODEL, TOKEN, copy_repo, make_app
from tests.ports import free_port
from tests.serving.server import serving
from training import promote as promotion
from training import repo as model_repo


@pytest.fixture(scope="module")
def client(trained):
    return make_app(trained).test_client()


def _csrf(page: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)


def test_index_lists_the_model_with_its_labels_and_versions(client):
    page = client.get("/").get_data(as_text=True)
    assert f'href="/models/{MODEL}"' in page
    assert 'data-label="stable">stable &rarr; 2<' in page
    assert "versions on disk: 1, 2" in page


def test_model_page_shows_versions_with_their_training_summary(client, trained):
    page = client.get(f"/models/{MODEL}").get_data(as_text=True)
    for number in (1, 2):
        accuracy = contract.training_summary(contract.read_lineage(trained["repo"] / MODEL / str(number)))["accuracy"]
        assert f'href="/models/{MODEL}/versions/{number}"' in page
        assert f"{accuracy * 100:.1f} %" in page
    assert "vgg16" in page and "feature-extraction" in page
    assert "no shadow comparison" in page
    assert 'id="rollback-form"' in page and 'id="promote-form"' in page


def test_version_page_shows_lineage_signatures_report_and_held_out_evaluation(client, trained):
    version_dir = trained["repo"] / MODEL / "2"
    lineage = contract.read_lineage(version_dir)
    page = client.get(f"/models/{MODEL}/versions/2").get_data(as_text=True)
    assert lineage["dataset"]["fingerprint"] in page
    assert lineage["created_at"] in page
    for name in ("serving_default", "predict_images", "classify", contract.CLASSIFY_METHOD):
        assert name in page
    report = json.loads((contract.report_path(version_dir) / "report.json").read_text())
    assert f"accuracy {report['evaluation']['accuracy'] * 100:.1f} % on {report['evaluation']['count']} images" in page
    promoted = json.loads((trained["report_dir"] / "promote-2.json").read_text())
    assert promoted["eval_data"]["fingerprint"] in page and "promote-2.json" in page
    assert f'src="/models/{MODEL}/versions/2/report/training_curves.png"' in page
    assert f'src="/models/{MODEL}/versions/2/report/confusion_matrix.png"' in page


@pytest.mark.parametrize("image", ["training_curves.png", "confusion_matrix.png"])
def test_report_images_are_served_as_png(client, trained, image):
    answer = client.get(f"/models/{MODEL}/versions/1/report/{image}")
    assert answer.status_code == 200 and answer.mimetype == "image/png"
    assert answer.data == (contract.report_path(trained["repo"] / MODEL / "1") / image).read_bytes()
    assert answer.data.startswith(b"\x89PNG")


def test_history_page_lists_the_moves_and_diffs_two_versions(client, trained):
    page = client.get(f"/models/{MODEL}/history?a=1&b=2").get_data(as_text=True)
    assert page.count("<td>promote</td>") == 2
    a, b = (contract.read_lineage(trained["repo"] / MODEL / v) for v in ("1", "2"))
    diff = page[page.index('id="diff"'):]
    assert "dataset.fingerprint" in diff and a["dataset"]["fingerprint"] in diff and b["dataset"]["fingerprint"] in diff
    assert re.search(r'<tr class="differs"><td>dataset\.fingerprint</td>', diff)
    assert re.search(r'<tr class="same"><td>base</td>', diff)


@pytest.mark.parametrize("path", [
    f"/models/{MODEL}/versions/..%2f..%2f..%2fetc",
    "/models/..%2f..%2fetc/versions/1",
    "/models/%2fetc",
    "/models/..",
    f"/models/{MODEL}/versions/%2fetc%2fpasswd",
    f"/models/{MODEL}/versions/3",
    f"/models/{MODEL}/versions/-1",
    f"/models/{MODEL}/versions/1/report/..%2fgraft.json",
    f"/models/{MODEL}/versions/1/report/report.json",
    f"/models/{MODEL}/versions/1/report/%2fetc%2fpasswd",
    f"/models/{MODEL}/history?a=..%2f1&b=2",
])
def test_paths_outside_the_listing_are_not_found(client, path):
    answer = client.get(path)
    assert answer.status_code == 404
    assert b"root:" not in answer.data


def test_links_out_of_the_repository_are_not_listed(trained, tmp_path):
    repo = copy_repo(trained, tmp_path / "repo")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(b"\x89PNG secret")
    (repo / "linked").symlink_to(outside, target_is_directory=True)
    report = contract.report_path(repo / MODEL / "1")
    (report / "training_curves.png").unlink()
    (report / "training_curves.png").symlink_to(outside / "secret.png")
    client = make_app(trained, repo).test_client()
    assert client.get("/models/linked").status_code == 404
    assert "linked" not in client.get("/").get_data(as_text=True)
    assert client.get(f"/models/{MODEL}/versions/1/report/training_curves.png").status_code == 404


def test_lineage_is_escaped(trained, tmp_path):
    repo = copy_repo(trained, tmp_path / "repo")
    path = contract.lineage_path(repo / MODEL / "1")
    lineage = json.loads(path.read_text())
    lineage["base"] = "<script>alert(1)</script>"
    lineage["dataset"]["root"] = '"><img src=x onerror=alert(2)>'
    path.write_text(json.dumps(lineage))
    client = make_app(trained, repo).test_client()
    for url in (f"/models/{MODEL}/versions/1", f"/models/{MODEL}", f"/models/{MODEL}/history?a=1&b=2"):
        page = client.get(url).get_data(as_text=True)
        assert "<script>" not in page and "<img src=x" not in page
    page = client.get(f"/models/{MODEL}/versions/1").get_data(as_text=True)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


@pytest.mark.parametrize("path", ["/", f"/models/{MODEL}", f"/models/{MODEL}/versions/1", "/models/nope",
                                  f"/models/{MODEL}/versions/1/report/confusion_matrix.png", "/healthz"])
def test_security_headers_on_every_answer(client, path):
    headers = client.get(path).headers
    assert headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    assert headers["X-Frame-Options"] == "DENY"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Referrer-Policy"] == "no-referrer"


def test_healthz(client):
    answer = client.get("/healthz")
    assert answer.status_code == 200 and answer.data == b"ok\n"


# ---- actions ----

def test_read_only_console_hides_forms_and_refuses_posts(trained, tmp_path):
    repo = copy_repo(trained, tmp_path / "repo")
    client = make_app(trained, repo, actions=False).test_client()
    page = client.get(f"/models/{MODEL}").get_data(as_text=True)
    assert "<form method=\"post\"" not in page and "read-only" in page
    for action in ("rollback", "promote"):
        answer = client.post(f"/models/{MODEL}/{action}", data={"label": "stable", "version": "1", "token": TOKEN},
                             headers={"Authorization": f"Bearer {TOKEN}"})
        assert answer.status_code == 403
    assert contract.read_labels(repo / MODEL) == {"stable": 2}


@pytest.mark.parametrize("form", [
    {"label": "stable"},                                     # no token
    {"label": "stable", "token": "wrong-token-0123456789"},  # a wrong token
    {"label": "stable", "token": TOKEN},                     # the token but no CSRF token
    {"label": "stable", "token": TOKEN, "csrf_token": "forged"},
])
def test_actions_need_the_token_and_the_csrf_token(trained, tmp_path, form):
    repo = copy_repo(trained, tmp_path / "repo")
    client = make_app(trained, repo).test_client()
    client.get(f"/models/{MODEL}")  # a session with a CSRF token exists; the form does not carry it
    answer = client.post(f"/models/{MODEL}/rollback", data=form)
    assert answer.status_code == 403
    assert contract.read_labels(repo / MODEL) == {"stable": 2}


def test_a_csrf_token_from_another_session_is_refused(trained, tmp_path):
    repo = copy_repo(trained, tmp_path / "repo")
    app = make_app(trained, repo)
    theirs = _csrf(app.test_client().get(f"/models/{MODEL}").get_data(as_text=True))
    mine = app.test_client()
    mine.get(f"/models/{MODEL}")
    answer = mine.post(f"/models/{MODEL}/rollback", data={"label": "stable", "token": TOKEN, "csrf_token": theirs})
    assert answer.status_code == 403
    assert contract.read_labels(repo / MODEL) == {"stable": 2}


def test_rollback_moves_the_label_through_training_promote(trained, tmp_path):
    repo = copy_repo(trained, tmp_path / "repo")
    client = make_app(trained, repo).test_client()
    token = _csrf(client.get(f"/models/{MODEL}").get_data(as_text=True))
    answer = client.post(f"/models/{MODEL}/rollback", data={"label": "stable", "token": TOKEN, "csrf_token": token})
    assert answer.status_code == 200, answer.get_data(as_text=True)
    assert "rolled_back: label &#39;stable&#39; moved back from version 2 to 1" in answer.get_data(as_text=True)
    assert contract.read_labels(repo / MODEL) == {"stable": 1}
    last = model_repo.read_history(repo / MODEL)[-1]
    assert (last["action"], last["from"], last["to"], last["stack"]) == ("rollback", 2, 1, [1])
    # Nothing but labels.json and the history changed; no staging file was left behind.
    assert sorted(p.name for p in (repo / MODEL).iterdir() if not p.name.startswith(".graft-")) == sorted([
        "1", "2", contract.LABELS_FILE, contract.HISTORY_FILE])
    # A second rollback has nowhere to go: the report says why, the label stays.
    again = client.post(f"/models/{MODEL}/rollback", data={"label": "stable", "token": TOKEN, "csrf_token": token})
    assert again.status_code == 409 and "no earlier version" in again.get_data(as_text=True)
    assert contract.read_labels(repo / MODEL) == {"stable": 1}


def test_promote_runs_the_gate_and_moves_the_label(trained, tmp_path):
    repo = copy_repo(trained, tmp_path / "repo")
    client = make_app(trained, repo).test_client()
    token = _csrf(client.get(f"/models/{MODEL}").get_data(as_text=True))
    answer = client.post(f"/models/{MODEL}/promote",
                         data={"label": "canary", "version": "1", "token": TOKEN, "csrf_token": token})
    page = answer.get_data(as_text=True)
    assert answer.status_code == 200, page
    assert "promoted: no version under label &#39;canary&#39;" in page
    assert contract.read_labels(repo / MODEL) == {"stable": 2, "canary": 1}
    last = model_repo.read_history(repo / MODEL)[-1]
    assert (last["action"], last["label"], last["to"]) == ("promote", "canary", 1)


@pytest.mark.parametrize("form, code", [
    ({"label": "stable", "version": "../1"}, 404),
    ({"label": "stable", "version": "9"}, 404),
    ({"label": "../stable", "version": "1"}, 400),
    ({"label": "", "version": "1"}, 400),
])
def test_promote_refuses_versions_and_labels_it_does_not_list(trained, tmp_path, form, code):
    repo = copy_repo(trained, tmp_path / "repo")
    client = make_app(trained, repo).test_client()
    token = _csrf(client.get(f"/models/{MODEL}").get_data(as_text=True))
    answer = client.post(f"/models/{MODEL}/promote", data={**form, "token": TOKEN, "csrf_token": token})
    assert answer.status_code == code
    assert contract.read_labels(repo / MODEL) == {"stable": 2}


def test_promote_without_held_out_data_is_not_offered(trained, tmp_path):
    repo = copy_repo(trained, tmp_path / "repo")
    client = make_app(trained, repo, eval_data=False).test_client()
    page = client.get(f"/models/{MODEL}").get_data(as_text=True)
    assert 'id="rollback-form"' in page and 'id="promote-form"' not in page
    answer = client.post(f"/models/{MODEL}/promote",
                         data={"label": "stable", "version": "1", "token": TOKEN, "csrf_token": _csrf(page)})
    assert answer.status_code == 403


def test_a_server_that_is_down_shows_as_down(trained):
    url = f"http://127.0.0.1:{free_port()}"
    client = make_app(trained, serve_urls=[url]).test_client()
    for path in ("/", f"/models/{MODEL}"):
        answer = client.get(path)
        assert answer.status_code == 200
        assert f"{url}" in answer.get_data(as_text=True) and ">down<" in answer.get_data(as_text=True)


def test_the_model_page_shows_graft_serves_shadow_comparison(trained, tmp_path):
    repo = copy_repo(trained, tmp_path / "repo")
    report = promotion.promote(repo, MODEL, 1, trained["eval_data"], label="canary",
                               gate=promotion.Gate(min_delta=-1.0))
    assert report["decision"] == "promoted", report["reason"]
    image = [[[float(i % 255)] * 3 for i in range(32)]] * 32
    with serving(model_name=MODEL, model_base_path=str(repo / MODEL), shadow_fraction=1.0,
                 file_system_poll_wait_seconds=0.2) as (_, client):
        deadline = time.monotonic() + 60
        # Ready means a version is AVAILABLE; the labels apply once both of theirs are.
        for label in ("stable", "canary"):
            while client.http.get(f"{client.rest}/v1/models/{MODEL}/labels/{label}", timeout=5).status_code != 200:
                assert time.monotonic() < deadline, f"graft-serve never applied the {label} label"
                time.sleep(0.1)
        for _ in range(4):
            answer = client.http.post(f"{client.rest}/v1/models/{MODEL}/labels/stable:predict",
                                      json={"instances": [image]}, timeout=30)
            assert answer.status_code == 200, answer.text
        deadline = time.monotonic() + 30
        while (shadow := client.http.get(f"{client.rest}/v1/models/{MODEL}/shadow", timeout=5).json())["compared"] < 4:
            assert time.monotonic() < deadline, shadow
            time.sleep(0.1)
        page = make_app(trained, repo, serve_urls=[client.rest]).test_client().get(f"/models/{MODEL}")
    text = page.get_data(as_text=True)
    section = text[text.index("<h2>Shadow</h2>"):text.index("<h2>Actions</h2>")]
    assert "no shadow comparison" not in section
    assert re.search(r"<th>stable</th><td>2</td>", section) and re.search(r"<th>canary</th><td>1</td>", section)
    assert re.search(r"<th>compared</th><td>4</td>", section)
    assert re.search(r"<th>agreement</th><td>[01](\.\d+)?</td>", section)


def test_a_server_without_a_shadow_comparison_says_so_and_its_rates_are_read_from_metrics(trained):
    image = [[[128.0] * 3] * 32] * 32
    with serving(model_name=MODEL, model_base_path=str(trained["repo"] / MODEL)) as (_, client):
        servers = Servers([client.rest], timeout_s=2.0)
        first = servers.read(client.rest)
        assert first["up"] and MODEL in first["models"] and first["rates"] == {}
        for body in ({"instances": [image]}, {"instances": [image]}, {"signature_name": "nope", "instances": [image]}):
            client.http.post(f"{client.rest}/v1/models/{MODEL}:predict", json=body, timeout=30)
        time.sleep(0.05)
        second = servers.read(client.rest)
        before = first["counts"].get(MODEL, {"requests": 0.0, "errors": 0.0})
        assert second["counts"][MODEL]["requests"] - before["requests"] == 3
        assert second["counts"][MODEL]["errors"] - before["errors"] == 1
        assert second["rates"][MODEL]["requests_per_s"] > second["rates"][MODEL]["errors_per_s"] > 0
        page = make_app(trained, serve_urls=[client.rest]).test_client().get(f"/models/{MODEL}")
    text = page.get_data(as_text=True)
    section = text[text.index("<h2>Shadow</h2>"):text.index("<h2>Actions</h2>")]
    assert client.rest in section and "no shadow comparison" in section
    assert "AVAILABLE" in text


def test_rates_survive_a_server_restart():
    before = {"m": {"requests": 100.0, "errors": 10.0}}
    after = {"m": {"requests": 4.0, "errors": 1.0}, "new": {"requests": 2.0, "errors": 0.0}}
    assert rates(before, after, 2.0) == {"m": {"requests_per_s": 2.0, "errors_per_s": 0.5},
                                         "new": {"requests_per_s": 1.0, "errors_per_s": 0.0}}
