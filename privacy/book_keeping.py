"""Per-sample clipping in one backward pass: book-keeping (Bu et al. 2023, "Differentially private
optimization on large model at small cost").

Opacus' ghost clipping runs two backward passes (norms, then the re-weighted loss). Here the single
backward pass only *records*: each supported layer keeps its input activations ``a`` (forward) and
its output gradients ``g`` (backward), and autograd never forms a weight gradient. From the records:

* per-sample gradient norms (ghost norms): ``nn.Linear`` on ``(B, d)`` input ``||a_i||^2 ||g_i||^2``
  (+ ``||g_i||^2`` for the bias), on ``(B, T, d)`` input ``sum_{t,t'} (a_t . a_t')(g_t . g_t')`` or the
  instantiated ``(p, d)`` per-sample gradient, whichever is cheaper; ``nn.Embedding`` the squared norm
  of each sample's gradient rows (positions of one sample with equal index summed first);
* clip factors ``c_i = min(1, C / (||grad_i|| + 1e-6))`` (Opacus' formula);
* the clipped gradient sum directly: Linear ``sum_i c_i g_i^T a_i`` (one matmul), Embedding an
  ``index_add`` of ``c_i g_{i,t}``;
* then, as Opacus' ``DPOptimizer``: Gaussian noise of std ``noise_multiplier * C`` per parameter (in
  the optimizer's parameter order, one ``torch.normal`` per parameter from the given generator), and
  division by ``expected_batch_size`` for ``loss_reduction="mean"``.

Supported: ``nn.Linear`` and ``nn.Embedding`` (exact types; no ``max_norm``, ``scale_grad_by_freq`` or
``sparse``), each called once per step, batch dimension first; any parameter-free module or op in
between (Tanh, pooling, gathers, masks), as long as no op mixes samples of a batch (the usual DP-SGD
assumption, as in Opacus). A module of any other type that holds trainable parameters raises
:class:`UnsupportedModuleError` at construction, naming its type; frozen parameters are skipped.
A trainable parameter that still receives an ordinary autograd gradient (used outside its layer's
forward, e.g. a tied weight) raises at the step: nothing is silently left unclipped.
``padding_idx`` rows of an embedding get no gradient (as in PyTorch; Opacus' per-sample gradients
would count the padding positions, which is the same whenever their output gradients are zero).
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import Optimizer

CLIP_EPS = 1e-6  # Opacus: clamp(C / (norm + 1e-6), max=1)
SUPPORTED = (nn.Linear, nn.Embedding)


class UnsupportedModuleError(ValueError):
    """A model layer with trainable parameters that book-keeping cannot clip per sample."""


class _Record:
    """What one layer keeps during a step: its input (forward) and output gradient (backward)."""

    __slots__ = ("activations", "backprops", "calls")

    def __init__(self) -> None:
        self.activations: torch.Tensor | None = None
        self.backprops: torch.Tensor | None = None
        self.calls = 0

    def clear(self) -> None:
        self.activations = self.backprops = None
        self.calls = 0


class _LinearBK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, record):
        ctx.save_for_backward(weight)
        ctx.record = record
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        ctx.record.backprops = grad.detach()
        grad_x = grad.matmul(weight) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None  # no weight gradient: the clipped sum is formed from the record


class _EmbeddingBK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, index, weight, padding_idx, record):
        ctx.record = record
        return F.embedding(index, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad):
        ctx.record.backprops = grad.detach()
        return None, None, None, None


def _linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    record = self._bk_record
    if not (self.training and torch.is_grad_enabled()):
        return F.linear(x, self.weight, self.bias)
    record.calls += 1
    record.activations = x.detach()
    return _LinearBK.apply(x, self.weight, self.bias, record)


def _embedding_forward(self: nn.Embedding, index: torch.Tensor) -> torch.Tensor:
    record = self._bk_record
    if not (self.training and torch.is_grad_enabled()):
        return F.embedding(index, self.weight, self.padding_idx)
    record.calls += 1
    record.activations = index.detach()
    return _EmbeddingBK.apply(index, self.weight, self.padding_idx, record)


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters(recurse=False) if p.requires_grad]


def check_supported(model: nn.Module) -> None:
    """Raise :class:`UnsupportedModuleError` unless every module holding a trainable parameter is a
    plain ``nn.Linear`` or ``nn.Embedding`` that book-keeping clips exactly."""
    for name, module in model.named_modules():
        if not _trainable(module):
            continue
        where = f"{name or '<root>'} ({type(module).__module__}.{type(module).__qualname__})"
        if type(module) not in SUPPORTED:
            raise UnsupportedModuleError(
                f"privacy.grad_sample_mode=book cannot clip module {where}: book-keeping supports trainable "
                f"parameters only in nn.Linear and nn.Embedding (use grad_sample_mode=ghost or hooks)")
        if isinstance(module, nn.Embedding) and (module.max_norm is not None or module.scale_grad_by_freq
                                                 or module.sparse):
            raise UnsupportedModuleError(
                f"privacy.grad_sample_mode=book cannot clip module {where}: max_norm, scale_grad_by_freq and "
                "sparse embeddings are not supported")


class BookKeeping:
    """Records of every trainable Linear/Embedding of ``model`` (patched in place until :meth:`close`).

    ``loss_reduction="mean"``: the loss is the mean of the per-sample losses, so a sample's gradient is
    the batch size times what backward gives (Opacus multiplies the output gradients by it; here the
    factor goes into the norms and clip factors). ``"sum"``: the loss is the sum of per-sample losses."""

    def __init__(self, model: nn.Module, loss_reduction: str = "mean") -> None:
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction={loss_reduction!r}: choose mean or sum")
        check_supported(model)
        self.model, self.loss_reduction = model, loss_reduction
        self.layers: list[nn.Module] = [m for m in model.modules() if _trainable(m)]
        self.owner: dict[nn.Parameter, nn.Module] = {p: m for m in self.layers for p in _trainable(m)}
        for module in self.layers:
            module._bk_record = _Record()
            forward = _linear_forward if isinstance(module, nn.Linear) else _embedding_forward
            module.forward = types.MethodType(forward, module)  # instance attribute: undone by close()
        self.per_sample_gradient_norms: torch.Tensor | None = None

    def close(self) -> None:
        """Restore the model's own forward methods and drop the records."""
        for module in self.layers:
            module.__dict__.pop("forward", None)
            module.__dict__.pop("_bk_record", None)
        self.layers = []

    def clear(self) -> None:
        for module in self.layers:
            module._bk_record.clear()

    def _records(self) -> list[tuple[nn.Module, torch.Tensor, torch.Tensor]]:
        """(module, activations, output gradients) of every layer used this step. Under
        ``loss_reduction="mean"`` a sample's gradient is the batch size times what these give: that
        factor is applied to the norms and clip factors, never to the (large) output gradients."""
        out, called = [], 0
        for module in self.layers:
            record = module._bk_record
            if record.calls == 0:
                continue
            called += 1
            name = type(module).__name__
            if record.calls > 1:
                raise RuntimeError(f"book-keeping: a {name} was called {record.calls} times in one step; each "
                                   "layer may be used once per step (its per-sample norm would be wrong)")
            if record.backprops is None:  # its output did not reach the loss: a zero gradient
                continue
            a, g = record.activations, record.backprops
            if a.shape[0] != g.shape[0]:
                raise RuntimeError(f"book-keeping: a {name}'s input and output gradient disagree on the batch size")
            out.append((module, a, g))
        if called and not out:
            raise RuntimeError("book-keeping: the model ran forward but no layer got an output gradient "
                               "(call loss.backward() before the optimizer step)")
        return out

    def batch_size(self, records) -> int:
        sizes = {int(a.shape[0]) for _, a, _ in records}
        if len(sizes) > 1:
            raise RuntimeError(f"book-keeping: layers saw different batch sizes {sorted(sizes)}")
        return sizes.pop() if sizes else 0

    def squared_norms(self, records) -> torch.Tensor:
        """Per-sample squared gradient norms ``(B,)`` over every trainable parameter."""
        batch = self.batch_size(records)
        total = None
        for module, a, g in records:
            part = (_linear_sq_norms(module, a, g) if isinstance(module, nn.Linear)
                    else _embedding_sq_norms(module, a, g))
            total = part if total is None else total + part.to(total.device)
        if total is None:
            ref = next(iter(self.owner), None)
            total = torch.zeros(batch, dtype=ref.dtype if ref is not None else torch.float32,
                                device=ref.device if ref is not None else None)
        return total

    def clipped_sums(self, max_grad_norm: float) -> dict[nn.Parameter, torch.Tensor]:
        """Each trainable parameter's sum over the batch of per-sample gradients clipped to
        ``max_grad_norm`` (zeros for parameters of layers unused this step or on an empty batch)."""
        records = self._records()
        scale = float(self.batch_size(records)) if self.loss_reduction == "mean" else 1.0
        norms = self.squared_norms(records).sqrt() * scale
        self.per_sample_gradient_norms = norms
        factors = (max_grad_norm / (norms + CLIP_EPS)).clamp(max=1.0) * scale  # c_i, and the mean's batch factor
        sums: dict[nn.Parameter, torch.Tensor] = {}
        for module, a, g in records:
            c = factors.to(device=g.device, dtype=g.dtype)
            if isinstance(module, nn.Linear):
                sums.update(_linear_clipped_sum(module, a, g, c))
            else:
                sums.update(_embedding_clipped_sum(module, a, g, c))
        for p in self.owner:
            if p not in sums:
                sums[p] = torch.zeros_like(p)
        return sums


