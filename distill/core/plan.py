"""`dstudio plan`: the memory a method needs on a teacher, before any weight is read (#31, item 5).

The teacher is built from its folder's configs with every network on the meta device (nothing is allocated), and
each method is built around it as a run would build it: its parameters are then counted by role, exactly. Weights:
the trained copies or LoRA adapters (float32), the frozen networks of the method (the teacher; a LoRA run's shared
base), in float32 or bf16 (trainer.frozen_dtype), and the pipeline's other components (text encoders, VAE; float32).
Gradients: the largest phase's trained parameters (each phase's gradients are freed after its step; in the total,
a phase counts the larger of its activations and its gradients, which backward trades one for the other). AdamW: two
states per parameter of every phase's optimiser (each keeps its states once it has stepped). EMA: the student's
parameters. Activations: the network passes a method's phases hold at once (Method.activation_passes), each traced on
the meta device at the given batch and size: the bytes of the tensors autograd saves for backward
(torch.autograd.graph.saved_tensors_hooks, counted once per storage while they live; parameters excluded), with
attention as the fused kernels run it (scaled_dot_product_attention saves its output and log-sum-exp, not the
attention matrix). On a CPU, the process's own memory (Python, torch, diffusers) comes on top: `baseline`.
"""
from __future__ import annotations

import contextlib
import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dstudio.distill.core.errors import UserError, one_line

GB = 1024 ** 3
FLOAT32, BF16 = 4, 2


class PlanError(UserError):
    """A teacher whose configs cannot be read (a one-line error)."""


# --- the teacher on the meta device -----------------------------------------------------------------------------------

def config_folder(source: str) -> Path:
    """A local pipeline folder, or a hub id's configs and tokenizer files (no weights) downloaded to the cache."""
    path = Path(source).expanduser()
    if path.exists() or source.startswith((".", "/", "~")) or source.count("/") != 1:
        if not path.is_dir():
            raise PlanError(f"teacher '{source}' does not exist: give a pipeline folder or a hub id")
        if not (path / "model_index.json").is_file():
            raise PlanError(f"teacher '{source}' is not a diffusers pipeline folder (no model_index.json)")
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, allow_patterns=["*.json", "*.txt", "*.model", "*tokenizer*", "*vocab*",
                                                              "*merges*", "*spiece*"]))
    except Exception as e:  # offline, unknown id, gated repository: one line
        raise PlanError(f"could not read the configs of '{source}': {one_line(e)}") from None


def meta_component(cls, path: Path):
    """A pipeline component from its folder: models from their config on the meta device, the rest as saved."""
    from diffusers import ModelMixin
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

    if isinstance(cls, type) and issubclass(cls, ModelMixin):
        with torch.device("meta"):
            return cls.from_config(cls.load_config(path)).to("meta")
    if hasattr(cls, "config_class") and isinstance(cls, type) and issubclass(cls, nn.Module):  # transformers
        with torch.device("meta"):
            return cls(cls.config_class.from_pretrained(path)).to("meta")
    if isinstance(cls, type) and issubclass(cls, SchedulerMixin):
        return cls.from_pretrained(path)
    return cls.from_pretrained(path)  # tokenizers, image processors


def meta_pipeline(source: str):
    """The pipeline of a folder (or a hub id's configs) with its networks on the meta device."""
    import diffusers

    from dstudio.distill.core.export import CUSTOM_CLASS, shipped_module
    from dstudio.distill.core.pipeline_dstudio import DStudioPipeline

    folder = config_folder(source)
    index = json.loads((folder / "model_index.json").read_text())
    parts = {}
    for name, spec in index.items():
        if name.startswith("_"):
            continue
        if not isinstance(spec, list) or spec[0] is None:
            parts[name] = None if isinstance(spec, list) else spec
            continue
        module = shipped_module(folder / name, spec[0]) or spec[0]
        parts[name] = meta_component(getattr(importlib.import_module(module), spec[1]), folder / name)
    name = index.get("_class_name")
    if name == CUSTOM_CLASS or name not in vars(diffusers) or "unet" in parts and "vae" not in parts:
        return DStudioPipeline(unet=parts["unet"], scheduler=parts["scheduler"])
    return getattr(diffusers, name)(**parts)


