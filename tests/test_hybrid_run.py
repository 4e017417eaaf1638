"""`qwqq run` for the hybrid Qwen models: llama.cpp runs qwqq's GGUF, and the chat template's switches
(enable_thinking, preserve_thinking, any other variable) reach the template; a switch the template does
not read is one line."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from qwqq.errors import QwqqError
from qwqq.gguf.quantize import quantize_to_gguf, resolve_mixture
from qwqq.run.chat import Conversation, Turn
from qwqq.run.template import ChatTemplate, parse_switches
from tests.conftest import one_line_error, run_qwqq
from tests.fixtures_hybrid import tiny_hybrid_dir

# The shape of Qwen3.5's template: it opens <think> itself unless enable_thinking is false (then an empty
# block), and keeps earlier reasoning only with preserve_thinking.
QWEN35_LIKE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'assistant' and preserve_thinking is defined and preserve_thinking and m.reasoning_content %}"
    "<think>\n{{ m.reasoning_content }}\n</think>\n\n{% endif %}{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
    "{% else %}<think>\n{% endif %}{% endif %}"
)


def test_switches_reach_the_template_and_unknown_ones_are_refused():
    t = ChatTemplate(QWEN35_LIKE, "", "<|im_end|>", Path("x.gguf"))
    msgs = [{"role": "user", "content": "hi"}]
    assert t.render(msgs).endswith("<|im_start|>assistant\n<think>\n")  # thinks by default
    t.set_switches(parse_switches([], think=False, preserve_thinking=False))
    assert t.render(msgs).endswith("<think>\n\n</think>\n\n")
    with pytest.raises(QwqqError, match="has no nope switch .it reads enable_thinking, preserve_thinking"):
        t.set_switches({"nope": 1})
    with pytest.raises(QwqqError, match="has no messages switch"):
        t.set_switches({"messages": []})
    assert parse_switches(["a=true", "b=3", 'c="x"', "d=plain"], None, True) == {
        "a": True, "b": 3, "c": "x", "d": "plain", "preserve_thinking": True}
    with pytest.raises(QwqqError, match="expected NAME=VALUE"):
        parse_switches(["novalue"], None, False)


def test_preserve_thinking_keeps_reasoning_in_the_history():
    t = ChatTemplate(QWEN35_LIKE, "", "<|im_end|>", Path("x.gguf"))
    t.set_switches({"preserve_thinking": True})
    c = Conversation()
    c.add("2+2?", Turn(thinking="two and two", answer="4"), keep_thinking=True)
    assert "<think>\ntwo and two\n</think>" in t.render(c.with_user("and 3+3?"))
    plain = Conversation()
    plain.add("2+2?", Turn(thinking="two and two", answer="4"))
    assert "two and two" not in t.render(plain.with_user("and 3+3?"))


@pytest.fixture(scope="module")
def qwen35_gguf(tmp_path_factory) -> Path:
    """The tiny Qwen3.5 with a Qwen3.5-shaped template, as a Q8_0 GGUF."""
    d = tmp_path_factory.mktemp("qwen35")
    src = d / "src"
    shutil.copytree(tiny_hybrid_dir("qwen3_5"), src)
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg["chat_template"] = QWEN35_LIKE
    (src / "tokenizer_config.json").write_text(json.dumps(cfg))
    (src / "chat_template.jinja").unlink(missing_ok=True)
    return quantize_to_gguf(src, resolve_mixture(type_name="Q8_0"), out=d / "qwen35-Q8_0.gguf", progress=False,
                            threads=2).path


@pytest.mark.slow
def test_run_answers_with_thinking_switched_off_and_refuses_unknown_switches(qwen35_gguf):
    r = run_qwqq("run", qwen35_gguf, "-p", "Hello", "-n", "6", "--greedy", "--no-think", "--ctx", "256")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()  # answer tokens (a random model: any text), not swallowed as thinking
    r = run_qwqq("run", qwen35_gguf, "-p", "Hello", "-n", "6", "--greedy", "--ctx", "256")
    assert r.returncode == 0 and "thinking" in r.stderr  # the template opened <think>: shown apart
    r = run_qwqq("run", qwen35_gguf, "-p", "Hello", "--template-arg", "reasoning_effort=high", "--ctx", "256")
    one_line_error(r, "has no reasoning_effort switch")


@pytest.mark.slow
def test_presence_penalty_reaches_llama_cpp_and_the_status_line_says_where_values_came_from(qwen35_gguf):
    """llama.cpp subtracts the presence penalty from the logit of every token in the recent output: a negative
    one with top_k 1 makes the first answer token win ever after (a random model otherwise repeats none), so
    the flag's value reached llama.cpp's sampler. Under --no-think the rest are Qwen3.5's non-thinking values."""
    r = run_qwqq("--debug", "run", qwen35_gguf, "-p", "Hello", "-n", "8", "--top-k", "1", "--presence-penalty", "-50",
                 "--no-think", "--ctx", "256")
    assert r.returncode == 0, r.stderr
    assert re.fullmatch(r"\s*(\S+?)(?:\s*\1){5,}\s*", r.stdout), r.stdout  # one piece, over and over
    assert ("sampling: temp 0.7, top_p 0.8, top_k 1, min_p 0, presence_penalty -50 (temp, top_p, min_p: "
            "Qwen3.5+ non-thinking defaults; top_k, presence_penalty: flags)") in r.stderr
