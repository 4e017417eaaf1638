"""What fit sizes: a model (catalog entry, hub id, local folder or GGUF file) and its GGUF builds.

For a model given by its config.json (catalog, hub, or a folder without weights) the GGUF tensor
list is synthesized from the config by `tensor_shapes`; for a folder with weights it comes from
the checkpoint itself (`gguf.prepared`, as quantize opens it); either way the per-tensor types and
sizes come from `make_plan`, the same plan quantize executes. An existing .gguf is read as is.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from math import prod
from pathlib import Path

from gguf import LlamaFileType

from qwqq.archs import check_gguf_arch, find_arch, hparams
from qwqq.errors import QwqqError, SourceError, UnsupportedError
from qwqq.fit.memory import Dims, Weights, WeightTensor, padded, split_weights
from qwqq.gguf.plan import ModelFacts, make_plan, model_facts
from qwqq.gguf.prepared import Prepared, prepare
from qwqq.gguf.types import MIXTURES
from qwqq.source import Checkpoint
from qwqq.gguf.reader import LazyArray, read_gguf

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
# Metadata bytes per vocabulary entry of a Qwen-style BPE tokenizer (token string, token type,
# merge), measured on the files qwqq writes: used for the header of a model known only by config.
HEADER_BYTES_PER_TOKEN = 39.1
HEADER_FIXED = 16 * 1024  # chat template, scalar keys


# --------------------------------------------------------------------------- what a config implies
def tensor_shapes(config: dict, output_tensor: bool = False) -> list[tuple[str, tuple[int, ...]]]:
    """The GGUF tensors (name, numpy-order shape) a config.json describes, in no particular order: its
    family's own shape function (qwqq/archs/<family>.py)."""
    return find_arch(config).shapes(hparams(config), output_tensor)


def dims_from_config(config: dict) -> Dims:
    arch = find_arch(config)
    return arch.dims(hparams(config), arch)


def facts_from_config(config: dict) -> ModelFacts:
    return model_facts(config, find_arch(config))


