"""The <think> splitter, sampling defaults, history and output streams (no model needed)."""

from __future__ import annotations

import io
import itertools

import pytest
from rich.console import Console

from qwqq.archs import sampling_table
from qwqq.run.chat import Conversation, Printer, ThinkSplitter, consume, prompt_opens_think, split_stream
from qwqq.run.sampling import default_sampling, resolve_sampling


def run(pieces, in_think=False):
    turn = consume(split_stream(pieces, in_think))
    return turn.thinking, turn.answer


def all_splits(text: str, n_cuts: int = 2):
    """Every way of cutting `text` into n_cuts+1 pieces (empty pieces included)."""
    for cuts in itertools.combinations_with_replacement(range(len(text) + 1), n_cuts):
        bounds = [0, *cuts, len(text)]
        yield [text[a:b] for a, b in zip(bounds, bounds[1:])]


# ---------------------------------------------------------------- splitter
THINK_TEXT = "<think>\nLet me add: 2+2=4.\n</think>\n\nThe answer is **4**."


def test_think_block_in_one_piece():
    assert run([THINK_TEXT]) == ("Let me add: 2+2=4.", "The answer is **4**.")


def test_tags_split_anywhere_across_pieces():
    for pieces in all_splits(THINK_TEXT, 2):
        assert run(pieces) == ("Let me add: 2+2=4.", "The answer is **4**."), pieces


def test_char_by_char_stream_keeps_every_character():
    parts = list(split_stream(list(THINK_TEXT)))
    think = "".join(t for k, t in parts if k == "think")
    answer = "".join(t for k, t in parts if k == "answer")
    assert think == "Let me add: 2+2=4.\n"
    assert answer == "The answer is **4**."


def test_thinking_streams_before_the_close_tag_arrives():
    s = ThinkSplitter()
    assert s.feed("<think>step one, ") == [("think", "step one, ")]
    assert s.feed("step two</th") == [("think", "step two")]  # "</th" held back
    assert s.feed("ink>Four") == [("answer", "Four")]
    assert s.flush() == []


@pytest.mark.parametrize("pieces", [["Hello, 2+2 is 4."], list("Hello, 2+2 is 4."), ["Hel", "lo, 2+2", " is 4."]])
def test_no_think_block_is_all_answer(pieces):
    assert run(pieces) == ("", "Hello, 2+2 is 4.")


def test_answer_that_merely_mentions_tags_is_left_alone():
    text = "Use <think> and </think> tags."
    for pieces in all_splits(text, 1):
        assert run(pieces) == ("", text), pieces


def test_something_that_starts_like_the_tag_is_answer():
    assert run(["<th", "ought>x"]) == ("", "<thought>x")
    assert run(["<thi"]) == ("", "<thi")  # stream ended on a would-be tag


def test_second_think_tag_after_the_answer_is_text():
    assert run(["<think>a</think>b <think>c</think>"]) == ("a", "b <think>c</think>")


def test_prompt_already_opened_think():
    for pieces in all_splits("Hmm, 2 and 2.\n</think>\n\nFour.", 2):
        assert run(pieces, in_think=True) == ("Hmm, 2 and 2.", "Four."), pieces


def test_prompt_opened_think_and_model_repeats_the_tag():
    assert run(["<think>\n", "Hmm.</think>Four."], in_think=True) == ("Hmm.", "Four.")


def test_open_think_that_never_closes_is_all_thinking():
    assert run(["<think>I am still", " thinking about </th"]) == ("I am still thinking about </th", "")
    assert run(["still thinking"], in_think=True) == ("still thinking", "")


def test_close_without_open_goes_to_thinking_in_the_turn():
    # A template that opened <think> we did not detect: the history still gets only the answer.
    assert run(["reasoning...</think>\n\nFour."]) == ("reasoning...", "Four.")


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n", True),  # QwQ-32B
        ("<｜User｜>hi<｜Assistant｜><think>\n", True),  # newer R1-Distill
        ("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>", True),
        ("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", False),  # Qwen3: the model opens it
        ("<|im_start|>assistant\n<think>\n\n</think>\n\n", False),  # Qwen3 with thinking off
    ],
)
def test_prompt_opens_think(prompt, expected):
    assert prompt_opens_think(prompt) is expected


# ---------------------------------------------------------------- sampling
def values(s):
    return (s.temperature, s.top_p, s.top_k, s.min_p)