@contextlib.contextmanager
def meta_scalars():
    """Reading a value off a meta tensor (a text encoder's padding check) gives 0 / True instead of raising."""
    item, as_bool = torch.Tensor.item, torch.Tensor.__bool__
    torch.Tensor.item = lambda t: 0 if t.is_meta else item(t)
    torch.Tensor.__bool__ = lambda t: True if t.is_meta else as_bool(t)
    try:
        yield
    finally:
        torch.Tensor.item, torch.Tensor.__bool__ = item, as_bool


@contextlib.contextmanager
def quiet():
    """diffusers' and transformers' warnings off while configs are read and methods built (deprecated scheduler
    keys, tokenizer notes, caption cleaning without bs4): the plan prints only its table."""
    import warnings

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    levels = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        diffusers_logging.set_verbosity(levels[0])
        transformers_logging.set_verbosity(levels[1])


# --- activations: saved-for-backward bytes of a traced pass -----------------------------------------------------------

class SavedBytes:
    """The bytes autograd holds for backward, counted once per storage while any graph node holds it (parameters
    excluded: they are weights); `peak` and `now` as the trace runs."""

    def __init__(self, params):
        self.skip = {p.untyped_storage()._cdata for p in params}
        self.live: dict[int, list[int]] = {}
        self.now = self.peak = 0

    def pack(self, t):
        key = t.untyped_storage()._cdata
        if key in self.skip:
            return None
        entry = self.live.setdefault(key, [t.untyped_storage().nbytes(), 0])
        if entry[1] == 0:
            self.now += entry[0]
            self.peak = max(self.peak, self.now)
        entry[1] += 1
        return _Held(self, key, t.untyped_storage())

    def release(self, key: int) -> None:
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self.live[key]


class _Held:
    """A saved tensor's place in a traced graph: its storage (held, as autograd holds it, so that no other tensor
    reuses its key), released with its bytes when the graph is. Not the tensor: that would hold the tensor's own
    graph alive through a cycle Python cannot collect."""

    __slots__ = ("bytes", "key", "storage")

    def __init__(self, counter: SavedBytes, key: int, storage):
        self.bytes, self.key, self.storage = counter, key, storage

    def __del__(self):
        self.bytes.release(self.key)


def _unpack(held):
    raise RuntimeError("a traced pass is never run backward")


def fused_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
    """scaled_dot_product_attention as fused CPU and GPU kernels run it (flash / memory-efficient: the output and the
    log-sum-exp saved, not the L x L matrix); on the meta device torch would trace its unfused math."""
    if dropout_p == 0.0 and not kwargs.get("enable_gqa"):
        mask = attn_mask if attn_mask is None or attn_mask.is_floating_point() else \
            torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device)  # a boolean mask's float twin
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, is_causal,
                                                                          attn_mask=mask, scale=scale)[0]
    return ATTENTION(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                     **kwargs)


ATTENTION = F.scaled_dot_product_attention


def traced(network: nn.Module, call, tap=None, reader=None) -> tuple[int, int]:
    """(peak, kept) saved bytes of one pass `call()`: its peak, and what stays held after it returns (everything, or
    with a feature `tap` only the graph up to the tapped features, the rest of the pass being dropped, and the graph
    of the `reader` module run on them: the GAN head)."""
    counter = SavedBytes(getattr(network, "base", network).parameters())
    F.scaled_dot_product_attention = fused_attention
    try:
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, _unpack), meta_scalars():
            with tap.capture(network) if tap else contextlib.nullcontext() as features:
                out = call()
            if tap:
                out = reader(features[-1]) if reader is not None else None  # the rest of the pass is dropped
            kept = counter.now
            del features, out
            return counter.peak, kept
    finally:
        F.scaled_dot_product_attention = ATTENTION


def backbone_of(module: nn.Module) -> nn.Module:
    """The network a method's module runs: a denoiser's backbone (through guidance / routing wrappers)."""
    while not hasattr(module, "config") or isinstance(module, nn.ModuleList):
        module = (module[0] if isinstance(module, nn.ModuleList) else getattr(module, "nets", None)
                  or getattr(module, "denoiser", None) or module.model)
    return module


