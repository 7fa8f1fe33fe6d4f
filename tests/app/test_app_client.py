"""The app end to end through its API: a real server on 127.0.0.1 driven by gradio_client.

Every action the page offers is an endpoint; a row pick takes the row's index.
"""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.real_model

MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def client(app_url):
    from gradio_client import Client

    return Client(app_url, verbose=False)


@pytest.fixture(scope="module")
def capital_prompt():
    from polar_core.study import tasks

    item = tasks.get_item("capitals/russia")
    return tasks.build_prompt(item), item.answer


def _details(outputs) -> dict:
    """The run's record (the "Raw numbers" JSON): the last output of /run."""
    return outputs[-1]


def test_predict_run_edit_changes_answer_and_layer_count(client, capital_prompt):
    prompt, answer = capital_prompt
    table, message, text, *_ = client.predict(prompt, MODEL, api_name="/predict")
    assert text  # top-1 of the router, or the full program when none is loaded
    assert ("router" in message.lower()) or table

    full = _details(client.predict(prompt, "full", answer, MODEL, api_name="/run"))
    assert full["edited_layers"] == 30 and full["full_correct"] is True
    assert full["stamp"] == {"prompt": prompt, "program": "0-29", "model": MODEL, "expected": answer, "rule": "exact"}

    text, *_ = client.predict("skip", 4, 20, 29, 2, MODEL, api_name="/apply_preset")
    assert text == "0-19"
    edited = _details(client.predict(prompt, text, answer, MODEL, api_name="/run"))
    assert edited["edited_layers"] == 20 and edited["full_layers"] == 30
    assert edited["compute_saved"] == pytest.approx(1 / 3, abs=1e-3)
    assert edited["edited_answer"] != edited["full_answer"]
    assert edited["full_answer"] == full["full_answer"]
    assert len(edited["data"]["steps"]) == 20  # the data behind the charts comes along


def test_a_free_text_answer_containing_the_expected_one_is_marked_right(client):
    """Regression: "The capital of France is Paris." was marked wrong against "Paris"."""
    outputs = client.predict("What is the capital of France?", "full", "Paris", MODEL, api_name="/run")
    details = _details(outputs)
    assert "Paris" in details["full_answer"] and details["full_correct"] is True
    assert details["rule"] == "contains “Paris”" and "✓ right — contains “Paris”" in outputs[0]
    exact = _details(client.predict("What is the capital of France?", "full", "Paris", MODEL, True, api_name="/run"))
    assert exact["full_correct"] is False  # the switch to the exact rule


def test_an_emoji_answer_comes_back_intact(client):
    outputs = client.predict("Repeat exactly: 🎉🐱🚀", "full", "", MODEL, api_name="/run")
    assert "🎉🐱🚀" in _details(outputs)["full_answer"]
    assert "🎉🐱🚀" in "".join(span["token"] for span in outputs[1])  # the highlighted answer too


def test_concurrent_runs_of_one_client_each_get_a_complete_answer(client, capital_prompt):
    """Regression: one Client submitting three /run jobs at once got one back as bare update placeholders."""
    prompt, answer = capital_prompt
    programs = ["0-29", "0-19", "0-2, 4-24, 27-29"]
    jobs = [client.submit(prompt, p, answer, MODEL, api_name="/run") for p in programs]
    results = [_details(job.result(timeout=300)) for job in jobs]
    assert [r["stamp"]["program"] for r in results] == programs
    assert [r["edited_layers"] for r in results] == [30, 20, 27]
    assert all(r["edited_answer"] is not None and r["data"]["steps"] for r in results)


def test_each_row_pick_endpoint_loads_the_row(client, capital_prompt):
    """Regression: /pick_prediction and /pick_search_result failed for every input (the click's event data)."""
    prompt, answer = capital_prompt
    table, *_ = client.predict(prompt, MODEL, api_name="/predict")
    if table["data"]:  # a router ships for the default model
        text, *_ = client.predict(table, len(table["data"]) - 1, MODEL, api_name="/pick_prediction")
        assert text == table["data"][-1][1]
    table = {"headers": ["#", "program"], "data": [[1, "0-29"], [2, "0-9, 12-29"]]}
    text, *_ = client.predict(table, 1, MODEL, api_name="/pick_search_result")
    assert text == "0-9, 12-29"
    text, *_ = client.predict(table, 0, MODEL, api_name="/pick_prediction")
    assert text == "0-29"


def test_bad_program_text_is_an_error_and_the_server_keeps_working(client, capital_prompt):
    from gradio_client.exceptions import AppError

    prompt, answer = capital_prompt
    with pytest.raises(AppError, match="out of range"):
        client.predict(prompt, "0-40", answer, MODEL, api_name="/run")
    text, *_ = client.predict("0-11, 12-15x2, 16-29", MODEL, api_name="/set_program_text")
    assert text == "0-11, 12-15x2, 16-29"
    with pytest.raises(AppError, match="row"):
        client.predict({"headers": ["#", "program"], "data": []}, 0, MODEL, api_name="/pick_search_result")


def test_search_returns_a_valid_program(client, capital_prompt):
    prompt, answer = capital_prompt
    table, message = client.predict(prompt, answer, "greedy", 40, MODEL, api_name="/search")
    rows = table["data"] if isinstance(table, dict) else table
    assert rows, message
    assert all(r[4].strip().lower() == answer.lower() for r in rows)
    assert rows[0][2] <= 30
    text, *_ = client.predict(table, 0, MODEL, api_name="/pick_search_result")
    assert text == rows[0][1]


def test_download_then_upload_a_program(client, tmp_path):
    import json

    from gradio_client import handle_file

    text, rows, note, roll, download = client.predict("0-9, 10-13x3, 14-29", MODEL, api_name="/set_program_text")
    saved = json.loads(open(download, encoding="utf-8").read())
    assert saved["text"] == "0-9, 10-13x3, 14-29" and saved["num_layers"] == 30
    (tmp_path / "p.json").write_text(json.dumps({"path": [0, 1, 2, 2, 3], "num_layers": 30}))
    text, *_ = client.predict(handle_file(str(tmp_path / "p.json")), MODEL, api_name="/upload_program")
    assert text == "0-1, 2x2, 3"


def test_every_action_has_an_endpoint(client):
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/run", "/predict", "/pick_prediction", "/pick_search_result", "/search", "/evaluate",
            "/set_program_text", "/set_program_grid", "/apply_preset", "/upload_program", "/model_status",
            "/example", "/learn_example_0", "/load_view"} <= names
