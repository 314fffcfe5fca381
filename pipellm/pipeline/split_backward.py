"""One micro batch's backward on a stage, split in two: the input gradient now (B), the weight gradients later (W).

B differentiates the stage's outputs with respect to its inputs only (``torch.autograd.grad``: autograd then
computes no weight gradient) and keeps the graph. On the way it records the gradient arriving at each *boundary
node*: a node on the input path (from the outputs down to the inputs) with an edge toward a trainable parameter
off that path (a linear layer's matmul: the gradient recorded there is dL/dy). W restarts autograd at the
boundary nodes with what was recorded and asks for the parameters only, so it runs just the weight side of each
node (``x^T dy`` for the matmul): B and W together cost one backward. Parameters that share a boundary node run
in one autograd call; where one call's boundary nodes lie on each other's paths, the recorded gradient replaces
what arrives from above, so nothing counts twice. This is the method of PyTorch's pipelining
(``torch.distributed.pipelining``: ``stage_backward_input`` / ``stage_backward_weight``), written here for
DeepSpeed's stages; W accumulates into ``.grad`` through autograd, so parameter hooks run as in one backward.

W instead differentiates the outputs again with respect to the parameters (repeating B's input-path work) when
the split cannot pay or cannot cover every parameter: the stage's inputs take no gradient (the first stage, whose
B is empty), a parameter's gradient does not pass the input path, or ``recompute`` is set (non-reentrant grad
checkpointing recomputes a layer's forward in every autograd call, and the split makes one call per group).

Compiled layers: a ``torch.compile``d graph is one autograd node whose backward computes every gradient it has,
wanted or not. ``separate_weight_grads`` therefore leaves each linear layer of a stage out of the compiled graphs
(a graph break): its matmul stays a node of its own, and W runs only its weight side. A parameter whose boundary
node is a compiled graph (a norm's weight) gets its gradient in B, where that graph's backward computes it anyway.
"""
from __future__ import annotations

import collections
import contextlib
from typing import Callable, ContextManager

import torch
import torch._functorch.config
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge


class GraphBreakLinear(nn.Linear):
    """``nn.Linear`` whose forward ``torch.compile`` does not trace: a compiled function calling it is split into
    graphs before and after it, and its matmul runs eagerly as an autograd node of its own."""

    forward = torch.compiler.disable(nn.Linear.forward, recursive=False)


def separate_weight_grads(module: nn.Module) -> None:
    """Prepare ``module``'s compiled layers for a split backward (once, before training): each ``nn.Linear`` in it
    becomes a ``GraphBreakLinear`` (LoRA's adapters and the base layers they wrap included; subclasses such as a
    quantized base are left as they are), and compiled backwards keep the buffers they would donate, since B keeps
    the graph for W (``retain_graph``), which a backward with donated buffers refuses. The latter is a setting of
    the process, which trains with one schedule. Eager layers compute the same with or without it."""
    for sub in module.modules():
        if type(sub) is nn.Linear:
            sub.__class__ = GraphBreakLinear
    torch._functorch.config.donated_buffer = False