def dims_from_gguf(meta: dict, tensors) -> Dims:
    a = meta.get("general.architecture")

    def key(k, default=None):
        v = meta.get(f"{a}.{k}", default)
        if isinstance(v, list):  # per-layer arrays (some architectures): the largest
            v = max(v) if v else default
        return v

    try:
        n_layer, n_embd, n_head = int(key("block_count")), int(key("embedding_length")), int(key("attention.head_count"))
    except (TypeError, ValueError):
        raise UnsupportedError(f"GGUF architecture {a!r}: no block_count / embedding_length / head_count") from None
    n_kv = int(key("attention.head_count_kv", n_head))
    hd_k = int(key("attention.key_length", n_embd // max(1, n_head)))
    hd_v = int(key("attention.value_length", hd_k))
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = getattr(tokens, "count", None) or (len(tokens) if isinstance(tokens, list) else 0)
    emb = next((t for t in tensors if t.name == "token_embd.weight"), None)
    if emb is not None:
        vocab = emb.shape[0] if len(emb.shape) > 1 else vocab  # numpy order: (vocab, hidden)
    n_k, n_v, n_q = n_kv * hd_k, n_kv * hd_v, n_head * hd_k
    if key("attention.kv_lora_rank"):  # MLA (deepseek2): the cache holds the compressed latent
        kv_lora, rope = int(key("attention.kv_lora_rank")), int(key("rope.dimension_count", 64))
        n_kv, n_k, n_v, n_q = 1, kv_lora + rope, kv_lora, n_head * (kv_lora + rope)
    n_layer -= int(key("nextn_predict_layers", 0) or 0)  # MTP blocks: no KV, no state, not loaded
    recurrent = meta.get(f"{a}.attention.recurrent_layers")
    recurrent = tuple(bool(x) for x in list(recurrent)[:n_layer]) if recurrent is not None and key("ssm.inner_size") else ()
    d_inner, d_state = int(key("ssm.inner_size", 0) or 0), int(key("ssm.state_size", 0) or 0)
    n_embd_r = (int(key("ssm.conv_kernel", 1) or 1) - 1) * (d_inner + 2 * int(key("ssm.group_count", 0) or 0) * d_state)
    return Dims(a, n_layer, n_embd, n_head, n_kv, n_k, n_v, n_q, int(key("feed_forward_length", 0) or 0), int(vocab),
                int(key("expert_count", 0) or 0), int(key("expert_used_count", 0) or 0),
                int(key("expert_feed_forward_length", 0) or 0), int(key("context_length", 0) or 0),
                recurrent=recurrent, n_embd_r=n_embd_r if recurrent else 0, n_embd_s=d_state * d_inner if recurrent else 0,
                mla=bool(key("attention.kv_lora_rank")))


# --------------------------------------------------------------------------- catalog
@dataclass(frozen=True)
class CatalogEntry:
    name: str
    hub: tuple[str, ...]
    family: str
    config: dict
    approximate: bool = False
    output_tensor: bool = False  # GGUF: the checkpoint ships lm_head.weight although config.json says tied


@cache
def catalog() -> tuple[CatalogEntry, ...]:
    data = tomllib.loads(resources.files("qwqq.fit").joinpath("data/catalog.toml").read_text(encoding="utf-8"))
    return tuple(CatalogEntry(m["name"], tuple(m.get("hub", ())), m.get("family", ""), m["config"],
                              bool(m.get("approximate", False)), bool(m.get("output_tensor", False)))
                 for m in data["model"])


def find_catalog(spec: str) -> CatalogEntry | None:
    s = spec.strip().lower()
    for e in catalog():
        keys = {e.name.lower(), *(h.lower() for h in e.hub), *(h.split("/")[-1].lower() for h in e.hub)}
        if s in keys:
            return e
    return None


# --------------------------------------------------------------------------- models and builds
@dataclass
class Build:
    """One concrete GGUF: a mixture of a model, or an existing file."""

    type_name: str
    tensors: list[WeightTensor]
    header_bytes: int
    header_exact: bool
    n_params: int
    _split: Weights | None = field(default=None, repr=False)

    def split(self, n_layer: int) -> Weights:
        """The tensor bytes grouped by layer (cached: fit places one build many times)."""
        if self._split is None or self._split.n_layer != n_layer:
            self._split = split_weights(self.tensors, n_layer)
        return self._split

    @property
    def tensor_bytes(self) -> int:
        return sum(padded(t.nbytes) for t in self.tensors)

    @property
    def file_bytes(self) -> int:
        return self.header_bytes + self.tensor_bytes

    @property
    def bits_per_weight(self) -> float:
        return 8 * sum(t.nbytes for t in self.tensors) / max(1, self.n_params)


@dataclass
class Model:
    name: str
    source: str  # "catalog" | "hub" | "local" | "gguf"
    ref: str  # hub id or path to show in commands
    dims: Dims
    config: dict | None = None
    shapes: list[tuple[str, tuple[int, ...]]] | None = None
    facts: ModelFacts | None = None
    approximate: bool = False
    gguf_build: Build | None = None
    prepared: Prepared | None = None  # a local folder with weights, opened and mapped as quantize does
    mtp: bool = True  # False: sized as `quantize --no-mtp` writes it, the multi-token-prediction blocks left out
    _builds: dict[str, Build] = field(default_factory=dict, repr=False)

    @property
    def checkpoint(self) -> Checkpoint | None:
        return self.prepared.ckpt if self.prepared is not None else None

    @property
    def n_params(self) -> int:
        if self.gguf_build is not None:
            return self.gguf_build.n_params
        return sum(prod(s) for _, s in self.shapes)

    @property
    def quantizable(self) -> bool:
        return self.source in ("catalog", "hub", "local") and not self.approximate

    @property
    def has_source_shapes(self) -> bool:
        """Whether its safetensors tensor shapes are known (not a GGUF): what MLX and GPTQ sizes need."""
        return self.quantizable and self.source != "gguf" and self.shapes is not None

    def build(self, type_name: str) -> Build:
        """The GGUF quantize would write for this mixture (or the file itself)."""
        if self.gguf_build is not None:
            return self.gguf_build
        name = type_name.upper()
        if name not in MIXTURES:
            raise QwqqError(f"unknown --type {type_name!r}; choose one of {', '.join(MIXTURES)}")
        if name not in self._builds:
            if self.prepared is not None:  # a folder with weights: exactly what quantize plans and writes
                plan = self.prepared.plan(MIXTURES[name])
                header, exact = len(self.prepared.header(plan)), True
            else:
                plan = make_plan(self.shapes, self.facts, MIXTURES[name])
                header, exact = estimate_header_bytes(plan.tensors, self.dims.n_vocab), False
            tensors = [WeightTensor(t.name, t.shape, t.type, t.nbytes) for t in plan.tensors]
            self._builds[name] = Build(name, tensors, header, exact, plan.n_params)
        return self._builds[name]


def estimate_header_bytes(tensors, n_vocab: int) -> int:
    """GGUF header for a model known only by config: tensor infos exactly, metadata estimated
    from the vocabulary size (tokens, token types and merges dominate)."""
    infos = sum(8 + len(t.name.encode()) + 4 + 8 * len(t.shape) + 4 + 8 for t in tensors)
    return padded(24 + infos + int(HEADER_BYTES_PER_TOKEN * n_vocab) + HEADER_FIXED)


def without_mtp(shapes: list[tuple[str, tuple[int, ...]]], n_layer: int) -> list[tuple[str, tuple[int, ...]]]:
    """The GGUF tensors less the multi-token-prediction blocks (blk.<n_layer> on), as `quantize --no-mtp`
    leaves them out."""
    return [(n, s) for n, s in shapes if not (n.startswith("blk.") and int(n.split(".")[1]) >= n_layer)]


# --------------------------------------------------------------------------- resolving a spec
def resolve(spec: str, mtp: bool = True) -> Model:
    """A .gguf file, a local Hugging Face folder, a catalog model or a hub id (config.json only); `mtp` False:
    sized without its multi-token-prediction blocks (`quantize --no-mtp`)."""
    p = Path(spec).expanduser()
    if spec.lower().endswith(".gguf"):
        if not mtp:
            raise QwqqError(f"--no-mtp sizes a GGUF that quantize would write; {p.name} is written already")
        return from_gguf(p)
    if p.is_dir():
        return _no_mtp(from_folder(p, mtp), mtp)
    entry = find_catalog(spec)
    if entry is not None:
        return _no_mtp(from_catalog(entry), mtp)
    if HUB_ID.match(spec):
        return _no_mtp(from_config(hub_config(spec), spec.split("/")[-1], "hub", spec), mtp)
    names = ", ".join(e.name for e in catalog())
    raise QwqqError(f"unknown model {spec!r}: not a .gguf file, a folder, a hub id (owner/name) or a catalog model ({names})")


def _no_mtp(m: Model, mtp: bool) -> Model:
    """`m` to be sized without its MTP blocks; one line when it has none (as quantize --no-mtp says)."""
    if mtp or m.prepared is not None:  # a folder with weights: prepare() has left them out (or refused)
        return m
    shapes = without_mtp(m.shapes or [], m.dims.n_layer)
    if len(shapes) == len(m.shapes or []):
        raise QwqqError(f"{m.name} has no multi-token-prediction (MTP) layers to leave out: drop --no-mtp")
    m.shapes, m.mtp = shapes, False  # planned from these, as quantize --no-mtp plans its tensors
    return m


def from_catalog(e: CatalogEntry) -> Model:
    return from_config(e.config, e.name, "catalog", e.hub[0] if e.hub else e.name, approximate=e.approximate,
                       output_tensor=e.output_tensor)


def from_config(config: dict, name: str, source: str, ref: str, approximate: bool = False,
                output_tensor: bool = False) -> Model:
    try:
        shapes = tensor_shapes(config, output_tensor)
        approximate = approximate or not find_arch(config).quantizable  # a shape model; qwqq cannot quantize it
        return Model(name, source, ref, dims_from_config(config), config, shapes, facts_from_config(config),
                     approximate=approximate)
    except KeyError as e:
        raise SourceError(f"config.json of {name} lacks {e.args[0]}") from None


def from_folder(root: Path, mtp: bool = True) -> Model:
    cfg_path = root / "config.json"
    if not cfg_path.is_file():
        raise SourceError("no config.json in this folder", root)
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SourceError(f"cannot read config.json: {e}", cfg_path) from None
    if not isinstance(config, dict):
        raise SourceError("config.json is not a JSON object", cfg_path)
    has_weights = any(root.glob("*.safetensors"))
    if not has_weights:
        return from_config(config, root.name, "local", str(root))
    m = from_prepared(prepare(root, mtp=mtp))
    m.mtp = mtp
    return m


def from_prepared(src: Prepared) -> Model:
    """A local folder with weights that quantize has already opened and mapped."""
    c = src.ckpt.config
    return Model(src.ckpt.root.name, "local", str(src.ckpt.root), dims_from_config(c), c,
                 [(t.name, t.shape) for t in src.tensors], src.facts, prepared=src)


def from_gguf(path: Path) -> Model:
    g = read_gguf(path)
    check_gguf_arch(g.architecture, path)
    tensors = [WeightTensor(t.name, tuple(reversed(t.shape)), t.type, t.nbytes) for t in g.tensors]
    meta = {k: (g.array(k) if k.endswith(".attention.recurrent_layers") and isinstance(v, LazyArray) else v)
            for k, v in g.metadata.items()}  # a per-layer array is lazy past 64 layers
    dims = dims_from_gguf(meta, tensors)
    header = g.data_offset
    ftype = g.get("general.file_type")
    try:
        type_name = LlamaFileType(ftype).name.replace("MOSTLY_", "").replace("ALL_", "") if ftype is not None else "?"
    except ValueError:
        type_name = "?"
    n_params = sum(t.n_elements for t in g.tensors)
    build = Build(type_name, tensors, header, True, n_params)
    # file_bytes of an existing file is its size, whatever the padding after the last tensor
    build.header_bytes = g.file_bytes - build.tensor_bytes
    return Model(path.stem, "gguf", str(path), dims, gguf_build=build)


def hub_config(repo_id: str) -> dict:
    """config.json only, through huggingface_hub (honours HF_HUB_OFFLINE and the local cache)."""
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(repo_id, "config.json")
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except Exception as e:  # noqa: BLE001 - huggingface_hub raises many types; all mean "not available"
        why = type(e).__name__
        offline = "offline (HF_HUB_OFFLINE) and not in the local cache" if _offline() else why
        raise SourceError(f"cannot read config.json of {repo_id} from the Hugging Face hub: {offline}") from None
    if not isinstance(config, dict):
        raise SourceError(f"config.json of {repo_id} is not a JSON object")
    return config


def _offline() -> bool:
    import os

    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


__all__ = ["Build", "CatalogEntry", "Model", "catalog", "dims_from_config", "dims_from_gguf", "find_catalog",
           "from_config", "from_folder", "from_gguf", "hub_config", "resolve", "tensor_shapes"]
