"""The page in a real browser: Playwright driving Debian's Chromium.

Types a prompt, runs it, unticks layers 20-29 in the layer grid, reruns, and
checks that the answer and the charts changed. Screenshots go to
docs/screenshots/. Needs `apt-get install -y chromium` (skipped without it).
"""
from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.real_model]

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
SHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
TIMEOUT = 90_000  # ms: a run on a busy 2-core machine can take many seconds

if not Path(CHROMIUM).is_file():
    pytest.skip(f"{CHROMIUM} is missing: `apt-get install -y chromium` (Playwright's own browser "
                "download does not work here)", allow_module_level=True)


@pytest.fixture(scope="module")
def page(app_url):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(TIMEOUT)
        page.goto(app_url)
        page.wait_for_selector("#status:has-text('layers')")
        yield page
        browser.close()


def _plot_steps(page, elem_id: str) -> int:
    """Number of step labels on a plot's x axis (similarity: emb + one per step)."""
    return page.evaluate(f"() => document.querySelector('#{elem_id} .js-plotly-plot').data[0].x.length")


def _untick(page, layer: int, want: str) -> None:
    """Untick one grid row and wait for the text form to read `want`.

    The grid re-renders when the synced value comes back from the server; a
    click that lands during that re-render is lost, so it is retried (as a
    person would click again).
    """
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    box = page.locator(f"#grid [data-testid='cell-{layer}-1'] input[type=checkbox]")
    synced = ("() => document.querySelector('#program-text textarea, #program-text input').value === "
              f"'{want}'")
    for _ in range(4):
        page.wait_for_timeout(200)
        if box.is_checked():
            box.click()
        try:
            page.wait_for_function(synced, timeout=10_000)
            return
        except PlaywrightTimeout:
            continue
    raise AssertionError(f"unticking layer {layer} did not give the program {want!r}")


def _shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / name), full_page=True)


def _enter_item(page, key: str) -> str:
    """Type a task-suite item's prompt and expected answer; returns the answer."""
    from polar_core.study import tasks

    item = tasks.get_item(key)
    page.get_by_role("tab", name="Explore").click()
    page.locator("#prompt textarea").fill(tasks.build_prompt(item))
    page.locator("#expected textarea, #expected input").first.fill(item.answer)
    return item.answer


def test_type_run_edit_grid_rerun(page):
    from polar_core.program import Program

    _enter_item(page, "capitals/russia")
    page.locator("#auto input[type=checkbox]").uncheck()  # one run per click below, not per tick
    page.locator("#run").click()
    page.wait_for_selector("#summary:has-text('Edited program: 30 layer calls')")
    page.wait_for_selector("#answer-edited:has-text('Moscow')")
    assert _plot_steps(page, "plot-similarity") == 31
    _shot(page, "explore_full_program.png")

    text = page.locator("#program-text textarea, #program-text input").first
    for layer in range(20, 30):  # untick the grid's "run" column; the text form follows each tick
        _untick(page, layer, Program.drop_layers(30, range(20, layer + 1)).format())
    assert text.input_value() == "0-19"
    page.locator("#run").click()
    page.wait_for_selector("#summary:has-text('Edited program: 20 layer calls')")
    page.wait_for_function("() => document.querySelector('#plot-similarity .js-plotly-plot').data[0].x.length === 21")
    edited = page.locator("#answer-edited").inner_text()
    assert "Moscow" not in edited
    assert "Moscow" in page.locator("#answer-full").inner_text()
    _shot(page, "explore_skip_20_29.png")
    assert "prompt=" in page.url and "program=0-19" in page.url  # the link reproduces the view
    page.get_by_role("tab", name="Logit lens").click()
    page.wait_for_selector("#plot-lens .js-plotly-plot")
    _shot(page, "explore_logit_lens.png")


def test_predict_shows_the_router_ranking(page, real_lm):
    from app.handlers import predict

    page.get_by_role("tab", name="Explore").click()
    page.locator("#predict").click()
    if predict(real_lm, "Q: x?\nA:").programs:  # a router checkpoint ships
        page.wait_for_selector("#predictions [data-testid='cell-0-1']")
        top1 = page.locator("#predictions [data-testid='cell-0-1']").inner_text().strip()
        page.wait_for_function("(want) => document.querySelector('#program-text textarea, #program-text input')"
                               ".value === want", arg=top1)
        steps = page.locator("#predictions [data-testid='cell-0-2']").inner_text().strip()
        page.locator("#run").click()
        page.wait_for_selector(f"#summary:has-text('Edited program: {steps} layer calls')")
    else:
        page.wait_for_selector("text=No router loaded")
    _shot(page, "explore_router_prediction.png")


def test_bad_program_shows_an_error_and_page_keeps_working(page):
    text = page.locator("#program-text textarea, #program-text input").first
    text.fill("0-99")
    text.press("Enter")
    page.wait_for_selector("text=out of range")
    page.wait_for_timeout(1000)  # let the toast finish fading in
    _shot(page, "error_message.png")
    text.fill("0-11, 12-15x2, 16-29")
    text.press("Enter")
    page.wait_for_selector("#grid-note:has-text('cannot express')")


def test_search_tab_finds_programs(page):
    _enter_item(page, "capitals/russia")  # each test stands alone: it sets the prompt it needs
    page.get_by_role("tab", name="Search").click()
    budget = page.locator("#search-budget input[type=number]")
    budget.fill("30")  # a small budget keeps the test short; greedy finds shorter programs fast
    budget.press("Enter")
    page.locator("#search-button").click()
    page.wait_for_selector("#search-results:has-text('Moscow')")
    _shot(page, "search_tab.png")
    page.locator("#search-results [data-testid='cell-0-1']").click()  # one click loads it
    page.wait_for_selector("#program-text")
    assert page.locator("#program-text textarea, #program-text input").first.input_value() != "0-11, 12-15x2, 16-29"


def test_evaluate_tab(page):
    page.get_by_role("tab", name="Evaluate").click()
    items = page.locator("#eval-items input[type=number]")
    items.fill("5")
    items.press("Enter")
    page.locator("#evaluate-button").click()
    page.wait_for_selector("#eval-table:has-text('Full program')")
    page.wait_for_selector("#eval-plot .js-plotly-plot")
    _shot(page, "evaluate_tab.png")


def test_learn_tab_loads_an_example(page):
    """One click loads a curated example into the Explore tab and runs it."""
    from app.handlers import learn_examples

    fix = next(i for i, ex in enumerate(learn_examples()) if ex["kind"] == "fix")
    page.get_by_role("tab", name="Learn").click()
    page.wait_for_selector("text=Load example 1")
    _shot(page, "learn_tab.png")
    page.locator(f"#learn-{fix}").click()
    want = learn_examples()[fix]["program"]
    page.wait_for_function(f"() => document.querySelector('#program-text textarea, #program-text input')"
                           f".value === '{want}'")
    page.wait_for_selector("text=Edited program · 27 layer calls/token · ✓ right")
    _shot(page, "learn_example_loaded.png")