@pytest.mark.parametrize(
    "metadata, name, expected",
    [
        ({"general.architecture": "qwen2", "general.name": "QwQ 32B"}, "", (0.6, 0.95, 40, 0.0)),
        ({"general.architecture": "qwen2"}, "qwq-32b-Q4_K_M", (0.6, 0.95, 40, 0.0)),
        ({"general.architecture": "qwen3", "general.name": "Qwen3 8B"}, "", (0.6, 0.95, 20, 0.0)),
        ({"general.architecture": "qwen3moe"}, "", (0.6, 0.95, 20, 0.0)),
        ({"general.architecture": "qwen2", "general.name": "DeepSeek R1 Distill Qwen 7B"}, "", (0.6, 0.95, 0, 0.0)),
        ({"general.architecture": "qwen2"}, "DeepSeek-R1-Distill-Qwen-1.5B-Q4_K_M", (0.6, 0.95, 0, 0.0)),
        ({"general.architecture": "llama", "general.name": "Smollm2 135M"}, "", (0.7, 0.8, 20, 0.0)),
        ({}, "", (0.7, 0.8, 20, 0.0)),
    ],
)
def test_family_defaults(metadata, name, expected):
    s = default_sampling(metadata, name)
    assert values(s) == pytest.approx(expected)
    assert not s.greedy


def test_family_table_covers_the_documented_families():
    assert list(dict.fromkeys(s.label for s in sampling_table())) == [
        "QwQ", "DeepSeek-R1-Distill", "Qwen3-2507 Thinking", "Qwen3-2507 Instruct", "Qwen3 thinking",
        "Qwen3 non-thinking", "Qwen3.5+ thinking", "Qwen3.5+ non-thinking", "Qwen3-Next Thinking", "Qwen3-Next Instruct"]


THINK, INSTRUCT = (0.6, 0.95, 20, 0.0, 0.0), (0.7, 0.8, 20, 0.0, 0.0)
QWEN35_THINK, QWEN35_INSTRUCT = (1.0, 0.95, 20, 0.0, 1.5), (0.7, 0.8, 20, 0.0, 1.5)


@pytest.mark.parametrize(
    "metadata, name, thinking, expected, label",
    [  # the model cards' values, by family (GGUF general.architecture or config.json model_type) and thinking mode
        ({"general.architecture": "qwen3", "general.name": "Qwen3 8B"}, "", None, THINK, "Qwen3 thinking"),
        ({"general.architecture": "qwen3", "general.name": "Qwen3 8B"}, "", True, THINK, "Qwen3 thinking"),
        ({"general.architecture": "qwen3", "general.name": "Qwen3 8B"}, "", False, INSTRUCT, "Qwen3 non-thinking"),
        ({"model_type": "qwen3_moe"}, "Qwen3-30B-A3B", False, INSTRUCT, "Qwen3 non-thinking"),
        ({"general.architecture": "qwen3moe", "general.name": "Qwen3 30B A3B Thinking 2507"}, "", None, THINK,
         "Qwen3-2507 Thinking"),
        ({"general.architecture": "qwen3"}, "Qwen3-4B-Instruct-2507-Q4_K_M", None, INSTRUCT, "Qwen3-2507 Instruct"),
        ({"general.architecture": "qwen35", "general.name": "Qwen3.5 27B"}, "", None, QWEN35_THINK, "Qwen3.5+ thinking"),
        ({"general.architecture": "qwen35"}, "Qwen3.6-27B-Q4_K_M", True, QWEN35_THINK, "Qwen3.5+ thinking"),
        ({"general.architecture": "qwen35"}, "Qwen3.8-27B-Q4_K_M", False, QWEN35_INSTRUCT, "Qwen3.5+ non-thinking"),
        ({"general.architecture": "qwen35moe"}, "Qwen3.6-35B-A3B-Q4_K_M", None, QWEN35_THINK, "Qwen3.5+ thinking"),
        ({"model_type": "qwen3_5_moe", "general.name": "Qwen3.5-397B-A17B"}, "", False, QWEN35_INSTRUCT,
         "Qwen3.5+ non-thinking"),
        ({"model_type": "qwen3_5", "general.name": "mlx"}, "", None, QWEN35_THINK, "Qwen3.5+ thinking"),
        ({"general.architecture": "qwen3next"}, "Qwen3-Next-80B-A3B-Thinking-Q4_K_M", None, THINK, "Qwen3-Next Thinking"),
        ({"general.architecture": "qwen3next"}, "Qwen3-Next-80B-A3B-Instruct-Q4_K_M", None, INSTRUCT,
         "Qwen3-Next Instruct"),
        ({"model_type": "qwen3_next"}, "my-finetune", False, INSTRUCT, "Qwen3-Next Instruct"),
        ({"general.architecture": "qwen2", "general.name": "QwQ 32B"}, "", False, (0.6, 0.95, 40, 0.0, 0.0), "QwQ"),
        ({"general.architecture": "llama"}, "DeepSeek-R1-Distill-Llama-8B", None, (0.6, 0.95, 0, 0.0, 0.0),
         "DeepSeek-R1-Distill"),
        ({"general.architecture": "llama", "general.name": "Smollm2 135M"}, "", False, INSTRUCT, "generic"),
    ],
)
def test_family_and_thinking_mode_pick_the_published_values(metadata, name, thinking, expected, label):
    s = resolve_sampling(metadata, name, thinking=thinking)
    assert (*values(s), s.presence_penalty) == pytest.approx(expected)
    assert s.source == f"{label} defaults"
    assert s.describe().endswith(f"presence_penalty {expected[4]:g} ({label} defaults)")