@contextlib.contextmanager
def trainable(network: nn.Module, trained: bool):
    """The network as a phase runs it: its parameters (a LoRA view's: its adapter's) trained or frozen."""
    params = list(network.parameters()) + list(getattr(network, "base", network).parameters())
    before = [p.requires_grad for p in params]
    getattr(network, "base", network).requires_grad_(False)
    network.requires_grad_(trained)
    try:
        yield
    finally:
        for p, flag in zip(params, before):
            p.requires_grad_(flag)


# --- a method's footprint ---------------------------------------------------------------------------------------------

@dataclass
class Footprint:
    """Bytes a method holds at its peak, by role; `frozen_params` are kept in float32 or bf16 (frozen_dtype)."""

    trained: int = 0        # trained weights (float32)
    frozen_params: int = 0  # the method's frozen parameters (the teacher, a LoRA run's base)
    other: int = 0          # the pipeline's other components (text encoders, VAE), float32
    grads: int = 0
    adam: int = 0
    ema: int = 0
    activations: int = 0
    phases: dict = field(default_factory=dict)  # phase -> (its activation peak, its gradients)

    def weights(self, frozen_bytes: int = FLOAT32) -> int:
        return self.trained + self.frozen_params * frozen_bytes + self.other

    def backward_peak(self) -> int:
        """The largest phase's activations or gradients: backward frees a phase's saved activations as it fills its
        gradients, so the two do not peak together."""
        return max((max(pair) for pair in self.phases.values()), default=0)

    def total(self, frozen_bytes: int = FLOAT32) -> int:
        return self.weights(frozen_bytes) + self.adam + self.ema + self.backward_peak()


def _numel(params) -> int:
    return sum(p.numel() for p in params)


def parameter_footprint(method, teacher) -> Footprint:
    """Weights, gradients, AdamW states and EMA of a built method, by role, in bytes (float32 unless frozen)."""
    phases = {ph.name: method.phase_parameters(ph) for ph in method.phases()}
    trained = {id(p): p for params in phases.values() for p in params}
    own = {id(p): p for p in method.parameters()}
    pipeline = {id(p): p for m in teacher.pipeline.components.values() if isinstance(m, nn.Module)
                for p in m.parameters()}
    return Footprint(trained=FLOAT32 * _numel(trained.values()),
                     frozen_params=_numel(p for k, p in own.items() if k not in trained),
                     other=FLOAT32 * _numel(p for k, p in pipeline.items() if k not in own and k not in trained),
                     grads=FLOAT32 * max((_numel(ps) for ps in phases.values()), default=0),
                     adam=2 * FLOAT32 * sum(_numel(ps) for ps in phases.values()),
                     ema=FLOAT32 * _numel(p for p in method.student_net().parameters() if id(p) in trained))


def phase_activations(method, phase, batch: int, cache: dict) -> int:
    """The saved bytes a phase holds at its peak: its passes in order (Method.activation_passes), each pass's peak on
    top of what the passes before it keep."""
    trained = {id(p) for p in method.phase_parameters(phase)}
    held = peak = 0
    for name, extent, *reader in method.activation_passes().get(phase.name, [(method.student_module, "full")]):
        module = getattr(method, name)
        network = backbone_of(module)
        mode = any(id(p) in trained for p in module.parameters())
        n = batch * (2 if getattr(module, "guidance_scale", 1.0) != 1.0 else 1)  # a guided pass: [cond, null]
        key = (type(network).__name__, json.dumps(dict(network.config), sort_keys=True, default=str),
               hasattr(network, "adapter"), mode, extent, n, *reader)
        if key not in cache:
            head = getattr(method, reader[0]) if reader else None
            head = head[0] if isinstance(head, nn.ModuleList) else head
            reads = trainable(head, any(id(p) in trained for p in head.parameters())) if head else contextlib.nullcontext()
            with reads:
                cache[key] = trace_pass(method, network, mode, extent, n, head)
        pass_peak, kept = cache[key]
        peak, held = max(peak, held + pass_peak), held + kept
    return peak


