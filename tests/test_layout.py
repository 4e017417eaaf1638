"""The shape of the package, held: no import cycles among qwqq's modules (imports inside functions count),
no two sub-packages that import each other, no module over 400 lines, and no architecture named outside
qwqq/archs/ (the one place a family's knowledge lives)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "qwqq"
MAX_LINES = 400
# Class names, model_types and GGUF arch names of the families qwqq knows, and mlx-lm's expert layout.
# ("llama" alone is not here: it also names llama.cpp, the runtime.)
ARCH_WORDS = re.compile(r"\b(Qwen2ForCausalLM|Qwen3ForCausalLM|Qwen3MoeForCausalLM|LlamaForCausalLM|"
                        r"DeepseekV3ForCausalLM|Qwen3NextForCausalLM|Qwen3_5\w*For\w+|switch_mlp|Qwen4Exp\w*For\w+|"
                        r"DeepseekV32ForCausalLM)\b")
ARCH_STRINGS = re.compile(r"""["'](qwen2|qwen3|qwen3_moe|qwen3moe|qwen3_next|qwen3next|qwen3_5|qwen3_5_moe|qwen35|"""
                          r"""qwen35moe|deepseek_v3|deepseek2|qwen4_exp|qwen4exp|deepseek_v32|deepseek32)["']""")


def modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        name = ".".join(p.relative_to(PKG.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """qwqq modules `name` imports anywhere in its body (a package's import of its own submodule excluded)."""
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in found if m in known and m != name and not name.startswith(m + ".")}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports(m, p, set(mods)) for m, p in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_sub_packages_depend_one_way():
    def pkg(m: str) -> str:
        return ".".join(m.split(".")[:2])

    edges = {(pkg(a), pkg(b)) for a, bs in graph().items() for b in bs if pkg(a) != pkg(b)}
    assert sorted((a, b) for a, b in edges if (b, a) in edges and a < b) == []


def test_no_module_over_400_lines():
    long = {str(p.relative_to(PKG.parent)): n for p in PKG.rglob("*.py")
            if (n := p.read_text(encoding="utf-8").count("\n")) > MAX_LINES}
    assert long == {}


def test_architectures_named_only_in_archs():
    hits = []
    for p in PKG.rglob("*.py"):
        if p.is_relative_to(PKG / "archs") or re.search(r"vocab|tokeniz", p.name):  # pre-tokenizer names are tokenizer data
            continue
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if ARCH_WORDS.search(line) or (ARCH_STRINGS.search(line) and not re.search(r"pre_?tok|tokenizer", line)):
                hits.append(f"{p.relative_to(PKG.parent)}:{i}: {line.strip()}")
    assert hits == []


def test_the_cycle_check_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