def test_status_line_names_each_values_origin_and_what_a_backend_leaves_out():
    md = {"general.architecture": "qwen35", "general.sampling.temp": "0.8", "general.sampling.top_k": "30"}
    s = resolve_sampling(md, "", top_p=0.9)
    assert (*values(s), s.presence_penalty) == pytest.approx((0.8, 0.9, 30, 0.0, 1.5))
    assert s.source == ("min_p, presence_penalty: Qwen3.5+ thinking defaults; temp, top_k: model's generation config; "
                        "top_p: flags")
    assert s.describe(("presence_penalty",)).endswith("top_p: flags)")
    assert s.describe(()).endswith("top_p: flags); presence_penalty not applied by this backend")
    off = resolve_sampling(md, "", presence_penalty=0.0)
    assert off.presence_penalty == 0 and "not applied" not in off.describe(())
    folder = {"model_type": "qwen3_5", "temperature": "0.6", "presence_penalty": "0.5"}  # generation_config.json
    s = resolve_sampling(folder, "", thinking=False)
    assert (*values(s), s.presence_penalty) == pytest.approx((0.6, 0.8, 20, 0.0, 0.5))
    assert s.source == "top_p, top_k, min_p: Qwen3.5+ non-thinking defaults; temp, presence_penalty: model's generation config"


def test_model_generation_config_in_gguf_beats_family():
    # llama.cpp hands metadata values over as strings
    md = {"general.architecture": "qwen3", "general.sampling.temp": "0.8", "general.sampling.top_k": "50"}
    s = default_sampling(md)
    assert values(s) == pytest.approx((0.8, 0.95, 50, 0.0))
    assert isinstance(s.top_k, int)
    assert "generation config" in s.source


def test_hf_generation_config_dict_is_accepted():
    gen = {"model_type": "qwen2", "_name_or_path": "Qwen/QwQ-32B", "temperature": 0.5, "top_p": 0.9,
           "top_k": 30, "min_p": 0.01, "do_sample": False}
    s = default_sampling(gen)
    assert values(s) == pytest.approx((0.5, 0.9, 30, 0.01))
    assert not s.greedy  # do_sample=False never turns on greedy


def test_flags_override_and_greedy_only_on_request():
    md = {"general.name": "QwQ 32B"}
    s = resolve_sampling(md, "", temperature=1.0, top_k=5, seed=7)
    assert values(s) == pytest.approx((1.0, 0.95, 5, 0.0))
    assert s.seed == 7 and not s.greedy
    assert resolve_sampling(md, "", greedy=True).greedy


# ---------------------------------------------------------------- history
def test_history_keeps_only_the_answer():
    conv = Conversation(system="Be brief.")
    turn = consume(split_stream(["<think>secret chain ", "of thought</think>", "\n\nIt is 4."]))
    assert turn.thinking == "secret chain of thought"
    conv.add("What is 2+2?", turn)
    assert conv.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "It is 4."},
    ]
    assert "secret" not in str(conv.with_user("And 3+3?"))
    conv.reset()
    assert conv.messages == [{"role": "system", "content": "Be brief."}]


# ---------------------------------------------------------------- output streams
@pytest.mark.parametrize("hide", [False, True])
def test_answer_on_stdout_thinking_dimmed_on_stderr(capsys, hide):
    buf = io.StringIO()
    err = Console(file=buf, force_terminal=True, width=80)
    printer = Printer(err, hide_thinking=hide)
    turn = consume(split_stream(["<think>pondering</think>", "Four."]), printer)
    printer.end(turn, max_tokens=100)
    assert capsys.readouterr().out == "Four.\n"
    if hide:
        assert "pondering" not in buf.getvalue()
    else:
        assert "pondering" in buf.getvalue()
        assert "\x1b[2m" in buf.getvalue()  # dim