def trace_pass(method, network, trained: bool, extent: str, batch: int, reader=None) -> tuple[int, int]:
    """(peak, kept) saved bytes of one pass of `network` at `batch` on the meta device: trained (its parameters,
    or its LoRA adapter, learn) or frozen (gradients flow to its input only); "tap": to the GAN head's features,
    which `reader` (the head) then reads."""
    from dstudio.distill.core.conditioning import backbone_call

    x = torch.zeros((batch, *method.shape), device="meta", requires_grad=True)
    t = torch.full((batch,), 500.0, device="meta")
    rows = method.conditions.rows
    cond = method.cond(torch.arange(batch) % rows if rows else None)
    tap = method._teacher.feature_tap if extent == "tap" else None
    with trainable(network, trained), torch.enable_grad():
        return traced(network, lambda: backbone_call(network, x, t, cond), tap, reader)


# --- rows: each method, full copies and LoRA --------------------------------------------------------------------------

@dataclass
class PlanRow:
    """One method in one variant ("full" copies or "LoRA rR"): its footprint, or why it does not apply."""

    method: str
    variant: str
    footprint: Footprint | None = None
    reason: str = ""


def plan_teacher(source: str, size: int | None = None):
    """The teacher of a folder or hub id, its networks on the meta device, sampled at size x size (None: its own)."""
    from dstudio.distill.core.teacher import teacher_from_pipeline

    with meta_scalars():
        return teacher_from_pipeline(meta_pipeline(source), str(source), size, size)


def plan_data(teacher):
    """What a method's constructor reads of its data: an image (in model space, on the meta device) of every class,
    or one with its caption."""
    from dstudio.distill.data import LabelledImages

    n = max(teacher.num_classes, 1)  # every class once (MSD draws each student's classes)
    captions = ["a photo"] * n if teacher.takes_prompts else None
    return LabelledImages(torch.zeros(n, *teacher.sample_shape, device="meta"), torch.arange(n),
                          [str(i) for i in range(n)], "plan", captions)


def method_footprint(cls, teacher, options: dict, batch: int, cache: dict) -> Footprint:
    """The footprint of method `cls` built around `teacher` with these method-config keys."""
    from dstudio.distill.core.config import from_dict

    with meta_scalars():
        method = cls(from_dict(cls.Config, options, "method."), teacher=teacher, data=plan_data(teacher))
    method.to("meta")  # what was made on the CPU: LoRA factors, a GAN head
    out = parameter_footprint(method, teacher)
    out.phases = {ph.name: (phase_activations(method, ph, method.micro_batch(batch), cache),
                            FLOAT32 * _numel(method.phase_parameters(ph))) for ph in method.phases()}
    out.activations = max((a for a, _ in out.phases.values()), default=0)
    return out


def plan(source, methods: list[str], rank: int = 64, batch: int = 1, size: int | None = None,
         teacher_factory=None, options: dict | None = None) -> list[PlanRow]:
    """Each method's footprint on the teacher, with full trainable copies and with rank-`rank` LoRA adapters (a
    fresh meta teacher for each: adapters go into the teacher's own network), its config's defaults updated by
    `options`. `teacher_factory()` overrides how the meta teacher is built (a pipeline made in code)."""
    from dstudio.distill.core.method import get_method

    build = teacher_factory or (lambda: plan_teacher(source, size))
    rows, cache = [], {}
    for name in methods:
        cls = get_method(name)
        fields = cls.Config.__dataclass_fields__
        variants = [("full", dict(options or {}))]
        if rank and "lora_rank" in fields:  # adapters adapt the teacher's own weights: students start from them
            variants.append((f"LoRA r{rank}", {**variants[0][1], "lora_rank": rank,
                                               **({"init": "teacher"} if "init" in fields else {})}))
        for variant, keys in variants:
            try:
                rows.append(PlanRow(cls.name, variant, method_footprint(cls, build(), keys, batch, cache)))
            except UserError as e:
                rows.append(PlanRow(cls.name, variant, reason=str(e)))
    return rows


def process_baseline() -> int:
    """This process's resident memory (Python, torch, diffusers loaded): what a CPU run holds before its tensors."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
