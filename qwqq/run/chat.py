"""`qwqq run`: the <think> block splitter, the conversation, the printer and the chat loop (sampling
settings are qwqq.run.sampling's, the backends qwqq.run.backends').

Output streams: the answer goes to stdout (plain text, nothing else), the thinking
and every status line to stderr, so `qwqq run m.gguf -p "..." > answer.txt`
keeps only the answer while the terminal still shows the reasoning (dimmed).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from rich.console import Console

from qwqq.errors import QwqqError
from qwqq.run import experts
from qwqq.run.backends import LoadOptions, canonical_name, pick_backend
from qwqq.run.fitted import experts_line, fitted_settings, not_llama_cpp
from qwqq.run.sampling import Sampling, resolve_sampling


# ---------------------------------------------------------------- <think> splitting
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def prompt_opens_think(prompt: str) -> bool:
    """True when the chat template already opened the think block (QwQ, newer R1-Distill)."""
    return prompt.rstrip(" \n").endswith(THINK_OPEN)


def partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper start of `tag`."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ThinkSplitter:
    """Streaming parser: feed text pieces, get (kind, text) with kind "think" or "answer".

    - `<think>` is only recognised at the very start (after whitespace); the first
      `</think>` ends thinking; after that everything is answer, tags included.
    - Tags split across pieces are held back until they can be decided.
    - `in_think=True`: the prompt already opened the block, so output starts as
      thinking (a repeated `<think>` at the start is dropped).
    - Leading whitespace of the thinking and of the answer is dropped.
    """

    def __init__(self, in_think: bool = False):
        self.state = "start"  # start -> think -> answer, or start -> answer
        self.after_start = "think" if in_think else "answer"
        self.fresh = True  # at the start of a segment: drop leading whitespace
        self.buf = ""

    def feed(self, piece: str) -> list[tuple[str, str]]:
        self.buf += piece
        out: list[tuple[str, str]] = []
        while self.buf:
            if self.fresh:
                self.buf = self.buf.lstrip()
                if not self.buf:
                    break
                self.fresh = self.state == "start"
            if self.state == "start":
                if self.buf.startswith(THINK_OPEN):
                    self.buf = self.buf[len(THINK_OPEN):]
                    self.state, self.fresh = "think", True
                    continue
                if THINK_OPEN.startswith(self.buf):
                    break  # could still become <think>
                self.state, self.fresh = self.after_start, False
                continue
            if self.state == "think":
                at = self.buf.find(THINK_CLOSE)
                if at >= 0:
                    if self.buf[:at]:
                        out.append(("think", self.buf[:at]))
                    self.buf = self.buf[at + len(THINK_CLOSE):]
                    self.state, self.fresh = "answer", True
                    continue
                keep = partial_suffix(self.buf, THINK_CLOSE)
                text, self.buf = self.buf[: len(self.buf) - keep], self.buf[len(self.buf) - keep:]
                if text:
                    out.append(("think", text))
                break
            out.append(("answer", self.buf))
            self.buf = ""
        return out

    def flush(self) -> list[tuple[str, str]]:
        """Whatever is held back, at the end of the stream."""
        text, self.buf = self.buf, ""
        if not text or (self.fresh and not text.strip()):
            return []
        kind = self.after_start if self.state == "start" else self.state
        return [(kind, text)]


def split_stream(pieces: Iterable[str], in_think: bool = False) -> Iterator[tuple[str, str]]:
    splitter = ThinkSplitter(in_think)
    for piece in pieces:
        yield from splitter.feed(piece)
    yield from splitter.flush()


# ---------------------------------------------------------------- one exchange
@dataclass
class Turn:
    thinking: str = ""
    answer: str = ""
    finish_reason: str | None = None
    interrupted: bool = False


def consume(parts: Iterable[tuple[str, str]], sink: Callable[[str, str], None] | None = None) -> Turn:
    """Collect split output into a Turn, passing each part to `sink` as it comes."""
    turn = Turn()
    for kind, text in parts:
        if kind == "think":
            turn.thinking += text
        else:
            turn.answer += text
        if sink:
            sink(kind, text)
    before, closed, after = turn.answer.partition(THINK_CLOSE)
    if not turn.thinking and closed and THINK_OPEN not in before:  # reasoning whose <think> we never saw
        turn.thinking, turn.answer = before, after
    turn.thinking, turn.answer = turn.thinking.strip(), turn.answer.strip()
    return turn


@dataclass
class Conversation:
    """The messages sent to the model. Only answers go back in, never the thinking (unless the template
    is asked to preserve it)."""

    system: str | None = None
    messages: list[dict] = field(default_factory=list)

    def __post_init__(self):
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def with_user(self, text: str) -> list[dict]:
        return [*self.messages, {"role": "user", "content": text}]

    def add(self, user: str, turn: Turn, keep_thinking: bool = False) -> None:
        """`keep_thinking`: the thinking goes back too, as reasoning_content (a template's preserve_thinking)."""
        answer = {"role": "assistant", "content": turn.answer}
        if keep_thinking and turn.thinking:
            answer["reasoning_content"] = turn.thinking
        self.messages += [{"role": "user", "content": user}, answer]


# ---------------------------------------------------------------- rendering
class Printer:
    """Thinking dimmed on stderr, set apart; answer plain on stdout."""

    def __init__(self, err: Console, hide_thinking: bool):
        self.err, self.hide = err, hide_thinking
        self.last: str | None = None

    def __call__(self, kind: str, text: str) -> None:
        if kind == "think":
            if self.hide:
                if self.last != "think" and self.err.is_terminal:
                    self.err.print("thinking… (hidden)", style="dim italic")
                self.last = kind
                return
            if self.last != "think":
                self.err.print("thinking…", style="dim italic")
            self.err.print(text, style="dim", end="", markup=False, highlight=False, soft_wrap=True)
            self.err.file.flush()
        else:
            if self.last == "think" and not self.hide:
                self.err.print()
                self.err.rule(style="dim")
            sys.stdout.write(text)
            sys.stdout.flush()
        self.last = kind

    def end(self, turn: Turn, max_tokens: int) -> None:
        if self.last == "answer":
            sys.stdout.write("\n")
            sys.stdout.flush()
        elif self.last == "think" and not self.hide:
            self.err.print()
        if turn.interrupted:
            self.err.print("[stopped]", style="yellow", markup=False)
        elif turn.finish_reason == "length":
            what = "while thinking, no answer yet" if not turn.answer else "answer cut short"
            self.err.print(f"[reached --max-tokens {max_tokens}: {what}]", style="yellow", markup=False)
        self.last = None


# ---------------------------------------------------------------- run
@dataclass
class RunOptions:
    model: Path
    prompt: str | None = None
    backend: str = "auto"
    ctx: int | None = None  # None: fitted to the machine (or --profile)
    n_gpu_layers: int | None = None  # None: fitted; -1: all
    n_cpu_moe: int | None = None  # llama.cpp: experts of the first N layers in RAM; None: fitted with the GPU layers
    cpu_moe: bool = False  # every layer's experts in RAM
    tensor_split: list[float] | None = None  # llama.cpp: layers over several GPUs; None: fitted (qwqq.run.split)
    max_tokens: int = 2048
    seed: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    greedy: bool = False
    hide_thinking: bool = False
    system: str | None = None
    threads: int = 0
    debug: bool = False
    profile: str | None = None  # a hardware profile to fit ctx / KV / GPU layers for
    kv: str | None = None  # f16, q8_0, q4_0; None: fitted
    flash_attn: bool = True
    load_in_4bit: bool = False  # bitsandbytes NF4 on load (transformers backend, unquantized folders)
    template_switches: dict = field(default_factory=dict)  # the chat template's own variables (enable_thinking, ...)


class ChatSession:
    def __init__(self, model, sampling: Sampling, opts: RunOptions, err: Console):
        self.model, self.sampling, self.opts = model, sampling, opts
        self.conversation = Conversation(opts.system)
        self.printer = Printer(err, opts.hide_thinking)

    def ask(self, text: str, *, stop_on_interrupt: bool = True) -> Turn:
        """Stream one answer. Ctrl-C stops this answer (and it stays out of the history)."""
        messages = self.conversation.with_user(text)
        in_think = prompt_opens_think(self.model.render(messages))
        stream = self.model.stream_chat(messages, self.sampling, self.opts.max_tokens)
        parts: list[tuple[str, str]] = []
        try:
            for part in split_stream(stream, in_think):
                parts.append(part)
                self.printer(*part)
        except KeyboardInterrupt:
            turn = consume(parts)
            turn.interrupted = True
            self.printer.end(turn, self.opts.max_tokens)
            if not stop_on_interrupt:
                raise
            return turn
        finally:
            close = getattr(stream, "close", None)
            if close:
                close()
        turn = consume(parts)
        turn.finish_reason = self.model.finish_reason
        self.printer.end(turn, self.opts.max_tokens)
        self.conversation.add(text, turn, keep_thinking=bool(self.model.template.switches.get("preserve_thinking")))
        return turn


HELP = "/exit or Ctrl-D quits, /reset forgets the conversation, Ctrl-C stops an answer"


def interactive(session: ChatSession, err: Console) -> None:
    err.print(HELP, style="dim")
    while True:
        try:
            line = err.input("[bold green]>>> [/]")
        except EOFError:
            err.print()
            return
        except KeyboardInterrupt:
            err.print(f"\n{HELP}", style="dim")
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit", "/bye"):
            return
        if text == "/reset":
            session.conversation.reset()
            err.print("conversation cleared", style="dim")
            continue
        if text in ("/help", "/?"):
            err.print(HELP, style="dim")
            continue
        try:
            session.ask(text)
        except QwqqError as e:  # e.g. the conversation outgrew --ctx: say so and go on
            err.print(f"error: {e}", style="red", markup=False)


def run_chat(opts: RunOptions) -> None:
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    if opts.max_tokens < 1:
        raise QwqqError("--max-tokens must be at least 1")
    if opts.ctx is not None and opts.ctx < 0:
        raise QwqqError("--ctx must be positive (0: the model's own context length)")
    if opts.kv is not None and opts.kv not in ("f16", "q8_0", "q4_0"):
        raise QwqqError(f"unknown --kv {opts.kv!r}; choose f16, q8_0 or q4_0")
    if opts.kv not in (None, "f16") and not opts.flash_attn:
        raise QwqqError("a quantized KV cache needs flash attention in llama.cpp (drop --no-flash-attn)")
    experts.requested(opts.n_cpu_moe, opts.cpu_moe)
    if opts.load_in_4bit and canonical_name(opts.backend) not in ("auto", "transformers"):
        raise QwqqError(f"--load-in-4bit quantizes an unquantized folder with bitsandbytes as the transformers backend "
                        f"loads it; it does not apply to --backend {opts.backend}")
    backend = pick_backend("transformers" if opts.load_in_4bit else opts.backend, opts.model)
    not_llama_cpp(backend.name, opts)
    settings = fitted_settings(opts, backend.name, err)
    load_options = LoadOptions(threads=opts.threads, seed=opts.seed, debug=opts.debug,
                               load_in_4bit=opts.load_in_4bit, **settings)
    name = Path(opts.model).name
    with err.status(f"loading {name} with {backend.name}…"):  # shown on a terminal only
        model = backend.load(Path(opts.model), load_options)
    try:
        model.template.set_switches(opts.template_switches)
        think = opts.template_switches.get("enable_thinking")  # --think / --no-think: the family's values for it
        sampling = resolve_sampling(
            model.metadata, Path(opts.model).stem, temperature=opts.temperature, top_p=opts.top_p,
            top_k=opts.top_k, min_p=opts.min_p, presence_penalty=opts.presence_penalty, seed=opts.seed,
            greedy=opts.greedy, thinking=think if isinstance(think, bool) else None,
        )
        if err.is_terminal or opts.debug:
            applies = getattr(backend, "sampling_extras", ())  # a plugin that does not say applies none
            err.print(f"{name} ({backend.name}), sampling: {sampling.describe(applies)}", style="dim", markup=False)
            if load_options.n_cpu_moe:
                err.print(experts_line(load_options.n_cpu_moe, getattr(model, "overridden", None)), style="dim",
                          markup=False)
        session = ChatSession(model, sampling, opts, err)
        if opts.prompt is not None:
            session.ask(opts.prompt, stop_on_interrupt=False)
        else:
            interactive(session, err)
    finally:
        model.close()
