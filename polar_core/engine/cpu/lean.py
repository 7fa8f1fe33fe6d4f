"""The lean decode step: one C call per program step while decoding on a CPU.

Decoding one token through transformers' decoder-layer code costs ~25 ms on
2 cores for the default model's 30 layers, of which the weight products on
the GGUF codes are ~10 ms; the rest is the overhead of ~20 small torch ops
per layer call (attention over the cache above all). For the plain pre-norm
families (Llama / SmolLM2, Mistral, Qwen2, Qwen3) whose weights all multiply
as their exact codes (polar_core.engine.cpu.packed), `csrc/lean_step.c`
does a whole step in one call: norm, q/k/v on the codes, rotary, attention
over this step's own KV slot, output projection, residual, norm, gate/up,
SiLU, down, residual; the products and the attention split over one thread
or torch's thread count, whichever has been faster lately (`ThreadChoice`).
The Python loop over the program's steps stays the only control flow
(`LeanDecoding.forward`), and the KV slots are the StepCache's, so loops keep
a slot per visit and the reference path can take over at any pass.

Same model: the weights are the same codes the reference path multiplies,
and only the rounding of sums differs (like two BLAS kernels). Whether a
model qualifies is decided once at load (`lean_decoding`): its structure is
checked, and one call of its layer 0 is compared with the transformers layer.
Everything else keeps the reference path: prompt passes, several rows, more
than MAX_ROWS new tokens, other families, dtypes and devices, and models
without exact codes. `POLAR_LEAN=0` turns the lean step off.
"""
from __future__ import annotations

import ctypes
import functools
import os
import time
from pathlib import Path

import torch

from polar_core.engine.adapter import SLIDING_ATTENTION, Adapter
from polar_core.engine.cache import StepCache
from polar_core.engine.cpu import packed

SOURCE = Path(__file__).parent / "csrc" / "lean_step.c"
LEAN_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
MAX_ROWS = 16  # new tokens per pass (a draft check): at most the Q4_1 codes' max_rows
UNIT = 32  # outputs per unit of work in the C code: every product's outputs are whole units
_FORMATS = {"q4_1": 0, "q8_0": 1}
_LAYER_PARTS = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
_ATTENTION_PARTS = {"q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"}
_MLP_PARTS = {"gate_proj", "up_proj", "down_proj", "act_fn"}


class _Weight(ctypes.Structure):
    _fields_ = [("format", ctypes.c_int32), ("in_features", ctypes.c_int32), ("out_features", ctypes.c_int32),
                ("tile", ctypes.c_int32), ("codes", ctypes.c_void_p), ("scales", ctypes.c_void_p),
                ("mins", ctypes.c_void_p), ("bias", ctypes.c_void_p)]


class _Layer(ctypes.Structure):
    _fields_ = [*((name, _Weight) for name in ("q", "k", "v", "o", "gate", "up", "down")),
                ("attn_norm", ctypes.c_void_p), ("mlp_norm", ctypes.c_void_p),
                ("q_norm", ctypes.c_void_p), ("k_norm", ctypes.c_void_p)]


class _Model(ctypes.Structure):
    _fields_ = [("hidden", ctypes.c_int32), ("heads", ctypes.c_int32), ("kv_heads", ctypes.c_int32),
                ("head_dim", ctypes.c_int32), ("inter", ctypes.c_int32), ("layers", ctypes.c_int32),
                ("eps", ctypes.c_float), ("scale", ctypes.c_float), ("layer", ctypes.POINTER(_Layer)),
                ("final_norm", ctypes.c_void_p), ("head", _Weight)]


@functools.lru_cache(maxsize=None)
def load_library(cache_dir: Path, avx512: bool | None = None) -> tuple[ctypes.CDLL | None, str]:
    """(the compiled lean step or None, why not) for this CPU (see packed.compile_flags)."""
    try:
        library = packed.build_library(cache_dir, SOURCE, (*packed.compile_flags(avx512), "-pthread"))
    except OSError as err:
        return None, f"no lean step ({err})"
    library.lean_vector_width.restype = ctypes.c_int
    pointer, integer = ctypes.c_void_p, ctypes.c_int
    library.lean_step.argtypes = [pointer, integer, pointer, integer, pointer, pointer, integer, integer, integer,
                                  integer, pointer, pointer, integer]
    library.lean_head.argtypes = [pointer, pointer, integer, pointer, integer]
    library.lean_step.restype = library.lean_head.restype = integer
    return library, ""


