"""`granular-po inspect`: summary, exit status, JSONL output and the HTML viewer (in headless Chromium)."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess

import pytest
from tiny import tiny_tokenizer

from granular_po.apps import inspect as inspect_cmd
from granular_po.data.encode import EncodeOptions, encode_record
from granular_po.data.masks import GranularOptions
from granular_po.data.schema import PreferenceRecord, Region, RegionFlag

ROWS = [
    {"prompt": "What is 7 * 8?", "correct_response": "The answer is 56.", "incorrect_response": "The answer is 54.",
     "masked_regions": [[14, 16, 1], [14, 16, -1]]},
    {"prompt": "Greet <b>me</b> & go", "correct_response": "Hello world!\nThis is 😀 café.",
     "incorrect_response": "Hello  world! This is <wrong>.", "masked_region": [22, 29, -1]},
    {"prompt": "No regions here", "correct_response": "Paris.", "incorrect_response": "Madrid."},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "byte_level_chat"
    tiny_tokenizer("byte_level", chat=True).save_pretrained(path)
    return path


def as_record(row, index):
    raw = row.get("masked_regions") or ([row["masked_region"]] if "masked_region" in row else [])
    regions = tuple(Region(s, e, RegionFlag(f)) for s, e, f in raw)
    return PreferenceRecord(row["prompt"], row["correct_response"], row["incorrect_response"], regions, index=index)


def test_json_output(tmp_path, tok_dir, capsys):
    data = write_jsonl(tmp_path / "data.jsonl", ROWS)
    out = tmp_path / "w.jsonl"
    assert inspect_cmd.main([str(data), "--tokenizer", str(tok_dir), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "read 3 records, kept 3, 3 regions" in printed and "response tokens carrying weight" in printed

    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["index"] for line in lines] == [0, 1, 2]
    tok = tiny_tokenizer("byte_level", chat=True)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    for i, line in enumerate(lines):
        assert set(line) == {"index", "chosen_ids", "chosen_tokens", "chosen_weights", "rejected_ids",
                             "rejected_tokens", "rejected_weights"}
        for side in ("chosen", "rejected"):  # one token string per id: each id decoded alone
            assert line[f"{side}_tokens"] == [tok.decode([t]) for t in line[f"{side}_ids"]]
        expected = encode_record(as_record(ROWS[i], i), tok, EncodeOptions(), GranularOptions(enabled=True))
        for key in ("chosen_ids", "chosen_weights", "rejected_ids", "rejected_weights"):
            assert line[key] == expected[key]
        assert line["chosen_ids"][-1] == line["rejected_ids"][-1] == im_end  # end token last, no prompt
        chosen = tok(ROWS[i]["correct_response"], add_special_tokens=False)["input_ids"]
        assert line["chosen_ids"][:-1] == chosen
    first = lines[0]
    assert [t for t, w in zip(first["chosen_tokens"][:-1], first["chosen_weights"]) if w] == ["56"]
    assert first["chosen_tokens"][-1] == "<|im_end|>" and "".join(first["chosen_tokens"][:-1]) == ROWS[0]["correct_response"]

    off = tmp_path / "off.jsonl"
    assert inspect_cmd.main([str(data), "--tokenizer", str(tok_dir), "--no-granular", "--json", str(off)]) == 0
    assert all(set(json.loads(x)["chosen_weights"]) == {1.0} for x in off.read_text().splitlines())


def test_a_region_reaching_no_token_is_refused_or_skipped_and_named(tmp_path, tok_dir, capsys):
    """Issue 11.8: a zero-length region left its pair "annotated", trained on its end token alone."""
    empty = {"prompt": "p", "correct_response": "It is 5.", "incorrect_response": "It is 6.",
             "masked_region": [6, 6, -1]}
    data = write_jsonl(tmp_path / "empty.jsonl", [*ROWS, empty])
    assert inspect_cmd.main([str(data), "--tokenizer", str(tok_dir)]) == 1
    err = capsys.readouterr().err
    assert "record 3, field 'masked_region': region [6, 6) of the incorrect response is empty" in err
    assert inspect_cmd.main([str(data), "--tokenizer", str(tok_dir), "--on-invalid", "skip"]) == 0
    out = capsys.readouterr().out
    assert "read 4 records, kept 3, 3 regions; skipped 1 (region_reaches_no_token=1: record 3)" in out
    assert "annotated pairs: 2 of 3" in out


def test_identical_responses_are_named(tmp_path, tok_dir, capsys):
    """Issue 13.9: a pair with identical responses is skipped, counted and named, also in error mode."""
    same = {"prompt": "p", "correct_response": "It is 5.", "incorrect_response": "It is 5."}
    data = write_jsonl(tmp_path / "same.jsonl", [*ROWS, same])
    assert inspect_cmd.main([str(data), "--tokenizer", str(tok_dir)]) == 0
    out = capsys.readouterr().out
    assert "read 4 records, kept 3, 3 regions; skipped 1 (identical_responses=1: record 3)" in out
    assert "record 3, field 'incorrect_response': is identical to the correct response" in out


def test_invalid_data_exit_status(tmp_path, tok_dir, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [*ROWS, {"prompt": "p", "correct_response": "ok",
                                                       "incorrect_response": "no", "masked_region": [0, 99, 1]}])
    assert inspect_cmd.main([str(bad), "--tokenizer", str(tok_dir)]) == 1
    err = capsys.readouterr().err
    assert "record 3" in err and "masked_region" in err and "Traceback" not in err

    assert inspect_cmd.main([str(bad), "--tokenizer", str(tok_dir), "--on-invalid", "skip"]) == 0
    assert "skipped 1 (region_out_of_range=1: record 3)" in capsys.readouterr().out
    assert inspect_cmd.main([str(tmp_path / "missing.jsonl"), "--tokenizer", str(tok_dir)]) == 1
    assert inspect_cmd.main([str(bad), "--tokenizer", str(tok_dir), "--prompt-format", "xml"]) == 2


def test_default_model_uses_models_loader(monkeypatch, tmp_path):
    import granular_po.models as models

    calls = []

    def fake(name, *args, **kwargs):
        calls.append(name)
        return tiny_tokenizer("byte_level", chat=True)

    monkeypatch.setattr(models, "load_tokenizer", fake, raising=False)
    data = write_jsonl(tmp_path / "data.jsonl", ROWS)
    assert inspect_cmd.main([str(data), "--tokenizer", "smollm2-135m"]) == 0
    assert calls == ["smollm2-135m"]


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


# Runs in the page (at the end of <body>): toggles the first prompt and reads the rendered colours.
PROBE = """<script>
(() => {
  const css = el => getComputedStyle(el);
  const card = document.getElementById("record-0"), details = card.querySelector("details.prompt-box");
  const out = {closed: !details.open, cardClosed: card.getBoundingClientRect().height,
               promptClosed: details.querySelector(".prompt").checkVisibility()};
  details.querySelector("summary").click();
  Object.assign(out, {openAfterClick: details.open, cardOpen: card.getBoundingClientRect().height,
                      promptOpen: details.querySelector(".prompt").checkVisibility()});
  out.card = css(card).backgroundColor;
  out.items = {};
  for (const [name, selector] of Object.entries({
      "weight 0": ".tok.w-off", "weight 0.1": '.tok.w-on[data-weight="0.1"]', "weight 1": '.tok.w-on:not(.end)[data-weight="1"]',
      "flag 1": ".tok.w-pos", "flag -1": ".tok.w-neg", "projected": ".tok.w-proj",
      "label": ".label", "prompt toggle": "summary", "card title": "h2 small"})) {
    const el = document.querySelector(selector);
    out.items[name] = el && {color: css(el).color, background: css(el).backgroundColor, title: el.title,
                             text: el.textContent};
  }
  out.legend = document.querySelector(".legend").textContent;
  document.body.insertAdjacentHTML("beforeend", "<pre id=probe>" + JSON.stringify(out) + "</pre>");
})();
</script>"""


def rgba(css: str) -> tuple[float, float, float, float]:
    """'rgb(1, 2, 3)' / 'rgba(1, 2, 3, 0.5)' -> (r, g, b, alpha), r g b in 0..255."""
    values = [float(v) for v in re.findall(r"[\d.]+", css)]
    return (*values[:3], values[3] if len(values) > 3 else 1.0)


def over(top: tuple, below: tuple) -> tuple[float, float, float]:
    """`top` (with its alpha) composited over an opaque `below`."""
    alpha = top[3]
    return tuple(alpha * t + (1 - alpha) * b for t, b in zip(top[:3], below[:3]))


def luminance(rgb) -> float:
    """WCAG 2 relative luminance."""
    def channel(c):
        c /= 255
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4
    r, g, b = (channel(c) for c in rgb[:3])
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast(a, b) -> float:
    """WCAG 2 contrast ratio of two opaque colours (1 to 21)."""
    high, low = sorted((luminance(a), luminance(b)), reverse=True)
    return (high + 0.05) / (low + 0.05)


def test_contrast_formula():
    assert contrast((0, 0, 0), (255, 255, 255)) == pytest.approx(21)
    assert contrast((0x88,) * 3, (255, 255, 255)) == pytest.approx(3.54, abs=0.01)  # the old weight-0 grey
    assert over((0, 0, 0, 0.5), (255, 255, 255)) == (127.5, 127.5, 127.5)


def test_html_viewer_renders_in_chromium(tmp_path, tok_dir):
    """The page in headless Chromium: prompt behind a toggle that a click opens, every text colour at
    least 4.5:1 against what it is drawn on (weight-0 text included), fractional weights shaded by weight
    with the value in the tooltip, the SFT projection explained in the legend; plus a screenshot."""
    data = write_jsonl(tmp_path / "data.jsonl", ROWS)
    page = tmp_path / "view.html"
    assert inspect_cmd.main([str(data), "--tokenizer", str(tok_dir), "--html", str(page),
                             "--outside-weight", "0.1"]) == 0
    text = page.read_text(encoding="utf-8")
    assert "&lt;b&gt;me&lt;/b&gt;" in text and "<b>me</b>" not in text and "<wrong>" not in text
    assert 'class="tok w-pos"' in text and 'class="tok w-neg"' in text and 'title="weight 1' in text

    chromium = _chromium()
    if chromium is None:
        pytest.skip("chromium not found (apt-get install -y chromium)")
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    probed = tmp_path / "probed.html"
    probed.write_text(text.replace("</body>", PROBE + "\n</body>"), encoding="utf-8")
    dom = subprocess.run([*flags, "--dump-dom", probed.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert '<span class="tok w-pos" data-weight="1" title="weight 1' in dom.stdout and ">56</span>" in dom.stdout
    assert 'class="tok w-neg"' in dom.stdout and 'id="record-2"' in dom.stdout
    probe = json.loads(html.unescape(re.search(r'<pre id="probe">(.*?)</pre>', dom.stdout, re.S).group(1)))

    # the prompt: closed at first, opened by a click
    assert probe["closed"] and not probe["promptClosed"]
    assert probe["openAfterClick"] and probe["promptOpen"] and probe["cardOpen"] > probe["cardClosed"]

    # every text readable on what it is drawn on: the token's own background over the card's
    card = rgba(probe["card"])
    for name, item in probe["items"].items():
        assert item is not None, f"no {name} element on the page"
        background = over(rgba(item["background"]), card)
        ratio = contrast(over(rgba(item["color"]), background), background)
        assert ratio >= 4.5, f"{name}: contrast {ratio:.2f}:1 ({item['color']} on {item['background']})"

    # fractional weights: lighter than weight 1, unlike weight 0, the value in the tooltip
    shade = {w: over(rgba(probe["items"][f"weight {w}"]["background"]), card) for w in ("0", "0.1", "1")}
    assert luminance(shade["0"]) > luminance(shade["0.1"]) > luminance(shade["1"])
    assert probe["items"]["weight 0.1"]["title"].startswith("weight 0.1 ")
    assert probe["items"]["weight 1"]["title"].startswith("weight 1 ")

    # classes this data does not produce, from the page's CSS: text between tokens, whitespace marks
    for selector in (".gap", ".ws"):
        colour = re.search(re.escape(selector) + r" \{[^}]*?color: #([0-9a-f]{6})", inspect_cmd._STYLE).group(1)
        rgb = tuple(int(colour[i:i + 2], 16) for i in (0, 2, 4))
        assert contrast(rgb, card) >= 4.5, f"{selector}: #{colour} on the card"

    legend = " ".join(probe["legend"].split())
    assert "chosen, SFT weights" in legend and "flagged -1" in legend and "projected onto the chosen" in legend
    assert "shaded by their weight" in legend

    png = tmp_path / "view.png"
    shot = subprocess.run([*flags, f"--screenshot={png}", "--window-size=1200,900", page.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert shot.returncode == 0, shot.stderr[-2000:]
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
