"""The page in a real browser: Playwright driving Debian's Chromium.

The page opens on lesson 1, already run; bursts of edits always end showing
the last program's answer; a person can edit the grid, see errors clear,
search, evaluate, load lessons, and reach every tab on a phone.
Screenshots go to docs/screenshots/. Needs `apt-get install -y chromium`
(skipped without it).
"""
from __future__ import annotations

import random
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.real_model]

SHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
TIMEOUT = 90_000  # ms: a run on a busy 2-core machine can take many seconds
TEXT = "#program-text textarea, #program-text input"
D = 30


@pytest.fixture(scope="module")
def page(browser, app_url):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(TIMEOUT)
    page.goto(app_url)
    page.wait_for_selector("#status:has-text('layers')")
    yield page
    page.close()


@pytest.fixture(scope="module")
def lesson():
    from app.handlers import learn_examples

    return learn_examples()[0]


@pytest.fixture(scope="module")
def reference(real_lm, lesson):
    """The edited answer the server must show for a program of lesson 1's prompt."""
    from app import handlers as H
    from app.session import Session

    session, answers = Session(), {}

    def answer(program_text: str) -> str:
        if program_text not in answers:
            answers[program_text] = H.run(real_lm, session, lesson["prompt"], program_text, lesson["expected"]).edited.text
        return answers[program_text]
    return answer


def _shot(page, name: str, full_page: bool = True) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / name), full_page=full_page)


def _plot_steps(page, elem_id: str) -> int:
    """Number of step labels on a plot's x axis (similarity: emb + one per step)."""
    return page.evaluate(f"() => document.querySelector('#{elem_id} .js-plotly-plot').data[0].x.length")


def _program_text(page) -> str:
    return page.locator(TEXT).first.input_value()


