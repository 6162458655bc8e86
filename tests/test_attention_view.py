"""Attention view: prompt handling, the page's embedded weights, the heatmap grid, and the page driven
in a real headless Chromium (DevTools protocol over --remote-debugging-pipe, no extra packages).

CI needs Chromium: `apt-get install -y chromium` (Debian); the browser tests skip without it.
"""

import base64
import colorsys
import fcntl
import io
import json
import os
import queue
import re
import shutil
import signal
import threading

import numpy as np
import pytest

from gpt import attention_page, attention_view, heads
from gpt.config import base_config
from gpt.errors import GPTError
from gpt.tokenizer import get_tokenizer

PROMPT = "The critique of pure reason asks what we can know without experience."


def _config(init, workdir_prompt=PROMPT):
  c = base_config()
  c.init = str(init)
  c.mode = "attention"
  c.attention.prompt = workdir_prompt
  return c


def _weights_from_html(page: str) -> tuple[dict, np.ndarray]:
  data = json.loads(re.search(r'id="attention-data">(.*?)</script>', page, re.S).group(1))
  w = np.frombuffer(base64.b64decode(data["weights"]), "<f4")
  return data, w.reshape(data["n_layer"], data["n_head"], data["n_tok"], data["n_tok"])


def test_prompt_ids_checks_and_prepends_eot(tmp_path):
  tok = get_tokenizer(None)
  att = base_config().attention
  att.prompt = "Hello world"
  assert attention_view.prompt_ids(att, tok, 64) == tok.encode("Hello world")
  att.prepend_eot = True
  assert attention_view.prompt_ids(att, tok, 64) == [tok.eot_id] + tok.encode("Hello world")
  att.prompt, att.prepend_eot = "", False
  with pytest.raises(GPTError, match="prompt is empty"):
    attention_view.prompt_ids(att, tok, 64)
  att.prompt = "word" + " word" * 39
  with pytest.raises(GPTError, match="40 tokens, more than 16"):
    attention_view.prompt_ids(att, tok, 16)
  att.prompt_file = str(tmp_path / "missing.txt")
  with pytest.raises(GPTError, match="prompt_file"):
    attention_view.prompt_ids(att, tok, 64)
  (tmp_path / "p.txt").write_text("From a file\n", encoding="utf-8")
  att.prompt_file = str(tmp_path / "p.txt")
  assert attention_view.prompt_ids(att, tok, 64) == tok.encode("From a file")


def test_parse_layers():
  assert attention_view.parse_layers("", 3) == [0, 1, 2]
  assert attention_view.parse_layers("2, 0", 3) == [2, 0]
  for bad in ("3", "x", ","):
    with pytest.raises(GPTError, match="png_layers"):
      attention_view.parse_layers(bad, 3)


def test_token_labels_keep_split_characters_visible():
  tok = get_tokenizer(None)
  ids = tok.encode(" naïve 🦜")  # the parrot's 4 bytes are split over 3 tokens
  assert attention_view.token_labels(tok, ids) == [" naïve", " \ufffd", "\ufffd", "\ufffd"]


def test_page_embeds_exact_weights_and_needs_no_network():
  rng = np.random.default_rng(0)
  probs = rng.random((3, 2, 4, 4), dtype=np.float32)
  tokens = ["a", "</script><b>", " c", "d"]
  page = attention_page.render_html(tokens, probs, title="t <x>", source="s")
  data, w = _weights_from_html(page)
  np.testing.assert_array_equal(w, probs)
  assert data["tokens"] == tokens and "<title>t &lt;x&gt;</title>" in page
  assert not re.search(r"<(link|img|iframe)|\b(src|href)\s*=", page)  # nothing fetched
  with pytest.raises(ValueError, match="do not match 3 tokens"):
    attention_page.render_html(tokens[:3], probs, title="", source="")


def test_heatmap_grid_draws_each_layer_and_head():
  pytest.importorskip("matplotlib", reason="heads.png needs matplotlib (pip install -e '.[plots]')")
  probs = np.random.default_rng(1).random((3, 2, 5, 5), dtype=np.float32)
  fig = attention_view.heatmap_grid(probs, list("abcde"), [2, 0])
  assert len(fig.axes) == 4
  for r, layer in enumerate([2, 0]):
    for h in range(2):
      np.testing.assert_array_equal(fig.axes[r * 2 + h].images[0].get_array(), probs[layer, h])


@pytest.fixture(scope="module")
def written(tmp_path_factory):
  """attention mode run on the tiny OpenAI fixture: (output folder, model weights for the prompt)."""
  from conftest import require_shared
  from gpt.weights import load_model

  fixture = require_shared("fixtures", "openai-gpt2-tiny")
  config = _config(fixture)
  workdir = tmp_path_factory.mktemp("attn")
  attention_view.run(config, str(workdir))
  loaded = load_model(config)
  ids = loaded.tokenizer.encode(PROMPT)
  probs = np.asarray(heads.attention_probs(loaded.model, np.asarray([ids], np.int32))[:, 0])
  return workdir / "attention", probs, ids