class SplitBackward:
    """B now (``__init__``: the inputs' gradients into their ``.grad``), W later (``weight_grads``).

    ``writing_param_grads``: a context around each autograd call that writes parameter gradients (W's, and B's
    where a compiled graph's parameters take theirs there), for an optimizer that collects them after each."""

    def __init__(self, outputs: list, grads: list | None, inputs: list, params: list, recompute: bool,
                 writing_param_grads: Callable[[], ContextManager] = contextlib.nullcontext):
        self.outputs, self.grads, self.params = outputs, grads, params
        self.writing_param_grads = writing_param_grads
        self.groups, now = (None, []) if recompute or not inputs else _parameter_groups(outputs, inputs, params)
        self.recorded: dict = {}
        self.split = self.groups is not None
        """W runs from the boundary nodes (False: from the outputs again)."""
        hooks = [node.register_prehook(self._recorder(node))
                 for group in self.groups or () for node in group["nodes"]]
        try:
            if inputs:
                for tensor in inputs:
                    tensor.grad = None
                # Into ``.grad`` through autograd: the parameters of ``now`` accumulate as in one backward.
                with writing_param_grads() if now else contextlib.nullcontext():
                    torch.autograd.backward(outputs, grads, inputs=[*inputs, *now], retain_graph=True)
        finally:
            for hook in hooks:
                hook.remove()

    def _recorder(self, node):
        def record(grad_outputs):
            self.recorded[node] = grad_outputs
        return record

    def weight_grads(self) -> None:
        """Every parameter's gradient of this micro batch, accumulated into ``.grad``; the graph is let go."""
        with self.writing_param_grads():
            if self.groups is None:
                torch.autograd.backward(self.outputs, self.grads, inputs=self.params)
            for group in self.groups or ():
                nodes = group["nodes"]
                roots = [(GradientEdge(node, i), grad) for node in nodes
                         for i, grad in enumerate(self.recorded.get(node, ())) if grad is not None]
                # A boundary node also reached from another root of this call gets what B recorded, not the sum.
                clamps = [node.register_prehook(lambda _, recorded=self.recorded[node]: recorded)
                          for node in nodes if node in self.recorded] if len(nodes) > 1 else []
                try:
                    torch.autograd.backward([edge for edge, _ in roots], [grad for _, grad in roots],
                                            inputs=group["params"], retain_graph=True)
                finally:
                    for clamp in clamps:
                        clamp.remove()
        self.outputs = self.grads = self.groups = self.recorded = None


def _parameter_groups(outputs: list, inputs: list, params: list) -> tuple[list[dict] | None, list]:
    """The boundary nodes of each group of parameters (``{"params": [...], "nodes": [...]}``), and the parameters
    that B computes (those with a compiled graph among their boundary nodes); (None, []) when a parameter in the
    graph reaches the outputs without crossing the input path."""
    users = _users([get_gradient_edge(t).node for t in outputs])
    input_path, _ = _toward_outputs([get_gradient_edge(t).node for t in inputs], users, stop=frozenset())
    group_of: dict = {}
    now = []
    for param in params:
        node = get_gradient_edge(param).node
        if node not in users:
            continue  # not used by this micro batch
        _, boundary = _toward_outputs([node], users, stop=input_path)
        if not boundary:
            return None, []
        if any(_is_compiled(n) for n in boundary):
            now.append(param)
            continue
        merged = {id(group_of[n]): group_of[n] for n in boundary if n in group_of}.values()
        group = {"params": [param] + [p for g in merged for p in g["params"]],
                 "nodes": list(dict.fromkeys([*boundary, *(n for g in merged for n in g["nodes"])]))}
        group_of.update((n, group) for n in group["nodes"])
    return list({id(group): group for group in group_of.values()}.values()), now


def _is_compiled(node) -> bool:
    """A ``torch.compile``d graph's backward (AOTAutograd's node), which computes all its gradients at once."""
    return type(node).__name__ == "CompiledFunctionBackward"


def _users(roots: list) -> dict:
    """Each node of the graph below ``roots`` -> the nodes that pass it gradient (its users in the forward)."""
    users: dict = collections.defaultdict(list)
    seen, queue = set(roots), collections.deque(roots)
    while queue:
        node = queue.popleft()
        for child, _ in node.next_functions:
            if child is not None:
                users[child].append(node)
                if child not in seen:
                    seen.add(child)
                    queue.append(child)
    for root in roots:
        users.setdefault(root, [])
    return users


def _toward_outputs(starts: list, users: dict, stop: frozenset | set) -> tuple[set, set]:
    """The nodes reached from ``starts`` toward the outputs without entering ``stop``; the ``stop`` nodes met."""
    seen, met, queue = set(starts), set(), collections.deque(starts)
    while queue:
        for user in users.get(queue.popleft(), ()):
            if user in stop:
                met.add(user)
            elif user not in seen:
                seen.add(user)
                queue.append(user)
    return seen, met