def _wait_settled(page, program, reference=None) -> None:
    """Wait until the page shows `program`'s finished run, then check it stays: the
    edited answer's heading names the program and its layer calls, the summary and
    the similarity chart agree, and (with a reference) the answer is its answer."""
    from polar_core.program import Program

    want = program.format()
    shown = ("(want) => { const h = document.querySelector('#head-edited').innerText;"
             " const s = document.querySelector('#summary').innerText;"
             " return h.startsWith('Edited program ' + want[0] + ' ·') && h.includes(want[1] + ' layer calls/token')"
             " && s.includes('Edited program: ' + want[1] + ' layer calls'); }")
    try:
        page.wait_for_function(shown, arg=[want, program.layer_calls], timeout=TIMEOUT // 2)
    except Exception as exc:
        raise AssertionError(f"the page never settled on {want!r}: text {_program_text(page)!r}, heading "
                             f"{page.locator('#head-edited').inner_text()!r}, summary "
                             f"{page.locator('#summary').inner_text()[:120]!r}") from exc
    page.wait_for_timeout(800)  # nothing stale may land after it: the check must still hold
    assert page.evaluate(shown, [want, program.layer_calls]), page.locator("#head-edited").inner_text()
    assert Program.parse(_program_text(page), D) == program  # the box keeps what was typed ("full")
    assert _plot_steps(page, "plot-similarity") == program.layer_calls + 1
    assert want in page.locator("#charts-head").inner_text()
    if reference is not None:
        shown = page.locator("#answer-edited").inner_text().split("\n", 1)[-1]  # below the component's label
        assert shown.strip() == (reference(want) or "(empty answer)")


def _untick(page, layer: int) -> None:
    """Untick a grid row's "run" box. The Dataframe now and then takes a click as
    selecting the cell rather than ticking it; the box then stays ticked and a
    person clicks again, so the test does too (up to three times)."""
    box = page.locator(f"#grid [data-testid='cell-{layer}-1'] input[type=checkbox]")
    for _ in range(3):
        box.click()
        try:
            page.wait_for_function("(b) => !b.checked", arg=box.element_handle(), timeout=1000)
            return
        except Exception:
            continue
    raise AssertionError(f"the grid's box of layer {layer} did not untick")


def _grid_program(page):
    """The program the grid's boxes show."""
    from polar_core.program import Program

    ticked = page.evaluate("""() => [...Array(30).keys()].map(i =>
        document.querySelector(`#grid [data-testid='cell-${i}-1'] input[type=checkbox]`).checked)""")
    return Program.drop_layers(D, [i for i, on in enumerate(ticked) if not on])


def _edit_text(page, program_text: str) -> None:
    box = page.locator(TEXT).first
    box.fill(program_text)
    box.press("Enter")


def test_the_page_opens_on_lesson_one_already_run(page, lesson):
    from polar_core.program import Program

    program = Program.parse(lesson["program"], D)
    page.wait_for_selector(f"#lesson:has-text('Lesson 1: {lesson['title']}')")
    _wait_settled(page, program)
    assert lesson["expected"] in page.locator("#answer-edited").inner_text()
    assert "✓ right" in page.locator("#head-edited").inner_text()
    # The whole 30-layer grid, without a scroll bar of its own (it showed layers 0-20 only).
    inner_scrollers = page.evaluate("""() => [...document.querySelectorAll('#grid *')].filter(e =>
        e.scrollHeight > e.clientHeight + 2 && /auto|scroll/.test(getComputedStyle(e).overflowY)).length""")
    assert inner_scrollers == 0 and page.locator("#grid [data-testid='cell-29-0']").is_visible()
    assert not page.locator("#preset-n").is_visible()  # the full-program preset uses no numbers
    _shot(page, "explore_desktop.png")
    page.get_by_role("tab", name="Logit lens").click()
    page.wait_for_selector("#plot-logit-lens .js-plotly-plot")
    page.locator("#plot-logit-lens").screenshot(path=str(SHOTS / "explore_logit_lens.png"))
    page.get_by_role("tab", name="Similarity").click()


def test_bursts_of_edits_always_end_on_the_last_program(page, reference):
    """Regression: with auto-run on, three edits typed 50-300 ms apart showed the
    first edit's answer (4 of 4 tries) or lost the third edit; grid ticks 0.4 s
    apart showed a header one step behind. 10 text bursts and 3 grid bursts must
    each settle on the last program: its answer, heading and layer count."""
    from polar_core.program import Program

    rng = random.Random(13)
    for burst in range(10):
        programs = [Program.drop_layers(D, rng.sample(range(1, D - 1), k)) for k in rng.sample(range(0, 6), 3)]
        for program in programs:
            _edit_text(page, program.format())
            page.wait_for_timeout(rng.randint(50, 300))
        _wait_settled(page, programs[-1], reference)

    for burst in range(3):
        _edit_text(page, "full")
        _wait_settled(page, Program.full(D))
        dropped = sorted(rng.sample(range(2, D - 2), 4))
        for layer in dropped:  # untick four rows of the grid's "run" column, 300 ms apart
            _untick(page, layer)
            page.wait_for_timeout(300)
        _wait_settled(page, Program.drop_layers(D, dropped), reference)
        assert _grid_program(page) == Program.drop_layers(D, dropped)  # no tick undone by the page


def test_edit_the_grid_and_rerun(page):
    """Untick layers 20-29 with auto-run off: the editor follows, Run shows the broken answer."""
    from polar_core.program import Program

    page.locator("#auto input[type=checkbox]").uncheck()
    try:
        _edit_text(page, "0-29")
        page.wait_for_selector("#grid [data-testid='cell-29-1'] input[type=checkbox]:checked")
        for layer in range(20, 30):
            _untick(page, layer)
            page.wait_for_timeout(150)
        page.wait_for_function(f"() => document.querySelector('{TEXT}').value === '0-19'")
        assert "not run yet" in page.locator("#head-edited").inner_text()  # never another program's answer
        assert "program=0-19" in page.url  # the address follows each edit, before any run
        page.locator("#copy-link").click()
        page.wait_for_selector("#copy-link:has-text('Link copied')")
        page.locator("#run").click()
        _wait_settled(page, Program.parse("0-19", D))
    finally:
        page.locator("#auto input[type=checkbox]").check()
    assert "Moscow" not in page.locator("#answer-edited").inner_text()
    assert "Moscow" in page.locator("#answer-full").inner_text()
    _shot(page, "explore_skip_20_29.png")


def test_preset_fields_show_only_when_used(page):
    page.locator("#preset input").click()
    page.get_by_role("option", name="Loop block a–b × r").click()
    for field, shown in (("n", False), ("a", True), ("b", True), ("r", True)):
        page.wait_for_selector(f"#preset-{field}", state="visible" if shown else "hidden")
    page.locator("#preset input").click()
    page.get_by_role("option", name="Full program (all layers once)").click()
    page.wait_for_selector("#preset-a", state="hidden")


def test_an_error_badge_clears_once_the_program_is_fixed(page):
    from polar_core.program import Program

    badge = "#program-text [data-testid='status-tracker'] .error"
    _edit_text(page, "0-29")
    _wait_settled(page, Program.full(D))
    _edit_text(page, "0-99")
    page.wait_for_selector("text=out of range")
    page.wait_for_selector(badge)
    page.wait_for_timeout(800)  # let the toast finish fading in
    _shot(page, "error_message.png", full_page=False)
    _untick(page, 3)  # fixed another way: the grid
    page.wait_for_selector(badge, state="detached")
    _wait_settled(page, Program.drop_layers(D, [3]))


def test_predict_shows_the_router_ranking(page, real_lm):
    from app.handlers import predict

    page.locator("#predict").click()
    if predict(real_lm, "Q: x?\nA:").programs:  # a router checkpoint ships
        page.wait_for_selector("#predictions [data-testid='cell-0-1']")
        top1 = page.locator("#predictions [data-testid='cell-0-1']").inner_text().strip()
        page.wait_for_function(f"(want) => document.querySelector('{TEXT}').value === want", arg=top1)
        steps = page.locator("#predictions [data-testid='cell-0-2']").inner_text().strip()
        page.wait_for_selector(f"#summary:has-text('Edited program: {steps} layer calls')")
        assert "log-probability" in page.locator("#predict-message").inner_text()
    else:
        page.wait_for_selector("text=No router loaded")
    _shot(page, "explore_router_prediction.png", full_page=False)


def test_search_tab_finds_programs(page):
    page.get_by_role("tab", name="Search").click()
    budget = page.locator("#search-budget input[type=number]")
    budget.fill("30")  # a small budget keeps the test short; greedy finds shorter programs fast
    budget.press("Enter")
    page.locator("#search-button").click()
    page.wait_for_selector("#search-results:has-text('Moscow')")
    _shot(page, "search_tab.png", full_page=False)
    want = page.locator("#search-results [data-testid='cell-0-1']").inner_text().strip()
    page.locator("#search-results [data-testid='cell-0-1']").click()  # one click loads it
    page.wait_for_function(f"(want) => document.querySelector('{TEXT}').value === want", arg=want)


def test_evaluate_tab(page):
    page.get_by_role("tab", name="Evaluate").click()
    items = page.locator("#eval-items input[type=number]")
    items.fill("5")
    items.press("Enter")
    page.locator("#evaluate-button").click()
    page.wait_for_selector("#eval-table:has-text('Full program')")
    page.wait_for_selector("#eval-notes:has-text('Static')")  # which depth the baselines ran at, and why
    page.wait_for_selector("#eval-plot .js-plotly-plot")
    _shot(page, "evaluate_tab.png", full_page=False)


def test_a_loaded_lesson_keeps_its_card_beside_the_results(page):
    from app.handlers import learn_examples

    lessons = learn_examples()
    fix = next(i for i, ex in enumerate(lessons) if ex["kind"] == "fix")
    page.get_by_role("tab", name="Learn").click()
    page.wait_for_selector("text=Load lesson 1")
    _shot(page, "learn_tab.png", full_page=False)
    page.locator(f"#learn-{fix}").click()
    page.wait_for_function(f"() => document.querySelector('{TEXT}').value === '{lessons[fix]['program']}'")
    page.wait_for_selector(f"#lesson:has-text('{lessons[fix]['title']}')")
    page.wait_for_selector("#head-edited:has-text('27 layer calls/token · ✓ right')")
    _shot(page, "learn_example_loaded.png", full_page=False)


def test_a_phone_reaches_every_tab_and_the_toolbar_leaves_titles_free(browser, app_url):
    """On a 390 px phone the tabs collapsed into a '…' menu hiding Evaluate, Learn and three chart tabs."""
    phone = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True,
                             has_touch=True)
    phone.set_default_timeout(TIMEOUT)
    try:
        phone.goto(app_url)
        phone.wait_for_selector("#head-edited:has-text('layer calls/token')")
        assert phone.locator("[aria-label='More tabs']:visible").count() == 0
        for name in ("Similarity", "Logit lens", "Answer probability", "Block influence", "Alignment"):
            tab = phone.get_by_role("tab", name=name)
            assert tab.is_visible(), name
            tab.click()
            plot = phone.locator(f"#plot-{name.lower().replace(' ', '-')} .js-plotly-plot")
            plot.wait_for()
            overlap = plot.evaluate("""(gd) => {
                const bar = gd.querySelector('.modebar'), title = gd.querySelector('.gtitle');
                if (!bar || !title) return false;
                const a = bar.getBoundingClientRect(), b = title.getBoundingClientRect();
                return a.left < b.right && b.left < a.right && a.top < b.bottom && b.top < a.bottom; }""")
            assert not overlap, f"the Plotly toolbar covers the title of {name}"
            assert plot.locator(".modebar-btn[data-title*='png' i]").count() == 1  # the chart saves as PNG
        phone.get_by_role("tab", name="Similarity").click()
        phone.locator("#charts-head").scroll_into_view_if_needed()
        phone.screenshot(path=str(SHOTS / "phone_charts.png"), full_page=False)
        phone.evaluate("() => window.scrollTo(0, 0)")
        phone.screenshot(path=str(SHOTS / "phone.png"), full_page=False)
        for name in ("Search", "Evaluate", "Learn", "Explore"):
            tab = phone.get_by_role("tab", name=name, exact=True)
            assert tab.is_visible(), name
            tab.click()
    finally:
        phone.close()


def test_switching_to_gemma_and_back_through_the_lessons(page):
    """Both real models are offered; a Gemma lesson switches the page to Gemma (18 layers, its notice)."""
    from app.handlers import learn_examples

    gemma = next(ex for ex in learn_examples("gemma3-270m") if ex["kind"] == "skip")
    page.get_by_role("tab", name="Learn").click()
    page.wait_for_selector("text=On gemma3-270m")
    page.locator("#learn-gemma3_270m-0").click()
    page.wait_for_selector("#status:has-text('gemma3_text')")
    page.wait_for_selector("#status:has-text('Gemma Terms of Use')")
    page.wait_for_function(f"() => document.querySelector('{TEXT}').value === '{gemma['program']}'")
    page.wait_for_selector(f"#head-edited:has-text('{gemma['facts']['layers']} layer calls/token')")
    _shot(page, "gemma_lesson.png", full_page=False)
    page.get_by_role("tab", name="Learn").click()
    page.locator("#learn-0").click()
    page.wait_for_selector("#status:has-text('llama')")
