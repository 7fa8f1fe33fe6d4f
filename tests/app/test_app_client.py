"""The app end to end through its API: a real server on 127.0.0.1 driven by gradio_client."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.real_model


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
    """The run's raw-numbers JSON: the last output of /run."""
    return outputs[-1]


def test_predict_run_edit_changes_answer_and_layer_count(client, capital_prompt):
    prompt, answer = capital_prompt
    model = "smollm2-135m-instruct"
    table, message, text, *_ = client.predict(prompt, model, api_name="/predict")
    assert text  # top-1 of the router, or the full program when none is loaded
    assert ("router" in message.lower()) or table

    full = _details(client.predict(prompt, "full", answer, model, api_name="/run"))
    assert full["edited_layers"] == 30 and full["full_correct"] is True

    text, *_ = client.predict("skip", 4, 20, 29, 2, model, api_name="/apply_preset")
    assert text == "0-19"
    edited = _details(client.predict(prompt, text, answer, model, api_name="/run"))
    assert edited["edited_layers"] == 20 and edited["full_layers"] == 30
    assert edited["compute_saved"] == pytest.approx(1 / 3, abs=1e-3)
    assert edited["edited_answer"] != edited["full_answer"]
    assert edited["full_answer"] == full["full_answer"]


def test_bad_program_text_is_an_error_and_the_server_keeps_working(client, capital_prompt):
    from gradio_client.exceptions import AppError

    prompt, answer = capital_prompt
    with pytest.raises(AppError, match="out of range"):
        client.predict(prompt, "0-40", answer, "smollm2-135m-instruct", api_name="/run")
    text, *_ = client.predict("0-11, 12-15x2, 16-29", "smollm2-135m-instruct", api_name="/set_program_text")
    assert text == "0-11, 12-15x2, 16-29"


def test_search_returns_a_valid_program(client, capital_prompt):
    prompt, answer = capital_prompt
    table, message = client.predict(prompt, answer, "greedy", 40, "smollm2-135m-instruct", api_name="/search")
    rows = table["data"] if isinstance(table, dict) else table
    assert rows, message
    assert all(r[4].strip().lower() == answer.lower() for r in rows)
    assert rows[0][2] <= 30


def test_download_then_upload_a_program(client, tmp_path):
    import json

    from gradio_client import handle_file

    model = "smollm2-135m-instruct"
    text, rows, note, roll, download = client.predict("0-9, 10-13x3, 14-29", model, api_name="/set_program_text")
    saved = json.loads(open(download, encoding="utf-8").read())
    assert saved["text"] == "0-9, 10-13x3, 14-29" and saved["num_layers"] == 30
    (tmp_path / "p.json").write_text(json.dumps({"path": [0, 1, 2, 2, 3], "num_layers": 30}))
    text, *_ = client.predict(handle_file(str(tmp_path / "p.json")), model, api_name="/upload_program")
    assert text == "0-1, 2x2, 3"