def _flat3(a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, d) and (B, T, p) views of a Linear's input and output gradient (T = 1 for 2-D input)."""
    batch = a.shape[0]
    return a.reshape(batch, -1, a.shape[-1]), g.reshape(batch, -1, g.shape[-1])


def _sq_rows(x: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm of each row of a 2-D tensor, without a temporary of its size."""
    return torch.linalg.vector_norm(x, ord=2, dim=1).square()


def _linear_sq_norms(module: nn.Linear, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    weight_trains, bias_trains = module.weight.requires_grad, module.bias is not None and module.bias.requires_grad
    if a.dim() == 2:
        g2 = _sq_rows(g)
        out = _sq_rows(a.to(g.dtype)) * g2 if weight_trains else torch.zeros_like(g2)
        return out + g2 if bias_trains else out
    a3, g3 = _flat3(a, g)
    steps, d, p = a3.shape[1], a3.shape[2], g3.shape[2]
    out = torch.zeros(a3.shape[0], dtype=g.dtype, device=g.device)
    if weight_trains:
        if steps * steps <= d * p:  # ghost norm
            out = out + (torch.bmm(a3, a3.transpose(1, 2)) * torch.bmm(g3, g3.transpose(1, 2))).sum((1, 2))
        else:  # the per-sample gradient itself is smaller
            out = out + torch.bmm(g3.transpose(1, 2), a3).pow(2).sum((1, 2))
    if bias_trains:
        out = out + g3.sum(1).pow(2).sum(1)
    return out


def _linear_clipped_sum(module: nn.Linear, a, g, c) -> dict[nn.Parameter, torch.Tensor]:
    """``sum_i c_i g_i^T a_i``: the factors scale the (small) input, not the output gradient."""
    a3, g3 = _flat3(a, g)
    flat_g = g3.reshape(-1, g3.shape[-1])  # (B*T, p)
    out = {}
    if module.weight.requires_grad:
        scaled_a = (a3.to(g.dtype) * c.view(-1, 1, 1)).reshape(-1, a3.shape[-1])  # (B*T, d)
        out[module.weight] = flat_g.t().matmul(scaled_a)
    if module.bias is not None and module.bias.requires_grad:
        weights = c.view(-1, 1).expand(-1, g3.shape[1]).reshape(-1)  # c_i for each of sample i's T rows
        out[module.bias] = weights.matmul(flat_g)
    return out


def _embedding_rows(module: nn.Embedding, index: torch.Tensor, g: torch.Tensor):
    """Flat (sample, row, gradient) triples of an embedding call, padding positions dropped."""
    batch, dim = index.shape[0], g.shape[-1]
    rows, grads = index.reshape(-1), g.reshape(-1, dim)
    sample = torch.arange(batch, device=index.device).repeat_interleave(rows.numel() // max(batch, 1))
    if module.padding_idx is not None:
        keep = rows != module.padding_idx
        rows, grads, sample = rows[keep], grads[keep], sample[keep]
    return sample, rows, grads


def _embedding_sq_norms(module: nn.Embedding, index: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    batch = index.shape[0]
    out = torch.zeros(batch, dtype=g.dtype, device=g.device)
    sample, rows, grads = _embedding_rows(module, index, g)
    if rows.numel() == 0:
        return out
    keys, inverse = torch.unique(sample * module.num_embeddings + rows, return_inverse=True)
    summed = torch.zeros(len(keys), grads.shape[1], dtype=g.dtype, device=g.device).index_add_(0, inverse, grads)
    return out.index_add_(0, keys // module.num_embeddings, summed.pow(2).sum(1))


def _embedding_clipped_sum(module: nn.Embedding, index, g, c) -> dict[nn.Parameter, torch.Tensor]:
    sample, rows, grads = _embedding_rows(module, index, g)
    total = torch.zeros_like(module.weight)
    total.index_add_(0, rows, (grads * c[sample].unsqueeze(1)).to(total.dtype))
    return {module.weight: total}


def refuse_ordinary_gradients(params: list[nn.Parameter]) -> None:
    """Raise if autograd gave a recorded parameter an ordinary (unclipped) gradient: it was used outside
    its layer's forward, so its per-sample norm would be missing that use."""
    for p in params:
        if p.grad is not None and bool(p.grad.any()):
            raise RuntimeError(
                f"book-keeping: a parameter of shape {tuple(p.shape)} received an ordinary (unclipped) gradient: "
                "it is used outside its layer's forward (tied or shared weights are not supported)")


class BookKeepingOptimizer:
    """Wraps ``optimizer``: ``step()`` sets each parameter's ``.grad`` to (clipped sum + noise) / expected
    batch size, as Opacus' ``DPOptimizer.pre_step`` does, then steps the wrapped optimizer.

    Noise: ``torch.normal(0, noise_multiplier * max_grad_norm, p.shape, generator=generator, dtype=p.dtype)`` for
    each parameter in the wrapped optimizer's parameter order (Opacus' order and call), also on an
    empty batch (zero sum + noise)."""

    def __init__(self, optimizer: Optimizer, book: BookKeeping, noise_multiplier: float, max_grad_norm: float,
                 expected_batch_size: int, generator: torch.Generator | None = None) -> None:
        self.original_optimizer, self.book = optimizer, book
        self.noise_multiplier, self.max_grad_norm = float(noise_multiplier), float(max_grad_norm)
        self.expected_batch_size, self.generator = expected_batch_size, generator
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        missing = [p for p in self.params if p not in book.owner]
        if missing:
            raise UnsupportedModuleError("book-keeping: the optimizer holds parameters that no supported layer of the "
                                         "model owns (or that are frozen)")

    @property
    def param_groups(self):
        return self.original_optimizer.param_groups

    @property
    def state(self):
        return self.original_optimizer.state

    @property
    def per_sample_gradient_norms(self) -> torch.Tensor | None:
        return self.book.per_sample_gradient_norms

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.book.clear()
        self.original_optimizer.zero_grad(set_to_none)

    @torch.no_grad()
    def pre_step(self) -> None:
        """Clipped sum, noise, scaling into ``p.grad``; clears the records."""
        refuse_ordinary_gradients(self.params)
        sums = self.book.clipped_sums(self.max_grad_norm)
        std = self.noise_multiplier * self.max_grad_norm
        for p in self.params:
            grad = sums.pop(p)  # freshly allocated: updated in place
            if std > 0:
                grad.add_(torch.normal(mean=0, std=std, size=grad.shape, device=grad.device,
                                       generator=self.generator, dtype=grad.dtype))
            if self.book.loss_reduction == "mean":
                grad.div_(self.expected_batch_size)
            p.grad = grad.view_as(p)
        self.book.clear()

    def step(self, closure: Callable[[], float] | None = None):
        if closure is not None:
            with torch.enable_grad():
                closure()
        self.pre_step()
        return self.original_optimizer.step()

    def state_dict(self):
        return self.original_optimizer.state_dict()

    def load_state_dict(self, state_dict) -> None:
        self.original_optimizer.load_state_dict(state_dict)

