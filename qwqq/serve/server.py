"""serve(): settings fitted as `qwqq run` fits them, the port bound (a clear error when taken), the model
loaded in the background while /health answers 503, then uvicorn until SIGINT / SIGTERM (in-flight
requests get a grace period, then whatever still runs is cancelled, and the exit status is 0)."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Callable

from rich.console import Console

from qwqq.errors import QwqqError
from qwqq.run import experts
from qwqq.run.backends import LoadOptions, pick_backend
from qwqq.run.chat import RunOptions
from qwqq.run.fitted import experts_line, fitted_settings, not_llama_cpp, placement
from qwqq.run.sampling import default_sampling
from qwqq.serve.options import ServeOptions, api_key, check_options

GRACE_SECONDS = 10  # in-flight requests may finish within this after SIGTERM / Ctrl-C


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free one)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise QwqqError(f"cannot listen on {host!r}: {e.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise QwqqError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"


def slots_line(opts: ServeOptions) -> str:
    if opts.parallel == 1:
        return "one request decoded at a time"
    share = "sharing one KV pool" if opts.kv_unified else "each with its share of the KV cache"
    return f"{opts.parallel} slots decoded in one batch, {share}"


def run_server(opts: ServeOptions, say: Callable[[str], None]) -> None:
    check_options(opts)
    key = api_key(opts)
    backend = pick_backend(opts.backend, opts.model)
    if backend.name not in ENGINES:
        raise QwqqError(f"qwqq serve runs llama.cpp, mlx and transformers models, not the {backend.name} backend's")
    not_llama_cpp(backend.name, opts)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    run_opts = RunOptions(model=Path(opts.model), ctx=opts.ctx, n_gpu_layers=opts.n_gpu_layers, profile=opts.profile,
                          kv=opts.kv, threads=opts.threads, flash_attn=opts.flash_attn, debug=opts.debug,
                          n_cpu_moe=opts.n_cpu_moe, cpu_moe=opts.cpu_moe, tensor_split=opts.tensor_split)
    settings = fitted_settings(run_opts, backend.name, err)
    experts.check_file(opts.model, settings["n_cpu_moe"])  # a bad N: one line before anything is bound

    import uvicorn

    from qwqq.serve.app import ServerState, create_app
    from qwqq.serve.metrics import Metrics

    name = Path(opts.model).name
    model_id = name.removesuffix(".gguf")
    batched = backend.name == "llama.cpp" or (backend.name == "mlx" and opts.parallel > 1)
    sock = bind(opts.host, opts.port)
    state = ServerState(opts=opts, model_id=model_id, key=key, metrics=Metrics())
    config = uvicorn.Config(create_app(state), log_level="info" if opts.debug else "warning", access_log=opts.debug,
                            timeout_graceful_shutdown=GRACE_SECONDS, lifespan="off")
    server = _server_class()(config)
    loaded: list = []

    def load() -> None:
        start = time.monotonic()
        try:
            model = backend.load(Path(opts.model), LoadOptions(threads=opts.threads, debug=opts.debug, **settings))
            loaded.append(model)
            _ready(state, model, backend.name)
        except Exception as e:  # never left answering "loading" for ever: one line, and the server stops
            state.load_error = str(e) if isinstance(e, QwqqError) else f"cannot load {name}: {type(e).__name__}: {e}"
            server.should_exit = True
            return
        moved = f", {experts_line(settings['n_cpu_moe'], model.overridden)}" if settings["n_cpu_moe"] else ""
        per = " per slot" if backend.name == "llama.cpp" and opts.parallel > 1 else ""
        serial = "; one request at a time: mlx-lm cannot batch this model's caches" if (
            backend.name == "mlx" and len(state.scheduler.slots) < opts.parallel) else ""
        unapplied = state.sampling.presence_penalty and "presence_penalty" not in state.engine.penalties
        unapplied = f"; its presence_penalty {state.sampling.presence_penalty:g} is not applied by {backend.name}" \
            if unapplied else ""
        say(f"ready: {model_id}, context {state.engine.n_ctx} tokens{per}{moved}{serial}{unapplied}, "
            f"loaded in {time.monotonic() - start:.1f} s")

    if backend.name == "llama.cpp":
        where = placement(settings, bool(settings["n_gpu_layers"]) and _gpu_offload())
    else:
        where = f"ctx {settings['ctx']}" if settings["ctx"] else "the model's own context"
    slots = slots_line(opts) if backend.name == "llama.cpp" else (
        f"{opts.parallel} requests decoded in one batch (mlx-lm's BatchGenerator)" if batched
        else "one request at a time")
    say(f"serving {name} ({backend.name}) at {url_of(sock)}: {where}; {slots}, "
        f"up to {opts.max_queue} waiting; {'API key required' if key else 'no API key'}; loading…")
    loader = threading.Thread(target=load, name="qwqq-serve-load", daemon=True)
    loader.start()
    try:
        server.run(sockets=[sock])
    finally:
        loader.join()
        stopped = state.scheduler.stop() if state.scheduler is not None else True
        if stopped:  # else a step is still running on the model: the process exits without freeing it
            for model in loaded:
                model.close()
        sock.close()
    if state.load_error:
        raise QwqqError(state.load_error)


def _llamacpp(model, opts: ServeOptions, metrics):
    from qwqq.serve.batch import BatchScheduler
    from qwqq.serve.llamacpp import LlamaCppEngine

    engine = LlamaCppEngine(model, opts.parallel, opts.kv_unified)
    return engine, BatchScheduler(engine, opts.max_queue, metrics)


def _mlx(model, opts: ServeOptions, metrics):
    from qwqq.serve.mlx import MlxBatchScheduler, batchable
    from qwqq.serve.serial import ModelEngine, SerialScheduler

    if opts.parallel > 1 and batchable(model):
        engine = ModelEngine(model, "mlx-lm", ("presence_penalty", "frequency_penalty"))
        return engine, MlxBatchScheduler(model, opts.parallel, opts.max_queue, metrics)
    return ModelEngine(model, "mlx-lm", ("presence_penalty",)), SerialScheduler(model, opts.max_queue, metrics)


def _transformers(model, opts: ServeOptions, metrics):
    from qwqq.serve.serial import ModelEngine, SerialScheduler

    return ModelEngine(model, "transformers"), SerialScheduler(model, opts.max_queue, metrics)


# What serves each backend's model: (engine, scheduler) from the loaded model. llama.cpp and MLX decode
# --parallel requests in one batch; transformers (and GPTQ folders) one at a time.
ENGINES = {"llama.cpp": _llamacpp, "mlx": _mlx, "transformers": _transformers}


def _ready(state, model, backend: str) -> None:
    """The loaded model behind the routes: engine, sampling defaults, template variables, worker started."""
    engine, scheduler = ENGINES[backend](model, state.opts, state.metrics)
    state.metrics.watch(depth=lambda: scheduler.depth, running=lambda: scheduler.running, slots=lambda: len(scheduler.slots))
    state.sampling = default_sampling(model.metadata, Path(state.opts.model).stem)
    state.template_vars = model.template.variables()
    scheduler.start()
    state.scheduler = scheduler
    state.engine = engine  # last: routes answer from here on


def _gpu_offload() -> bool:
    try:
        import llama_cpp

        return bool(llama_cpp.llama_supports_gpu_offload())
    except Exception:
        return False


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            super().handle_exit(sig, frame)
            # A signal is how a server is meant to stop: shut down gracefully and exit 0, rather than
            # have uvicorn raise the signal again once it is done (a KeyboardInterrupt, or death by SIGTERM).
            self._captured_signals.clear()

    return Server