def _weight(module: torch.nn.Module, keep: list) -> _Weight | str:
    """The C view of a PackedLinear's codes, or why there is none."""
    if type(module) is not packed.PackedLinear or module.code_format not in _FORMATS:
        return "is not multiplied as exact codes"
    if module.out_features % UNIT or module.in_features % UNIT:
        return f"has {module.out_features} x {module.in_features} weights, not multiples of {UNIT}"
    bias = None
    if module.bias is not None:
        bias = module.bias.detach().float().contiguous()
        keep.append(bias)
    tile = next(f.tile for f in packed.FORMATS if f.name == module.code_format)
    return _Weight(_FORMATS[module.code_format], module.in_features, module.out_features, tile,
                   module.codes.data_ptr(), module.scales.data_ptr(), module.mins.data_ptr(),
                   bias.data_ptr() if bias is not None else None)


def _norm(module: torch.nn.Module, size: int, keep: list) -> tuple[int, float] | str:
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if not type(module).__name__.endswith("RMSNorm") or weight is None or tuple(weight.shape) != (size,) or eps is None:
        return f"{type(module).__name__} is not a plain RMSNorm of size {size}"
    weight = weight.detach().contiguous()
    keep.append(weight)
    return weight.data_ptr(), float(eps)


class ThreadChoice:
    """How many threads a lean pass uses: 1 or torch's thread count, whichever
    has been faster lately.

    Results do not depend on it (each output is one thread's sum in a fixed
    order), only the time does: on a machine whose cores are busy with other
    work, a second thread that loses its core for a while costs more than it
    brings, and one thread is faster. One-token passes are timed (seconds per
    program step, a moving average per count); every EXPLORE-th pass tries
    the count not chosen, so the choice follows the machine's load. The
    averages are the only state that changes after load; a lost update
    between threads only delays the choice.
    """

    EXPLORE = 16
    WEIGHT = 0.25  # of the newest timing in the moving average

    def __init__(self):
        self._cost: dict[int, float] = {}
        self._passes = 0

    def pick(self) -> int:
        """The count for the next pass (now and then the other one, to keep its timing fresh)."""
        most = torch.get_num_threads()
        if most <= 1:
            return 1
        self._passes += 1
        for n in (most, 1):
            if n not in self._cost:
                return n
        best = self.best()
        return (1 if best == most else most) if self._passes % self.EXPLORE == 0 else best

    def best(self) -> int:
        """The count that has been faster lately (torch's thread count until both are timed)."""
        most = torch.get_num_threads()
        if most <= 1 or most not in self._cost or 1 not in self._cost:
            return most
        return most if self._cost[most] <= self._cost[1] else 1

    def record(self, threads: int, seconds_per_step: float) -> None:
        old = self._cost.get(threads)
        self._cost[threads] = seconds_per_step if old is None else old + self.WEIGHT * (seconds_per_step - old)


