"""Activation ranges against float16: forward hooks on every module of a model, by qualified name.

`ActivationPeaks` is the one way vaekit measures activations: `vaekit inspect --precision` reads
its per-layer maxima, the exact rescaling (`vaekit.model.rescale`) plans from them and from the
GroupNorm input variances it can record, and the fp16-safe fine-tune adds its differentiable
penalty on the activations above a limit through the same hooks.
"""

import torch

FP16_MAX = torch.finfo(torch.float16).max  # 65504


# Containers, and modules whose output is their input's (a Dropout in eval mode, an Identity): their
# "activation" is another layer's, listed under that layer.
UNMEASURED = (torch.nn.ModuleList, torch.nn.ModuleDict, torch.nn.Sequential, torch.nn.Dropout, torch.nn.Identity)


class ActivationPeaks:
    """Forward hooks recording the largest |output| of every named module, by qualified name.

    Use as a context manager around forward passes. Options:
    - `group_variance`: every GroupNorm also records the variance of each (image, group) of its
      input, in `variances[name]` (what its eps is compared against when the input is rescaled);
    - `limit` with `penalized` (module names): each output of those modules adds the
      differentiable term sum((|a| / limit - 1)_+^2) / batch to `excess[name]`, so a loss can
      push the activations above `limit` down.
    Maxima are kept as detached device tensors and read once (`maxima`), so a training step does
    not wait for the device at every module.
    """

    def __init__(self, model, group_variance=False, limit=None, penalized=()):
        self.model = model
        self.group_variance = group_variance
        self.limit = limit
        self.penalized = set(penalized) if limit is not None else set()
        self.peaks = {}  # name -> 0-dim tensor, the largest |output| seen
        self.variances = {}  # name -> [(B * G,) tensors], GroupNorm inputs' per-(image, group) variance
        self.excess = {}  # name -> differentiable penalty term (sum over the module's calls)
        self.handles = []

    def __enter__(self):
        for name, module in self.model.named_modules():
            if name and not isinstance(module, UNMEASURED):
                self.handles.append(module.register_forward_hook(self.make_hook(name, module)))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles = []

    @property
    def maxima(self):
        """{module name: largest |output| as a float}, in the order the modules first ran."""
        if not self.peaks:
            return {}
        values = torch.stack([p.float() for p in self.peaks.values()]).cpu().tolist()  # one transfer
        return dict(zip(self.peaks, values))

    def penalty(self):
        """The sum of the `excess` terms (a 0-dim tensor; 0.0 when nothing was penalised)."""
        return sum(self.excess.values()) if self.excess else torch.zeros(())

    def make_hook(self, name, module):
        """A hook folding the module's tensor outputs into the records of `name`."""
        record_variance = self.group_variance and isinstance(module, torch.nn.GroupNorm)
        penalize = name in self.penalized

        def hook(module, inputs, output):
            tensors = output if isinstance(output, (tuple, list)) else (output,)
            for t in tensors:
                if not (torch.is_tensor(t) and t.is_floating_point() and t.numel()):
                    continue
                peak = t.detach().abs().amax()
                self.peaks[name] = torch.maximum(self.peaks[name], peak) if name in self.peaks else peak
                if penalize:
                    over = torch.relu(t.float().abs() / self.limit - 1)
                    term = over.square().sum() / t.shape[0]  # per image: the same at any batch split
                    self.excess[name] = self.excess[name] + term if name in self.excess else term
            if record_variance:
                x = inputs[0].detach().float()
                groups = x.reshape(x.shape[0], module.num_groups, -1)  # (B, G, C/G * H * W)
                self.variances.setdefault(name, []).append(groups.var(dim=-1, unbiased=False).flatten().cpu())

        return hook