def test_run_writes_page_png_and_raw_weights(written):
  out, probs, ids = written
  saved = np.load(out / "attention.npz")
  np.testing.assert_array_equal(saved["probs"], probs)
  np.testing.assert_array_equal(saved["ids"], ids)
  data, w = _weights_from_html((out / "attention.html").read_text(encoding="utf-8"))
  np.testing.assert_array_equal(w, probs)
  assert "".join(data["tokens"]) == PROMPT and w.shape == (2, 2, len(ids), len(ids))
  pytest.importorskip("matplotlib", reason="heads.png needs matplotlib (pip install -e '.[plots]')")
  assert (out / "heads.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_needs_workdir(openai_fixture):
  with pytest.raises(GPTError, match="--workdir"):
    attention_view.run(_config(openai_fixture), None)


# ---------------------------------------------------------------- a real browser


def _chromium() -> str:
  for name in (os.environ.get("GPT_CHROMIUM", ""), "chromium", "chromium-browser", "google-chrome"):
    if name and shutil.which(name):
      return shutil.which(name)
  pytest.skip("Chromium not found (Debian: apt-get install -y chromium; or set GPT_CHROMIUM)")


def _high_fd(fd: int) -> int:
  high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
  os.close(fd)
  return high


class Browser:
  """Headless Chromium driven through the DevTools protocol on fds 3/4 (--remote-debugging-pipe)."""

  def __init__(self, exe: str, profile: str):
    to_chrome, self._out = os.pipe()
    self._in, from_chrome = os.pipe()
    # Above fd 4, so that the dup2s below cannot overwrite each other's source.
    to_chrome, from_chrome = (_high_fd(fd) for fd in (to_chrome, from_chrome))
    args = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--remote-debugging-pipe", f"--user-data-dir={profile}", "about:blank"]
    # posix_spawn, not fork: JAX's threads live in this process. The pipe ends become the
    # child's fds 3 (commands in) and 4 (replies out), as --remote-debugging-pipe expects.
    self.pid = os.posix_spawn(exe, args, os.environ, file_actions=[
        (os.POSIX_SPAWN_DUP2, to_chrome, 3), (os.POSIX_SPAWN_DUP2, from_chrome, 4),
        (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
        (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0)])
    os.close(to_chrome)
    os.close(from_chrome)
    self._replies: queue.Queue = queue.Queue()
    self._next_id = 0
    threading.Thread(target=self._read, daemon=True).start()
    target = self.call("Target.createTarget", url="about:blank")["targetId"]
    self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

  def _read(self) -> None:
    buf = b""
    while chunk := os.read(self._in, 1 << 16):
      buf += chunk
      *messages, buf = buf.split(b"\0")
      for m in messages:
        self._replies.put(json.loads(m))

  def call(self, method: str, session: str | None = None, **params):
    self._next_id += 1
    msg = {"id": self._next_id, "method": method, "params": params}
    if session:
      msg["sessionId"] = session
    os.write(self._out, json.dumps(msg).encode() + b"\0")
    while True:
      reply = self._replies.get(timeout=60)
      if reply.get("id") == self._next_id:
        if "error" in reply:
          raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

  def page(self, method: str, **params):
    return self.call(method, self.session, **params)

  def js(self, expression: str):
    result = self.page("Runtime.evaluate", expression=expression, returnByValue=True)
    if "exceptionDetails" in result:
      raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
    return result["result"].get("value")

  def open(self, url: str) -> None:
    self.page("Emulation.setDeviceMetricsOverride", width=800, height=600, deviceScaleFactor=1,
              mobile=False)
    self.page("Page.navigate", url=url)
    for _ in range(200):
      if self.js("document.body && document.body.dataset.ready === '1'"):
        return
      threading.Event().wait(0.05)
    raise TimeoutError(f"{url} did not become ready")

  def center(self, selector: str) -> tuple[float, float]:
    r = self.js(f"(r => [r.x + r.width / 2, r.y + r.height / 2])"
                f"(document.querySelector({json.dumps(selector)}).getBoundingClientRect())")
    return r[0], r[1]

  def mouse(self, kind: str, selector: str) -> None:
    x, y = self.center(selector)
    if kind == "click":
      for t in ("mousePressed", "mouseReleased"):
        self.page("Input.dispatchMouseEvent", type=t, x=x, y=y, button="left", clickCount=1)
    else:
      self.page("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)

  def screenshot(self) -> np.ndarray:
    from PIL import Image

    png = base64.b64decode(self.page("Page.captureScreenshot", format="png")["data"])
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))

  def close(self) -> None:
    os.kill(self.pid, signal.SIGTERM)
    os.waitpid(self.pid, 0)
    for fd in (self._out, self._in):
      os.close(fd)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
  b = Browser(_chromium(), str(tmp_path_factory.mktemp("chromium-profile")))
  yield b
  b.close()


EDGES = "[...document.querySelectorAll('#edges line')]"
VISIBLE = (f"{EDGES}.filter(e => getComputedStyle(e).display !== 'none')"
           ".map(e => [+e.dataset.head, +e.dataset.q, +e.dataset.k, +e.getAttribute('stroke-opacity')])")


def _expected_edges(probs, layer, heads, q=None):
  return sorted((h, i, j, float(probs[layer, h, i, j])) for h in heads for i in range(probs.shape[2])
                for j in range(i + 1) if probs[layer, h, i, j] >= attention_page.MIN_WEIGHT and
                (q is None or i == q))


def _line_hues(img: np.ndarray, box) -> np.ndarray:
  """Hues (degrees) of the coloured pixels inside box=(x0, y0, x1, y1) of a screenshot."""
  x0, y0, x1, y1 = (int(v) for v in box)
  px = img[y0:y1, x0:x1].reshape(-1, 3).astype(float) / 255
  px = px[px.max(1) - px.min(1) > 0.05]
  return np.array([colorsys.rgb_to_hsv(*p)[0] * 360 for p in px])


@pytest.mark.slow
def test_page_in_chromium_layer_heads_hover_and_weights(written, browser):
  pytest.importorskip("PIL", reason="screenshots are read with Pillow, which the [plots] extra "
                      "(matplotlib) brings: pip install -e '.[plots]'")
  out, probs, ids = written
  browser.open((out / "attention.html").as_uri())
  n_layer, n_head, n_tok, _ = probs.shape
  # The weights the page's JavaScript decoded equal the model's, exactly (float32).
  page_w = np.array(browser.js(
      f"(() => {{ const v = window.attentionView, out = []; for (let l = 0; l < {n_layer}; l++) "
      f"for (let h = 0; h < {n_head}; h++) for (let q = 0; q < {n_tok}; q++) for (let k = 0; k < "
      f"{n_tok}; k++) out.push(v.weight(l, h, q, k)); return out; }})()"), np.float32)
  np.testing.assert_array_equal(page_w.reshape(probs.shape), probs)
  assert browser.js("document.querySelectorAll('#layer option').length") == n_layer
  np.testing.assert_allclose(sorted(browser.js(VISIBLE)), _expected_edges(probs, 0, [0, 1]), rtol=1e-6)

  # Select layer 1, then untick head 0 with a real mouse click: only head 1's lines of layer 1.
  browser.js("(s => { s.value = '1'; s.dispatchEvent(new Event('change')); })"
             "(document.getElementById('layer'))")
  browser.mouse("click", "input[data-head='0']")
  assert browser.js("document.querySelector(\"input[data-head='0']\").checked") is False
  np.testing.assert_allclose(sorted(browser.js(VISIBLE)), _expected_edges(probs, 1, [1]), rtol=1e-6)

  # Pixels between the token columns are drawn in head 1's hue (180 degrees for 2 heads), not head 0's.
  svg = browser.js("(r => [r.x, r.y, r.right, r.bottom])(document.getElementById('view').getBoundingClientRect())")
  gap = (svg[0] + 160, svg[1], svg[0] + 360, min(svg[3], 600))
  hues = _line_hues(browser.screenshot(), gap)
  assert len(hues) > 200 and np.all(np.abs(hues - 180) < 25), hues
  browser.mouse("click", "input[data-head='0']")
  browser.mouse("click", "input[data-head='1']")
  hues = _line_hues(browser.screenshot(), gap)
  assert len(hues) > 200 and np.all(np.minimum(hues, 360 - hues) < 25)

  # Hovering query token 5 keeps only its lines and highlights the keys it attends to.
  browser.mouse("move", "#tok-q5")
  np.testing.assert_allclose(sorted(browser.js(VISIBLE)), _expected_edges(probs, 1, [0], q=5), rtol=1e-6)
  active = browser.js("[...document.querySelectorAll('text.active')].map(t => t.id)")
  assert "tok-q5" in active and {f"tok-k{j}" for j in range(6)} <= set(active)
  browser.mouse("move", "h1")
  assert len(browser.js(VISIBLE)) == len(_expected_edges(probs, 1, [0]))


@pytest.mark.slow
def test_page_url_hash_sets_the_view(written, browser):
  out, probs, _ = written
  browser.open((out / "attention.html").as_uri() + "#layer=1&heads=1&hover=k2")
  assert browser.js("document.getElementById('layer').value") == "1"
  expected = [e for e in _expected_edges(probs, 1, [1]) if e[2] == 2]
  np.testing.assert_allclose(sorted(browser.js(VISIBLE)), expected, rtol=1e-6)