class LeanDecoding:
    """Whether, and how, this model decodes with the lean step (see the module docstring).

    Built once at load by `lean_decoding`; read-only afterwards, so threads share it.
    `note` says what it does or why it is off.
    """

    def __init__(self, note: str, library=None, model: _Model | None = None, keep=(), layer_types=(),
                 sliding_window: int | None = None, shape=(0, 0, 0), sentinel=None, vectors: str = "",
                 switched_off: bool = False):
        self.note = note
        self.vectors = vectors  # "AVX-512" or "AVX2" when ready
        self.switched_off = switched_off  # POLAR_LEAN=0 (said in the status line)
        self._library = library
        self._model = model
        self._keep = list(keep)  # tensors whose memory the C structs point into
        self._windows = [(sliding_window or 0) if t == SLIDING_ATTENTION else 0 for t in layer_types]
        self._layer_types = tuple(layer_types)
        self._kv_heads, self._head_dim, self._vocab = shape
        # A PackedLinear of the model: inside packed.float32_products it is a
        # plain Linear again, and decoding then takes the float32 reference path.
        self._sentinel = sentinel
        self.threads = ThreadChoice()

    @property
    def ready(self) -> bool:
        return self._library is not None

    def __str__(self) -> str:
        return self.note

    def applies(self, tokens: torch.Tensor, programs) -> bool:
        """Whether a cached pass of `tokens` (B, t) under `programs` can take the lean step."""
        return (self._library is not None and tokens.shape[0] == 1 and len(programs) == 1
                and 0 < tokens.shape[1] <= MAX_ROWS and type(self._sentinel) is packed.PackedLinear)

    def forward(self, adapter: Adapter, tokens: torch.Tensor, key_mask: torch.Tensor, path: tuple[int, ...],
                cache: StepCache, capture: str | None = None) -> tuple[torch.Tensor, list[torch.Tensor]] | None:
        """As forward.forward_cached for one row: hidden states (1, t, d) after
        the program's steps and, with capture, [embeddings, after step 1, ...];
        None when the key mask is not left padding then real tokens."""
        rows = tokens.shape[1]
        start = cache.length
        if start + rows > cache.capacity:
            raise RuntimeError(f"KV cache overflow: {start + rows} > capacity {cache.capacity}")
        first_key = 0
        if not bool(key_mask.all()):
            first_key = int((key_mask[0] == 0).sum())
            if bool(key_mask[0, :first_key].any()) or not bool(key_mask[0, first_key:].all()):
                return None
        hidden = adapter.embed(tokens).contiguous()  # (1, t, d), a fresh tensor: updated in place below
        snapshots = [hidden.clone()] if capture else []
        positions = torch.arange(start - first_key, start - first_key + rows, device=hidden.device)[None]
        rope = {kind: (cos.contiguous(), sin.contiguous())
                for kind, (cos, sin) in adapter.position_embeddings(hidden, positions).items()}
        like = hidden.new_empty((1, self._kv_heads, 0, self._head_dim))
        threads = self.threads.pick()
        started = time.perf_counter()
        step = self._library.lean_step
        model, h = ctypes.byref(self._model), hidden.data_ptr()
        for k, layer in enumerate(path):
            keys, values = cache.slot(k, 1, like)
            cos, sin = rope[self._layer_types[layer]]
            failed = step(model, layer, h, rows, keys.data_ptr(), values.data_ptr(), cache.capacity, start, first_key,
                          self._windows[layer], cos.data_ptr(), sin.data_ptr(), threads)
            if failed:
                raise MemoryError("lean step: out of memory") if failed == -1 else ValueError("lean step: bad arguments")
            if capture == "all":
                snapshots.append(hidden.clone())
            elif capture == "last":
                snapshots.append(hidden[:, -1].clone())
        if rows == 1 and not capture:
            self.threads.record(threads, (time.perf_counter() - started) / len(path))
        cache.length += rows
        return hidden, snapshots

    def has_head(self) -> bool:
        return self._library is not None and self._vocab > 0 and type(self._sentinel) is packed.PackedLinear

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head on hidden (n, d): logits (n, V), float32."""
        h = hidden.contiguous()
        out = torch.empty(h.shape[0], self._vocab)
        if self._library.lean_head(ctypes.byref(self._model), h.data_ptr(), h.shape[0], out.data_ptr(),
                                   self.threads.best()):
            raise MemoryError("lean head: out of memory")
        return out


def _describe(model: torch.nn.Module, adapter: Adapter, keep: list) -> tuple[_Model, bool] | str:
    """The C description of the model, whether it has a packed LM head; or why it is not a lean model."""
    config = model.config
    if adapter.family not in LEAN_FAMILIES:
        return f"{adapter.family} layers are not plain pre-norm blocks (lean step: {', '.join(LEAN_FAMILIES)})"
    if getattr(config, "hidden_act", None) not in ("silu", "swish"):
        return f"activation {getattr(config, 'hidden_act', None)!r}, not SiLU"
    if adapter.rope_per_layer_type or adapter.final_logit_softcap is not None:
        return "per-layer rotary tables or logit soft-capping"
    first = adapter.layers[0].self_attn
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = first.head_dim
    hidden, inter = config.hidden_size, config.intermediate_size
    if head_dim % 8 or head_dim > 512 or heads % kv_heads or hidden % UNIT:
        return f"head size {head_dim}, {heads} / {kv_heads} heads, hidden {hidden}"
    norms: set[float] = set()
    layers = (_Layer * len(adapter.layers))()
    for i, layer in enumerate(adapter.layers):
        attn, mlp = layer.self_attn, layer.mlp
        parts = {n for n, _ in layer.named_children()}
        if (parts != _LAYER_PARTS or not {n for n, _ in attn.named_children()} <= _ATTENTION_PARTS
                or {n for n, _ in mlp.named_children()} != _MLP_PARTS):
            return f"layer {i} ({type(layer).__name__}) has parts {sorted(parts)}, not a plain pre-norm block"
        if getattr(attn, "attn_logit_softcapping", None) or abs(attn.scaling - head_dim ** -0.5) > 1e-12 * head_dim:
            return f"layer {i}'s attention scales by {attn.scaling}, not 1/sqrt(head size)"
        weights = {}
        for name, module in (("q", attn.q_proj), ("k", attn.k_proj), ("v", attn.v_proj), ("o", attn.o_proj),
                             ("gate", mlp.gate_proj), ("up", mlp.up_proj), ("down", mlp.down_proj)):
            w = _weight(module, keep)
            if isinstance(w, str):
                return f"layer {i}'s {name} projection {w}"
            weights[name] = w
        shapes = {n: (w.out_features, w.in_features) for n, w in weights.items()}
        expected = {"q": (heads * head_dim, hidden), "k": (kv_heads * head_dim, hidden),
                    "v": (kv_heads * head_dim, hidden), "o": (hidden, heads * head_dim),
                    "gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter)}
        if shapes != expected:
            return f"layer {i}'s projections have shapes {shapes}"
        found = [_norm(layer.input_layernorm, hidden, keep), _norm(layer.post_attention_layernorm, hidden, keep)]
        for name in ("q_norm", "k_norm"):
            if hasattr(attn, name):
                found.append(_norm(getattr(attn, name), head_dim, keep))
        for n in found:
            if isinstance(n, str):
                return f"layer {i}: {n}"
            norms.add(n[1])
        pointers = [n[0] for n in found] + [None] * (4 - len(found))
        layers[i] = _Layer(*weights.values(), *pointers)
    final = _norm(adapter.norm, hidden, keep)
    if isinstance(final, str):
        return f"final norm: {final}"
    norms.add(final[1])
    if len(norms) != 1:
        return f"norms with different epsilons {sorted(norms)}"
    head = _weight(adapter.lm_head, keep)
    has_head = not isinstance(head, str) and head.in_features == hidden
    if not has_head:
        head = _Weight(-1, 0, 0, 0, None, None, None, None)
    keep.append(layers)
    description = _Model(hidden, heads, kv_heads, head_dim, inter, len(adapter.layers), norms.pop(),
                         head_dim ** -0.5, layers, final[0], head)
    return description, has_head


def _check_layer_zero(lean: LeanDecoding, adapter: Adapter) -> str:
    """Compare one lean step of layer 0 with the transformers layer on 3 tokens; '' when they agree."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, adapter.embed_tokens.num_embeddings, (1, 3), generator=generator)
    mask = torch.ones_like(tokens)
    with torch.inference_mode():
        hidden = adapter.embed(tokens)
        reference_cache, lean_cache = StepCache(4), StepCache(4)
        pos = adapter.positions(hidden, mask, 0)
        reference = adapter.run_layer(0, hidden, pos, None, reference_cache.view(0, None, 1))
        ours, _ = lean.forward(adapter, tokens, mask, (0,), lean_cache)
        error = float((ours - reference).abs().max() / reference.abs().max().clamp(min=1e-30))
        keys = float((lean_cache._slots[0][0] - reference_cache._slots[0][0]).abs().max())
    if not error < 1e-4 or not keys < 1e-3:
        return f"lean step differs from the transformers layer (relative error {error:.2g}, keys {keys:.2g})"
    return ""


