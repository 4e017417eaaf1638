"""The model's chat template, rendered in Jinja's immutable sandbox (as transformers and llama.cpp
do), so a template from a stranger's file cannot reach Python internals. Shared by every backend."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from qwqq.errors import QwqqError

# Used when a model carries no template at all.
CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


RESERVED = ("messages", "add_generation_prompt", "bos_token", "eos_token")  # what qwqq itself passes


class ChatTemplate:
    def __init__(self, source: str | None, bos: str, eos: str, path: Path):
        import jinja2

        self.bos, self.eos, self.path = bos, eos, path
        self.source = source or CHATML_TEMPLATE
        self.switches: dict = {}  # the template's own variables set by the user: enable_thinking, ...
        try:
            self._template = _environment().from_string(self.source)
        except jinja2.TemplateError as e:
            raise QwqqError(f"the model's chat template does not parse: {e}", path) from None

    def variables(self) -> set[str]:
        """The names the template reads from its context (its switches among them)."""
        from jinja2 import meta

        return meta.find_undeclared_variables(_environment().parse(self.source))

    def set_switches(self, switches: dict) -> None:
        """Template variables to render with (chat_template_kwargs): each must be one the template reads."""
        have = self.variables()
        unknown = [k for k in switches if k in RESERVED or k not in have]
        if unknown:
            offered = sorted(have - set(RESERVED) - {"tools", "documents", "raise_exception", "strftime_now"})
            raise QwqqError(f"this model's chat template has no {', '.join(unknown)} switch"
                            + (f" (it reads {', '.join(offered)})" if offered else ""), self.path)
        self.switches = dict(switches)

    def render(self, messages: list[dict]) -> str:
        import jinja2

        try:
            return self._template.render(messages=messages, add_generation_prompt=True, bos_token=self.bos,
                                         eos_token=self.eos, **self.switches)
        except jinja2.TemplateError as e:  # SecurityError (a sandbox escape attempt) is one of these
            raise QwqqError(f"the model's chat template failed: {e}", self.path) from None


def _environment():
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f))
    return env


def prompt_room(n_prompt: int, n_ctx: int) -> int:
    """Tokens left to generate; a prompt that fills the context is a clear error."""
    room = n_ctx - n_prompt
    if room < 1:
        raise QwqqError(f"the prompt is {n_prompt} tokens, the context only {n_ctx}: "
                        "raise --ctx, or /reset the conversation")
    return room


def with_bos(tokens: list[int], bos_id: int | None, wanted: bool) -> list[int]:
    """Prepend BOS when the model wants one and the rendered template did not already put it there."""
    if wanted and bos_id is not None and bos_id >= 0 and tokens[:1] != [bos_id]:
        return [bos_id, *tokens]
    return tokens


def parse_switches(args: list[str], think: bool | None, preserve_thinking: bool) -> dict:
    """--template-arg KEY=VALUE (VALUE as JSON where it parses: true, 3, "x"; else the text), --think /
    --no-think (enable_thinking) and --preserve-thinking, as the template's variables."""
    out: dict = {}
    for arg in args:
        key, eq, value = arg.partition("=")
        if not eq or not key.strip().isidentifier():
            raise QwqqError(f"--template-arg {arg!r}: expected NAME=VALUE, e.g. enable_thinking=false")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    if think is not None:
        out["enable_thinking"] = think
    if preserve_thinking:
        out["preserve_thinking"] = True
    return out
