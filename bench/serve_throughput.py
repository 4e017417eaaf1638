"""`qwqq serve` against llama-server and llama-cpp-python's own server: aggregate decode throughput and time
to first token at 1, 4, 8 and 16 concurrent streams, on one GGUF, same threads, same context per stream.

Servers (each started fresh for every concurrency level N, on a free loopback port):

- ``qwqq serve MODEL --parallel N --no-kv-unified --ctx N*C --kv f16 --threads T``;
- ``llama-server -m MODEL -np N -c N*C -t T -tb T -fa on --no-kv-unified -cram 0 --no-webui`` built from the
  vendored llama.cpp of the llama-cpp-python sdist (``tests.fixtures.llama_cpp_server``: static, CPU-only, no
  AMX): C cells per slot, and no prompt cache in RAM beyond the slots (qwqq has none);
- ``python -m llama_cpp.server --n_ctx C --n_threads T --n_threads_batch T --flash_attn true
  --interrupt_requests false`` (one sequence: it answers one request at a time, the others wait on its lock;
  by default a new request cuts the running stream short).

Clients: the official ``openai`` client, one per stream, N threads released together by a barrier, each
streaming one ``/v1/completions`` request (a counting prompt, distinct per stream and per round, so no
server reuses another request's KV; ``temperature: 0``, ``seed: 0``, ``max_tokens`` M; llama-server gets
``ignore_eos: true``; qwqq has no such field, and the prompt makes the greedy continuation run to M
tokens; the tokens are counted from ``usage``, or from the streamed chunks where a server sends none).

Definitions:

- **TTFT**: from a stream's request start to its first non-empty text delta;
- **aggregate decode tok/s** = total completion tokens of the N streams / (last stream's end - first
  stream's start): prompt evaluation and queueing included, as a client sees it;
- **per-stream decode tok/s** = (tokens - 1) / (last text delta - first text delta) of one stream: the
  decode rate alone, median over the streams;
- **raw llama-cpp-python**: ``Llama.generate`` in a process of its own (same model, threads, context, flash
  attention, greedy), (M - 1) / (time of the M-th token - time of the 1st); the best of 3.

Peak RSS of a server: ``VmHWM`` of its process just before it is stopped.
Results go to ``bench/results/serve_throughput.json`` and the "Throughput" section of ``docs/serve.md``.

Run from the repository root::

    .venv/bin/python -m bench.serve_throughput [--models smollm2,qwen25] [--streams 1,4,8,16] [--max-tokens 64]
        [--threads 2] [--ctx-per-stream 512] [--rounds 2] [--servers qwqq,llama-server,llama-cpp-python]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from bench.common import (BENCH_CACHE, DOCS, MB, REPO, RESULTS_DIR, fmt_mb, machine, prog, qwqq_command, qwqq_git,
                          qwqq_tree, replace_section, version)

RESULTS_JSON = RESULTS_DIR / "serve_throughput.json"
DOC = DOCS / "serve.md"
HEADING = "## Throughput"
OUT_DIR = BENCH_CACHE / "serve"
GGUF = {"smollm2": ("SmolLM2-135M-Instruct Q4_1", "smollm2_gguf"),
        "qwen25": ("Qwen2.5-Coder-1.5B-Instruct Q4_K_M", "qwen25_coder_gguf")}
SERVERS = ("qwqq", "llama-server", "llama-cpp-python")
TARGET_AGG = 0.9  # qwqq / llama-server aggregate at 8 streams
TARGET_ONE = 0.95  # qwqq one stream / raw llama-cpp-python decode

RAW_CHILD = """\
import json, sys, time
from llama_cpp import Llama
path, threads, ctx, n, prompt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=ctx, n_batch=512, flash_attn=True,
            seed=0, verbose=False)
tokens = llm.tokenize(prompt.encode())
best = None
for rep in range(3):
    times = []
    for tok in llm.generate(tokens, temp=0.0, top_k=1, reset=True):
        times.append(time.perf_counter())
        if len(times) >= n:
            break
    rate = (len(times) - 1) / (times[-1] - times[0])
    best = rate if best is None else max(best, rate)