def lean_decoding(model: torch.nn.Module, adapter: Adapter, cache_dir: Path, *,
                  avx512: bool | None = None) -> LeanDecoding:
    """Decide once, at load, whether this model decodes with the lean step; the
    result says why not. `avx512=False` keeps the C code to AVX2 (see packed.compile_flags)."""
    if os.environ.get("POLAR_LEAN", "1") == "0":
        return LeanDecoding("lean step off (POLAR_LEAN=0)", switched_off=True)
    param = next(model.parameters())
    if param.device.type != "cpu" or param.dtype != torch.float32:
        return LeanDecoding(f"no lean step on {param.device.type} / {str(param.dtype).replace('torch.', '')}")
    keep: list = []
    described = _describe(model, adapter, keep)
    if isinstance(described, str):
        return LeanDecoding(f"no lean step: {described}")
    library, why_not = load_library(cache_dir, avx512)
    if library is None:
        return LeanDecoding(why_not)
    description, has_head = described
    shape = (description.kv_heads, description.head_dim, adapter.lm_head.out_features if has_head else 0)
    sentinel = adapter.layers[0].self_attn.q_proj
    vectors = "AVX-512" if library.lean_vector_width() == 16 else "AVX2"
    lean = LeanDecoding(f"lean decode step (C, one call per program step, {vectors})", library, description, keep,
                        adapter.layer_types, adapter.sliding_window, shape, sentinel, vectors)
    problem = _check_layer_zero(lean, adapter)
    return LeanDecoding(f"no lean step: {problem}") if problem else lean