print(json.dumps({"decode_tok_s": best, "prompt_tokens": len(tokens)}))
"""


def prompt_for(round_: int, stream: int) -> str:
    """A prompt whose greedy continuation goes on for far more than max_tokens, distinct from its first token."""
    start = 100 * (round_ * 64 + stream) + 1
    return f"{round_}-{stream}. Count up by one: " + ", ".join(str(start + i) for i in range(12)) + ","


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vm_hwm(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Server:
    def __init__(self, kind: str, model: Path, n: int, args, llama_server: Path | None):
        self.kind, self.port = kind, free_port()
        c, t = args.ctx_per_stream, str(args.threads)
        if kind == "qwqq":
            cmd = [*qwqq_command(), "serve", str(model), "--port", str(self.port), "--parallel", str(n),
                   "--no-kv-unified", "--ctx", str(c * n), "--kv", "f16", "--threads", t]
            self.health = "/health"
        elif kind == "llama-server":
            cmd = [str(llama_server), "-m", str(model), "--port", str(self.port), "-np", str(n), "-c", str(c * n),
                   "-t", t, "-tb", t, "-fa", "on", "--no-kv-unified", "-cram", "0", "--no-webui"]
            self.health = "/health"
        else:
            cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--port", str(self.port),
                   "--n_ctx", str(c), "--n_threads", t, "--n_threads_batch", t, "--flash_attn", "true",
                   "--interrupt_requests", "false"]
            self.health = "/v1/models"
        self.cmd = cmd
        self.log = OUT_DIR / f"{kind}-{model.stem}-{n}.log"
        self.f = open(self.log, "wb")
        self.p = subprocess.Popen(cmd, stdout=self.f, stderr=subprocess.STDOUT, cwd=REPO)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.p.poll() is not None:
                raise RuntimeError(f"{kind} exited {self.p.returncode}: {self.log.read_text(errors='replace')[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{self.health}", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{kind} not ready in 180 s")

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stop(self) -> int:
        peak = vm_hwm(self.p.pid)
        self.p.send_signal(signal.SIGTERM)
        try:
            self.p.wait(30)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
        self.f.close()
        return peak


def one_stream(client, kind: str, model_id: str, prompt: str, max_tokens: int, barrier, out: dict) -> None:
    extra = {"ignore_eos": True} if kind == "llama-server" else {}
    barrier.wait()
    t0 = time.perf_counter()
    deltas, usage, chunks = [], None, 0
    stream = client.completions.create(model=model_id, prompt=prompt, max_tokens=max_tokens, temperature=0, seed=0,
                                       stream=True, stream_options={"include_usage": True}, extra_body=extra)
    for ev in stream:
        if ev.usage is not None and ev.usage.completion_tokens:
            usage = ev.usage.completion_tokens
        if ev.choices and ev.choices[0].text:
            deltas.append(time.perf_counter())
            chunks += 1
    t1 = time.perf_counter()
    tokens = usage if usage is not None else chunks
    out.update(start=t0, end=t1, ttft=deltas[0] - t0 if deltas else None, tokens=tokens, counted="usage"
               if usage is not None else "chunks",
               decode=(tokens - 1) / (deltas[-1] - deltas[0]) if len(deltas) > 1 and deltas[-1] > deltas[0] else None)


def run_level(server: Server, model_id: str, n: int, rnd: int, max_tokens: int) -> dict:
    from openai import OpenAI

    clients = [OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=600) for _ in range(n)]
    barrier = threading.Barrier(n)
    outs = [{} for _ in range(n)]
    threads = [threading.Thread(target=one_stream, args=(clients[i], server.kind, model_id, prompt_for(rnd, i),
                                                         max_tokens, barrier, outs[i])) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for c in clients:
        c.close()
    if any("tokens" not in o for o in outs):
        raise RuntimeError(f"{server.kind}: a stream failed; see {server.log}")
    wall = max(o["end"] for o in outs) - min(o["start"] for o in outs)
    total = sum(o["tokens"] for o in outs)
    ttfts = sorted(o["ttft"] for o in outs if o["ttft"] is not None)
    decodes = [o["decode"] for o in outs if o["decode"]]
    return {"streams": n, "wall_s": wall, "tokens": total, "tokens_per_stream": sorted({o["tokens"] for o in outs}),
            "counted": sorted({o["counted"] for o in outs}), "agg_tok_s": total / wall,
            "ttft_median_s": statistics.median(ttfts), "ttft_max_s": ttfts[-1],
            "per_stream_decode_tok_s": statistics.median(decodes) if decodes else None}


def bench_model(name: str, model: Path, args, llama_server: Path | None) -> dict:
    display = GGUF[name][0]
    res = {"display": display, "file": model.name, "bytes": model.stat().st_size, "servers": {}}
    print(f"[{name}] raw llama-cpp-python ...", flush=True)
    r = subprocess.run([sys.executable, "-c", RAW_CHILD, str(model), str(args.threads), str(args.ctx_per_stream),
                        str(args.max_tokens), prompt_for(99, 0)], capture_output=True, text=True, cwd=REPO)
    if r.returncode:
        raise RuntimeError(r.stderr[-2000:])
    res["raw"] = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"  raw decode {res['raw']['decode_tok_s']:.1f} tok/s", flush=True)
    for kind in args.servers:
        levels = []
        for n in args.streams:
            print(f"[{name}] {kind} N={n} ...", flush=True)
            s = Server(kind, model, n, args, llama_server)
            try:
                model_id = json.load(urllib.request.urlopen(f"{s.base_url}/models", timeout=10))["data"][0]["id"]
                run_level(s, model_id, 1, 90, 8)  # warm-up: one short request
                rounds = [run_level(s, model_id, n, k, args.max_tokens) for k in range(args.rounds)]
            finally:
                peak = s.stop()
            best = max(rounds, key=lambda x: x["agg_tok_s"])
            best["rounds_agg_tok_s"] = [x["agg_tok_s"] for x in rounds]
            best["peak_rss"] = peak
            best["command"] = shlex.join(s.cmd).replace(str(REPO) + "/", "")
            levels.append(best)
            print(f"  agg {best['agg_tok_s']:.1f} tok/s (rounds {', '.join(f'{x:.1f}' for x in best['rounds_agg_tok_s'])}), "
                  f"TTFT median {best['ttft_median_s'] * 1000:.0f} ms max {best['ttft_max_s'] * 1000:.0f} ms, "
                  f"per-stream {best['per_stream_decode_tok_s'] or 0:.1f} tok/s, tokens {best['tokens_per_stream']}, "
                  f"peak RSS {peak / MB:.0f} MB", flush=True)
        res["servers"][kind] = levels
    return res


def verdicts(m: dict) -> dict:
    out = {}
    sv = m["servers"]
    if "qwqq" in sv and "llama-server" in sv:
        q8 = next((x for x in sv["qwqq"] if x["streams"] == 8), None)
        l8 = next((x for x in sv["llama-server"] if x["streams"] == 8), None)
        if q8 and l8:
            out["agg8_ratio"] = q8["agg_tok_s"] / l8["agg_tok_s"]
    if "qwqq" in sv:
        q1 = next((x for x in sv["qwqq"] if x["streams"] == 1), None)
        if q1 and q1["per_stream_decode_tok_s"]:
            out["one_ratio"] = q1["per_stream_decode_tok_s"] / m["raw"]["decode_tok_s"]
    return out


# --------------------------------------------------------------------------- doc
def write_doc(res: dict) -> None:
    m = res["machine"]
    a = res["args"]
    L = [HEADING, ""]
    L.append(f"`bench/serve_throughput.py` (qwqq {res['versions']['qwqq commit']}): {a['threads']} threads, "
             f"{a['ctx_per_stream']} tokens of context per stream, greedy (`temperature: 0`, `seed: 0`), every server "
             "started afresh for each N, tokens per stream and rounds as each model's command says. Clients: the "
             "`openai` client streaming `/v1/completions`, N threads released together (in one process that shares "
             "the machine's cores with the server). **TTFT** = request start to its first text delta; **aggregate** = "
             "total completion tokens / (last stream's end - first stream's start), prompt evaluation and queueing "
             "included; **per stream** = (tokens - 1) / (last text delta - first), median over the streams: the "
             "decode rate alone. Raw llama-cpp-python: `Llama.generate` in a process of its own, same threads, "
             "context and flash attention, greedy, the decode rate alone (best of 3). Peak RSS: the server "
             "process's VmHWM at the end of its run. Best round by aggregate (every round's aggregate is in "
             "`bench/results/serve_throughput.json`).")
    L.append("")
    L.append(f"Machine: {m['cpu']}, {m['nproc']} cores, {m['mem_total'] / 2**30:.1f} GiB; Linux {m['kernel']}, "
             f"Python {m['python']}; " + ", ".join(f"{k} {v}" for k, v in res["versions"].items() if v) +
             ".")
    L.append("")
    for name, r in res["models"].items():
        L.append(f"**{r['display']}** (`{r['file']}`, {fmt_mb(r['bytes'])}); raw llama-cpp-python one stream: "
                 f"**{r['raw']['decode_tok_s']:.1f} tok/s**.\n")
        if r.get("command"):
            ra = r["args"]
            L.append(f"Measured by `{r['command']}` ({r['date']}; {ra['max_tokens']} tokens per stream, best of "
                     f"{ra['rounds']} round(s); load average before / after {r['loadavg']}).\n")
        L.append("| server | N | aggregate tok/s | TTFT median / max (ms) | per stream tok/s | tokens / stream | peak RSS |")
        L.append("|---|---:|---:|---:|---:|---:|---:|")
        for kind, levels in r["servers"].items():
            for x in levels:
                ps = f"{x['per_stream_decode_tok_s']:.1f}" if x["per_stream_decode_tok_s"] else "n/a"
                tps = "/".join(map(str, x["tokens_per_stream"])) + (" (chunks)" if "chunks" in x["counted"] else "")
                L.append(f"| {kind} | {x['streams']} | {x['agg_tok_s']:.1f} | {x['ttft_median_s'] * 1000:.0f} / "
                         f"{x['ttft_max_s'] * 1000:.0f} | {ps} | {tps} | {fmt_mb(x['peak_rss'])} |")
        L.append("")
        v = r.get("verdicts", {})
        if "agg8_ratio" in v:
            ok = "meets" if v["agg8_ratio"] >= TARGET_AGG else "**misses**"
            L.append(f"- qwqq / llama-server aggregate at 8 streams: **{v['agg8_ratio']:.2f}** ({ok} the >= {TARGET_AGG} target).")
        if "one_ratio" in v:
            ok = "meets" if v["one_ratio"] >= TARGET_ONE else "**misses**"
            L.append(f"- qwqq one stream / raw llama-cpp-python decode: **{v['one_ratio']:.2f}** ({ok} the >= {TARGET_ONE} target).")
        L.append("")
    L.append("Server commands (N = 8):\n")
    first = next(iter(res["models"].values()))
    for kind, levels in first["servers"].items():
        x = next((y for y in levels if y["streams"] == 8), levels[-1])
        L.append(f"- {kind}: `{x['command']}`")
    notes = [ln for ln in res.get("notes") or [] if ln is not None]
    if notes:
        L.append("")
        L += notes
    replace_section(DOC, HEADING, "\n".join(L) + "\n", before="## vLLM")


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=prog(__spec__), description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="smollm2", help=f"comma-separated, of {', '.join(GGUF)}")
    ap.add_argument("--streams", default="1,4,8,16")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx-per-stream", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--servers", default=",".join(SERVERS))
    ap.add_argument("--add", action="store_true",
                    help="keep the other models of the existing results (each model records its own command)")
    ap.add_argument("--notes", type=Path, help="a Markdown file of findings appended to the doc section")
    ap.add_argument("--render-only", action="store_true", help=f"rewrite the doc from {RESULTS_JSON.relative_to(REPO)}")
    args = ap.parse_args(argv)
    if args.render_only:
        res = json.loads(RESULTS_JSON.read_text())
        if args.notes:
            res["notes"] = args.notes.read_text().rstrip("\n").splitlines()
            RESULTS_JSON.write_text(json.dumps(res, indent=2) + "\n")
        write_doc(res)
        return 0
    args.streams = [int(x) for x in args.streams.split(",")]
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    for s in args.servers:
        if s not in SERVERS:
            ap.error(f"unknown server {s!r}")
    for n in names:
        if n not in GGUF:
            ap.error(f"unknown model {n!r}")
    import tests.fixtures as fixtures

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    llama_server = fixtures.llama_cpp_server() / "llama-server" if "llama-server" in args.servers else None
    cmd = ".venv/bin/python -m bench.serve_throughput " + shlex.join(sys.argv[1:] if argv is None else argv)
    res = {"date": dt.datetime.now().astimezone().isoformat(timespec="seconds"), "command": cmd.strip(),
           "args": {k: v for k, v in vars(args).items() if k not in ("render_only", "notes", "add")}, "machine": machine(),
           "versions": {"qwqq commit": qwqq_git(), "qwqq tree": qwqq_tree(), "llama-cpp-python": version("llama-cpp-python"),
                        "openai": version("openai"), "uvicorn": version("uvicorn")},
           "loadavg_before": " ".join(f"{x:.2f}" for x in os.getloadavg()), "models": {}}
    if args.add and RESULTS_JSON.exists():
        old = json.loads(RESULTS_JSON.read_text())
        res["models"] = {k: v for k, v in old["models"].items() if k not in names}
        res["notes"] = old.get("notes")
    for name in names:
        model = Path(getattr(fixtures, GGUF[name][1])())
        r = bench_model(name, model, args, llama_server)
        r["verdicts"] = verdicts(r)
        r["command"], r["date"], r["args"] = res["command"], res["date"], res["args"]
        r["loadavg"] = f"{res['loadavg_before']} / " + " ".join(f"{x:.2f}" for x in os.getloadavg())
        print(f"[{name}] verdicts {r['verdicts']}", flush=True)
        res["models"][name] = r
    res["loadavg_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    if args.notes:
        res["notes"] = args.notes.read_text().rstrip("\n").splitlines()
    RESULTS_JSON.write_text(json.dumps(res, indent=2) + "\n")
    write_doc(res)
    print(f"wrote {RESULTS_JSON.relative_to(REPO)} and the Throughput section of {DOC.relative_to(REPO)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
